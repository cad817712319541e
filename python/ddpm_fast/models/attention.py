"""The UNet's spatial self-attention block (diffusers' ``Attention`` with ``AttnProcessor2_0``, as built
by the UNet2D blocks): GroupNorm -> to_q/to_k/to_v -> scaled dot-product attention -> to_out.0 ->
+ residual -> / rescale_output_factor.  Parameter names equal diffusers' so checkpoints load unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fast_path, ops
from . import linear
from .prepared import PreparedCache, trackable
from .resnet import _dropout, make_group_norm


class Attention(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions of a ``(B, C, H, W)`` feature map.

    ``heads * dim_head`` is the inner width (it may differ from ``query_dim`` when ``dim_head`` does not
    divide it, as in diffusers); ``norm_num_groups=None`` means no GroupNorm.
    """

    # Tells checkpoint loading that old names (query/key/value/proj_attn) may appear under this module.
    _from_deprecated_attn_block = True

    def __init__(
        self,
        query_dim: int,
        heads: int = 8,
        dim_head: int = 64,
        rescale_output_factor: float = 1.0,
        eps: float = 1e-5,
        norm_num_groups: int | None = None,
        residual_connection: bool = True,
        bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if heads < 1 or dim_head < 1:
            raise ValueError(
                f"attention_head_dim {dim_head} gives {heads} heads for {query_dim} channels; "
                "attention_head_dim must be between 1 and the block's channel count"
            )
        self.query_dim = query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.inner_dim = heads * dim_head
        self.scale = dim_head**-0.5
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.group_norm = (
            make_group_norm(norm_num_groups, query_dim, eps, "Attention.group_norm") if norm_num_groups else None
        )
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_v = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])
        # The concatenated to_q/to_k/to_v weight and bias of the fused path (one GEMM instead of three) and the
        # oneDNN-packed projection weights, kept while the layers' parameters are unchanged; a plain attribute, so
        # state-dict keys stay diffusers'.
        self._prepared = PreparedCache(limit=8)  # the QKV concatenation, then two packed weights per row count

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.ndim != 4:
            raise ValueError(f"Attention expects a (B, C, H, W) tensor, got shape {tuple(hidden_states.shape)}")
        if fast_path.use_fused(hidden_states, self):
            return self._forward_fused(hidden_states)
        return self._forward_reference(hidden_states)

    def _project(self, hidden_states: torch.Tensor, batch: int):
        """(B, S, C) -> q, k, v as (B, heads, S, dim_head)."""
        q = self.to_q(hidden_states)
        k = self.to_k(hidden_states)
        v = self.to_v(hidden_states)
        q = q.view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        k = k.view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        v = v.view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        return q, k, v

    def _output(self, attn: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        batch, channel, height, width = residual.shape
        out = attn.transpose(1, 2).reshape(batch, -1, self.inner_dim).to(dtype)
        out = self.to_out[0](out)
        out = self.to_out[1](out)
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor

    def _forward_reference(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        batch = hidden_states.shape[0]
        hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = self._project(hidden_states, batch)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return self._output(attn, residual, q.dtype)

    def _packed_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        layers = (self.to_q, self.to_k, self.to_v)
        sources = [t for layer in layers for t in (layer.weight, layer.bias)]

        def build():
            weight = torch.cat([layer.weight for layer in layers], dim=0)
            if all(layer.bias is None for layer in layers):
                return weight, None
            bias = torch.cat(
                [layer.weight.new_zeros(self.inner_dim) if layer.bias is None else layer.bias for layer in layers]
            )
            return weight, bias

        if fast_path.prepared_weights_allowed() and all(trackable(t) for t in sources):
            return self._prepared.get(("qkv",), sources, build)
        return build()  # traced by torch.compile (it folds the concatenation), or untrackable parameters

    def _apply(self, fn, *args, **kwargs):  # .to() / .half(): drop the old copy now rather than at next use
        self._prepared.clear()
        return super()._apply(fn, *args, **kwargs)

    def _forward_fused(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """GroupNorm, one packed QKV GEMM, the native attention on strided views, to_out, then the residual
        add and the rescale in place.  On channels_last activations every (B, C, H, W) <-> (B, HW, C)
        change of view is free."""
        residual = hidden_states
        batch, channel, height, width = hidden_states.shape
        if self.group_norm is not None:
            g = self.group_norm
            hidden_states = ops.group_norm_silu(hidden_states, g.num_groups, g.weight, g.bias, g.eps, silu=False)
        hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, HW, C)
        weight, bias = self._packed_qkv()
        rows = hidden_states.reshape(-1, channel)
        sources = tuple(t for layer in (self.to_q, self.to_k, self.to_v) for t in (layer.weight, layer.bias))
        if linear.usable(rows, *sources):  # oneDNN's packed GEMMs, bias and residual in their epilogues
            qkv = linear.packed_linear(self._prepared, ("qkv",), sources, lambda: weight, bias, rows)
            qkv = qkv.view(batch, -1, 3 * self.inner_dim)
        else:
            qkv = F.linear(hidden_states, weight, bias)
        q, k, v = (
            t.view(batch, -1, self.heads, self.dim_head).transpose(1, 2) for t in qkv.split(self.inner_dim, dim=-1)
        )
        attn = ops.attention(q, k, v, self.scale)
        out = attn.transpose(1, 2).reshape(batch, -1, self.inner_dim).to(q.dtype)
        proj, dropout = self.to_out
        # (B, HW, C) -> channels_last (B, C, H, W) views with canonical strides (so that F.pad and torch.cat
        # downstream recognise the format even at batch 1)
        rows = out.view(-1, self.inner_dim)
        if linear.usable(rows, proj.weight, proj.bias) and not (dropout.training and dropout.p > 0):
            other = residual.permute(0, 2, 3, 1).reshape(-1, channel) if self.residual_connection else None
            out = linear.packed_linear(
                self._prepared, ("out",), (proj.weight,), lambda: proj.weight, proj.bias, rows, other
            )
            out = out.view(batch, height, width, channel).permute(0, 3, 1, 2)
        else:
            out = _dropout(dropout, proj(out)).reshape(batch, height, width, channel).permute(0, 3, 1, 2)
            if self.residual_connection:
                out = out.add_(residual)
        if self.rescale_output_factor != 1.0:
            out = out.div_(self.rescale_output_factor)
        return out
