"""Down, mid and up blocks of UNet2DModel, with diffusers 0.42.1's structure, channel arithmetic and
parameter names (including its quirks, so every diffusers config builds the same tensors).

Down blocks return ``(hidden_states, output_states)`` (plus ``skip_sample`` for the Skip blocks); up blocks
take the residuals of the matching down block.  A block with a ``skip_conv`` attribute uses the skip path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Attention
from .conv import Conv2d
from .resnet import Downsample2D, FirDownsample2D, FirUpsample2D, ResnetBlock2D, Upsample2D, make_group_norm

_SQRT2 = math.sqrt(2.0)

DOWN_BLOCK_TYPES = (
    "DownBlock2D",
    "ResnetDownsampleBlock2D",
    "AttnDownBlock2D",
    "SkipDownBlock2D",
    "AttnSkipDownBlock2D",
)
UP_BLOCK_TYPES = ("UpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D",)
RESAMPLE_TYPES = ("conv", "resnet")


def _uattn(channels: int, head_dim: int | None, scale: float, eps: float, groups: int | None) -> Attention:
    """The attention every UNet2D block builds (residual, biased, heads = channels // head_dim)."""
    head_dim = channels if head_dim is None else head_dim
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        rescale_output_factor=scale,
        eps=eps,
        norm_num_groups=groups,
        residual_connection=True,
        bias=True,
    )


def _skip_groups(channels: int) -> int:
    """GroupNorm group count the Skip blocks use: min(channels // 4, 32)."""
    return min(channels // 4, 32)


# -- down blocks ---------------------------------------------------------------------------------------


class DownBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional stride-2 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels=in_channels if i == 0 else out_channels,
                out_channels=out_channels,
                temb_channels=temb_channels,
                eps=resnet_eps,
                groups=resnet_groups,
                dropout=dropout,
                time_embedding_norm=resnet_time_scale_shift,
                non_linearity=resnet_act_fn,
                output_scale_factor=output_scale_factor,
            )
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)]
            )
            if add_downsample
            else None
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None):
        output_states = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                hidden_states = downsampler(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class ResnetDownsampleBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional resnet with ``down=True`` (avg-pool resampling)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        skip_time_act: bool = False,
    ):
        super().__init__()
        kw = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            groups=resnet_groups,
            dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
            skip_time_act=skip_time_act,
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, **kw)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, down=True, **kw)])
            if add_downsample
            else None
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None):
        output_states = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                hidden_states = downsampler(hidden_states, temb)
            output_states += (hidden_states,)
        return hidden_states, output_states


class AttnDownBlock2D(nn.Module):
    """(resnet, attention) x ``num_layers``, then a conv or resnet downsampler (``downsample_type``, or None)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        attention_head_dim: int | None = 1,
        output_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        downsample_type: str | None = "conv",
    ):
        super().__init__()
        self.downsample_type = downsample_type
        kw = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            groups=resnet_groups,
            dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
        )
        self.attentions = nn.ModuleList(
            _uattn(out_channels, attention_head_dim, output_scale_factor, resnet_eps, resnet_groups)
            for _ in range(num_layers)
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, **kw)
            for i in range(num_layers)
        )
        if downsample_type == "conv":
            self.downsamplers = nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)]
            )
        elif downsample_type == "resnet":
            self.downsamplers = nn.ModuleList(
                [ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, down=True, **kw)]
            )
        elif downsample_type is None:
            self.downsamplers = None
        else:
            raise ValueError(f"downsample_type {downsample_type!r} is not supported; expected one of {RESAMPLE_TYPES}")

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None):
        output_states = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb))
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                if self.downsample_type == "resnet":
                    hidden_states = downsampler(hidden_states, temb)
                else:
                    hidden_states = downsampler(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class SkipDownBlock2D(nn.Module):
    """Resnets (GroupNorm groups min(C // 4, 32), output scale sqrt(2)); the downsampler is a FIR resnet, and
    the FIR-downsampled input image enters through a 1x1 ``skip_conv`` (3 input channels)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        output_scale_factor: float = _SQRT2,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        kw = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
        )
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            cin = in_channels if i == 0 else out_channels
            self.resnets.append(
                ResnetBlock2D(
                    in_channels=cin,
                    out_channels=out_channels,
                    groups=_skip_groups(cin),
                    groups_out=_skip_groups(out_channels),
                    **kw,
                )
            )
        _add_skip_downsampler(self, add_downsample, out_channels, kw)

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, skip_sample: torch.Tensor | None = None
    ):
        output_states = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            output_states += (hidden_states,)
        return _skip_downsample(self, hidden_states, temb, skip_sample, output_states)


