"""Loads the compiled extension ``ddpm_fast._C`` (which registers ``torch.ops.ddpm_fast.*``).

The extension is only usable with the exact torch it was compiled against (C++ ABI); :func:`load` checks
the version recorded at build time against the installed one and raises with both in the message.
:func:`available` and :func:`has_cuda` never raise: callers fall back to pure PyTorch when they say False.
Set ``DDPM_FAST_DISABLE_NATIVE=1`` to ignore the extension entirely.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch  # must come first: _C links against libtorch

__all__ = ["NativeExtensionError", "load", "available", "has_cuda", "load_error", "cpu_isa"]


class NativeExtensionError(ImportError):
    """The native extension is missing, fails to load, or was built for another torch."""


_module: ModuleType | None = None
_error: str | None = None
_tried = False

_REBUILD = "rebuild it against the installed torch: pip install --no-build-isolation --force-reinstall ddpm_fast (or pip install --no-build-isolation -e . in a checkout)"


def _try_load() -> None:
    global _module, _error, _tried
    _tried = True
    if os.environ.get("DDPM_FAST_DISABLE_NATIVE", "").strip() not in ("", "0"):
        _error = "disabled by DDPM_FAST_DISABLE_NATIVE"
        return
    try:
        mod = importlib.import_module("ddpm_fast._C")
    except ImportError as exc:  # not built, or undefined symbols from a different torch
        _error = (
            f"ddpm_fast._C could not be imported with torch {torch.__version__} ({exc}); "
            f"if it was built against another torch version, {_REBUILD}"
        )
        return
    built = getattr(mod, "torch_version", None)
    if built != torch.__version__:
        _error = (
            f"ddpm_fast._C was built against torch {built} but torch {torch.__version__} is installed; {_REBUILD}"
        )
        return
    _module = mod


def load() -> ModuleType:
    """Return the extension module, or raise :class:`NativeExtensionError` saying why it is unusable."""
    if not _tried:
        _try_load()
    if _module is None:
        raise NativeExtensionError(_error)
    return _module


def available() -> bool:
    """True when the extension loaded and matches the installed torch."""
    try:
        load()
    except NativeExtensionError:
        return False
    return True


def has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return available() and bool(getattr(_module, "with_cuda", False))


def load_error() -> str | None:
    """Why the extension is unusable (None when it is usable)."""
    return None if available() else _error


def cpu_isa() -> str | None:
    """The CPU kernel build in use ("AVX2" or "DEFAULT"), None without the extension."""
    return _module.cpu_isa() if available() and hasattr(_module, "cpu_isa") else None
