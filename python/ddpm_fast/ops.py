"""Typed wrappers over the native ``torch.ops.ddpm_fast`` kernels.

Each wrapper runs the native op when the extension is loaded, covers the inputs' device and no autograd graph is
needed; otherwise a pure-PyTorch composite with the same semantics (autograd always takes it: the native ops have
no backward). Tensor arguments are checked once, by the native op (``csrc/checks.cpp`` names the argument); a
refusal reaches the caller as :class:`ArgumentError`. Python checks only what never reaches C++. The fake (meta)
kernels registered here let ``torch.compile(fullgraph=True)`` trace the native ops.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _native
from .utils.warn import warn_once

__all__ = [
    "ArgumentError",
    "attention",
    "conv3x3_panel_weight",
    "conv3x3_panels",
    "conv3x3_winograd",
    "cpu_memory_stats",
    "empty_cpu_cache",
    "group_norm_silu",
    "group_norm_silu_cat",
    "native_available",
    "panel_linear",
    "panel_weight",
    "scheduler_step",
    "scheduler_step_table",
    "set_cpu_cache_limit",
    "winograd_weight",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns per panel of panel_weight / winograd_weight(panels=True) (csrc/cpu/kernels/panel_gemm_kernel.cpp).
PANEL = 16
# Below this many keys the CPU kernel's two GEMM calls per (batch, head, query block) cost more than they save
# and PyTorch's SDPA is as fast or faster (measured: bench/results/*/kernels*.json).
CPU_ATTENTION_MIN_KEYS = 128
# The CUDA kernel runs without tensor cores: it beats SDPA only in float32 on small problems (batch 1 at the UNets'
# shapes, B*H*L*S*D = 2**24-2**25) and loses at batch 8 (2**28) and in half precision
# (bench/results/nvidia-h200/kernels.json). Above this size, or in fp16/bf16, attention goes to SDPA.
CUDA_ATTENTION_MAX_WORK = 2**26
# DDPM_FAST_CUDA_ATTENTION=mma (read once, here at import; the CUDA library reads it once too) turns on the
# tensor-core kernel for fp16/bf16 (csrc/cuda/attention_mma_kernels.cuh) and sends every half-precision CUDA call
# up to the head-dim limit to it instead of SDPA. Off by default: that kernel has not run on a GPU yet.
CUDA_ATTENTION_MMA = os.environ.get("DDPM_FAST_CUDA_ATTENTION", "") == "mma"


class ArgumentError(ValueError, TypeError):
    """A kernel refused an argument; the message names it and says what was expected.

    Both a ``ValueError`` and a ``TypeError`` (like numpy's ``AxisError``), so code that catches either for a bad
    argument keeps working."""


def native_available() -> bool:
    """True when the compiled kernels are loaded (CPU always; CUDA when built with it)."""
    return _native.available()


def _native_covers(x: torch.Tensor, *others: torch.Tensor | None, any_dtype: bool = False) -> bool:
    """Whether the native op should run these tensors: extension loaded, a device it has kernels for (or meta,
    where its fake runs), no autograd graph needed, and a dtype it has kernels for: float64 inputs, valid for
    the PyTorch composites, go there unless ``any_dtype`` (an op whose composite serves autograd only). Everything
    else about the arguments the op checks itself, with one wording."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not _native.available():
        reason = _native.load_error()
        if reason and "DDPM_FAST_DISABLE_NATIVE" not in reason:
            warn_once(
                "native-unavailable",
                f"ddpm_fast: native kernels unavailable, using PyTorch fallbacks: {reason}",
                UserWarning,
                stacklevel=4,
            )
        return False
    device = x.device.type
    if not (device in ("cpu", "meta") or (device == "cuda" and _native.has_cuda())):
        return False
    if not any_dtype and x.is_floating_point() and x.dtype not in _FLOAT_DTYPES:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in others)):
        return False
    return True


