"""Loads the compiled extension: ``ddpm_fast._C`` (the op schemas of ``torch.ops.ddpm_fast`` and the CPU
kernels) and, when the running torch has CUDA, ``libddpm_fast_cuda.so`` (the CUDA kernels).

Both are built on the LibTorch stable ABI, so one build loads on every torch at or above the version it
targets (:func:`target_version`, torch 2.10), whichever torch it was compiled against. :func:`load` refuses an
older torch, a missing or broken build, and says why, naming the installed torch and the build's. A CUDA
library that fails to load leaves the CPU kernels working; the reason is warned once and kept in
:func:`cuda_error`. :func:`available` and :func:`has_cuda` never raise: callers fall back to pure PyTorch when
they say False. Set ``DDPM_FAST_DISABLE_NATIVE=1`` to ignore the extension entirely.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from types import ModuleType

import torch  # must come first: the extension links against libtorch

__all__ = [
    "NativeExtensionError",
    "load",
    "available",
    "has_cuda",
    "load_error",
    "cuda_error",
    "cpu_isa",
    "torch_gemm_avx512",
    "limits",
    "target_version",
]


class NativeExtensionError(ImportError):
    """The native extension is missing, fails to load, or needs a newer torch."""


_module: ModuleType | None = None
_error: str | None = None
_cuda_loaded = False
_cuda_error: str | None = None
_tried = False

_REINSTALL = (
    "reinstall it (pip install --force-reinstall ddpm_fast, or pip install --no-build-isolation . in a checkout)"
)


def _version_tuple(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a torch version string ("2.14.1+cu130", "2.10.0a0+git123" -> (2, 10, 0))."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _build_info() -> ModuleType | None:
    try:
        return importlib.import_module("ddpm_fast._build_info")
    except ImportError:
        return None


def _describe(info) -> str:
    """ "built against torch 2.13.0+cpu for torch >= 2.10.0" (from _C or _build_info)."""
    built = getattr(info, "torch_version", None)
    target = getattr(info, "target_version", None)
    if built is None:
        return "build details unknown"
    return f"built against torch {built} for torch >= {target}" if target else f"built against torch {built}"


def _check_torch(target: str, what: str) -> str | None:
    """Why the running torch cannot use a build targeting `target` (None when it can)."""
    try:
        too_old = _version_tuple(torch.__version__) < _version_tuple(target)
    except ValueError:
        return None  # an unparseable local version: let the import decide
    if too_old:
        return (
            f"ddpm_fast's native extension ({what}) needs torch >= {target}, but torch {torch.__version__} is "
            f"installed; upgrade torch (pip install 'torch>={target}')"
        )
    return None


def _load_cuda(mod: ModuleType) -> None:
    """Loads the CUDA kernels' library when the running torch has CUDA; records why not otherwise."""
    global _cuda_loaded, _cuda_error
    name = getattr(mod, "cuda_library", "")
    if not torch.version.cuda:
        _cuda_error = f"torch {torch.__version__} is a CPU-only build"
        return
    if not name:
        _cuda_error = (
            f"this ddpm_fast build has no CUDA kernels (it was built where CUDA was unavailable: "
            f"{_describe(mod)}); the CPU kernels are in use"
        )
        return
    path = os.path.join(os.path.dirname(mod.__file__), name)
    if not os.path.exists(path):
        _cuda_error = f"the CUDA kernels' library {path} is missing; {_REINSTALL}"
    else:
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError) as exc:
            built_cuda = getattr(mod, "cuda_version", "") or "?"
            _cuda_error = (
                f"the CUDA kernels ({name}, CUDA {built_cuda}, {_describe(mod)}) could not be loaded with torch "
                f"{torch.__version__} (CUDA {torch.version.cuda}): {exc}"
            )
        else:
            _cuda_loaded = True
            return
    warnings.warn(f"ddpm_fast: {_cuda_error}; CUDA tensors use the PyTorch fallbacks", RuntimeWarning, stacklevel=3)


def _try_load() -> None:
    global _module, _error, _tried
    _tried = True
    if os.environ.get("DDPM_FAST_DISABLE_NATIVE", "").strip() not in ("", "0"):
        _error = "disabled by DDPM_FAST_DISABLE_NATIVE"
        return
    info = _build_info()
    if info is not None:
        _error = _check_torch(info.target_version, _describe(info))
        if _error is not None:
            return
    try:
        mod = importlib.import_module("ddpm_fast._C")
    except ModuleNotFoundError as exc:
        _error = (
            f"ddpm_fast._C is missing ({exc}): this ddpm_fast was installed without its native extension; {_REINSTALL}"
        )
        return
    except ImportError as exc:  # a broken build: undefined symbol, missing shared library
        _error = (
            f"ddpm_fast._C ({_describe(info)}) could not be loaded with torch {torch.__version__}: {exc}; {_REINSTALL}"
        )
        return
    target = getattr(mod, "target_version", None)
    if target is None:
        _error = (
            f"ddpm_fast._C (built against torch {getattr(mod, 'torch_version', '?')}) predates the stable-ABI "
            f"build and only works with exactly that torch; torch {torch.__version__} is installed; {_REINSTALL}"
        )
        return
    _error = _check_torch(target, _describe(mod))
    if _error is not None:
        return
    _module = mod
    _load_cuda(mod)


def load() -> ModuleType:
    """Return the extension module, or raise :class:`NativeExtensionError` saying why it is unusable."""
    if not _tried:
        _try_load()
    if _module is None:
        raise NativeExtensionError(_error)
    return _module


def available() -> bool:
    """True when the extension (schemas and CPU kernels) loaded with the installed torch."""
    try:
        load()
    except NativeExtensionError:
        return False
    return True


def has_cuda() -> bool:
    """True when the CUDA kernels' library loaded as well."""
    return available() and _cuda_loaded


def load_error() -> str | None:
    """Why the extension is unusable (None when it is usable)."""
    return None if available() else _error


def cuda_error() -> str | None:
    """Why the CUDA kernels are not in use (None when they are)."""
    if not available():
        return _error
    return None if _cuda_loaded else _cuda_error


def cpu_isa() -> str | None:
    """The CPU kernel build in use ("AVX512", "AVX2" or "DEFAULT"), None without the extension."""
    return _module.cpu_isa() if available() else None


def torch_gemm_avx512() -> bool:
    """Whether torch's CPU GEMM runs AVX-512 kernels here (MKL on an Intel CPU with AVX-512); False without the
    extension. Where it does not, the AVX-512 kernels' own GEMM is faster at every Winograd size."""
    return bool(_module.torch_gemm_avx512()) if available() else False


def limits() -> dict[str, int]:
    """Limits of the kernels (e.g. ``cuda_attention_max_head_dim``), from csrc/limits.h; {} without the extension."""
    return dict(_module.limits) if available() else {}


def target_version() -> str | None:
    """The oldest torch the build loads on ("2.10.0"), None when unknown (no build)."""
    if available():
        return _module.target_version
    info = _build_info()
    return getattr(info, "target_version", None)
