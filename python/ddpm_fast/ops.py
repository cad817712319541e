"""Typed wrappers over the native ``torch.ops.ddpm_fast`` kernels.

Each wrapper validates its arguments (``TypeError`` / ``ValueError`` naming the argument), then calls the
native op when the extension is loaded and covers the input's device and dtype, else a pure-PyTorch
composite with the same semantics, so callers never need to check. Autograd always takes the composite
(the native ops have no backward). The fake (meta) kernels registered here let
``torch.compile(fullgraph=True)`` trace the native ops.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from . import _native

__all__ = ["group_norm_silu", "attention", "scheduler_step", "conv3x3_winograd", "winograd_weight", "native_available"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned = False


def _native_ops():
    """``torch.ops.ddpm_fast`` when the extension is usable, else None (warning once why not)."""
    global _warned
    if _native.available():
        return torch.ops.ddpm_fast
    if not _warned:
        _warned = True
        reason = _native.load_error()
        if reason and "DDPM_FAST_DISABLE_NATIVE" not in reason:
            warnings.warn(f"ddpm_fast: native kernels unavailable, using PyTorch fallbacks: {reason}", stacklevel=3)
    return None


def native_available() -> bool:
    """True when the compiled kernels are loaded (CPU always; CUDA when built with it)."""
    return _native.available()


def _covers(*tensors: torch.Tensor | None) -> bool:
    """Whether the native op handles these tensors (device, dtype, no autograd)."""
    ref = tensors[0]
    if ref.dtype not in _FLOAT_DTYPES:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    if ref.device.type == "cpu":
        return True
    return ref.device.type == "cuda" and _native.has_cuda()


def _check_tensor(name: str, t: object, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must share a device")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


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
        weight, bias: optional ``(C,)`` affine parameters (x's dtype or float32).
        eps: added to the variance.
        temb: optional ``(N, C)`` per-channel term added to ``x`` before the statistics.
        silu: apply SiLU after the affine (False gives the plain GroupNorm).

    Statistics are computed in float32 (stable for ``|mean| >> std``); the output has ``x``'s dtype.
    """
    if _plain_cpu_inference(x, weight, bias, temb) and type(num_groups) is int and type(silu) is bool:
        try:  # the op checks its arguments itself; on any error the checks below name the culprit
            return torch.ops.ddpm_fast.group_norm_silu.default(x, num_groups, weight, bias, eps, temb, silu)
        except (RuntimeError, TypeError, ValueError):
            pass
    _check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    C = x.shape[1]
    if C % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channel count C={C}")
    for name, p in (("weight", weight), ("bias", bias)):
        _check_tensor(name, p, optional=True)
        if p is not None:
            if p.shape != (C,):
                raise ValueError(f"{name} must have shape ({C},), got {tuple(p.shape)}")
            if p.device != x.device:
                raise ValueError(f"{name} is on {p.device} but x is on {x.device}; they must share a device")
            if p.dtype not in (x.dtype, torch.float32):
                raise ValueError(f"{name} must have x's dtype ({x.dtype}) or float32, got {p.dtype}")
    _check_tensor("temb", temb, optional=True)
    if temb is not None:
        _check_like("temb", temb, "x", x)
        if temb.shape != (x.shape[0], C):
            raise ValueError(f"temb must have shape ({x.shape[0]}, {C}), got {tuple(temb.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    ops = _native_ops()
    if ops is not None and _covers(x, weight, bias, temb):
        return ops.group_norm_silu.default(x, num_groups, weight, bias, float(eps), temb, bool(silu))
    return _group_norm_silu_composite(x, num_groups, weight, bias, eps, temb, silu)


def _plain_cpu_inference(x: object, *others: object) -> bool:
    """Whether a call can go straight to the native CPU op, skipping the Python checks (~5-10 us, a tenth of
    a batch-1 GroupNorm): every tensor a plain CPU float tensor, no autograd, extension loaded. The native op
    checks its arguments itself; callers catch its error and run the Python checks, which raise the
    argument-naming TypeError / ValueError. CUDA calls always take the Python checks first."""
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in _FLOAT_DTYPES or not _native.available():
        return False
    for t in others:
        if t is not None and (type(t) is not torch.Tensor or not t.is_cpu):
            return False
    return not torch.is_grad_enabled() or not (x.requires_grad or any(t is not None and t.requires_grad for t in others))


def _group_norm_silu_composite(x, num_groups, weight, bias, eps, temb, silu):
    if temb is not None:
        x = x + temb[:, :, None, None]
    if weight is not None and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


# --------------------------------------------------------------------------------------------------------
# Attention


CUDA_ATTENTION_MAX_HEAD_DIM = 512
# Below this many keys the CPU kernel's two GEMM calls per (batch, head, query block) cost more than they
# save, and PyTorch's SDPA is as fast or faster (bench/bench_kernels.py: 0.64x at (16, 1, 16, 256)).
CPU_ATTENTION_MIN_KEYS = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale=scale)`` without mask or dropout.

    Args:
        q: ``(B, H, L, D)`` or ``(B, L, D)``; any strides (unit stride along ``D`` avoids a copy).
        k: ``(B, H, S, D)`` (same leading dims as ``q``).
        v: ``(B, H, S, Dv)``.
        scale: multiplier of ``q @ k^T``; ``1 / sqrt(D)`` when None.

    Returns a contiguous ``(B, H, L, Dv)`` (or ``(B, L, Dv)``) tensor; accumulation is in float32.
    """
    if _plain_cpu_inference(q, k, v) and (scale is None or type(scale) is float):
        try:  # the op checks its arguments itself; on any error the checks below name the culprit
            if k.shape[-2] >= CPU_ATTENTION_MIN_KEYS:
                return torch.ops.ddpm_fast.attention.default(q, k, v, scale)
            # SDPA would broadcast leading dims and mix dtypes; only hand it what the checks below accept.
            if q.dim() in (3, 4) and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and q.dtype == k.dtype == v.dtype:
                if q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2] > 0:
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
        except (RuntimeError, TypeError, ValueError, IndexError):
            pass
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    _check_like("k", k, "q", q)
    _check_like("v", v, "q", q)
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(
            f"q, k, v must all be 4-D (B, H, S, D) or all 3-D (B, S, D), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"q, k, v leading dims differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's last dim ({k.shape[-1]}) must equal q's ({q.shape[-1]})")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v has {v.shape[-2]} keys but k has {k.shape[-2]}")
    if k.shape[-2] == 0 and q.shape[-2] > 0:
        raise ValueError("k and v need at least one key")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    ops = _native_ops()
    # The CUDA kernel keeps a query row's accumulator in registers, so it stops at head dim 512 (the
    # widest google checkpoint); wider heads go to PyTorch's SDPA.
    fits = not q.is_cuda or max(q.shape[-1], v.shape[-1]) <= CUDA_ATTENTION_MAX_HEAD_DIM
    if q.device.type == "cpu" and k.shape[-2] < CPU_ATTENTION_MIN_KEYS:
        fits = False
    if ops is not None and fits and _covers(q, k, v):
        return ops.attention.default(q, k, v, None if scale is None else float(scale))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# --------------------------------------------------------------------------------------------------------
# Scheduler step


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
    _check_tensor("model_output", model_output)
    _check_tensor("sample", sample)
    _check_tensor("noise", noise, optional=True)
    _check_like("model_output", model_output, "sample", sample)
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}")
    if noise is not None:
        _check_like("noise", noise, "sample", sample)
        if noise.shape != sample.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but sample has {tuple(sample.shape)}")
    if len(x0_coefs) != 2:
        raise ValueError(f"x0_coefs must be (a_x, a_e), got {x0_coefs!r}")
    if len(prev_coefs) != 3:
        raise ValueError(f"prev_coefs must be (c0, c1, c2), got {prev_coefs!r}")
    if clip_range is not None and not clip_range >= 0:
        raise ValueError(f"clip_range must be >= 0 or None, got {clip_range}")
    a_x, a_e = (float(c) for c in x0_coefs)
    c0, c1, c2 = (float(c) for c in prev_coefs)
    ops = _native_ops()
    if ops is not None and _covers(sample, model_output, noise):
        return ops.scheduler_step.default(
            model_output, sample, noise, a_x, a_e, c0, c1, c2, float(noise_scale),
            None if clip_range is None else float(clip_range),
        )
    x0 = a_x * sample + a_e * model_output
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    prev = c0 * x0 + c1 * sample + c2 * model_output
    if noise is not None and noise_scale != 0.0:
        prev = prev + noise_scale * noise
    return prev, x0


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
        ((4.0, 0.0, -5.0, 0.0, 1.0, 0.0), (0.0, -4.0, -4.0, 1.0, 1.0, 0.0), (0.0, 4.0, -4.0, -1.0, 1.0, 0.0),
         (0.0, -2.0, -1.0, 2.0, 1.0, 0.0), (0.0, 2.0, -1.0, -2.0, 1.0, 0.0), (0.0, 4.0, 0.0, -5.0, 0.0, 1.0)),
        ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
        ((1.0, 1.0, 1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, 2.0, -2.0, 0.0), (0.0, 1.0, 1.0, 4.0, 4.0, 0.0),
         (0.0, 1.0, -1.0, 8.0, -8.0, 1.0)),
    ),
}
_WINOGRAD_TILE = {16: 2, 36: 4}  # first dimension of a transformed weight -> output tile size


def winograd_weight(weight: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """The ``((tile + 2)**2, C_in, C_out)`` float32 transform ``G g G^T`` of a ``(C_out, C_in, 3, 3)`` convolution
    weight, computed in float64, as :func:`conv3x3_winograd` takes it (prepare it once per weight).

    ``tile=2`` gives F(2x2, 3x3) (16 planes); ``tile=4`` gives F(4x4, 3x3) (36 planes, 4x fewer multiplies
    than the direct convolution instead of 2.25x; its larger transform coefficients round worse, up to about
    6e-6 of the output's largest value)."""
    _check_tensor("weight", weight)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (C_out, C_in, 3, 3), got shape {tuple(weight.shape)}")
    if tile not in _WINOGRAD:
        raise ValueError(f"tile must be 2 or 4, got {tile!r}")
    g = torch.tensor(_WINOGRAD[tile][1], dtype=torch.float64, device=weight.device)
    u = torch.einsum("ia,ocab,jb->ijco", g, weight.detach().to(torch.float64), g)
    return u.reshape((tile + 2) ** 2, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


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
        weight: ``winograd_weight(w, tile)`` of the ``(C_out, C_in, 3, 3)`` weight ``w``; its first dimension
            (16 or 36) selects F(2x2, 3x3) or F(4x4, 3x3).
        bias: optional ``(C_out,)``.
        residual: optional ``(N, C_out, H, W)`` added before the SiLU.

    Returns a channels_last ``(N, C_out, H, W)`` float32 tensor. 2.25x (F2) or 4x (F4) fewer multiplies than
    the direct convolution; the result differs from it by float rounding (about 1e-6 relative for F2, a few
    times that for F4).
    """
    if _plain_cpu_inference(x, weight, bias, residual) and type(silu) is bool:
        try:  # the op checks its arguments itself; on any error the checks below name the culprit
            return torch.ops.ddpm_fast.conv3x3_winograd.default(x, weight, bias, residual, silu, float(output_scale))
        except (RuntimeError, TypeError, ValueError):
            pass
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if weight.dim() != 3 or weight.shape[0] not in _WINOGRAD_TILE or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must be the (16 or 36, C_in={x.shape[1]}, C_out) output of winograd_weight, "
            f"got {tuple(weight.shape)}"
        )
    _check_like("weight", weight, "x", x)
    out_shape = (x.shape[0], weight.shape[2], x.shape[2], x.shape[3])
    for name, t, shape in (("bias", bias, (weight.shape[2],)), ("residual", residual, out_shape)):
        _check_tensor(name, t, optional=True)
        if t is not None:
            _check_like(name, t, "x", x)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not (math.isfinite(output_scale) and output_scale != 0):
        raise ValueError(f"output_scale must be finite and nonzero, got {output_scale}")
    ops = _native_ops()
    if ops is not None and x.device.type == "cpu" and _covers(x, weight, bias, residual):
        return ops.conv3x3_winograd.default(x, weight, bias, residual, bool(silu), float(output_scale))
    return _conv3x3_winograd_composite(x, weight, bias, residual, silu, output_scale)


def _conv3x3_winograd_composite(x, weight, bias, residual, silu, output_scale):
    """The same algorithm in PyTorch ops (any device, autograd): the reference the kernel is tested against."""
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
# Fake kernels: output metadata exactly as the native kernels produce it.


def _register_fakes() -> None:
    @torch.library.register_fake("ddpm_fast::group_norm_silu")
    def _(x, num_groups, weight, bias, eps, temb, silu):
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)

    @torch.library.register_fake("ddpm_fast::attention")
    def _(q, k, v, scale):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    @torch.library.register_fake("ddpm_fast::conv3x3_winograd")
    def _(x, weight, bias, residual, silu, output_scale):
        return x.new_empty((x.shape[0], weight.shape[2], x.shape[2], x.shape[3])).contiguous(
            memory_format=torch.channels_last
        )

    @torch.library.register_fake("ddpm_fast::scheduler_step")
    def _(model_output, sample, noise, a_x, a_e, c0, c1, c2, noise_scale, clip_range):
        dense = (
            (sample.is_contiguous() or (sample.dim() == 4 and sample.is_contiguous(memory_format=torch.channels_last)))
            and model_output.stride() == sample.stride()
            and (noise is None or noise_scale == 0.0 or noise.stride() == sample.stride())
        )
        fmt = torch.preserve_format if dense else torch.contiguous_format
        return torch.empty_like(sample, memory_format=fmt), torch.empty_like(sample, memory_format=fmt)

    @torch.library.register_fake("ddpm_fast::scheduler_step_table")
    def _(model_output, sample, noise, coefs, index, clip_range):
        # The kernels' device checks (csrc/checks.cpp), word for word: the dispatcher runs the CUDA kernel as
        # soon as one argument is on CUDA, and it first requires sample there; then every other tensor must be
        # on sample's device.
        named = [("model_output", model_output), ("noise", noise), ("coefs", coefs), ("index", index)]
        if sample.device.type != "cuda" and any(t is not None and t.device.type == "cuda" for _, t in named):
            raise RuntimeError(
                f"scheduler_step_table (CUDA): sample must be a CUDA tensor, got device {sample.device}"
            )
        for name, t in named:
            if t is not None and t.device != sample.device:
                raise RuntimeError(
                    f"scheduler_step_table: {name} is on {t.device} but sample is on {sample.device} "
                    "(all tensors must be on one device)"
                )
        # Unlike scheduler_step, noise counts for the layout whenever it is given (its scale is device data).
        dense = (
            (sample.is_contiguous() or (sample.dim() == 4 and sample.is_contiguous(memory_format=torch.channels_last)))
            and model_output.stride() == sample.stride()
            and (noise is None or noise.stride() == sample.stride())
        )
        fmt = torch.preserve_format if dense else torch.contiguous_format
        return torch.empty_like(sample, memory_format=fmt), torch.empty_like(sample, memory_format=fmt)


if _native.available():
    _register_fakes()
