"""A drop-in ``nn.Conv2d`` whose inference runs on the fastest path this machine has, with its weight prepared once.

:func:`conv_path` (pure: the layer's geometry, the input's metadata and the :mod:`~ddpm_fast.fast_path` policy)
picks one of

* ``"winograd4"`` / ``"winograd2"``: fp32 3x3 stride-1 CPU convolutions with enough channels and output tiles, as
  Winograd F(4x4, 3x3) / F(2x2, 3x3) (:func:`ddpm_fast.ops.conv3x3_winograd`, 4x / 2.25x fewer multiplies) on
  the weight transformed once (as column panels for few tiles: ``WINOGRAD_PANELS_MAX_TILES``);
* ``"gemm"``: 1x1 and fp32 3x3 stride-1 CPU convolutions on few pixels (the shortcuts at batch 1, the 4x4 level at
  batch 1 and 2): on channels_last activations a 1x1 convolution is one GEMM, ``(N*H*W, C) @ W^T``, and a 3x3 one
  is the same GEMM over the 9 shifted copies of the input (im2col, ``(N*H*W, 9C) @ (9C, O)``, the weight reordered
  once). There the convolution is bound by reading its weight, which Winograd makes 16/9 larger, and one GEMM
  (oneDNN's packed linear, :mod:`~ddpm_fast.models.linear`, else ``addmm``) costs less than oneDNN's per-call
  convolution overhead; a 3x3 one of at most ``linear.PANEL_MAX_ROWS`` pixels runs as one op,
  :func:`ddpm_fast.ops.conv3x3_panels` (the panel GEMM over im2col rows it builds itself);
* ``"taps"``: fp32 3x3 stride-1 CPU convolutions with at most ``TAPS_MAX_OUT_CHANNELS`` outputs (the UNet's
  ``conv_out`` to RGB): one GEMM of the channels_last pixels against all nine taps' weights, ``(N*H*W, C) @ (C, 9*O)``,
  then the nine shifted slices of that product summed. oneDNN's kernels use few of their vector lanes on so few
  output channels;
* ``"packed"``: the other CPU convolutions, on oneDNN with the weight reordered once into its blocked layout
  (``torch.ops.mkldnn._reorder_convolution_weight``) and a fused SiLU or residual add
  (``torch.ops.mkldnn._convolution_pointwise``, the ops torch.compile's CPU backend emits). PyTorch itself sends
  many batch-1 convolutions to a slow path, and reorders the weight on every call of the others;
* ``"cuda_nhwc"``: CUDA with channels_last activations, on a channels_last copy of the weight (cuDNN's NHWC
  kernels would otherwise convert it on every call);
* ``"plain"``: ``nn.Conv2d`` itself (training, autograd, the reference backend, tracing, other devices).

:func:`cat_path` decides how a convolution over a channel concatenation, ``conv(torch.cat([x, skip], 1))`` (an up
block's shortcut), runs: ``"gemm_cat"``, a 1x1 CPU convolution as two GEMMs over the inputs' rows against the
weight's two column blocks, the second adding the first's output, so the concatenation is never built; or
``"cat"``, the concatenation and then :func:`conv_path`'s choice.

The oneDNN ops are internal to PyTorch: each compute dtype is probed once against ``F.conv2d`` on a tiny
problem; where the probe fails, those convolutions stay plain. On a CPU without native bf16/fp16 convolutions in
oneDNN, bf16/fp16 convolutions compute in fp32 on oneDNN and round the result (PyTorch's own path there is
several times slower than fp32). Prepared weights follow the parameters however they change
(:mod:`~ddpm_fast.models.prepared`). Parameters and state-dict keys are those of ``nn.Conv2d``.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _native, fast_path, ops
from . import linear
from .prepared import PreparedCache, trackable

__all__ = [
    "Conv2d",
    "conv_path",
    "mkldnn_conv_supported",
    "WINOGRAD_MIN_CHANNELS",
    "WINOGRAD_MIN_TILES",
    "WINOGRAD_MIN_TILES_OWN_GEMM",
    "own_gemm_planes",
    "WINOGRAD_PANELS_MAX_TILES",
    "GEMM_1X1_MAX_PIXELS",
    "GEMM_3X3_MAX_PIXELS",
    "TAPS_MAX_OUT_CHANNELS",
]

# 3x3 stride-1 convolutions with at least this many input and output channels may run as Winograd: the 3-channel
# image input/output convolutions lose to oneDNN.
WINOGRAD_MIN_CHANNELS = 64
# ... and with at least this many output tiles (N * ceil(H/m) * ceil(W/m) for m x m tiles): below, the GEMMs are
# too thin and the transformed weight (16/9 or 36/9 the size of the original) makes them weight-bandwidth bound.
# F(4x4) when it has that many 4x4 tiles, else F(2x2) when it has that many 2x2 tiles, else oneDNN.
WINOGRAD_MIN_TILES = {4: 64, 2: 4}
# ... where the planes' GEMMs run on ddpm_fast's own AVX-512 GEMM at every size (torch's GEMM has no AVX-512
# kernels here: own_gemm_planes()), F(4x4) pays from 8 tiles (the 16x16 level at batch 1, the 8x8 level at batch 2).
WINOGRAD_MIN_TILES_OWN_GEMM = {4: 8, 2: 4}
# With at most this many tiles (the 8x8 level at batch 1) and the AVX-512 kernels, the transformed weight goes to
# the kernel as column panels (ops.winograd_weight(panels=True)), which its threads read once between them, front
# to back: there the GEMMs wait on the weight. At 32 tiles the panels were even with the other schedules.
WINOGRAD_PANELS_MAX_TILES = 16
# 1x1 convolutions with at most this many output pixels (N*H*W) run as one GEMM ("gemm"); above, oneDNN's
# blocked kernels are faster.
GEMM_1X1_MAX_PIXELS = 1024
# ... and fp32 3x3 stride-1 ones with at most this many (4x4 at batch 2); above, Winograd F(2x2) is faster.
GEMM_3X3_MAX_PIXELS = 32
# fp32 3x3 stride-1 convolutions with at most this many output channels run as "taps" (the product has 9 x O
# columns per pixel; beyond a few, summing its shifted slices costs more than it saves).
TAPS_MAX_OUT_CHANNELS = 8

_CAPABILITY: dict[torch.dtype, bool] = {}  # compute dtype -> packed oneDNN probe passed
_CAPABILITY_LOCK = threading.Lock()
_PROBE_ERRORS = (RuntimeError, AttributeError, TypeError, NotImplementedError)


def _mkldnn_ops_present() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    mk = torch.ops.mkldnn
    return hasattr(mk, "_reorder_convolution_weight") and hasattr(mk, "_convolution_pointwise")


def _probe(dtype: torch.dtype) -> bool:
    """Run the packed ops on a tiny convolution in ``dtype`` and compare with ``F.conv2d``."""
    if not _mkldnn_ops_present():
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 5, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(16, 8, 3, 3, generator=gen) * 0.1).to(dtype)
    b = torch.randn(16, generator=gen).to(dtype)
    other = torch.randn(2, 16, 5, 5, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    pad, stride, dil = [1, 1], [1, 1], [1, 1]
    try:
        with torch.no_grad():
            wp = torch.ops.mkldnn._reorder_convolution_weight(w, pad, stride, dil, 1, list(x.shape))
            y = torch.ops.mkldnn._convolution_pointwise(x, wp, b, pad, stride, dil, 1, "none", [], "")
            ys = torch.ops.mkldnn._convolution_pointwise(x, wp, b, pad, stride, dil, 1, "swish", [], "")
            ya = torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, wp, b, pad, stride, dil, 1, "add", None, None, [], None
            )
    except _PROBE_ERRORS:  # the internal ops changed or refuse this dtype here
        return False
    ref = F.conv2d(x.float(), w.float(), b.float(), 1, 1)
    tol = (1e-4 if dtype == torch.float32 else 5e-2) * (ref.abs().max().item() + 1.0)
    return bool(
        (y.float() - ref).abs().max().item() <= tol
        and (ys.float() - F.silu(ref)).abs().max().item() <= tol
        and (ya.float() - (ref + other.float())).abs().max().item() <= tol
    )


def mkldnn_conv_supported(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the packed oneDNN convolution works here for ``dtype`` (probed once, then cached)."""
    cached = _CAPABILITY.get(dtype)
    if cached is not None:
        return cached
    with _CAPABILITY_LOCK:
        if dtype not in _CAPABILITY:
            _CAPABILITY[dtype] = _probe(dtype)
            if dtype == torch.float32 and not _CAPABILITY[dtype]:
                warnings.warn(
                    "ddpm_fast: torch.ops.mkldnn packed convolutions are unavailable or wrong in this "
                    "torch build; convolutions use F.conv2d",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _CAPABILITY[dtype]


def _packed_compute_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the packed path computes ``dtype`` inputs in, or None when it cannot."""
    if dtype in (torch.bfloat16, torch.float16) and mkldnn_conv_supported(dtype):
        return dtype
    if dtype in (torch.float32, torch.bfloat16, torch.float16) and mkldnn_conv_supported(torch.float32):
        return torch.float32
    return None


def _winograd_tile(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """4 or 2: the Winograd tile for ``conv(x)``; 0: not eligible (see WINOGRAD_MIN_*)."""
    max_tile = fast_path.winograd_max_tile()
    if not (
        max_tile
        and x.dtype == torch.float32
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS
        and ops.native_available()
    ):
        return 0
    min_tiles = WINOGRAD_MIN_TILES_OWN_GEMM if own_gemm_planes() else WINOGRAD_MIN_TILES
    for tile in (4, 2):
        if tile <= max_tile and _tiles(x, tile) >= min_tiles[tile]:
            return tile
    return 0


def own_gemm_planes() -> bool:
    """Whether the Winograd planes' GEMMs run on ddpm_fast's AVX-512 GEMM at every size: its AVX-512 kernels are in
    use and torch's GEMM has none here (MKL on a CPU other than Intel's; see ``_native.torch_gemm_avx512``)."""
    return linear.panel_supported() and not _native.torch_gemm_avx512()


def _tiles(x: torch.Tensor, tile: int) -> int:
    n, _, h, w = x.shape
    return n * -(-h // tile) * -(-w // tile)


def _winograd_panels(conv: nn.Conv2d, x: torch.Tensor, tile: int) -> bool:
    """Whether ``conv(x)``'s Winograd weight goes to the kernel as column panels (few tiles: see
    ops.winograd_weight)."""
    return (
        _tiles(x, tile) <= WINOGRAD_PANELS_MAX_TILES and conv.out_channels % ops.PANEL == 0 and linear.panel_supported()
    )


def _gemm(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    if not (
        conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return False
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    if conv.kernel_size == (1, 1) and conv.padding == (0, 0):
        return pixels <= GEMM_1X1_MAX_PIXELS
    return (
        conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and x.dtype == torch.float32
        and pixels <= GEMM_3X3_MAX_PIXELS
    )


def _panels(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether a "gemm" convolution runs as :func:`~ddpm_fast.ops.conv3x3_panels`: 3x3, whole output panels, few
    pixels (:func:`~ddpm_fast.models.linear.panel_rows`). The op builds the im2col rows itself, where the GEMM
    over them in Python takes a padded copy, a strided gather and views around it."""
    n, _, h, w = x.shape
    return conv.kernel_size == (3, 3) and conv.out_channels % ops.PANEL == 0 and linear.panel_rows(n * h * w)


