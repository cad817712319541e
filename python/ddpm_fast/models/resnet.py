"""Residual block and resampling layers of UNet2DModel, mirroring diffusers 0.42.1 op for op.

``ResnetBlock2D`` has two paths: the reference path (nn.GroupNorm, activation, convs exactly as diffusers)
and, where :func:`ddpm_fast.fast_path.use_fused` allows it, a fused path that runs GroupNorm + SiLU (and the
time-embedding add before ``norm2``) as one :func:`ddpm_fast.ops.group_norm_silu` and folds the residual add and
the output scale into ``conv2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fast_path, ops
from .conv import Conv2d, cat_path
from .embeddings import get_activation

FIR_KERNEL = (1, 3, 3, 1)
# Up-block resnets on at least this many pixels (N*H*W) skip the concatenation of their input (cat_free).
CAT_FREE_MIN_PIXELS = 1024


def make_group_norm(num_groups: int, num_channels: int, eps: float, where: str) -> nn.GroupNorm:
    """``nn.GroupNorm`` with an error that says which layer and config value is wrong."""
    if num_groups is None or num_groups <= 0 or num_channels % num_groups != 0:
        raise ValueError(
            f"{where}: {num_channels} channels cannot be split into {num_groups} groups "
            "(norm_num_groups must divide every block_out_channels entry)"
        )
    return nn.GroupNorm(num_groups=num_groups, num_channels=num_channels, eps=eps, affine=True)


# -- FIR resampling (used by the Skip blocks) --------------------------------------------------------


def upfirdn2d(tensor: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)):
    """Upsample by zero insertion, pad, filter with ``kernel`` (2-D), then subsample: diffusers' upfirdn2d_native."""
    pad0, pad1 = pad
    _, channel, in_h, in_w = tensor.shape
    tensor = tensor.reshape(-1, in_h, in_w, 1)
    kernel_h, kernel_w = kernel.shape

    out = tensor.view(-1, in_h, 1, in_w, 1, 1)
    out = F.pad(out, [0, 0, 0, up - 1, 0, 0, 0, up - 1])
    out = out.view(-1, in_h * up, in_w * up, 1)
    out = F.pad(out, [0, 0, max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)])
    out = out[:, max(-pad0, 0) : out.shape[1] - max(-pad1, 0), max(-pad0, 0) : out.shape[2] - max(-pad1, 0), :]

    out = out.permute(0, 3, 1, 2).reshape([-1, 1, in_h * up + pad0 + pad1, in_w * up + pad0 + pad1])
    w = torch.flip(kernel, [0, 1]).view(1, 1, kernel_h, kernel_w)
    out = F.conv2d(out, w)
    out = out.reshape(-1, 1, in_h * up + pad0 + pad1 - kernel_h + 1, in_w * up + pad0 + pad1 - kernel_w + 1)
    out = out.permute(0, 2, 3, 1)[:, ::down, ::down, :]

    out_h = (in_h * up + pad0 + pad1 - kernel_h) // down + 1
    out_w = (in_w * up + pad0 + pad1 - kernel_w) // down + 1
    return out.view(-1, channel, out_h, out_w)


def _fir_kernel(kernel, gain: float) -> torch.Tensor:
    k = torch.tensor(kernel, dtype=torch.float32)
    if k.ndim == 1:
        k = torch.outer(k, k)
    k /= torch.sum(k)
    return k * gain


