"""``UNet2DModel``: the unconditional (optionally class-conditioned) 2-D UNet of DDPM, config- and
state-dict-compatible with diffusers 0.42.1's ``UNet2DModel``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import fast_path, ops
from ..configuration import ConfigMixin, register_to_config
from ..utils.outputs import BaseOutput
from . import linear as linear_mod
from .conv import Conv2d
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from .modeling_utils import ModelMixin
from .plans import ForwardPlans
from .prepared import PreparedCache, trackable
from .resnet import TimeProjections, make_group_norm, shares_time_projection
from .unet_2d_blocks import get_down_block, get_mid_block, get_up_block


@dataclass
class UNet2DOutput(BaseOutput):
    """Output of :class:`UNet2DModel`: ``sample`` of shape ``(batch, out_channels, height, width)``."""

    sample: torch.Tensor


TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
CLASS_EMBED_TYPES = (None, "timestep", "identity")
SKIP_BLOCKS = ("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")


def time_projections_on_panels(rows: torch.Tensor) -> bool:
    """Whether the shared time-projection GEMM of ``rows`` (the batch's embeddings) runs on the panel GEMM: a few
    rows against a weight of several MB are bound by reading the weight, which the panel GEMM does once, in
    address order (``bench/ab_paths.py --choice temb_panel``)."""
    return rows.dtype == torch.float32 and rows.is_cpu and linear_mod.panel_rows(len(rows), 1)


class UNet2DModel(ModelMixin, ConfigMixin):
    """A 2-D UNet mapping a noisy sample and a timestep to a sample-shaped output.

    Every config key of diffusers' ``UNet2DModel`` is accepted with the same meaning and default; the
    parameters carry diffusers' names, so checkpoints load in either library.  See diffusers' ``UNet2DModel``
    documentation for each key.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        self.sample_size = sample_size
        self._validate_config(
            down_block_types,
            up_block_types,
            block_out_channels,
            time_embedding_type,
            class_embed_type,
            num_train_timesteps,
            resnet_time_scale_shift,
            downsample_type,
            upsample_type,
            in_channels,
            out_channels,
            layers_per_block,
        )
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4

        self.conv_in = Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=(1, 1))

        # time
        if time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=block_out_channels[0], scale=16)
            timestep_input_dim = 2 * block_out_channels[0]
        elif time_embedding_type == "positional":
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
            timestep_input_dim = block_out_channels[0]
        else:  # learned
            self.time_proj = nn.Embedding(num_train_timesteps, block_out_channels[0])
            timestep_input_dim = block_out_channels[0]
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)

        # class embedding (same precedence as diffusers: num_class_embeds only when class_embed_type is None)
        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        else:
            self.class_embedding = None

        # Registration order (down, up, mid) reproduces diffusers' state-dict key order.
        self.down_blocks = nn.ModuleList([])
        self.up_blocks = nn.ModuleList([])

        # down
        output_channel = block_out_channels[0]
        for i, down_block_type in enumerate(down_block_types):
            input_channel = output_channel
            output_channel = block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    down_block_type,
                    num_layers=layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=i != len(block_out_channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim if attention_head_dim is not None else output_channel,
                    downsample_padding=downsample_padding,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    downsample_type=downsample_type,
                    dropout=dropout,
                )
            )

        # mid
        self.mid_block = get_mid_block(
            mid_block_type,
            in_channels=block_out_channels[-1],
            temb_channels=time_embed_dim,
            dropout=dropout,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            output_scale_factor=mid_block_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift,
            attention_head_dim=attention_head_dim if attention_head_dim is not None else block_out_channels[-1],
            resnet_groups=norm_num_groups,
            attn_groups=attn_norm_num_groups,
            add_attention=add_attention,
        )

        # up
        reversed_block_out_channels = list(reversed(block_out_channels))
        output_channel = reversed_block_out_channels[0]
        for i, up_block_type in enumerate(up_block_types):
            prev_output_channel = output_channel
            output_channel = reversed_block_out_channels[i]
            input_channel = reversed_block_out_channels[min(i + 1, len(block_out_channels) - 1)]
            self.up_blocks.append(
                get_up_block(
                    up_block_type,
                    num_layers=layers_per_block + 1,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=time_embed_dim,
                    add_upsample=i != len(block_out_channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim if attention_head_dim is not None else output_channel,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    upsample_type=upsample_type,
                    dropout=dropout,
                )
            )

        # out
        num_groups_out = norm_num_groups if norm_num_groups is not None else min(block_out_channels[0] // 4, 32)
        self.conv_norm_out = make_group_norm(num_groups_out, block_out_channels[0], norm_eps, "conv_norm_out")
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

        # Fused path: the resnets' time projections as one GEMM (TimeProjections); a plain list, so neither
        # state-dict keys nor module traversal change.
        self._shared_temb_resnets = [m for m in self.modules() if shares_time_projection(m)]
        self._prepared = PreparedCache(limit=1)
        self._plans = ForwardPlans()

    @staticmethod
    def _validate_config(
        down_block_types,
        up_block_types,
        block_out_channels,
        time_embedding_type,
        class_embed_type,
        num_train_timesteps,
        resnet_time_scale_shift,
        downsample_type,
        upsample_type,
        in_channels,
        out_channels,
        layers_per_block,
    ) -> None:
        if isinstance(down_block_types, str) or isinstance(up_block_types, str):
            raise TypeError("down_block_types and up_block_types must be lists of block names, not a single string")
        if len(down_block_types) != len(up_block_types):
            raise ValueError(
                f"down_block_types and up_block_types must have the same length: {list(down_block_types)} vs "
                f"{list(up_block_types)}"
            )
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(
                f"block_out_channels must have one entry per down block: {list(block_out_channels)} vs "
                f"{list(down_block_types)}"
            )
        if len(block_out_channels) == 0:
            raise ValueError("block_out_channels must not be empty")
        if time_embedding_type not in TIME_EMBEDDING_TYPES:
            raise ValueError(
                f"time_embedding_type {time_embedding_type!r} is not supported; expected one of {TIME_EMBEDDING_TYPES}"
            )
        if time_embedding_type == "learned" and not num_train_timesteps:
            raise ValueError("time_embedding_type='learned' needs num_train_timesteps (the embedding table size)")
        if class_embed_type not in CLASS_EMBED_TYPES:
            raise ValueError(
                f"class_embed_type {class_embed_type!r} is not supported; expected one of {CLASS_EMBED_TYPES}"
            )
        if resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(
                f"resnet_time_scale_shift {resnet_time_scale_shift!r} is not supported; "
                "expected 'default' or 'scale_shift'"
            )
        if downsample_type not in ("conv", "resnet"):
            raise ValueError(f"downsample_type {downsample_type!r} is not supported; expected 'conv' or 'resnet'")
        if upsample_type not in ("conv", "resnet"):
            raise ValueError(f"upsample_type {upsample_type!r} is not supported; expected 'conv' or 'resnet'")
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be at least 1, got {layers_per_block}")
        # The Skip blocks carry a 3-channel image path (skip_conv) from the input to the output.
        last = len(down_block_types) - 1
        if any(t in SKIP_BLOCKS for i, t in enumerate(down_block_types) if i != last) and in_channels != 3:
            raise ValueError(
                f"Skip down blocks need in_channels=3 (their skip_conv reads the RGB input), got {in_channels}"
            )
        if any(t in SKIP_BLOCKS for i, t in enumerate(up_block_types) if i != last) and out_channels != 3:
            raise ValueError(f"Skip up blocks need out_channels=3 (their skip_conv writes RGB), got {out_channels}")

    # -- forward -------------------------------------------------------------------------------------
    def _time_projections(self, emb: torch.Tensor) -> torch.Tensor | TimeProjections:
        linears = [r.time_emb_proj for r in self._shared_temb_resnets]
        sources = [t for linear in linears for t in (linear.weight, linear.bias)]
        if not linears or not all(trackable(t) for t in sources) or any(t is None for t in sources):
            return emb

        def build():
            offsets, start = {}, 0
            for resnet, linear in zip(self._shared_temb_resnets, linears):
                offsets[id(resnet)] = (start, start + linear.out_features)
                start += linear.out_features
            weight = torch.cat([linear.weight for linear in linears])
            panels = ops.panel_weight(weight) if panelled else None
            return weight, torch.cat([linear.bias for linear in linears]), offsets, panels

        panelled = linear_mod.panel_supported() and sum(lin.out_features for lin in linears) % ops.PANEL == 0
        weight, bias, offsets, panels = self._prepared.get(("time_projections", panelled), sources, build)
        rows = torch.nn.functional.silu(emb)
        if panels is not None and time_projections_on_panels(rows):
            out = ops.panel_linear(rows, panels, bias)
        else:
            out = torch.nn.functional.linear(rows, weight, bias)
        return TimeProjections(emb, out, offsets)

    def _apply(self, fn, recurse: bool = True):  # .to() / .half(): drop the old copy now rather than at next use
        self._prepared.clear()
        self._plans.clear()
        return super()._apply(fn, recurse)

    def _timesteps(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
                raise TypeError(f"timestep must be an int, a float or a tensor, got {type(timestep).__name__}")
            # As diffusers: a Python number becomes an int64 tensor (a float is truncated).
            return torch.tensor([timestep], dtype=torch.long, device=sample.device)
        if timestep.ndim == 0:
            return timestep[None].to(sample.device)
        if timestep.ndim != 1 or timestep.shape[0] not in (1, sample.shape[0]):
            raise ValueError(
                f"timestep must be a number, a 0-d tensor or a 1-d tensor of length 1 or batch size "
                f"{sample.shape[0]}; got shape {tuple(timestep.shape)}"
            )
        return timestep.to(sample.device)

    def _check_sample(self, sample: torch.Tensor) -> None:
        if not torch.is_tensor(sample):
            raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
        if sample.ndim != 4:
            raise ValueError(f"sample must have shape (batch, channels, height, width), got {tuple(sample.shape)}")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample has {sample.shape[1]} channels but the model's in_channels is {self.config.in_channels}"
            )
        factor = 2 ** (len(self.down_blocks) - 1)
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(
                f"sample height and width must be multiples of {factor} (2 ** (number of blocks - 1)), "
                f"got {tuple(sample.shape[2:])}"
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        """Denoise ``sample`` (B, C, H, W) at ``timestep`` (number, 0-d or 1-d tensor).

        ``class_labels`` is required exactly when the model has a class embedding.  Returns
        ``UNet2DOutput(sample=...)``, or ``(sample,)`` when ``return_dict`` is False.
        """
        self._check_sample(sample)
        timesteps = self._timesteps(timestep, sample)
        if self.class_embedding is not None and class_labels is None:
            raise ValueError("class_labels must be given: this model is class-conditioned (class embedding configured)")
        if self.class_embedding is None and class_labels is not None:
            raise ValueError(
                "class_labels were given but this model has no class embedding "
                "(set num_class_embeds or class_embed_type)"
            )
        fused = fast_path.use_fused(sample, self)
        if fused and fast_path.use_cpu_plan(sample, self):
            sample = self._plans.run(self, self._denoise_fused, (sample, timesteps, class_labels))
        else:
            sample = self._denoise(sample, timesteps, class_labels, fused)
        if not return_dict:
            return (sample,)
        return UNet2DOutput(sample=sample)

    def _denoise_fused(
        self, sample: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None
    ) -> torch.Tensor:
        return self._denoise(sample, timesteps, class_labels, True)

    def _denoise(
        self, sample: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None, fused: bool
    ) -> torch.Tensor:
        """The forward on checked inputs (``timesteps``: 1-d, length 1 or batch), as a function of tensors."""
        # Fused path: activations run channels_last (packed oneDNN convs on the CPU produce it; on CUDA the
        # input is converted once here); the output comes back in the input's memory format.
        input_is_nchw = sample.is_contiguous()
        if fused and sample.device.type == "cuda" and sample.shape[1] > 1:
            sample = sample.contiguous(memory_format=torch.channels_last)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        t_emb = self.time_proj(timesteps)
        # time_proj returns float32; the MLP may run in half precision.
        emb = self.time_embedding(t_emb.to(dtype=self.dtype))

        if self.class_embedding is not None:
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(dtype=self.dtype)
            emb = emb + self.class_embedding(class_labels).to(dtype=self.dtype)

        if fused and fast_path.prepared_weights_allowed():
            emb = self._time_projections(emb)

        # 2. pre-process
        skip_sample = sample
        sample = self.conv_in(sample)

        # 3. down
        down_block_res_samples = (sample,)
        for block in self.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, res_samples, skip_sample = block(sample, emb, skip_sample)
            else:
                sample, res_samples = block(sample, emb)
            down_block_res_samples += res_samples

        # 4. mid
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)

        # 5. up
        skip_sample = None
        for block in self.up_blocks:
            res_samples = down_block_res_samples[-len(block.resnets) :]
            down_block_res_samples = down_block_res_samples[: -len(block.resnets)]
            if hasattr(block, "skip_conv"):
                sample, skip_sample = block(sample, res_samples, emb, skip_sample)
            else:
                sample = block(sample, res_samples, emb)

        # 6. post-process
        norm = self.conv_norm_out
        if fused:
            sample = ops.group_norm_silu(sample, norm.num_groups, norm.weight, norm.bias, norm.eps)
        else:
            sample = self.conv_act(norm(sample))
        sample = self.conv_out(sample)
        if skip_sample is not None:
            sample += skip_sample
        if self.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape((sample.shape[0], *([1] * len(sample.shape[1:]))))

        if fused and input_is_nchw and not sample.is_contiguous():
            sample = sample.contiguous()
        return sample
