"""The one place that decides whether a call may take ddpm_fast's fast path, and which.

Models, op wrappers, schedulers and the CUDA-graph loop all ask this module; none of them keeps a rule of
its own. What turns the fused path off:

========================================  =====================================================================
condition                                 effect
========================================  =====================================================================
backend ``"reference"``                   every model and scheduler runs the pure-PyTorch code that mirrors
(``set_backend``, ``with backend()``,     diffusers op for op (the op wrappers in :mod:`ddpm_fast.ops` keep
``DDPM_FAST_BACKEND=reference``)          using the native kernels: calling one is asking for it)
autograd: grad mode on and an input or    that module runs its reference path (the native ops have no
a parameter requires grad                 backward); op wrappers use their PyTorch composites
autocast enabled on the input's device    reference path: autocast decides the dtypes itself
``torch.compile`` / ``torch.jit`` trace   the custom ops stay (they have fake kernels, so they appear in the
                                          graph); prepared weights (packed oneDNN, Winograd, packed QKV,
                                          CUDA channels_last copies) are not used: the compiler handles convs
native extension missing or disabled      op wrappers run their PyTorch composites, with one warning saying
(``DDPM_FAST_DISABLE_NATIVE=1``)          why; convolutions still use packed oneDNN
device other than CPU, or CUDA without    op wrappers run their PyTorch composites
the CUDA kernels built
dtype other than fp32 / bf16 / fp16       op wrappers run their PyTorch composites
Winograd ``0`` / ``2`` (``set_winograd``, 3x3 convolutions stay on oneDNN / use F(2x2, 3x3) only
``with winograd()``,
``DDPM_FAST_WINOGRAD=0|2``)
``DDPM_FAST_CUDA_GRAPHS=0``,              the denoising loop runs eagerly instead of replaying a CUDA graph
``pipe.enable_cuda_graphs(False)``
``DDPM_FAST_CPU_PLANS=0``,                the UNet's CPU forward runs its Python code on every call instead of
``with cpu_plans(False)``                 replaying the op list recorded for its input signature
                                          (:mod:`ddpm_fast.models.plans`)
========================================  =====================================================================

The choice of backend, Winograd tiles and CPU plans is a :class:`Policy` held in a :mod:`contextvars` variable, so
threads, asyncio tasks and ``with`` blocks never see each other's settings; new threads start from the
environment's defaults. ``torch.compile`` cannot read a context variable, so each thread also keeps a mirror
of its latest setting, which the compiler reads (and guards on) while tracing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch

__all__ = [
    "BACKENDS",
    "WINOGRAD_TILES",
    "Policy",
    "backend",
    "cpu_plans",
    "current",
    "fused_backend",
    "forward_hooked",
    "fused_step",
    "get_backend",
    "global_forward_hooks",
    "prepared_weights_allowed",
    "record_paths",
    "set_backend",
    "set_winograd",
    "use_cpu_plan",
    "use_fused",
    "winograd",
]

BACKENDS = ("fused", "reference")
# Largest Winograd output tile a 3x3 convolution may use: 4 = F(4x4) or F(2x2) (each layer picks), 2 = F(2x2)
# only, 0 = no Winograd.
WINOGRAD_TILES = (0, 2, 4)
_ENV_BACKEND = "DDPM_FAST_BACKEND"
_ENV_WINOGRAD = "DDPM_FAST_WINOGRAD"
_ENV_PLANS = "DDPM_FAST_CPU_PLANS"


@dataclass(frozen=True)
class Policy:
    """What the fast path may do in the current context."""

    backend: str = "fused"
    winograd: int = 4
    cpu_plans: bool = True


def _check_backend(name: object, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name  # type: ignore[return-value]


def _check_winograd(max_tile: object, where: str) -> int:
    if isinstance(max_tile, bool) or max_tile not in WINOGRAD_TILES:
        raise ValueError(
            f"{where} must be one of {WINOGRAD_TILES} (largest Winograd tile; 0 turns it off), got {max_tile!r}"
        )
    return int(max_tile)  # type: ignore[arg-type]


def env_flag(name: str, default: str) -> bool:
    """Environment variable ``name`` (``default`` when unset) as a switch: 1/true/on/yes or 0/false/off/no."""
    value = os.environ.get(name, default).strip().lower()
    if value in ("", "1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"environment variable {name}={value!r}: expected 1/0 (or true/false, on/off)")


def _from_env() -> Policy:
    name = os.environ.get(_ENV_BACKEND, "fused").strip().lower() or "fused"
    tile = os.environ.get(_ENV_WINOGRAD, "4").strip() or "4"
    return Policy(
        backend=_check_backend(name, f"environment variable {_ENV_BACKEND}"),
        winograd=_check_winograd(int(tile) if tile.isdigit() else tile, f"environment variable {_ENV_WINOGRAD}"),
        cpu_plans=env_flag(_ENV_PLANS, "1"),
    )


_DEFAULT = _from_env()
_POLICY: ContextVar[Policy] = ContextVar("ddpm_fast_policy", default=_DEFAULT)


class _TraceMirror(threading.local):
    """The current thread's latest policy, for torch.compile (which cannot call ContextVar.get)."""

    def __init__(self) -> None:
        self.policy = _DEFAULT


_MIRROR = _TraceMirror()


def current() -> Policy:
    """The policy in force for this thread / task."""
    if torch.compiler.is_compiling():
        return _MIRROR.policy
    return _POLICY.get()