def _taps(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.out_channels <= TAPS_MAX_OUT_CHANNELS
        and x.dtype == torch.float32
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def conv_path(conv: nn.Conv2d, x: torch.Tensor, other: torch.Tensor | None = None) -> str:
    """Which implementation runs ``conv(x)`` (then ``+ other``): see the module docstring."""
    w, b = conv.weight, conv.bias
    if not (
        x.dim() == 4
        and x.shape[1] == conv.in_channels
        and x.dtype == w.dtype
        and (x.is_cpu and w.is_cpu or x.device == w.device)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and fast_path.use_fused(x, conv)
        and fast_path.prepared_weights_allowed()
        and trackable(w)
        and trackable(b)
    ):
        return "plain"
    if x.is_cpu:
        exact_other = other is None or other.shape == (x.shape[0], conv.out_channels, x.shape[2], x.shape[3])
        if exact_other and _gemm(conv, x):
            return "gemm"
        if exact_other and _taps(conv, x):
            return "taps"
        tile = _winograd_tile(conv, x)
        if tile and exact_other:
            return "winograd4" if tile == 4 else "winograd2"
        return "packed" if _packed_compute_dtype(x.dtype) is not None else "plain"
    if x.is_cuda and x.is_contiguous(memory_format=torch.channels_last):
        return "cuda_nhwc"
    return "plain"


def cat_path(conv: nn.Conv2d, x: torch.Tensor, skip: torch.Tensor) -> str:
    """How ``conv(torch.cat([x, skip], 1))`` runs: see the module docstring."""
    if not (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and x.dim() == 4
        and skip.dim() == 4
        and x.shape[1] + skip.shape[1] == conv.in_channels
        and x.shape[0] == skip.shape[0]
        and x.shape[2:] == skip.shape[2:]
        and x.dtype == skip.dtype == conv.weight.dtype
        and x.is_cpu
        and skip.is_cpu
        and x.is_contiguous(memory_format=torch.channels_last)
        and skip.is_contiguous(memory_format=torch.channels_last)
        and fast_path.use_fused(x, conv)
        and fast_path.use_fused(skip, conv)
        and x.shape[0] * x.shape[2] * x.shape[3] >= linear.PACKED_LINEAR_MIN_ROWS
    ):
        return "cat"
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view
    return "gemm_cat" if linear.usable(rows, conv.weight, conv.bias) else "cat"


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters and state-dict keys) that runs on :func:`conv_path`'s choice."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._prepared = PreparedCache()

    def _apply(self, fn, *args, **kwargs):  # .to() / .half(): drop the old copies now rather than at next use
        self._prepared.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002  (nn.Conv2d's argument name)
        return self.forward_fused(input)

    def forward_fused(
        self,
        x: torch.Tensor,
        other: torch.Tensor | None = None,
        *,
        silu: bool = False,
        output_scale: float = 1.0,
    ) -> torch.Tensor:
        """``conv(x)``, then ``+ other`` (a residual of the output's shape, or one that broadcasts to it), then
        SiLU, then ``/ output_scale``; fused into the convolution where the path allows, otherwise the same ops
        one after the other. Matches the unfused composite up to float rounding."""
        path = conv_path(self, x, other)
        if path != "packed":  # _packed notes itself (the kernel benchmark's baseline calls it directly)
            fast_path.note(f"conv:{path}")
        if path.startswith("winograd"):
            tile = int(path[-1])
            panels = _winograd_panels(self, x, tile)
            if panels:
                fast_path.note("winograd:panels")
            u, b = self._prepared.get(
                (path, panels), (self.weight, self.bias), lambda: self._winograd_weights(tile, panels)
            )
            return ops.conv3x3_winograd(x, u, b, residual=other, silu=silu, output_scale=output_scale)
        if path == "packed":
            y = self._packed(x, other, silu)
            return y.div_(output_scale) if output_scale != 1.0 else y
        if path in ("gemm", "taps"):
            y = self._gemm(x, other) if path == "gemm" else self._taps(x, other)
            if silu:
                y = F.silu(y, inplace=True)
            return y.div_(output_scale) if output_scale != 1.0 else y
        weight = self.weight
        if path == "cuda_nhwc":
            weight = self._prepared.get(
                ("cuda_nhwc",),
                (self.weight,),
                lambda: self.weight.detach().contiguous(memory_format=torch.channels_last),
            )
        y = self._conv_forward(x, weight, self.bias)
        inplace = path != "plain"  # y is ours alone (no autograd on these paths)
        if other is not None:
            y = y.add_(other) if inplace and y.shape == torch.broadcast_shapes(y.shape, other.shape) else y + other
        if silu:
            y = F.silu(y, inplace=inplace)
        if output_scale != 1.0:
            y = y.div_(output_scale) if inplace else y / output_scale
        return y

    def forward_cat(self, x: torch.Tensor, skip: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """``conv(torch.cat([x, skip], 1))`` (then ``+ other``, of the output's shape) on :func:`cat_path`'s
        choice; channels_last out of "gemm_cat"."""
        if cat_path(self, x, skip) == "cat":
            return self.forward_fused(torch.cat([x, skip], dim=1), other)
        fast_path.note("conv:gemm_cat")
        n, c1, h, w = x.shape
        o = self.out_channels

        def rows(t: torch.Tensor) -> torch.Tensor:  # channels_last: (N*H*W, C) views
            return t.permute(0, 2, 3, 1).reshape(n * h * w, t.shape[1])

        def block(lo: int, hi: int):
            return lambda: self.weight.detach()[:, lo:hi].reshape(o, hi - lo)

        y = linear.packed_linear(
            self._prepared,
            ("gemm_cat", 0, c1),
            (self.weight,),
            block(0, c1),
            self.bias,
            rows(x),
            None if other is None else rows(other),
        )
        y = linear.packed_linear(
            self._prepared, ("gemm_cat", 1, c1), (self.weight,), block(c1, self.in_channels), None, rows(skip), y
        )
        return y.view(n, h, w, o).permute(0, 3, 1, 2)

    def _winograd_weights(self, tile: int, panels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.bias
        u = ops.winograd_weight(self.weight, tile, panels=panels)
        return u, None if b is None else b.detach().float().contiguous()

    def _gemm(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        """1x1 or 3x3 convolution of channels_last ``x`` as one GEMM of its (im2col) rows, ``(N*H*W, K) @ (K, O)``,
        + bias, + other (a 3x3 one of few pixels on :func:`~ddpm_fast.ops.conv3x3_panels`, else on oneDNN's packed
        linear where it takes the rows, else ``addmm``); the result is channels_last."""
        n, c, h, w = x.shape
        o = self.out_channels
        if _panels(self, x):
            fast_path.note("linear:panel")
            panels = self._prepared.get(
                ("gemm", "conv3x3_panels"), (self.weight,), lambda: ops.conv3x3_panel_weight(self.weight)
            )
            return ops.conv3x3_panels(x, panels, self.bias, other)
        if self.kernel_size == (1, 1):
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: x is channels_last
        else:  # rows of the 3x3 neighbourhoods in (kh, kw, c) order, which the reordered weight's rows follow
            padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
            rows = padded.unfold(1, 3, 1).unfold(2, 3, 1).permute(0, 1, 2, 4, 5, 3).reshape(n * h * w, 9 * c)
        other_rows = None if other is None else other.permute(0, 2, 3, 1).reshape(n * h * w, o)
        if linear.usable(rows, self.weight, self.bias):
            y = linear.packed_linear(
                self._prepared, ("gemm",), (self.weight,), self._gemm_weight, self.bias, rows, other_rows
            )
            return y.view(n, h, w, o).permute(0, 3, 1, 2)
        if self.kernel_size == (1, 1):
            weight = self._gemm_weight().t()  # a view
        else:  # the (K, O) copy is made once
            weight = self._prepared.get(("gemm",), (self.weight,), lambda: self._gemm_weight().t().contiguous())
        if other_rows is None:
            y = rows @ weight if self.bias is None else torch.addmm(self.bias, rows, weight)
        else:
            y = torch.addmm(other_rows, rows, weight)
            if self.bias is not None:
                y = y.add_(self.bias)
        return y.view(n, h, w, o).permute(0, 3, 1, 2)

    def _taps(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        """3x3 convolution of channels_last ``x`` with few outputs: z = pixels @ (C, 9*O), every tap's weight at
        once; output pixel (i, j) sums z's tap (kh, kw) part at input pixel (i + kh - 1, j + kw - 1) (zero outside
        the image: index i + kh of z padded by one pixel); + bias, + other. The result is channels_last."""
        n, c, h, w = x.shape
        o = self.out_channels
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: x is channels_last
        if linear.usable(rows, self.weight):  # oneDNN's packed linear, on the (out, in) = (9 * O, C) matrix
            z = linear.packed_linear(
                self._prepared, ("taps",), (self.weight,), lambda: self._taps_weight().t(), None, rows
            )
        else:
            z = rows @ self._prepared.get(("taps",), (self.weight,), lambda: self._taps_weight().contiguous())
        z = z.view(n, h, w, 3, 3, o)
        z = F.pad(z, (0, 0, 0, 0, 0, 0, 1, 1, 1, 1))  # a zero pixel around the image
        y = z[:, 1 : h + 1, 1 : w + 1, 1, 1, :].clone()  # the centre tap first: n, h, w, o
        for kh in range(3):
            for kw in range(3):
                if (kh, kw) != (1, 1):
                    y += z[:, kh : kh + h, kw : kw + w, kh, kw, :]
        if self.bias is not None:
            y += self.bias
        if other is not None:
            y += other.permute(0, 2, 3, 1)
        return y.permute(0, 3, 1, 2)

    def _taps_weight(self) -> torch.Tensor:
        """The weight as (C, 9 * O): column (kh, kw, o) is tap (kh, kw)'s weight for output o."""
        w = self.weight.detach()
        return w.permute(1, 2, 3, 0).reshape(w.shape[1], -1)

    def _gemm_weight(self) -> torch.Tensor:
        """The weight as the GEMM's (out, in) matrix, its columns in the rows' (kh, kw, c) order."""
        w = self.weight.detach()
        return w.view(w.shape[0], -1) if self.kernel_size == (1, 1) else w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)

    def _packed(self, x: torch.Tensor, other: torch.Tensor | None, silu: bool) -> torch.Tensor:
        fast_path.note("conv:packed")
        compute = _packed_compute_dtype(x.dtype)
        w, b = self.weight, self.bias

        def build():
            hint = list(x.shape)
            wp = torch.ops.mkldnn._reorder_convolution_weight(
                w.detach().to(compute), list(self.padding), list(self.stride), list(self.dilation), self.groups, hint
            )
            return wp, None if b is None else b.detach().to(compute).contiguous()

        # oneDNN picks the blocked layout for the input shape it is given: one copy per shape.
        wp, bp = self._prepared.get(("packed", compute, tuple(x.shape)), (w, b), build)
        out_dtype = x.dtype
        if compute != x.dtype:
            x = x.to(compute)
            other = other.to(compute) if other is not None else None
        pad, stride, dil = list(self.padding), list(self.stride), list(self.dilation)
        mk = torch.ops.mkldnn._convolution_pointwise
        if other is not None and other.shape == self._output_shape(x):
            y = mk.binary(x, other, wp, bp, pad, stride, dil, self.groups, "add", None, None, [], None)
            if silu:
                y = F.silu(y, inplace=True)
        else:  # no residual, or one that broadcasts (oneDNN's binary post-op wants the exact output shape)
            y = mk(x, wp, bp, pad, stride, dil, self.groups, "swish" if silu and other is None else "none", [], "")
            if other is not None:
                y = y + other
                if silu:
                    y = F.silu(y, inplace=True)
        return y.to(out_dtype) if y.dtype != out_dtype else y

    def _output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        spatial = [
            (x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1) // self.stride[i]
            + 1
            for i in range(2)
        ]
        return (x.shape[0], self.out_channels, *spatial)
