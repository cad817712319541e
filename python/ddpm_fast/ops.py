"""Typed wrappers over the native ``torch.ops.ddpm_fast`` kernels.

Each wrapper falls back to a pure-PyTorch composite with the same semantics when the native extension
is not built (or does not cover the input's device), so callers never need to check.

NOTE (skeleton): native dispatch is added by the kernels work; the composites below define the contract.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    temb: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """``SiLU(GroupNorm(x + temb[:, :, None, None]) * weight + bias)`` (SiLU only when ``silu``)."""
    if temb is not None:
        x = x + temb[:, :, None, None]
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale=scale)`` without mask or dropout; (B, H, S, D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def scheduler_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    noise: torch.Tensor | None,
    x0_coefs: tuple[float, float],
    prev_coefs: tuple[float, float, float],
    noise_scale: float = 0.0,
    clip_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One elementwise pass of a DDPM/DDIM step.

    ``x0 = a_x * sample + a_e * model_output`` (then clamped to ``±clip_range`` if given);
    ``prev = c0 * x0 + c1 * sample + c2 * model_output + noise_scale * noise``.
    Returns ``(prev_sample, pred_original_sample)``.
    """
    a_x, a_e = x0_coefs
    c0, c1, c2 = prev_coefs
    x0 = a_x * sample + a_e * model_output
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    prev = c0 * x0 + c1 * sample + c2 * model_output
    if noise is not None and noise_scale != 0.0:
        prev = prev + noise_scale * noise
    return prev, x0