class AttnSkipDownBlock2D(nn.Module):
    """SkipDownBlock2D with an attention (32 GroupNorm groups) after each resnet."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        attention_head_dim: int | None = 1,
        output_scale_factor: float = _SQRT2,
        add_downsample: bool = True,
    ):
        super().__init__()
        kw = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
        )
        self.attentions = nn.ModuleList()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            cin = in_channels if i == 0 else out_channels
            self.resnets.append(
                ResnetBlock2D(
                    in_channels=cin,
                    out_channels=out_channels,
                    groups=_skip_groups(cin),
                    groups_out=_skip_groups(out_channels),
                    **kw,
                )
            )
            self.attentions.append(_uattn(out_channels, attention_head_dim, output_scale_factor, resnet_eps, 32))
        _add_skip_downsampler(self, add_downsample, out_channels, kw)

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, skip_sample: torch.Tensor | None = None
    ):
        output_states = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb))
            output_states += (hidden_states,)
        return _skip_downsample(self, hidden_states, temb, skip_sample, output_states)


def _add_skip_downsampler(block: nn.Module, add_downsample: bool, out_channels: int, kw: dict) -> None:
    if add_downsample:
        block.resnet_down = ResnetBlock2D(
            in_channels=out_channels,
            out_channels=out_channels,
            groups=_skip_groups(out_channels),
            use_in_shortcut=True,
            down=True,
            kernel="fir",
            **kw,
        )
        block.downsamplers = nn.ModuleList([FirDownsample2D(out_channels, out_channels=out_channels)])
        block.skip_conv = Conv2d(3, out_channels, kernel_size=(1, 1), stride=(1, 1))
    else:
        block.resnet_down = None
        block.downsamplers = None
        block.skip_conv = None


def _skip_downsample(block, hidden_states, temb, skip_sample, output_states):
    if block.downsamplers is not None:
        hidden_states = block.resnet_down(hidden_states, temb)
        for downsampler in block.downsamplers:
            skip_sample = downsampler(skip_sample)
        hidden_states = block.skip_conv(skip_sample) + hidden_states
        output_states += (hidden_states,)
    return hidden_states, output_states, skip_sample


# -- mid block -----------------------------------------------------------------------------------------


class UNetMidBlock2D(nn.Module):
    """resnet, then (attention, resnet) x ``num_layers``.

    The attention's GroupNorm uses ``attn_groups``; when that is None it has ``resnet_groups`` groups for
    ``resnet_time_scale_shift="default"`` and no GroupNorm at all otherwise (diffusers' rule).
    """

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int | None = 32,
        attn_groups: int | None = None,
        add_attention: bool = True,
        attention_head_dim: int | None = 1,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        self.add_attention = add_attention
        if attn_groups is None:
            attn_groups = resnet_groups if resnet_time_scale_shift == "default" else None
        kw = dict(
            in_channels=in_channels,
            out_channels=in_channels,
            temb_channels=temb_channels,
            eps=resnet_eps,
            groups=resnet_groups,
            dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
        )
        resnets = [ResnetBlock2D(**kw)]
        attentions = []
        for _ in range(num_layers):
            attentions.append(
                _uattn(in_channels, attention_head_dim, output_scale_factor, resnet_eps, attn_groups)
                if add_attention
                else None
            )
            resnets.append(ResnetBlock2D(**kw))
        self.attentions = nn.ModuleList(attentions)
        self.resnets = nn.ModuleList(resnets)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                hidden_states = attn(hidden_states)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


# -- up blocks -----------------------------------------------------------------------------------------


def _up_resnet_channels(i: int, num_layers: int, in_channels: int, prev_output_channel: int, out_channels: int):
    """(resnet input channels before the concat, channels of the concatenated skip) for layer ``i``."""
    res_skip_channels = in_channels if i == num_layers - 1 else out_channels
    resnet_in_channels = prev_output_channel if i == 0 else out_channels
    return resnet_in_channels, res_skip_channels


def _on_skip(resnet: ResnetBlock2D, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple, temb):
    """``resnet(torch.cat([hidden_states, skip], 1), temb)`` on the last skip connection, and the rest of them
    (:meth:`ResnetBlock2D.forward_cat` leaves the concatenation out where it can)."""
    skip = res_hidden_states_tuple[-1]
    return resnet.forward_cat(hidden_states, skip, temb), res_hidden_states_tuple[:-1]


class UpBlock2D(nn.Module):
    """``num_layers`` resnets on [hidden, skip] concatenations, then an optional nearest x2 + conv."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
    ):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            rin, rskip = _up_resnet_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            self.resnets.append(
                ResnetBlock2D(
                    in_channels=rin + rskip,
                    out_channels=out_channels,
                    temb_channels=temb_channels,
                    eps=resnet_eps,
                    groups=resnet_groups,
                    dropout=dropout,
                    time_embedding_norm=resnet_time_scale_shift,
                    non_linearity=resnet_act_fn,
                    output_scale_factor=output_scale_factor,
                )
            )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample
            else None
        )
        self.resolution_idx = resolution_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple,
        temb: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states, res_hidden_states_tuple = _on_skip(resnet, hidden_states, res_hidden_states_tuple, temb)
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