def _refused(op: str, exc: RuntimeError) -> ArgumentError | None:
    """The kernel's argument check, if that is what raised (its message starts with the op's name)."""
    message = str(exc)
    at = message.find(f"{op}: ")
    if at < 0 and not message.startswith(f"{op} ("):
        return None
    return ArgumentError(message[max(at, 0) :].splitlines()[0])


def _run_native(op: str, *args):
    """``torch.ops.ddpm_fast.<op>(*args)``, its argument check's refusal raised as :class:`ArgumentError`."""
    try:
        return getattr(torch.ops.ddpm_fast, op).default(*args)
    except RuntimeError as exc:
        if (refusal := _refused(op, exc)) is not None:
            raise refusal from None
        raise


# --------------------------------------------------------------------------------------------------------
# The CPU kernels' memory pool (csrc/cpu/pool.cpp)


def cpu_memory_stats() -> dict[str, int]:
    """Counters of the memory the CPU kernels keep for their large outputs and scratch (blocks of 4 MiB and up,
    reused call after call so that a forward does not fault its activations in again every time):
    ``cached_bytes`` (free blocks kept), ``live_bytes`` (blocks in use), ``limit_bytes`` (the most kept free;
    ``DDPM_FAST_CPU_POOL_MB``, default a quarter of physical memory, 0 = off), ``hits`` and ``misses``.
    All zero without the native extension. The pool needs torch >= 2.11 (tensors with a deleter); on 2.10 the
    kernels allocate through torch, and the counters stay at zero."""
    if not _native.available():
        return {"cached_bytes": 0, "live_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    return dict(_native.load().cpu_pool_stats())


def empty_cpu_cache() -> None:
    """Free every block the CPU kernels' pool keeps (blocks of live tensors are freed when those die), as
    ``torch.cuda.empty_cache()`` does for CUDA."""
    if _native.available():
        _native.load().cpu_pool_release_cached()


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Keep at most ``limit_bytes`` of free blocks in the CPU kernels' pool (0 turns it off and frees them)."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    if _native.available():
        _native.load().cpu_pool_set_limit(limit_bytes)


# --------------------------------------------------------------------------------------------------------
# GroupNorm (+ time-embedding add) (+ SiLU)


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
    """``SiLU(GroupNorm(x + temb[:, :, None, None]) * weight + bias)`` in one fused pass.

    Args:
        x: ``(N, C, H, W)``, contiguous or channels_last (the output keeps the memory format).
        num_groups: number of groups; must divide ``C``.
        weight, bias: optional ``(C,)`` affine parameters (any float dtype).
        eps: added to the variance.
        temb: optional ``(N, C)`` per-channel term added to ``x`` before the statistics.
        silu: apply SiLU after the affine (False gives the plain GroupNorm).

    Statistics are computed in float32 (stable for ``|mean| >> std``); the output has ``x``'s dtype.
    """
    if _native_covers(x, weight, bias, temb):
        return _run_native("group_norm_silu", x, num_groups, weight, bias, eps, temb, silu)
    return _group_norm_silu_composite(x, num_groups, weight, bias, eps, temb, silu)


def group_norm_silu_cat(
    x: torch.Tensor,
    skip: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    silu: bool = True,
) -> torch.Tensor:
    """``group_norm_silu(torch.cat([x, skip], dim=1), ...)``: on the CPU without building the concatenation (both
    inputs are read where they are; an up block's skip connection), elsewhere as those two ops.

    Args:
        x: ``(N, C1, H, W)``; its memory format is the output's.
        skip: ``(N, C2, H, W)``, x's dtype and device.
        num_groups: must divide ``C1 + C2``; a group may take channels of both.
        weight, bias: optional ``(C1 + C2,)``.
    """
    if not isinstance(skip, torch.Tensor):
        raise TypeError(f"skip: expected a torch.Tensor, got {type(skip).__name__}")
    if x.device.type != "cuda" and _native_covers(x, skip, weight, bias):
        return _run_native("group_norm_silu_cat", x, skip, num_groups, weight, bias, eps, silu)
    return group_norm_silu(torch.cat([x, skip], dim=1), num_groups, weight, bias, eps, silu=silu)


def _group_norm_silu_composite(x, num_groups, weight, bias, eps, temb, silu):
    if temb is not None:
        x = x + temb[:, :, None, None].to(x.dtype)
    if weight is not None and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


# --------------------------------------------------------------------------------------------------------
# Attention


def _attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The routing rule: the native kernel, or PyTorch's SDPA where that is as fast or faster (short CPU key
    sequences; CUDA half precision unless CUDA_ATTENTION_MMA, and large fp32 problems) or the kernel has no
    variant (CUDA head dims above its limit, read from the extension)."""
    if min(q.dim(), k.dim(), v.dim()) < 2:
        return True  # let the kernel refuse it
    if q.device.type == "cpu":
        return k.shape[-2] >= CPU_ATTENTION_MIN_KEYS
    if q.device.type == "cuda":
        head_dim = max(q.shape[-1], v.shape[-1])
        if head_dim > _native.limits()["cuda_attention_max_head_dim"]:
            return False
        if q.dtype != torch.float32:
            return CUDA_ATTENTION_MMA
        return q.numel() // max(q.shape[-1], 1) * k.shape[-2] * head_dim <= CUDA_ATTENTION_MAX_WORK
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale=scale)`` without mask or dropout.

    Args:
        q: ``(B, H, L, D)`` or ``(B, L, D)``; any strides (unit stride along ``D`` avoids a copy).
        k: ``(B, H, S, D)`` (same leading dims as ``q``).
        v: ``(B, H, S, Dv)``.
        scale: multiplier of ``q @ k^T``; ``1 / sqrt(D)`` when None.

    Returns a contiguous ``(B, H, L, Dv)`` (or ``(B, L, Dv)``) tensor; accumulation is in float32. Where the
    native kernel is not the fastest choice (see :func:`_attention_native`) the inputs, once checked, go to SDPA.
    """
    if _native_covers(q, k, v):
        if _attention_native(q, k, v):
            return _run_native("attention", q, k, v, scale)
        # SDPA broadcasts and mixes what the kernel refuses: let the kernel's checks see the inputs first.
        _run_native("attention", q[..., :0, :], k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# --------------------------------------------------------------------------------------------------------
# Scheduler step


def _step_coefs(x0_coefs, prev_coefs) -> tuple[float, ...]:
    if len(x0_coefs) != 2:
        raise ValueError(f"x0_coefs must be (a_x, a_e), got {x0_coefs!r}")
    if len(prev_coefs) != 3:
        raise ValueError(f"prev_coefs must be (c0, c1, c2), got {prev_coefs!r}")
    return tuple(float(c) for c in (*x0_coefs, *prev_coefs))


def step_composite(model_output, sample, noise, a_x, a_e, c0, c1, c2, noise_scale, clip_range):
    """The fused step's formula in PyTorch ops (float32 math, ``sample``'s dtype out); its one Python copy:
    the native kernels implement the same lines (``csrc/kernel_types.h``)."""
    x, e = sample.float(), model_output.float()
    x0 = a_x * x + a_e * e
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    prev = c0 * x0 + c1 * x + c2 * e
    if noise is not None:
        prev = prev + noise_scale * noise.float()
    return prev.to(sample.dtype), x0.to(sample.dtype)


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
    Math in float32, outputs in ``sample``'s dtype. Returns ``(prev_sample, pred_original_sample)``.
    """
    a_x, a_e, c0, c1, c2 = _step_coefs(x0_coefs, prev_coefs)
    clip = None if clip_range is None else float(clip_range)
    if _native_covers(sample, model_output, noise):
        return _run_native(
            "scheduler_step", model_output, sample, noise, a_x, a_e, c0, c1, c2, float(noise_scale), clip
        )
    if noise is not None and noise_scale == 0.0:
        noise = None
    return step_composite(model_output, sample, noise, a_x, a_e, c0, c1, c2, float(noise_scale), clip)


def scheduler_step_table(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    noise: torch.Tensor | None,
    coefs: torch.Tensor,
    index: torch.Tensor,
    clip_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scheduler_step` with the coefficients ``(a_x, a_e, c0, c1, c2, noise_scale)`` taken from row
    ``index[0]`` of ``coefs``, a ``(T, 6)`` float32 tensor on the sample's device. Nothing is read back to the host,
    so a CUDA graph can replay it while the caller advances ``index`` (see :mod:`ddpm_fast.cuda_graphs`)."""
    clip = None if clip_range is None else float(clip_range)
    if _native_covers(sample, model_output, noise):
        return _run_native("scheduler_step_table", model_output, sample, noise, coefs, index, clip)
    row = coefs.index_select(0, index.reshape(1))[0]
    a_x, a_e, c0, c1, c2, noise_scale = row.unbind(0)
    if noise is None:
        noise_scale = 0.0
    return step_composite(model_output, sample, noise, a_x, a_e, c0, c1, c2, noise_scale, clip)


# --------------------------------------------------------------------------------------------------------
# 3x3 convolution by Winograd F(2x2, 3x3) and F(4x4, 3x3)

# Lavin & Gray's matrices: V = B^T d B ((m+2)x(m+2) input patch), U = G g G^T (3x3 filter), Y = A^T M A (m x m).
_WINOGRAD = {
    2: (
        ((1.0, 0.0, -1.0, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, -1.0, 1.0, 0.0), (0.0, 1.0, 0.0, -1.0)),
        ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
        ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0)),
    ),
    4: (
        (
            (4.0, 0.0, -5.0, 0.0, 1.0, 0.0),
            (0.0, -4.0, -4.0, 1.0, 1.0, 0.0),
            (0.0, 4.0, -4.0, -1.0, 1.0, 0.0),
            (0.0, -2.0, -1.0, 2.0, 1.0, 0.0),
            (0.0, 2.0, -1.0, -2.0, 1.0, 0.0),
            (0.0, 4.0, 0.0, -5.0, 0.0, 1.0),
        ),
        (
            (1 / 4, 0.0, 0.0),
            (-1 / 6, -1 / 6, -1 / 6),
            (-1 / 6, 1 / 6, -1 / 6),
            (1 / 24, 1 / 12, 1 / 6),
            (1 / 24, -1 / 12, 1 / 6),
            (0.0, 0.0, 1.0),
        ),
        (
            (1.0, 1.0, 1.0, 1.0, 1.0, 0.0),
            (0.0, 1.0, -1.0, 2.0, -2.0, 0.0),
            (0.0, 1.0, 1.0, 4.0, 4.0, 0.0),
            (0.0, 1.0, -1.0, 8.0, -8.0, 1.0),
        ),
    ),
}
_WINOGRAD_TILE = {16: 2, 36: 4}  # first dimension of a transformed weight -> output tile size


