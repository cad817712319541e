"""ddpm_fast: a drop-in, faster ``DDPMPipeline`` for diffusers checkpoints.

``from ddpm_fast import DDPMPipeline`` replaces ``from diffusers import DDPMPipeline``: same checkpoints,
same images for the same seed, fused C++/CUDA kernels underneath.
"""

from __future__ import annotations

import importlib

from .fast_path import backend, get_backend, set_backend, set_winograd, winograd

__version__ = "0.1.0"

# Public names, as diffusers spells them, imported on first use so `import ddpm_fast` stays cheap.
_LAZY = {
    "UNet2DModel": "ddpm_fast.models",
    "UNet2DOutput": "ddpm_fast.models",
    "DDPMScheduler": "ddpm_fast.schedulers",
    "DDIMScheduler": "ddpm_fast.schedulers",
    "DDPMSchedulerOutput": "ddpm_fast.schedulers",
    "DDIMSchedulerOutput": "ddpm_fast.schedulers",
    "DDPMPipeline": "ddpm_fast.pipelines",
    "ImagePipelineOutput": "ddpm_fast.pipelines",
}

__all__ = ["backend", "get_backend", "set_backend", "set_winograd", "winograd", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpm_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