class ResnetUpsampleBlock2D(nn.Module):
    """UpBlock2D whose upsampler is a resnet with ``up=True`` (nearest resampling inside)."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        skip_time_act: bool = False,
    ):
        super().__init__()
        kw = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            groups=resnet_groups,
            dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
            skip_time_act=skip_time_act,
        )
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            rin, rskip = _up_resnet_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            self.resnets.append(ResnetBlock2D(in_channels=rin + rskip, out_channels=out_channels, **kw))
        self.upsamplers = (
            nn.ModuleList([ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, up=True, **kw)])
            if add_upsample
            else None
        )
        self.resolution_idx = resolution_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple,
        temb: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states, res_hidden_states_tuple = _on_skip(resnet, hidden_states, res_hidden_states_tuple, temb)
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                hidden_states = upsampler(hidden_states, temb)
        return hidden_states


class AttnUpBlock2D(nn.Module):
    """(resnet, attention) x ``num_layers``, then a conv or resnet upsampler (``upsample_type``, or None)."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        attention_head_dim: int | None = 1,
        output_scale_factor: float = 1.0,
        upsample_type: str | None = "conv",
    ):
        super().__init__()
        self.upsample_type = upsample_type
        kw = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            groups=resnet_groups,
            dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
        )
        self.attentions = nn.ModuleList()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            rin, rskip = _up_resnet_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            self.resnets.append(ResnetBlock2D(in_channels=rin + rskip, out_channels=out_channels, **kw))
            self.attentions.append(
                _uattn(out_channels, attention_head_dim, output_scale_factor, resnet_eps, resnet_groups)
            )
        if upsample_type == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
        elif upsample_type == "resnet":
            self.upsamplers = nn.ModuleList(
                [ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, up=True, **kw)]
            )
        elif upsample_type is None:
            self.upsamplers = None
        else:
            raise ValueError(f"upsample_type {upsample_type!r} is not supported; expected one of {RESAMPLE_TYPES}")
        self.resolution_idx = resolution_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple,
        temb: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states, res_hidden_states_tuple = _on_skip(resnet, hidden_states, res_hidden_states_tuple, temb)
            hidden_states = attn(hidden_states)
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                if self.upsample_type == "resnet":
                    hidden_states = upsampler(hidden_states, temb)
                else:
                    hidden_states = upsampler(hidden_states)
        return hidden_states


