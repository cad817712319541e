"""Which implementation the models and schedulers use.

``"fused"`` (the default) runs the native kernels of :mod:`ddpm_fast.ops` where they apply;
``"reference"`` runs the pure-PyTorch code that mirrors diffusers line by line (and serves autograd and
training). Choose with :func:`set_backend`, the :func:`backend` context manager, or the environment
variable ``DDPM_FAST_BACKEND`` read at import.
"""

from __future__ import annotations

import contextlib
import os

BACKENDS = ("fused", "reference")
_ENV = "DDPM_FAST_BACKEND"


def _from_env() -> str:
    value = os.environ.get(_ENV, "fused").strip().lower() or "fused"
    if value not in BACKENDS:
        raise ValueError(f"environment variable {_ENV}={value!r}: expected one of {BACKENDS}")
    return value


_current = _from_env()


def set_backend(name: str) -> None:
    """Select ``"fused"`` or ``"reference"`` for every model and scheduler in this process."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"backend name must be one of {BACKENDS}, got {name!r}")
    _current = name


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def backend(name: str):
    """Temporarily select a backend: ``with ddpm_fast.backend("reference"): ...``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_fused() -> bool:
    return _current == "fused"