def _install(policy: Policy):
    token = _POLICY.set(policy)
    _MIRROR.policy = policy
    return token


def _restore(token, previous: Policy) -> None:
    _POLICY.reset(token)
    _MIRROR.policy = previous


# -- public switches -------------------------------------------------------------------------------------


def set_backend(name: str) -> None:
    """Select ``"fused"`` (the default) or ``"reference"`` for the current thread (and asyncio task)."""
    _install(replace(current(), backend=_check_backend(name, "backend name")))


def get_backend() -> str:
    return current().backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Select a backend inside a block: ``with ddpm_fast.backend("reference"): ...``."""
    previous = current()
    token = _install(replace(previous, backend=_check_backend(name, "backend name")))
    try:
        yield
    finally:
        _restore(token, previous)


def set_winograd(max_tile: int) -> None:
    """Largest Winograd tile for 3x3 CPU convolutions in the current thread: 4 (default), 2 or 0 (off)."""
    _install(replace(current(), winograd=_check_winograd(max_tile, "max_tile")))


@contextlib.contextmanager
def winograd(max_tile: int) -> Iterator[None]:
    """``with ddpm_fast.winograd(0): ...`` runs no convolution as Winograd inside the block (oneDNN instead)."""
    previous = current()
    token = _install(replace(previous, winograd=_check_winograd(max_tile, "max_tile")))
    try:
        yield
    finally:
        _restore(token, previous)


@contextlib.contextmanager
def cpu_plans(enabled: bool) -> Iterator[None]:
    """``with ddpm_fast.fast_path.cpu_plans(False): ...`` runs the UNet's CPU forward eagerly inside the block."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous = current()
    token = _install(replace(previous, cpu_plans=enabled))
    try:
        yield
    finally:
        _restore(token, previous)


# -- decisions ---------------------------------------------------------------------------------------------


def _autocast_on(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def use_fused(x: torch.Tensor, module: torch.nn.Module | None = None) -> bool:
    """Whether ``module`` may run its fused path on input ``x``: fused backend, no autograd graph needed (neither
    ``x`` nor a parameter of ``module`` requires grad while grad mode is on), no autocast on ``x``'s device."""
    if current().backend != "fused":
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or (module is not None and any(p.requires_grad for p in module.parameters()))
    ):
        return False
    return not _autocast_on(x.device.type)


def fused_backend() -> bool:
    """Whether the fused backend is selected (schedulers ask this; their inputs carry no autograd graph)."""
    return current().backend == "fused"


def fused_step(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None = None) -> bool:
    """Whether a scheduler step may run as the fused op: fused backend, and operands the op takes as they are,
    one dtype and one device (diffusers' arithmetic promotes mixed ones; the reference path reproduces that)."""
    if current().backend != "fused":
        return False
    return all(t is None or (t.dtype == sample.dtype and t.device == sample.device) for t in (model_output, noise))


def prepared_weights_allowed() -> bool:
    """Whether weights prepared once (packed, transformed, concatenated copies) may be used: not while
    ``torch.compile`` or ``torch.jit`` traces the model (a cache read there is a graph break or a baked-in
    constant; the compiler prepares weights itself)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())


def use_cpu_plan(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether ``module``'s fused forward on ``x`` may be replayed from a recorded plan: plans on, a CPU input,
    ``module`` in eval mode, and not inside a compiler's or tracer's trace (which records the forward itself).
    The caller has checked :func:`use_fused`; :class:`~ddpm_fast.models.plans.ForwardPlans` checks the rest
    (hooks, submodule modes, parameter changes) on every call."""
    return current().cpu_plans and x.is_cpu and not module.training and prepared_weights_allowed()


def global_forward_hooks() -> bool:
    """Whether a global forward (pre-)hook is registered (``torch.nn.modules.module.register_module_forward_hook``):
    it sees every module call, so nothing may leave a module call out (a recorded plan, a resnet that skips its
    input's concatenation)."""
    g = torch.nn.modules.module
    return bool(
        getattr(g, "_global_forward_hooks", None)
        or getattr(g, "_global_forward_pre_hooks", None)
        or getattr(g, "_global_forward_hooks_always_called", None)
    )


def forward_hooked(module: torch.nn.Module) -> bool:
    """Whether a forward hook, ``module``'s own or a global one, would see a call of ``module``."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or global_forward_hooks()


def winograd_max_tile() -> int:
    return current().winograd


# -- which path ran (tests and benchmarks) -----------------------------------------------------------------

_RECORDER: ContextVar[Counter | None] = ContextVar("ddpm_fast_path_recorder", default=None)


@contextlib.contextmanager
def record_paths() -> Iterator[Counter]:
    """Count which implementation each convolution (and other prepared layer) ran inside the block::

        with ddpm_fast.fast_path.record_paths() as paths:
            unet(x, t)
        paths["conv:winograd4"], paths["conv:packed"], paths["prepare:conv"], ...

    Nothing is counted outside such a block."""
    counts: Counter = Counter()
    token = _RECORDER.set(counts)
    try:
        yield counts
    finally:
        _RECORDER.reset(token)


def add_notes(counts: Counter) -> None:
    """Add ``counts`` (paths noted elsewhere, e.g. while a plan was recorded) to the active block, if any."""
    active = _RECORDER.get()
    if active is not None:
        active.update(counts)


def note(path: str) -> None:
    """Count ``path`` in the active :func:`record_paths` block, if any."""
    if torch.compiler.is_compiling():
        return
    counts = _RECORDER.get()
    if counts is not None:
        counts[path] += 1