class SkipUpBlock2D(nn.Module):
    """Resnets (groups min(C // 4, 32), scale sqrt(2)); the running 3-channel ``skip_sample`` is FIR-upsampled
    and gets ``skip_conv(act(skip_norm(h)))`` added; the upsampler is a FIR resnet."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        output_scale_factor: float = _SQRT2,
        add_upsample: bool = True,
        upsample_padding: int = 1,
    ):
        super().__init__()
        kw = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
        )
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            rin, rskip = _up_resnet_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            self.resnets.append(
                ResnetBlock2D(
                    in_channels=rin + rskip,
                    out_channels=out_channels,
                    groups=_skip_groups(rin + rskip),
                    groups_out=_skip_groups(out_channels),
                    **kw,
                )
            )
        _add_skip_upsampler(self, add_upsample, in_channels, out_channels, resnet_eps, kw)
        self.resolution_idx = resolution_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple,
        temb: torch.Tensor | None = None,
        skip_sample: torch.Tensor | None = None,
    ):
        for resnet in self.resnets:
            hidden_states, res_hidden_states_tuple = _on_skip(resnet, hidden_states, res_hidden_states_tuple, temb)
        return _skip_upsample(self, hidden_states, temb, skip_sample)


class AttnSkipUpBlock2D(nn.Module):
    """SkipUpBlock2D with one attention (32 groups) after the resnets.

    The first GroupNorm's group count reproduces diffusers' ``min(resnet_in + res_skip // 4, 32)``
    (operator precedence included), so checkpoints match."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        attention_head_dim: int | None = 1,
        output_scale_factor: float = _SQRT2,
        add_upsample: bool = True,
    ):
        super().__init__()
        kw = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
        )
        self.attentions = nn.ModuleList()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            rin, rskip = _up_resnet_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            self.resnets.append(
                ResnetBlock2D(
                    in_channels=rin + rskip,
                    out_channels=out_channels,
                    groups=min(rin + rskip // 4, 32),
                    groups_out=_skip_groups(out_channels),
                    **kw,
                )
            )
        self.attentions.append(_uattn(out_channels, attention_head_dim, output_scale_factor, resnet_eps, 32))
        _add_skip_upsampler(self, add_upsample, in_channels, out_channels, resnet_eps, kw)
        self.resolution_idx = resolution_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple,
        temb: torch.Tensor | None = None,
        skip_sample: torch.Tensor | None = None,
    ):
        for resnet in self.resnets:
            hidden_states, res_hidden_states_tuple = _on_skip(resnet, hidden_states, res_hidden_states_tuple, temb)
        hidden_states = self.attentions[0](hidden_states)
        return _skip_upsample(self, hidden_states, temb, skip_sample)