def winograd_weight(weight: torch.Tensor, tile: int = 2, *, panels: bool = False) -> torch.Tensor:
    """The ``((tile + 2)**2, C_in, C_out)`` float32 transform ``G g G^T`` of a ``(C_out, C_in, 3, 3)`` convolution
    weight, computed in float64, as :func:`conv3x3_winograd` takes it (prepare it once per weight).

    ``tile=2`` gives F(2x2, 3x3) (16 planes); ``tile=4`` gives F(4x4, 3x3) (36 planes, 4x fewer multiplies
    than the direct convolution instead of 2.25x; its larger transform coefficients round worse, up to about
    6e-6 of the output's largest value).

    ``panels=True`` returns the same numbers as ``(planes, C_out / 16, C_in, 16)`` column panels (C_out a multiple
    of 16; CPU), which the kernel reads once front to back, split between its threads: faster where there are
    few tiles (the 8x8 level at batch 1), whose GEMMs wait on the weight coming from memory."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (C_out, C_in, 3, 3), got shape {tuple(weight.shape)}")
    if tile not in _WINOGRAD:
        raise ValueError(f"tile must be 2 or 4, got {tile!r}")
    g = torch.tensor(_WINOGRAD[tile][1], dtype=torch.float64, device=weight.device)
    if panels and weight.shape[0] % PANEL:
        raise ValueError(f"panels=True needs C_out a multiple of {PANEL}, got weight shape {tuple(weight.shape)}")
    u = torch.einsum("ia,ocab,jb->ijco", g, weight.detach().to(torch.float64), g)
    u = u.reshape((tile + 2) ** 2, weight.shape[1], weight.shape[0]).to(torch.float32)
    if panels:
        return u.reshape(u.shape[0], u.shape[1], -1, PANEL).permute(0, 2, 1, 3).contiguous()
    return u.contiguous()


def conv3x3_winograd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    silu: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=1)`` (3x3, stride 1) by Winograd F(2x2, 3x3) or F(4x4, 3x3), then
    ``+ residual``, then SiLU, then ``/ output_scale``, in one call.

    Args:
        x: ``(N, C_in, H, W)`` float32, any memory format (channels_last avoids a copy).
        weight: ``winograd_weight(w, tile)`` of the ``(C_out, C_in, 3, 3)`` weight ``w`` (or its ``panels=True``
            form); its first dimension (16 or 36) selects F(2x2, 3x3) or F(4x4, 3x3).
        bias: optional ``(C_out,)``.
        residual: optional ``(N, C_out, H, W)`` added before the SiLU.

    Returns a channels_last ``(N, C_out, H, W)`` float32 tensor. 2.25x (F2) or 4x (F4) fewer multiplies than
    the direct convolution; the result differs from it by float rounding (about 1e-6 relative for F2, a few
    times that for F4).
    """
    if x.device.type != "cuda" and _native_covers(x, weight, bias, residual, any_dtype=True):
        return _run_native("conv3x3_winograd", x, weight, bias, residual, silu, float(output_scale))
    return _conv3x3_winograd_composite(x, weight, bias, residual, silu, output_scale)


