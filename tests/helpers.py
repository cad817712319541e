"""Oracles and tolerances shared by the tests: one place for each rule.

* Images against diffusers (the README's compatibility promise): ``REFERENCE_TOL`` on the reference backend,
  ``FUSED_TOL`` on the fused backend, as max |d| of ``output_type="np"`` images.
* Kernels against float64 (flash-attention's rule): a kernel's error may be at most twice that of the PyTorch
  ops it replaces in the same precision, plus a floor per dtype (:func:`assert_close_rule`).
* Models: the architectures the benchmarks run (``ddpm_fast.bench.common.ARCHS``), and a diffusers / ddpm_fast
  UNet pair with the same weights (:func:`unet_pair`).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from ddpm_fast.bench.common import ARCHS

REFERENCE_TOL = 2e-4
FUSED_TOL = 1e-3

# Floors of the float64 rule: absolute on the CPU (the tests' inputs are O(1)), relative to max |ref| on CUDA.
CPU_FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
CUDA_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CIFAR10_32 = ARCHS["cifar10-32"]["unet"]
CIFAR10_32_SCHEDULER = ARCHS["cifar10-32"]["scheduler"]
# A small model with every block kind the google checkpoints use (attention down/up, mid attention).
TINY = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "sample_size": 16,
    "norm_num_groups": 8,
    "attention_head_dim": None,
    "downsample_padding": 0,
    "norm_eps": 1e-6,
}


def seed_of(*key) -> int:
    """A generator seed fixed by the test's parameters. Python's hash() of a str is salted per process
    (PYTHONHASHSEED), so seeding from it would give every run different inputs."""
    return zlib.crc32(repr(key).encode())


def err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| in float64 (0 for empty tensors)."""
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def assert_close_rule(
    ours: torch.Tensor,
    torch_same: torch.Tensor,
    ref64: torch.Tensor,
    dtype: torch.dtype,
    what: str = "",
    *,
    relative: bool = False,
) -> None:
    """|ours - ref64| <= 2 |torch_same - ref64| + floor(dtype) (times max |ref64| when ``relative``)."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == dtype, f"{what}: dtype {ours.dtype} != {dtype}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite output"
    scale = max(ref64.abs().max().item() if ref64.numel() else 1.0, 1e-6) if relative else 1.0
    floor = (CUDA_FLOOR if relative else CPU_FLOOR)[dtype] * scale
    e_ours, e_torch = err(ours, ref64), err(torch_same, ref64)
    assert e_ours <= 2 * e_torch + floor, f"{what}: ours {e_ours:.3g} vs torch {e_torch:.3g} (+{floor:.3g}, {dtype})"


def layout(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` as ``"contiguous"``, ``"channels_last"`` or ``"strided"`` (every other column of a wider tensor)."""
    if fmt == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if fmt == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def unet_pair(config: dict, seed: int = 0):
    """diffusers' UNet2DModel and ddpm_fast's with the same (seeded) weights, both in eval mode."""
    import diffusers

    import ddpm_fast

    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**config).eval()
    ours = ddpm_fast.UNet2DModel(**config).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def pipeline_images(pipe, steps: int, batch: int = 1, seed: int = 0, output_type: str = "np") -> np.ndarray:
    """``pipe(...)`` images as float32 NHWC numpy from a seeded CPU generator (``"pt"``: converted the same way,
    for dtypes numpy lacks)."""
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(seed)
    images = pipe(batch_size=batch, generator=gen, num_inference_steps=steps, output_type=output_type).images
    if output_type == "pt":
        images = images.float().cpu().permute(0, 2, 3, 1).numpy()
    return images