def _add_skip_upsampler(
    block: nn.Module, add_upsample: bool, in_channels: int, out_channels: int, eps: float, kw: dict
) -> None:
    block.upsampler = FirUpsample2D(in_channels, out_channels=out_channels)
    if add_upsample:
        groups = _skip_groups(out_channels)
        block.resnet_up = ResnetBlock2D(
            in_channels=out_channels,
            out_channels=out_channels,
            groups=groups,
            groups_out=groups,
            use_in_shortcut=True,
            up=True,
            kernel="fir",
            **kw,
        )
        block.skip_conv = Conv2d(out_channels, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
        block.skip_norm = make_group_norm(groups, out_channels, eps, "skip_norm")
        block.act = nn.SiLU()
    else:
        block.resnet_up = None
        block.skip_conv = None
        block.skip_norm = None
        block.act = None


def _skip_upsample(block, hidden_states, temb, skip_sample):
    skip_sample = block.upsampler(skip_sample) if skip_sample is not None else 0
    if block.resnet_up is not None:
        skip_sample_states = block.skip_conv(block.act(block.skip_norm(hidden_states)))
        skip_sample = skip_sample + skip_sample_states
        hidden_states = block.resnet_up(hidden_states, temb)
    return hidden_states, skip_sample


# -- factories -----------------------------------------------------------------------------------------


def _strip_prefix(block_type: str) -> str:
    # diffusers accepts "UNetRes"-prefixed names for the same blocks.
    return block_type[7:] if isinstance(block_type, str) and block_type.startswith("UNetRes") else block_type


def get_down_block(
    down_block_type: str,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    temb_channels: int,
    add_downsample: bool,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int | None = None,
    downsample_padding: int | None = None,
    resnet_time_scale_shift: str = "default",
    attention_head_dim: int | None = None,
    downsample_type: str | None = None,
    dropout: float = 0.0,
    resnet_skip_time_act: bool = False,
    resnet_out_scale_factor: float = 1.0,
) -> nn.Module:
    """Build a down block by name; raises ValueError naming an unknown ``down_block_type``."""
    t = _strip_prefix(down_block_type)
    common = dict(
        num_layers=num_layers,
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        dropout=dropout,
        resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn,
        resnet_time_scale_shift=resnet_time_scale_shift,
    )
    if t == "DownBlock2D":
        return DownBlock2D(
            add_downsample=add_downsample, resnet_groups=resnet_groups, downsample_padding=downsample_padding, **common
        )
    if t == "ResnetDownsampleBlock2D":
        return ResnetDownsampleBlock2D(
            add_downsample=add_downsample,
            resnet_groups=resnet_groups,
            skip_time_act=resnet_skip_time_act,
            output_scale_factor=resnet_out_scale_factor,
            **common,
        )
    if t == "AttnDownBlock2D":
        if downsample_type is not None and downsample_type not in RESAMPLE_TYPES:
            raise ValueError(f"downsample_type {downsample_type!r} is not supported; expected one of {RESAMPLE_TYPES}")
        dtype_ = (downsample_type or "conv") if add_downsample else None
        return AttnDownBlock2D(
            resnet_groups=resnet_groups,
            downsample_padding=downsample_padding,
            attention_head_dim=attention_head_dim,
            downsample_type=dtype_,
            **common,
        )
    if t == "SkipDownBlock2D":
        return SkipDownBlock2D(add_downsample=add_downsample, downsample_padding=downsample_padding, **common)
    if t == "AttnSkipDownBlock2D":
        return AttnSkipDownBlock2D(add_downsample=add_downsample, attention_head_dim=attention_head_dim, **common)
    raise ValueError(f"down_block_type {down_block_type!r} does not exist; supported: {', '.join(DOWN_BLOCK_TYPES)}")


def get_up_block(
    up_block_type: str,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    prev_output_channel: int,
    temb_channels: int,
    add_upsample: bool,
    resnet_eps: float,
    resnet_act_fn: str,
    resolution_idx: int | None = None,
    resnet_groups: int | None = None,
    resnet_time_scale_shift: str = "default",
    attention_head_dim: int | None = None,
    upsample_type: str | None = None,
    dropout: float = 0.0,
    resnet_skip_time_act: bool = False,
    resnet_out_scale_factor: float = 1.0,
) -> nn.Module:
    """Build an up block by name; raises ValueError naming an unknown ``up_block_type``."""
    t = _strip_prefix(up_block_type)
    common = dict(
        num_layers=num_layers,
        in_channels=in_channels,
        out_channels=out_channels,
        prev_output_channel=prev_output_channel,
        temb_channels=temb_channels,
        resolution_idx=resolution_idx,
        dropout=dropout,
        resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn,
        resnet_time_scale_shift=resnet_time_scale_shift,
    )
    if t == "UpBlock2D":
        return UpBlock2D(add_upsample=add_upsample, resnet_groups=resnet_groups, **common)
    if t == "ResnetUpsampleBlock2D":
        return ResnetUpsampleBlock2D(
            add_upsample=add_upsample,
            resnet_groups=resnet_groups,
            skip_time_act=resnet_skip_time_act,
            output_scale_factor=resnet_out_scale_factor,
            **common,
        )
    if t == "AttnUpBlock2D":
        if upsample_type is not None and upsample_type not in RESAMPLE_TYPES:
            raise ValueError(f"upsample_type {upsample_type!r} is not supported; expected one of {RESAMPLE_TYPES}")
        utype = (upsample_type or "conv") if add_upsample else None
        return AttnUpBlock2D(
            resnet_groups=resnet_groups, attention_head_dim=attention_head_dim, upsample_type=utype, **common
        )
    if t == "SkipUpBlock2D":
        return SkipUpBlock2D(add_upsample=add_upsample, **common)
    if t == "AttnSkipUpBlock2D":
        return AttnSkipUpBlock2D(add_upsample=add_upsample, attention_head_dim=attention_head_dim, **common)
    raise ValueError(f"up_block_type {up_block_type!r} does not exist; supported: {', '.join(UP_BLOCK_TYPES)}")


def get_mid_block(
    mid_block_type: str | None,
    temb_channels: int,
    in_channels: int,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int | None,
    output_scale_factor: float = 1.0,
    resnet_time_scale_shift: str = "default",
    attention_head_dim: int | None = 1,
    attn_groups: int | None = None,
    add_attention: bool = True,
    dropout: float = 0.0,
    num_layers: int = 1,
) -> nn.Module | None:
    """Build the mid block (``"UNetMidBlock2D"``) or return None for ``None``; ValueError for other names.

    The defaults build what UNet2DModel builds (one attention + two resnets).
    """
    if mid_block_type is None:
        return None
    if mid_block_type == "UNetMidBlock2D":
        return UNetMidBlock2D(
            in_channels=in_channels,
            temb_channels=temb_channels,
            dropout=dropout,
            num_layers=num_layers,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            output_scale_factor=output_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift,
            attention_head_dim=attention_head_dim,
            resnet_groups=resnet_groups,
            attn_groups=attn_groups,
            add_attention=add_attention,
        )
    raise ValueError(f"mid_block_type {mid_block_type!r} does not exist; supported: UNetMidBlock2D or None")