def _conv3x3_winograd_composite(x, weight, bias, residual, silu, output_scale):
    """The same algorithm in PyTorch ops (any device, autograd): the reference the kernel is tested against."""
    if weight.dim() == 4:  # column panels back to (planes, C_in, C_out)
        weight = weight.permute(0, 2, 1, 3).reshape(weight.shape[0], weight.shape[2], -1)
    n, c, h, w = x.shape
    tile = _WINOGRAD_TILE[weight.shape[0]]
    p = tile + 2
    th, tw = -(-h // tile), -(-w // tile)
    # overlapping (p x p) patches, one per tile: (N, C, th, tw, p, p)
    d = F.pad(x, (1, tile * tw + 1 - w, 1, tile * th + 1 - h)).unfold(2, p, tile).unfold(3, p, tile)
    bt = torch.tensor(_WINOGRAD[tile][0], dtype=x.dtype, device=x.device)
    at = torch.tensor(_WINOGRAD[tile][2], dtype=x.dtype, device=x.device)
    v = torch.einsum("ia,nchwab,jb->ijnhwc", bt, d, bt).reshape(p * p, n * th * tw, c)
    m = torch.bmm(v, weight).reshape(p, p, n, th, tw, -1)
    y = torch.einsum("ia,abnhwo,jb->nohiwj", at, m, at).reshape(n, -1, tile * th, tile * tw)[:, :, :h, :w]
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    if silu:
        y = F.silu(y)
    if output_scale != 1.0:
        y = y / output_scale
    return y.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------------
# GEMMs of few rows against a weight read once as column panels (PANEL columns each)


def panel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The ``(N / 16, K, 16)`` float32 column panels of an ``(N, K)`` linear weight, as :func:`panel_linear` takes
    it (prepare it once per weight): panel ``p`` holds columns ``16p .. 16p + 15`` of ``weight.T``, row by row.
    N must be a multiple of 16."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] % PANEL:
        raise ValueError(f"weight must be (N, K) with N a multiple of {PANEL}, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    return weight.detach().to(torch.float32).reshape(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def panel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, other: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ w.T + bias (+ other)`` for ``weight = panel_weight(w)``, one call: ``x`` is ``(M, K)`` float32 (rows
    may be strided), ``bias`` ``(N,)``, ``other`` ``(M, N)``; returns a contiguous ``(M, N)`` float32 tensor.

    Meant for few rows (the UNet's deepest levels at batch 1): the kernel reads the weight once, front to back,
    prefetching ahead, where a general GEMM waits on memory; with many rows a blocked GEMM is faster."""
    if x.device.type == "cpu" and _native_covers(x, weight, bias, other, any_dtype=True):
        return _run_native("panel_linear", x, weight, bias, other)
    return _panel_linear_composite(x, weight, bias, other)


def _panel_linear_composite(x, weight, bias, other):
    """The same product in PyTorch ops (any device, autograd)."""
    w = weight.transpose(1, 2).reshape(weight.shape[0] * weight.shape[2], weight.shape[1])  # back to (N, K)
    y = F.linear(x, w, bias)
    return y if other is None else y + other


def conv3x3_panel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The ``(C_out / 16, 9 C_in, 16)`` float32 column panels of a ``(C_out, C_in, 3, 3)`` convolution weight, as
    :func:`conv3x3_panels` takes it (prepare it once per weight): :func:`panel_weight` of the ``(C_out, 9 C_in)``
    matrix whose columns follow the im2col rows' ``(kh, kw, c)`` order. C_out must be a multiple of 16."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or weight.shape[2:] != (3, 3) or weight.shape[0] % PANEL:
        raise ValueError(
            f"weight must be (C_out, C_in, 3, 3) with C_out a multiple of {PANEL}, got shape {tuple(weight.shape)}"
        )
    return panel_weight(weight.detach().permute(0, 2, 3, 1).reshape(weight.shape[0], -1))


def conv3x3_panels(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=1) + residual`` (3x3, stride 1) for ``weight = conv3x3_panel_weight(w)``, one
    call: the panel GEMM (:func:`panel_linear`) over ``x``'s im2col rows, built inside the op. ``x`` is
    ``(N, C_in, H, W)`` float32, any memory format (channels_last avoids a copy), ``bias`` ``(C_out,)``,
    ``residual`` ``(N, C_out, H, W)``; returns a channels_last ``(N, C_out, H, W)`` float32 tensor.

    Meant for few pixels (the UNet's 4x4 level at batch 1), where the convolution waits on its weight coming from
    memory; with more, Winograd or oneDNN are faster."""
    if x.device.type == "cpu" and _native_covers(x, weight, bias, residual, any_dtype=True):
        return _run_native("conv3x3_panels", x, weight, bias, residual)
    return _conv3x3_panels_composite(x, weight, bias, residual)


def _conv3x3_panels_composite(x, weight, bias, residual):
    """The same convolution in PyTorch ops (any device, autograd), its weight unpacked from the panels."""
    o, c = weight.shape[0] * weight.shape[2], weight.shape[1] // 9
    w = weight.transpose(1, 2).reshape(o, 3, 3, c).permute(0, 3, 1, 2)  # back to (C_out, C_in, 3, 3)
    y = F.conv2d(x, w, bias, padding=1)
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------------
# Fake kernels: output metadata exactly as the native kernels produce it. They also run when a real tensor on the
# meta device is mixed with CPU tensors (the dispatcher then picks the Meta kernel): refuse that with the real
# kernels' wording instead of returning an uninitialised tensor.


def _same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """The kernels' device checks, word for word (csrc/checks.cpp): the dispatcher runs the CUDA kernel as soon as
    one argument is on CUDA, and that first requires the main tensor there; then every other tensor must be on
    the main tensor's device."""
    if ref.device.type != "cuda" and any(t is not None and t.device.type == "cuda" for t in others.values()):
        raise RuntimeError(f"{op} (CUDA): {ref_name} must be a CUDA tensor, got device {ref.device}")
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device} (all tensors must be on one device)"
            )