def upsample_2d(hidden_states: torch.Tensor, kernel=FIR_KERNEL, factor: int = 2, gain: float = 1) -> torch.Tensor:
    """FIR upsampling by ``factor`` (pixels outside the image are zero)."""
    k = _fir_kernel(kernel, gain * factor**2)
    p = k.shape[0] - factor
    k = k.to(device=hidden_states.device, dtype=hidden_states.dtype)
    return upfirdn2d(hidden_states, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(hidden_states: torch.Tensor, kernel=FIR_KERNEL, factor: int = 2, gain: float = 1) -> torch.Tensor:
    """FIR downsampling by ``factor``."""
    k = _fir_kernel(kernel, gain)
    p = k.shape[0] - factor
    k = k.to(device=hidden_states.device, dtype=hidden_states.dtype)
    return upfirdn2d(hidden_states, k, down=factor, pad=((p + 1) // 2, p // 2))


class _FirResample2D(nn.Module):
    """Shared constructor of the FIR resamplers (same attribute names as diffusers, for checkpoints)."""

    def __init__(
        self,
        channels: int | None = None,
        out_channels: int | None = None,
        use_conv: bool = False,
        fir_kernel=FIR_KERNEL,
    ):
        super().__init__()
        out_channels = out_channels if out_channels else channels
        if use_conv:
            self.Conv2d_0 = Conv2d(channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.use_conv = use_conv
        self.fir_kernel = fir_kernel
        self.out_channels = out_channels


class FirUpsample2D(_FirResample2D):
    """FIR upsampling, optionally fused with a 3x3 convolution (``Conv2d_0``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return upsample_2d(hidden_states, self.fir_kernel, factor=2)
        # Transposed conv with the flipped kernel, then the FIR filter: diffusers' fused formulation.
        factor = 2
        weight = self.Conv2d_0.weight
        k = _fir_kernel(self.fir_kernel, factor**2)
        conv_h, conv_w, in_c = weight.shape[2], weight.shape[3], weight.shape[1]
        p = (k.shape[0] - factor) - (conv_w - 1)
        groups = hidden_states.shape[1] // in_c
        w = torch.reshape(weight, (groups, -1, in_c, conv_h, conv_w))
        w = torch.flip(w, dims=[3, 4]).permute(0, 2, 1, 3, 4).reshape(groups * in_c, -1, conv_h, conv_w)
        x = F.conv_transpose2d(hidden_states, w, stride=(factor, factor), output_padding=(0, 0), padding=0)
        k = k.to(device=x.device, dtype=x.dtype)
        x = upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))
        return x + self.Conv2d_0.bias.reshape(1, -1, 1, 1)


class FirDownsample2D(_FirResample2D):
    """FIR downsampling, optionally fused with a 3x3 convolution (``Conv2d_0``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return downsample_2d(hidden_states, self.fir_kernel, factor=2)
        factor = 2
        weight = self.Conv2d_0.weight
        k = _fir_kernel(self.fir_kernel, 1)
        p = (k.shape[0] - factor) + (weight.shape[3] - 1)
        k = k.to(device=hidden_states.device, dtype=hidden_states.dtype)
        x = upfirdn2d(hidden_states, k, pad=((p + 1) // 2, p // 2))
        x = F.conv2d(x, weight, stride=[factor, factor], padding=0)
        return x + self.Conv2d_0.bias.reshape(1, -1, 1, 1)


# -- plain resampling --------------------------------------------------------------------------------


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (``use_conv``) or 2x2 average pooling.

    With ``padding=0`` the input is padded by one pixel on the right and bottom first (the original
    DDPM checkpoints use that), as diffusers does.
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv = Conv2d(self.channels, self.out_channels, kernel_size=3, stride=2, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample2D without a conv cannot change the channel count")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling, then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.conv = Conv2d(self.channels, self.out_channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        # upsample_nearest_nhwc fails for large batches and huge outputs (diffusers issues 984, pytorch 141831).
        if hidden_states.shape[0] >= 64 or hidden_states.numel() * 2 > 2**31:
            hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states


# -- time-embedding projections ---------------------------------------------------------------------


class TimeProjections:
    """Every resnet's ``time_emb_proj(silu(temb))`` of one forward, computed by the UNet as one GEMM: they all read
    the same embedding, and one (B, 512) x (512, sum of C) product beats one small GEMM per resnet. Passed down the
    blocks in place of ``temb``; a resnet not in ``offsets`` projects ``emb`` itself."""

    __slots__ = ("emb", "out", "offsets")

    def __init__(self, emb: torch.Tensor, out: torch.Tensor, offsets: dict[int, tuple[int, int]]):
        self.emb, self.out, self.offsets = emb, out, offsets

    def for_resnet(self, resnet: "ResnetBlock2D") -> torch.Tensor | None:
        span = self.offsets.get(id(resnet))
        if span is None:
            return resnet._project_temb(self.emb)
        return self.out[:, span[0] : span[1]]


def shares_time_projection(resnet: nn.Module) -> bool:
    """Whether a resnet's time projection can be part of :class:`TimeProjections`' shared GEMM."""
    return (
        isinstance(resnet, ResnetBlock2D)
        and resnet.time_emb_proj is not None
        and not resnet.skip_time_act
        and isinstance(resnet.nonlinearity, nn.SiLU)
    )


def _dropout(layer: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, not called where it is the identity (eval mode or p = 0): a recorded plan
    (:mod:`~ddpm_fast.models.plans`) would otherwise hold a copy of ``x`` in its place."""
    return layer(x) if layer.training and layer.p > 0 else x


def cat_free(resnet: "ResnetBlock2D", input_tensor: torch.Tensor, skip: torch.Tensor) -> bool:
    """Whether ``resnet`` runs on ``cat([input_tensor, skip], 1)`` without the concatenation
    (:meth:`ResnetBlock2D.forward_cat`): its fused path on the CPU with the native kernels, no resampling, a 1x1
    shortcut that takes both inputs as two GEMMs (:func:`~ddpm_fast.models.conv.cat_path`), at least
    ``CAT_FREE_MIN_PIXELS`` pixels (below, the second GEMM costs more than the concatenation it saves), and no hook
    on the resnet or its shortcut (a hook sees the concatenated input)."""
    return (
        resnet.conv_shortcut is not None
        and resnet.upsample is None
        and resnet.downsample is None
        and isinstance(resnet.nonlinearity, nn.SiLU)
        and input_tensor.shape[0] * input_tensor.shape[2] * input_tensor.shape[3] >= CAT_FREE_MIN_PIXELS
        and ops.native_available()
        and fast_path.use_fused(input_tensor, resnet)
        and cat_path(resnet.conv_shortcut, input_tensor, skip) == "gemm_cat"
        and not fast_path.forward_hooked(resnet)
        and not fast_path.forward_hooked(resnet.conv_shortcut)
    )


# -- residual block ----------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """norm1 -> act -> [resample] -> conv1 -> (+ time embedding) -> norm2 -> act -> dropout -> conv2, plus shortcut.

    ``time_embedding_norm`` "default" adds ``time_emb_proj(act(temb))`` before ``norm2``; "scale_shift"
    applies ``h * (1 + scale) + shift`` after it.  ``up`` / ``down`` resample both branches (nearest/avg-pool,
    or FIR with ``kernel="fir"``).  The output is ``(shortcut(x) + h) / output_scale_factor``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        skip_time_act: bool = False,
        time_embedding_norm: str = "default",
        kernel: str | None = None,
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        up: bool = False,
        down: bool = False,
        conv_shortcut_bias: bool = True,
    ):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                f"resnet_time_scale_shift / time_embedding_norm {time_embedding_norm!r} is not supported; "
                "expected 'default' or 'scale_shift'"
            )
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.output_scale_factor = output_scale_factor
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        groups_out = groups if groups_out is None else groups_out

        self.norm1 = make_group_norm(groups, in_channels, eps, "ResnetBlock2D.norm1")
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = out_channels if time_embedding_norm == "default" else 2 * out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_out)
        self.norm2 = make_group_norm(groups_out, out_channels, eps, "ResnetBlock2D.norm2")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = get_activation(non_linearity)

        # Resamplers hold no parameters; kept as plain callables or parameter-free modules.
        self.upsample = self.downsample = None
        if up:
            self.upsample = (lambda x: upsample_2d(x, FIR_KERNEL)) if kernel == "fir" else Upsample2D(in_channels)
        elif down:
            self.downsample = (
                (lambda x: downsample_2d(x, FIR_KERNEL)) if kernel == "fir" else Downsample2D(in_channels, padding=1)
            )

        self.use_in_shortcut = in_channels != out_channels if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = None
        if self.use_in_shortcut:
            self.conv_shortcut = Conv2d(
                in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=conv_shortcut_bias
            )

    def _resample(self, input_tensor: torch.Tensor, hidden_states: torch.Tensor):
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            return self.upsample(input_tensor), self.upsample(hidden_states)
        if self.downsample is not None:
            return self.downsample(input_tensor), self.downsample(hidden_states)
        return input_tensor, hidden_states

    def _time_proj(self, temb: torch.Tensor | TimeProjections | None) -> torch.Tensor | None:
        if self.time_emb_proj is None or temb is None:
            return None
        if isinstance(temb, TimeProjections):
            return temb.for_resnet(self)
        return self._project_temb(temb)

    def _project_temb(self, temb: torch.Tensor) -> torch.Tensor:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        return self.time_emb_proj(temb)

    def _finish(self, input_tensor: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:  # contiguous only in training (DDP stride warning), as diffusers
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor

    def _finish_fused(self, input_tensor: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(shortcut(x) + conv2(dropout(h))) / output_scale_factor`` with the add and the scale folded
        into conv2 (oneDNN's sum post-op on the CPU)."""
        hidden_states = _dropout(self.dropout, hidden_states)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return self.conv2.forward_fused(hidden_states, other=input_tensor, output_scale=self.output_scale_factor)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | TimeProjections | None = None) -> torch.Tensor:
        if isinstance(self.nonlinearity, nn.SiLU) and fast_path.use_fused(input_tensor, self):
            return self._forward_fused(input_tensor, temb)
        return self._forward_reference(input_tensor, temb)

    def _forward_reference(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        input_tensor, hidden_states = self._resample(input_tensor, hidden_states)
        hidden_states = self.conv1(hidden_states)

        temb = self._time_proj(temb)
        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb[:, :, None, None]
            hidden_states = self.norm2(hidden_states)
        else:
            if temb is None:
                raise ValueError("temb must not be None when time_embedding_norm is 'scale_shift'")
            time_scale, time_shift = torch.chunk(temb[:, :, None, None], 2, dim=1)
            hidden_states = self.norm2(hidden_states)
            hidden_states = hidden_states * (1 + time_scale) + time_shift
        hidden_states = self.nonlinearity(hidden_states)
        return self._finish(input_tensor, hidden_states)

    def _forward_fused(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        n1 = self.norm1
        hidden_states = ops.group_norm_silu(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps)
        input_tensor, hidden_states = self._resample(input_tensor, hidden_states)
        hidden_states = self._conv1_norm2(hidden_states, temb)
        return self._finish_fused(input_tensor, hidden_states)

    def forward_cat(
        self, input_tensor: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor | TimeProjections | None = None
    ) -> torch.Tensor:
        """``self(torch.cat([input_tensor, skip], 1), temb)`` without building the concatenation where
        :func:`cat_free` allows it (norm1 and the shortcut read both inputs where they are); otherwise exactly that
        call. An up block's resnet on its skip connection."""
        if not cat_free(self, input_tensor, skip):
            return self(torch.cat([input_tensor, skip], dim=1), temb)
        fast_path.note("resnet:cat_free")
        n1 = self.norm1
        hidden_states = ops.group_norm_silu_cat(input_tensor, skip, n1.num_groups, n1.weight, n1.bias, n1.eps)
        hidden_states = _dropout(self.dropout, self._conv1_norm2(hidden_states, temb))
        shortcut = self.conv_shortcut.forward_cat(input_tensor, skip)
        return self.conv2.forward_fused(hidden_states, other=shortcut, output_scale=self.output_scale_factor)

    def _conv1_norm2(self, hidden_states: torch.Tensor, temb: torch.Tensor | TimeProjections | None) -> torch.Tensor:
        """The fused path's conv1 -> (+ time embedding) -> norm2 -> SiLU."""
        n2 = self.norm2
        hidden_states = self.conv1(hidden_states)
        temb = self._time_proj(temb)
        if self.time_embedding_norm == "default":
            hidden_states = ops.group_norm_silu(hidden_states, n2.num_groups, n2.weight, n2.bias, n2.eps, temb=temb)
        else:
            if temb is None:
                raise ValueError("temb must not be None when time_embedding_norm is 'scale_shift'")
            time_scale, time_shift = torch.chunk(temb[:, :, None, None], 2, dim=1)
            hidden_states = self.norm2(hidden_states)
            hidden_states = F.silu(hidden_states * (1 + time_scale) + time_shift)
        return hidden_states
