"""GEMMs of the fused CPU path on oneDNN's packed linear: ``rows @ weight.T + bias (+ other)`` with the weight
reordered once into oneDNN's blocked layout for the row count (``torch.ops.mkldnn._reorder_linear_weight``) and the
bias and the residual add in its epilogue (``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU
backend emits). ``addmm`` writes the broadcast bias into the output before its GEMM reads it back, and repacks
the weight on every call; at the UNet's GEMM shapes the packed op was as fast or faster (bench/results/).

Used by the convolutions that are one GEMM (``Conv2d``'s "gemm" path) and by attention's projections. The op
is internal to PyTorch: it is probed once against ``F.linear``; where the probe fails, callers keep ``addmm``.

Up to ``PANEL_MAX_ROWS`` rows (the 4x4 level at batch 1) the product instead runs on ddpm_fast's
:func:`~ddpm_fast.ops.panel_linear`, which reads a weight prepared once as column panels front to back: there
the GEMM waits on the weight coming from memory, and oneDNN's blocked walk over it streamed at about half the
rate (bench/results/). Used where the AVX-512 kernels run (the build measured; its AVX2 kernel is not). A 3x3
convolution of that many pixels runs on it as one op, :func:`~ddpm_fast.ops.conv3x3_panels`, which builds its
im2col rows itself (``Conv2d``'s "gemm" path).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import _native, fast_path, ops
from .prepared import PreparedCache, trackable

__all__ = [
    "packed_linear",
    "packed_linear_supported",
    "panel_rows",
    "panel_supported",
    "PACKED_LINEAR_MIN_ROWS",
    "PANEL_MAX_ROWS",
]

# Below this many rows (the time embedding's batch-size GEMMs) the packed op was slower than addmm.
PACKED_LINEAR_MIN_ROWS = 16
# Up to this many rows the panel GEMM beat oneDNN's packed one at every UNet shape; at 32 rows it won at some and
# lost at others, at 64 they were even.
PANEL_MAX_ROWS = 16

_SUPPORTED: bool | None = None
_LOCK = threading.Lock()
_PROBE_ERRORS = (RuntimeError, AttributeError, TypeError, NotImplementedError)


def _probe() -> bool:
    mk = torch.ops.mkldnn
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(mk, "_reorder_linear_weight")
        and hasattr(mk, "_linear_pointwise")
    ):
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(20, 24, generator=gen), torch.randn(12, 24, generator=gen)
    b, other = torch.randn(12, generator=gen), torch.randn(20, 12, generator=gen)
    try:
        with torch.no_grad():
            wp = mk._reorder_linear_weight(w, 20)
            y = mk._linear_pointwise(x, wp, b, "none", [], "")
            ya = mk._linear_pointwise.binary(x, other, wp, b, "add")
    except _PROBE_ERRORS:
        return False
    ref = F.linear(x, w, b)
    tol = 1e-4 * (ref.abs().max().item() + 1.0)
    return bool((y - ref).abs().max().item() <= tol and (ya - (ref + other)).abs().max().item() <= tol)


def packed_linear_supported() -> bool:
    """Whether oneDNN's packed fp32 linear works here (probed once, then cached)."""
    global _SUPPORTED
    if _SUPPORTED is None:
        with _LOCK:
            if _SUPPORTED is None:
                _SUPPORTED = _probe()
    return _SUPPORTED


def panel_supported() -> bool:
    """Whether GEMMs of few rows go to :func:`~ddpm_fast.ops.panel_linear`: the native kernels loaded, in their
    AVX-512 build."""
    return _native.cpu_isa() == "AVX512"


def panel_rows(m: int, min_rows: int = PACKED_LINEAR_MIN_ROWS) -> bool:
    """Whether a GEMM of ``m`` rows runs on the panel GEMM: ``min_rows`` (by default PACKED_LINEAR_MIN_ROWS, below
    which the other linears keep ``addmm``) to PANEL_MAX_ROWS rows (the range measured), where
    :func:`panel_supported`."""
    return min_rows <= m <= PANEL_MAX_ROWS and panel_supported()


def _panels(weight: torch.Tensor) -> torch.Tensor | None:
    """The panel copy of an (out, in) weight, None when ``out`` is not a whole number of panels."""
    return ops.panel_weight(weight) if weight.shape[0] % ops.PANEL == 0 else None


def usable(rows: torch.Tensor, *sources: torch.Tensor | None) -> bool:
    """Whether ``packed_linear`` takes ``rows`` with a weight made from ``sources``: fp32 CPU rows, at least
    PACKED_LINEAR_MIN_ROWS of them, weights that may be prepared (:mod:`~ddpm_fast.models.prepared`)."""
    return (
        rows.dtype == torch.float32
        and rows.is_cpu
        and rows.dim() == 2
        and rows.shape[0] >= PACKED_LINEAR_MIN_ROWS
        and all(t is None or t.dtype == torch.float32 for t in sources)
        and fast_path.prepared_weights_allowed()
        and all(trackable(t) for t in sources)
        and packed_linear_supported()
    )


def packed_linear(
    cache: PreparedCache,
    key: tuple,
    sources: tuple[torch.Tensor | None, ...],
    weight: Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    other: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rows @ weight().T + bias (+ other)`` for ``usable(rows)``: ``weight()`` builds the (out, in) matrix from
    ``sources`` (the parameters it depends on), packed once (per row count for oneDNN) into ``cache`` under
    ``key``."""
    m = rows.shape[0]
    if panel_rows(m):
        panels = cache.get((*key, "panel"), sources, lambda: _panels(weight().detach()))
        if panels is not None:
            fast_path.note("linear:panel")
            return ops.panel_linear(rows, panels, bias, other)
    fast_path.note("linear:packed")
    packed = cache.get(
        (*key, "packed_linear", m),
        sources,
        lambda: torch.ops.mkldnn._reorder_linear_weight(weight().detach().contiguous(), m),
    )
    rows = rows.contiguous()  # (callers run without autograd: the bias is passed as it is)
    if other is None:
        return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(rows, other.contiguous(), packed, bias, "add")