def _step_layout(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None) -> torch.memory_format:
    """The kernels' output layout: ``sample``'s when every operand shares one dense layout, else contiguous."""
    dense = (
        (sample.is_contiguous() or (sample.dim() == 4 and sample.is_contiguous(memory_format=torch.channels_last)))
        and model_output.stride() == sample.stride()
        and (noise is None or noise.stride() == sample.stride())
    )
    return torch.preserve_format if dense else torch.contiguous_format


def _register_fakes() -> None:
    @torch.library.register_fake("ddpm_fast::group_norm_silu")
    def _(x, num_groups, weight, bias, eps, temb, silu):
        _same_device("group_norm_silu", "x", x, weight=weight, bias=bias, temb=temb)
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)

    @torch.library.register_fake("ddpm_fast::group_norm_silu_cat")
    def _(x, skip, num_groups, weight, bias, eps, silu):
        _same_device("group_norm_silu_cat", "x", x, skip=skip, weight=weight, bias=bias)
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        shape = (x.shape[0], x.shape[1] + skip.shape[1], *x.shape[2:])
        return x.new_empty(shape).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

    @torch.library.register_fake("ddpm_fast::attention")
    def _(q, k, v, scale):
        _same_device("attention", "q", q, k=k, v=v)
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    @torch.library.register_fake("ddpm_fast::conv3x3_winograd")
    def _(x, weight, bias, residual, silu, output_scale):
        _same_device("conv3x3_winograd", "x", x, weight=weight, bias=bias, residual=residual)
        out = weight.shape[1] * weight.shape[3] if weight.dim() == 4 else weight.shape[2]
        return x.new_empty((x.shape[0], out, x.shape[2], x.shape[3])).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("ddpm_fast::panel_linear")
    def _(x, weight, bias, other):
        _same_device("panel_linear", "x", x, weight=weight, bias=bias, other=other)
        return x.new_empty((x.shape[0], weight.shape[0] * weight.shape[2]))

    @torch.library.register_fake("ddpm_fast::conv3x3_panels")
    def _(x, weight, bias, residual):
        _same_device("conv3x3_panels", "x", x, weight=weight, bias=bias, residual=residual)
        out = weight.shape[0] * weight.shape[2]
        return x.new_empty((x.shape[0], out, x.shape[2], x.shape[3])).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("ddpm_fast::scheduler_step")
    def _(model_output, sample, noise, a_x, a_e, c0, c1, c2, noise_scale, clip_range):
        _same_device("scheduler_step", "sample", sample, model_output=model_output, noise=noise)
        fmt = _step_layout(model_output, sample, noise if noise_scale != 0.0 else None)
        return torch.empty_like(sample, memory_format=fmt), torch.empty_like(sample, memory_format=fmt)

    @torch.library.register_fake("ddpm_fast::scheduler_step_table")
    def _(model_output, sample, noise, coefs, index, clip_range):
        _same_device(
            "scheduler_step_table", "sample", sample, model_output=model_output, noise=noise, coefs=coefs, index=index
        )
        fmt = _step_layout(model_output, sample, noise)
        return torch.empty_like(sample, memory_format=fmt), torch.empty_like(sample, memory_format=fmt)


if _native.available():
    _register_fakes()
