"""CPU tests of the native ops (torch.ops.ddpm_fast.*) and their Python wrappers in ddpm_fast.ops.

Every op is checked against a float64 reference and against the PyTorch ops it replaces, with the rule
|ours - fp64| <= 2 * |torch same precision - fp64| + floor(dtype).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import _native, ops
from helpers import assert_close_rule, err, layout, seed_of

native = pytest.mark.skipif(not _native.available(), reason=f"native extension unavailable: {_native.load_error()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_err, _layout = err, layout


def _assert_close_rule(ours, torch_same, ref, dtype, what=""):
    assert_close_rule(ours, torch_same, ref, dtype, what)


# ---------------------------------------------------------------------------------------------- group norm

GN_SHAPES = [(2, 96, 7, 5, 8), (1, 64, 1, 1, 32), (2, 32, 4, 64, 8), (1, 256, 16, 16, 32), (3, 6, 3, 3, 3)]


@native
@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_silu_matches_reference(shape, fmt, dtype):
    N, C, H, W, G = shape
    g = torch.Generator().manual_seed(seed_of(shape, fmt))
    x = _layout((torch.randn(N, C, H, W, generator=g) * 2 + 0.5).to(dtype), fmt)
    w = torch.randn(C, generator=g).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    t = torch.randn(N, C, generator=g).to(dtype)
    for temb, silu, affine in [(None, True, True), (t, True, True), (t, False, False), (None, False, True)]:
        ww, bb = (w, b) if affine else (None, None)
        out = torch.ops.ddpm_fast.group_norm_silu(x, G, ww, bb, 1e-5, temb, silu)
        xd = x.double() + (temb.double()[:, :, None, None] if temb is not None else 0)
        ref = F.group_norm(xd, G, None if ww is None else ww.double(), None if bb is None else bb.double(), 1e-5)
        ref = F.silu(ref) if silu else ref
        xs = x + temb[:, :, None, None] if temb is not None else x
        same = F.group_norm(xs.contiguous(), G, ww, bb, 1e-5)  # torch's channels_last GroupNorm is less stable
        same = F.silu(same) if silu else same
        assert out.dtype == dtype and out.shape == x.shape
        _assert_close_rule(out, same, ref, dtype, f"temb={temb is not None} silu={silu} affine={affine}")
        if fmt == "channels_last" and H * W > 1:
            assert out.is_contiguous(memory_format=torch.channels_last)
        else:
            assert out.is_contiguous()


# (N, C1, C2, H, W, G): groups inside one input, groups across the boundary (C1 not a multiple of C / G), channel
# counts that are not whole vectors, single pixels
GN_CAT_SHAPES = [
    (2, 64, 32, 5, 7, 8),
    (1, 12, 20, 3, 3, 4),
    (3, 5, 7, 4, 2, 3),
    (1, 256, 128, 9, 9, 32),
    (2, 8, 8, 1, 1, 4),
]


@native
@pytest.mark.parametrize("shape", GN_CAT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_silu_cat_matches_reference(shape, fmt, dtype):
    N, C1, C2, H, W, G = shape
    g = torch.Generator().manual_seed(seed_of(shape, fmt, "cat"))
    x = (torch.randn(N, C1, H, W, generator=g) * 2 + 0.5).to(dtype)
    skip = (torch.randn(N, C2, H, W, generator=g) - 1.5).to(dtype)
    if fmt == "mixed":  # skip in the other format: brought to x's
        x, skip = _layout(x, "channels_last"), _layout(skip, "contiguous")
    else:
        x, skip = _layout(x, fmt), _layout(skip, fmt)
    w = torch.randn(C1 + C2, generator=g).to(dtype)
    b = torch.randn(C1 + C2, generator=g).to(dtype)
    cat = torch.cat([x, skip], dim=1)
    for silu, affine in [(True, True), (False, False), (True, False)]:
        ww, bb = (w, b) if affine else (None, None)
        out = torch.ops.ddpm_fast.group_norm_silu_cat(x, skip, G, ww, bb, 1e-5, silu)
        ref = F.group_norm(cat.double(), G, None if ww is None else ww.double(), None if bb is None else bb.double())
        ref = F.silu(ref) if silu else ref
        same = F.group_norm(cat.contiguous(), G, ww, bb, 1e-5)
        same = F.silu(same) if silu else same
        _assert_close_rule(out, same, ref, dtype, f"silu={silu} affine={affine}")
        # the one-input op on the concatenation, up to the order of the float sums
        tol = 2e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, ops.group_norm_silu(cat, G, ww, bb, 1e-5, silu=silu), rtol=tol, atol=tol)
        channels_last = fmt in ("channels_last", "mixed") and H * W > 1
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@native
def test_group_norm_silu_cat_large_mean_is_stable():
    torch.manual_seed(0)
    x = (1e4 + torch.randn(2, 48, 16, 16)).contiguous(memory_format=torch.channels_last)
    skip = (-3e3 + torch.randn(2, 16, 16, 16)).contiguous(memory_format=torch.channels_last)
    ref = F.group_norm(torch.cat([x, skip], 1).double(), 8)
    assert _err(ops.group_norm_silu_cat(x, skip, 8, silu=False), ref) < 5e-3


@native
def test_group_norm_silu_cat_bad_inputs():
    x, skip = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)
    op = torch.ops.ddpm_fast
    cases = [
        (lambda: ops.group_norm_silu_cat(x, skip, 5), ValueError, "divisible"),
        (lambda: op.group_norm_silu_cat(x, skip, 5, None, None, 1e-5, True), RuntimeError, "divisible"),
        (lambda: ops.group_norm_silu_cat(x, skip[:1], 4), ValueError, "skip must be"),
        (lambda: ops.group_norm_silu_cat(x, skip[:, :, :3], 4), ValueError, "skip must be"),
        (lambda: ops.group_norm_silu_cat(x, skip[0], 4), ValueError, "skip must be"),
        (lambda: ops.group_norm_silu_cat(x[0], skip, 4), ValueError, "4-D"),
        (lambda: ops.group_norm_silu_cat(x, skip.half(), 4), ValueError, "skip has dtype"),
        (lambda: ops.group_norm_silu_cat(x, skip, 4, torch.randn(8)), ValueError, "weight must have shape \\(12\\)"),
        (lambda: op.group_norm_silu_cat(x, skip, 4, None, torch.randn(12).int(), 1e-5, True), RuntimeError, "bias"),
        (lambda: ops.group_norm_silu_cat(x, skip, 4, eps=-1.0), ValueError, "eps"),
        (lambda: op.group_norm_silu_cat(x.int(), skip, 4, None, None, 1e-5, True), RuntimeError, "x has dtype Int"),
        (lambda: ops.group_norm_silu_cat(x, "skip", 4), TypeError, "skip"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


@native
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_group_norm_large_mean_is_stable(fmt):
    torch.manual_seed(0)
    x = _layout(1e4 + torch.randn(2, 64, 16, 16), fmt)
    t = torch.randn(2, 64)
    ref = F.group_norm(x.double() + t.double()[:, :, None, None], 8)
    torch_nchw = F.group_norm((x + t[:, :, None, None]).contiguous(), 8)
    out = ops.group_norm_silu(x, 8, temb=t, silu=False)
    assert _err(out, ref) <= 2 * _err(torch_nchw, ref) + 1e-5
    assert _err(out, ref) < 5e-3  # E[x^2]-E[x]^2 in fp32 would give errors of order 1 here


@native
def test_group_norm_fp32_params_with_half_input():
    x = torch.randn(2, 32, 5, 5).to(torch.bfloat16)
    w, b = torch.randn(32), torch.randn(32)
    out = ops.group_norm_silu(x, 8, w, b)
    ref = F.silu(F.group_norm(x.double(), 8, w.double(), b.double()))
    assert out.dtype == torch.bfloat16 and _err(out, ref) < 3e-2


# ---------------------------------------------------------------------------------------------- attention

ATTN_CASES = [  # B, H, L, S, D, Dv
    (1, 1, 256, 256, 256, 256),
    (2, 3, 7, 9, 5, 5),
    (1, 1, 1, 1, 512, 512),
    (1, 2, 100, 130, 33, 17),
    (1, 1, 64, 64, 520, 520),
    (1, 1, 13, 4099, 8, 8),
]


@native
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_matches_reference(case, dtype):
    B, H, L, S, D, Dv = case
    g = torch.Generator().manual_seed(sum(case))
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k = torch.randn(B, H, S, D, generator=g).to(dtype)
    v = torch.randn(B, H, S, Dv, generator=g).to(dtype)
    for scale in (None, 0.3):
        out = torch.ops.ddpm_fast.attention(q, k, v, scale)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
        same = F.scaled_dot_product_attention(q, k, v, scale=scale)
        assert out.shape == same.shape and out.dtype == dtype and out.is_contiguous()
        _assert_close_rule(out, same, ref, dtype, f"scale={scale}")


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_on_unet_views_and_transposes(dtype):
    torch.manual_seed(1)
    B, S, C = 2, 37, 24
    qkv = torch.randn(B, S, 3 * C).to(dtype)  # one packed projection, split into strided views
    q, k, v = (t.unsqueeze(1) for t in qkv.split(C, dim=-1))
    kt = torch.randn(B, 1, C, S).to(dtype).transpose(-1, -2)  # last-dim stride != 1: copied
    q3 = torch.randn(B, C, S).to(dtype).transpose(1, 2)  # 3-D (B, S, C) transposed view
    for qq, kk, vv in [(q, k, v), (q, kt, v), (q3, q3, q3)]:
        out = ops.attention(qq, kk, vv)
        ref = F.scaled_dot_product_attention(qq.double(), kk.double(), vv.double())
        _assert_close_rule(out, F.scaled_dot_product_attention(qq, kk, vv), ref, dtype)


# ---------------------------------------------------------------------------------------------- scheduler step


def _step_ref(e, x, n, ax, ae, c0, c1, c2, s, clip):
    x0 = ax * x + ae * e
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    prev = c0 * x0 + c1 * x + c2 * e
    return (prev + s * n if n is not None else prev), x0


@native
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 7, 5), (1, 1, 1, 1)], ids=str)
def test_scheduler_step_matches_reference(fmt, dtype, shape):
    g = torch.Generator().manual_seed(3)
    e, x, n = (_layout(torch.randn(shape, generator=g).to(dtype), fmt) for _ in range(3))
    coefs = (1.3, -0.4, 0.6, 0.35, 0.05)
    for noise, scale, clip in [(n, 0.2, 1.0), (None, 0.0, None), (n, 0.0, 0.5)]:
        prev, x0 = ops.scheduler_step(e, x, noise, coefs[:2], coefs[2:], scale, clip)
        rp, r0 = _step_ref(e.double(), x.double(), None if noise is None else noise.double(), *coefs, scale, clip)
        sp, s0 = _step_ref(e, x, noise, *coefs, scale, clip)
        assert prev.dtype == dtype and prev.shape == x.shape
        _assert_close_rule(prev, sp, rp, dtype, "prev")
        _assert_close_rule(x0, s0, r0, dtype, "x0")
        if fmt == "channels_last":
            assert prev.stride() == x.stride()


# Rows of (a_x, a_e, c0, c1, c2, noise_scale): the last has no noise term.
STEP_TABLE = [
    (1.3, -0.4, 0.6, 0.35, 0.05, 0.2),
    (1.02, -0.2, 0.9, 0.1, 0.0, 0.07),
    (3.1, -2.9, 0.25, 0.7, -0.1, 0.5),
    (1.0, -0.01, 0.99, 0.0, 0.0, 0.0),
]


def _step_table(rows=STEP_TABLE, layout="contiguous"):
    t = torch.tensor(rows, dtype=torch.float32)
    return t.t().contiguous().t() if layout == "column_major" else t  # strides (1, T): read through its strides


@native
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 7, 5), (1, 1, 1, 1), (3, 5, 3, 1)], ids=str)
def test_scheduler_step_table_matches_reference(fmt, dtype, shape):
    """Row index[0] of the table gives exactly scheduler_step with those coefficients (the same kernel), and the
    Python formula within the usual rule; a row noise_scale of 0 drops the noise term even when noise is given."""
    g = torch.Generator().manual_seed(11)
    e, x, n = (_layout(torch.randn(shape, generator=g).to(dtype), fmt) for _ in range(3))
    op = torch.ops.ddpm_fast
    for table_layout in ("contiguous", "column_major"):
        table = _step_table(layout=table_layout)
        for i, row in enumerate(STEP_TABLE):
            coefs = tuple(float(v) for v in table[i])  # the float32 values the kernel reads
            for noise, clip in [(n, 1.0), (None, None), (n, None)]:
                for index in (torch.tensor([i]), torch.tensor(i)):  # (1,) or 0-dim: one int64 element
                    prev, x0 = op.scheduler_step_table(e, x, noise, table, index, clip)
                    want = op.scheduler_step(e, x, noise, *coefs, clip)
                    assert prev.dtype == dtype and prev.shape == x.shape
                    torch.testing.assert_close(prev, want[0], rtol=0, atol=0)
                    torch.testing.assert_close(x0, want[1], rtol=0, atol=0)
                used = noise if coefs[5] != 0.0 else None
                rp, r0 = _step_ref(e.double(), x.double(), None if used is None else used.double(), *coefs, clip)
                sp, s0 = _step_ref(e, x, used, *coefs, clip)
                _assert_close_rule(prev, sp, rp, dtype, f"prev row {i}")
                _assert_close_rule(x0, s0, r0, dtype, f"x0 row {i}")
                if fmt == "channels_last":
                    assert prev.stride() == x.stride() and x0.stride() == x.stride()


@native
def test_scheduler_step_table_zero_noise_scale_skips_the_noise_and_layouts():
    x = torch.randn(2, 3, 6, 5)
    nan_noise = torch.full_like(x, float("nan"))
    table, last = _step_table(), torch.tensor([len(STEP_TABLE) - 1])
    prev, x0 = torch.ops.ddpm_fast.scheduler_step_table(x, x, nan_noise, table, last, None)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    # Noise given in another layout counts for the layout even when its row scale is 0 (the fake cannot see it).
    cl = x.contiguous(memory_format=torch.channels_last)
    prev, _ = torch.ops.ddpm_fast.scheduler_step_table(cl, cl, x, table, last, None)
    assert prev.is_contiguous()
    prev, _ = torch.ops.ddpm_fast.scheduler_step_table(cl, cl, None, table, last, None)
    assert prev.stride() == cl.stride()
    empty = torch.empty(0, 3, 4, 4)
    prev, x0 = torch.ops.ddpm_fast.scheduler_step_table(empty, empty, None, table, torch.tensor([0]), None)
    assert prev.shape == empty.shape and x0.shape == empty.shape


@native
def test_scheduler_step_table_bad_inputs():
    x = torch.randn(2, 3, 4, 4)
    table, i = _step_table(), torch.tensor([1])
    op = torch.ops.ddpm_fast.scheduler_step_table
    cases = [
        (lambda: op(x, x, None, table, torch.tensor([4]), None), "index 4 is out of range for a coefs table of 4 rows"),
        (lambda: op(x, x, None, table, torch.tensor([-1]), None), "index -1 is out of range"),
        (lambda: op(x, x, None, table.double(), i, None), "coefs has dtype Double; expected float32"),
        (lambda: op(x, x, None, table[:, :5], i, None), r"coefs must be a \(T, 6\) table"),
        (lambda: op(x, x, None, table[:0], i, None), r"coefs must be a \(T, 6\) table"),
        (lambda: op(x, x, None, table[0], i, None), r"coefs must be a \(T, 6\) table"),
        (lambda: op(x, x, None, table, i.int(), None), "index has dtype Int; expected int64"),
        (lambda: op(x, x, None, table, torch.tensor([1, 2]), None), "index must have exactly one element"),
        (lambda: op(x, x[:1], None, table, i, None), "model_output has shape"),
        (lambda: op(x, x, x[:1], table, i, None), "noise has shape"),
        (lambda: op(x, x.half(), None, table, i, None), "model_output has dtype Float but sample has dtype Half"),
        (lambda: op(x.int(), x.int(), None, table, i, None), "sample has dtype Int"),
        (lambda: op(x, x, None, table, i, -1.0), "clip_range must be >= 0"),
        # Another device (meta stands in for one): the dispatcher runs the fake kernel, which words it as the
        # real kernels do.
        (
            lambda: op(x, x, None, table.to("meta"), i, None),
            r"scheduler_step_table: coefs is on meta but sample is on cpu \(all tensors must be on one device\)",
        ),
        (lambda: op(x, x, None, table, i.to("meta"), None), "index is on meta but sample is on cpu"),
        (lambda: op(x.to("meta"), x.to("meta"), None, table, i, None), "coefs is on cpu but sample is on meta"),
    ]
    for fn, text in cases:
        with pytest.raises(RuntimeError, match=text):
            fn()


@native
def test_scheduler_step_table_fake_raises_the_kernels_device_errors():
    """Under FakeTensorMode (torch.compile's tracing) the fake words device mismatches as the CUDA kernel does
    (tests/test_ops_cuda.py compares the two on a GPU); fake CUDA tensors need no GPU."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()

    def fake(shape, device, dtype=torch.float32):
        return FakeTensor(mode, torch.empty(shape, dtype=dtype, device="meta"), torch.device(device))

    x, t, i = (2, 3, 4, 4), (4, 6), (1,)
    op = torch.ops.ddpm_fast.scheduler_step_table
    cases = [
        (
            (fake(x, "cuda:0"), fake(x, "cuda:0"), None, fake(t, "cpu"), fake(i, "cuda:0", torch.int64)),
            "scheduler_step_table: coefs is on cpu but sample is on cuda:0 (all tensors must be on one device)",
        ),
        (
            (
                fake(x, "cuda:0"),
                fake(x, "cuda:0"),
                fake(x, "cuda:1"),
                fake(t, "cuda:0"),
                fake(i, "cuda:0", torch.int64),
            ),
            "scheduler_step_table: noise is on cuda:1 but sample is on cuda:0 (all tensors must be on one device)",
        ),
        (
            (fake(x, "cuda:0"), fake(x, "cpu"), None, fake(t, "cuda:0"), fake(i, "cuda:0", torch.int64)),
            "scheduler_step_table (CUDA): sample must be a CUDA tensor, got device cpu",
        ),
    ]
    with mode:
        for args, text in cases:
            with pytest.raises(RuntimeError) as info:
                op(*args, None)
            assert str(info.value) == text
        prev, x0 = op(
            fake(x, "cuda:0"), fake(x, "cuda:0"), None, fake(t, "cuda:0"), fake(i, "cuda:0", torch.int64), 1.0
        )
        assert prev.device == torch.device("cuda:0") and prev.shape == x0.shape == x


@native
def test_scheduler_step_table_opcheck_and_compile():
    torch.manual_seed(0)
    e, s, n = torch.randn(3, 2, 3, 5, 4).unbind(0)
    table = _step_table()
    op = torch.ops.ddpm_fast.scheduler_step_table.default
    for ee, ss, nn in [
        (e, s, n),
        tuple(t.contiguous(memory_format=torch.channels_last) for t in (e, s, n)),
        (e.transpose(2, 3), s.transpose(2, 3).contiguous(), None),
    ]:
        for i in (0, 3):
            torch.library.opcheck(op, (ee, ss, nn, table, torch.tensor([i]), 1.0))
            torch.library.opcheck(op, (ee, ss, nn, _step_table(layout="column_major"), torch.tensor(i), None))
    torch._dynamo.reset()
    idx = torch.tensor([0])

    def loop(x, eps, noise):
        for _ in range(3):  # the caller advances the index in place between steps
            x, _ = torch.ops.ddpm_fast.scheduler_step_table(eps, x, noise, table, idx, 1.0)
            idx.add_(1)
        return x

    eager = loop(s, e, n)
    idx.zero_()
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")(s, e, n)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- opcheck / compile


@native
def test_opcheck_all_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 3)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(
            torch.ops.ddpm_fast.group_norm_silu.default,
            (xx, 4, torch.randn(16), torch.randn(16), 1e-5, torch.randn(2, 16), True),
        )
        torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (xx, 8, None, None, 1e-6, None, False))
        skip = torch.randn(2, 12, 5, 3).contiguous(
            memory_format=torch.preserve_format if xx is x else torch.channels_last
        )
        torch.library.opcheck(
            torch.ops.ddpm_fast.group_norm_silu_cat.default, (xx, skip, 4, torch.randn(28), torch.randn(28), 1e-5, True)
        )
        torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu_cat.default, (xx, skip, 7, None, None, 1e-6, False))
    q, k, v = torch.randn(1, 2, 7, 9), torch.randn(1, 2, 11, 9), torch.randn(1, 2, 11, 5)
    torch.library.opcheck(torch.ops.ddpm_fast.attention.default, (q, k, v, None))
    torch.library.opcheck(torch.ops.ddpm_fast.attention.default, (q[0], k[0], v[0], 0.5))
    e, s, n = torch.randn(3, 1, 3, 4, 4).unbind(0)
    torch.library.opcheck(torch.ops.ddpm_fast.scheduler_step.default, (e, s, n, 1.0, -0.5, 0.4, 0.5, 0.1, 0.3, 1.0))
    torch.library.opcheck(
        torch.ops.ddpm_fast.scheduler_step.default, (e, s.transpose(2, 3), None, 1.0, -0.5, 0.4, 0.5, 0.1, 0.0, None)
    )


@native
@pytest.mark.parametrize("which", ["group_norm_silu", "attention", "scheduler_step"])
def test_torch_compile_fullgraph(which):
    torch._dynamo.reset()
    torch.manual_seed(0)
    if which == "group_norm_silu":
        args = (torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(1, 8))
        fn = lambda x, t: ops.group_norm_silu(x, 4, temb=t) * 2  # noqa: E731
    elif which == "attention":
        args = tuple(torch.randn(1, 1, 6, 8) for _ in range(3))
        fn = lambda q, k, v: ops.attention(q, k, v) + 1  # noqa: E731
    else:
        args = tuple(torch.randn(1, 3, 4, 4) for _ in range(3))
        fn = lambda e, x, n: ops.scheduler_step(e, x, n, (1.1, -0.2), (0.5, 0.4, 0.1), 0.3, 1.0)[0]  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), fn(*args))


# ---------------------------------------------------------------------------------------------- bad inputs


@native
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 12, 4, 4)
    op = torch.ops.ddpm_fast
    cases = [
        (lambda: ops.group_norm_silu(x, 5), ValueError, "divisible"),
        (lambda: op.group_norm_silu(x, 5, None, None, 1e-5, None, True), RuntimeError, "divisible"),
        (lambda: ops.group_norm_silu(x, 4, torch.randn(11)), ValueError, "weight"),
        (lambda: op.group_norm_silu(x, 4, torch.randn(11), None, 1e-5, None, True), RuntimeError, "weight"),
        (lambda: ops.group_norm_silu(x, 4, temb=torch.randn(2, 11)), ValueError, "temb"),
        (lambda: op.group_norm_silu(x, 4, None, None, 1e-5, torch.randn(12), True), RuntimeError, "temb"),
        (lambda: ops.group_norm_silu(x, 4, temb=torch.randn(2, 12).double()), ValueError, "temb"),
        (lambda: ops.group_norm_silu(x[0], 4), ValueError, "4-D"),
        (lambda: op.group_norm_silu(x[0], 4, None, None, 1e-5, None, True), RuntimeError, "4-D"),
        (lambda: ops.group_norm_silu(x.int(), 4), TypeError, "x"),
        (lambda: op.group_norm_silu(x.int(), 4, None, None, 1e-5, None, True), RuntimeError, "x has dtype Int"),
        (lambda: op.group_norm_silu(x, 4, None, torch.randn(12).int(), 1e-5, None, True), RuntimeError, "bias"),
        (lambda: op.attention(x, x, x[:, :, :3], None), RuntimeError, "sequence length"),
        (lambda: op.scheduler_step(x.double(), x.double(), None, 1, 1, 1, 1, 1, 0, None), RuntimeError, "dtype"),
        (lambda: op.scheduler_step(x, x, x[:1], 1, 1, 1, 1, 1, 1, None), RuntimeError, "noise has shape"),
        (lambda: ops.attention(x, x, x.double()), ValueError, "dtype"),
        (lambda: op.attention(x, x, x.half(), None), RuntimeError, "dtype"),
        (lambda: ops.attention(x, x[..., :3], x), ValueError, "last dim"),
        (lambda: op.attention(x, x[..., :3], x, None), RuntimeError, "last dim"),
        (lambda: ops.attention(x[0, 0], x[0, 0], x[0, 0]), ValueError, "4-D"),
        (lambda: ops.scheduler_step(x, x[:1], None, (1, 1), (1, 1, 1)), ValueError, "shape"),
        (lambda: op.scheduler_step(x, x.half(), None, 1, 1, 1, 1, 1, 0, None), RuntimeError, "dtype"),
        (lambda: ops.scheduler_step(x, x, x.half(), (1, 1), (1, 1, 1), 1.0), ValueError, "noise"),
        (lambda: ops.scheduler_step(x, x, None, (1,), (1, 1, 1)), ValueError, "x0_coefs"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()
    if torch.device("meta") != x.device:  # mixed devices (meta stands in for a second device)
        with pytest.raises(ValueError, match="device"):
            ops.group_norm_silu(x, 4, torch.randn(12, device="meta"))


# ---------------------------------------------------------------------------------------------- loader / fallback


@pytest.fixture
def fresh_loader(monkeypatch):
    """`use(c, info)`: _native as if nothing had been loaded yet, with importing ddpm_fast._C returning (or
    raising) `c` and ddpm_fast._build_info returning `info` (None: not installed). Everything is restored after."""
    monkeypatch.delenv("DDPM_FAST_DISABLE_NATIVE", raising=False)

    def use(c, info=None):
        for name, value in [
            ("_tried", False),
            ("_module", None),
            ("_error", None),
            ("_cuda_loaded", False),
            ("_cuda_error", None),
        ]:
            monkeypatch.setattr(_native, name, value)
        imported = []

        def import_module(name):
            imported.append(name)
            target = c if name == "ddpm_fast._C" else info
            if isinstance(target, BaseException):
                raise target
            if target is None:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return target

        monkeypatch.setattr(_native.importlib, "import_module", import_module)
        return imported

    return use


def _fake_c(**kw):
    attrs = dict(
        torch_version="2.10.0+cpu",
        target_version="2.10.0",
        cuda_library="",
        cuda_version="",
        limits={"cuda_attention_max_head_dim": 512},
        cpu_isa=lambda: "AVX2",
        __file__=__file__,
    )
    return types.SimpleNamespace(**{**attrs, **kw})


def test_version_mismatch_message_names_both_versions(fresh_loader):
    """The stable-ABI rule: a torch older than the build's target is refused, naming the installed torch and the
    build's versions; any newer torch (patch, +cpu/+cu suffixes included) is accepted."""
    fresh_loader(_fake_c(torch_version="99.1.0", target_version="99.0.0"))
    with pytest.raises(_native.NativeExtensionError) as info:
        _native.load()
    msg = str(info.value)
    assert "99.0.0" in msg and "99.1.0" in msg and torch.__version__ in msg, msg
    assert not _native.available() and not _native.has_cuda() and _native.load_error() == msg


@pytest.mark.parametrize("built", ["2.10.0", "2.10.0+cu130", "1.2.3"])
def test_newer_torch_than_the_build_is_accepted(fresh_loader, built):
    fake = _fake_c(torch_version=built, target_version="2.10.0")
    fresh_loader(fake, info=types.SimpleNamespace(torch_version=built, target_version="2.10.0"))
    assert _native.load() is fake and _native.available() and _native.load_error() is None
    assert _native.target_version() == "2.10.0" and _native.limits() == {"cuda_attention_max_head_dim": 512}
    assert _native.cpu_isa() == "AVX2"


def test_older_torch_is_refused_before_importing_the_extension(fresh_loader):
    """_build_info (written at build time) lets the refusal happen, and name both versions, without loading _C."""
    imported = fresh_loader(
        ImportError("must not be imported"), info=types.SimpleNamespace(torch_version="99.3.1", target_version="99.2.0")
    )
    assert not _native.available()
    msg = _native.load_error()
    assert "99.2.0" in msg and "99.3.1" in msg and torch.__version__ in msg, msg
    assert "ddpm_fast._C" not in imported and _native.target_version() == "99.2.0"


def test_missing_and_broken_builds_are_explained(fresh_loader):
    fresh_loader(None)  # no _C, no _build_info: installed without the extension
    assert not _native.available() and "missing" in _native.load_error() and "reinstall" in _native.load_error()
    fresh_loader(
        ImportError("undefined symbol: aoti_torch_new_thing"),
        info=types.SimpleNamespace(torch_version="2.11.0+cu130", target_version="2.10.0"),
    )
    msg = _native.load_error()
    assert "undefined symbol: aoti_torch_new_thing" in msg and "2.11.0+cu130" in msg and torch.__version__ in msg, msg
    fresh_loader(types.SimpleNamespace(torch_version="2.5.1", with_cuda=False))  # a pre-stable-ABI build
    assert "2.5.1" in _native.load_error() and torch.__version__ in _native.load_error()


def test_cuda_library_failure_leaves_the_cpu_kernels_and_is_warned_once(fresh_loader, monkeypatch, tmp_path):
    bad = tmp_path / "libddpm_fast_cuda.so"
    bad.write_bytes(b"not a shared library")
    fresh_loader(_fake_c(cuda_library=bad.name, cuda_version="13.0", __file__=str(tmp_path / "_C.so")))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.warns(RuntimeWarning, match="CUDA kernels") as record:
        assert _native.available()
        assert _native.available() and not _native.has_cuda()
    assert len(record) == 1
    assert str(bad) in _native.cuda_error() or bad.name in _native.cuda_error()
    assert _native.load_error() is None


def test_cpu_only_torch_or_build_has_no_cuda_kernels(fresh_loader, monkeypatch):
    fresh_loader(_fake_c())
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA torch, but this build has no CUDA library
    assert _native.available() and not _native.has_cuda()
    assert "no CUDA kernels" in _native.cuda_error()


@native
def test_real_extension_reports_its_build():
    c = _native.load()
    assert _native.target_version() == c.target_version == "2.10.0"
    assert _native._version_tuple(torch.__version__) >= (2, 10, 0) and isinstance(c.torch_version, str)
    assert _native.limits()["cuda_attention_max_head_dim"] == 512
    assert _native.cpu_isa() in ("AVX512", "AVX2", "DEFAULT")
    assert _native.has_cuda() == (
        torch.version.cuda is not None and bool(c.cuda_library) and _native.cuda_error() is None
    )


_SERIAL_CHUNKS_CHECK = """
import torch, torch.nn.functional as F
import ddpm_fast.ops  # noqa: F401
for threads in (2, 3):
    torch.set_num_threads(threads)
    for shape in [(1, 128, 32, 32), (1, 64, 9, 7), (3, 96, 16, 16), (5, 32, 8, 8)]:
        g = torch.Generator().manual_seed(sum(shape))
        x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        t = torch.randn(shape[:2], generator=g)
        y = torch.ops.ddpm_fast.group_norm_silu(x, 16, None, None, 1e-5, t, True)
        ref = F.silu(F.group_norm((x + t[:, :, None, None]).double(), 16, eps=1e-5))
        assert (y.double() - ref).abs().max() < 1e-5, (threads, shape)
print("ok")
"""


@native
def test_group_norm_channels_last_needs_no_concurrent_chunks():
    """torch's stable parallel_for may run its chunks one after another; with DDPM_FAST_SERIAL_CHUNKS=1 the glue
    does exactly that, and channels_last GroupNorm of samples split between chunks must still finish (a
    barrier waiting for the other chunk would hang here) and be right."""
    res = subprocess.run(
        [sys.executable, "-c", _SERIAL_CHUNKS_CHECK],
        env={**os.environ, "DDPM_FAST_SERIAL_CHUNKS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_autograd_uses_composite_and_gradients_flow():
    x = torch.randn(1, 8, 3, 3, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    ops.group_norm_silu(x, 4, w, None).sum().backward()
    assert x.grad is not None and w.grad is not None
    q = torch.randn(1, 1, 5, 4, requires_grad=True)
    ops.attention(q, q, q).sum().backward()
    assert q.grad is not None


_SUBPROCESS_CHECK = """
import torch, torch.nn.functional as F
from ddpm_fast import ops, _native
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 24, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
t = torch.randn(2, 24, generator=g)
ref = F.silu(F.group_norm((x + t[:, :, None, None]).double(), 8))
assert (ops.group_norm_silu(x, 8, temb=t).double() - ref).abs().max() < 1e-5
# bf16 / fp16 through the vectorised conversions (whole vectors and tails: 40 channels, 21 pixels)
for dt, tol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
    for fmt in (torch.channels_last, torch.contiguous_format):
        xh = (torch.randn(2, 40, 3, 7, generator=g) * 2 + 0.5).to(dt).contiguous(memory_format=fmt)
        ref = F.silu(F.group_norm(xh.double(), 8))
        assert (ops.group_norm_silu(xh, 8).double() - ref).abs().max() < tol, dt
q, k, v = torch.randn(1, 2, 19, 40), torch.randn(1, 2, 70, 40), torch.randn(1, 2, 70, 9)
ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
assert (ops.attention(q, k, v).double() - ref).abs().max() < 1e-5
p, x0 = ops.scheduler_step(x, x, x, (1.0, 0.5), (0.5, 0.25, 0.125), 0.5, 1.0)
assert (x0 - (1.5 * x).clamp(-1, 1)).abs().max() < 1e-6
for dt in (torch.bfloat16, torch.float16):  # 37 elements: vectors and a tail
    e = torch.randn(37, generator=g).to(dt)
    p, x0 = ops.scheduler_step(e, e, e, (1.0, 0.5), (0.5, 0.25, 0.125), 0.5, 1.0)
    r0 = (1.5 * e.double()).clamp(-1, 1)
    assert (x0.double() - r0).abs().max() <= 1e-2, dt
    assert (p.double() - (0.5 * r0 + 0.875 * e.double())).abs().max() <= 2e-2, dt
w = torch.randn(11, 24, 3, 3) / 15
ref = F.conv2d(x.double(), w.double(), padding=1)
assert (ops.conv3x3_winograd(x, ops.winograd_weight(w)).double() - ref).abs().max() < 1e-5
assert (ops.conv3x3_winograd(x, ops.winograd_weight(w, 4)).double() - ref).abs().max() < 3e-5
w = torch.randn(32, 24, 3, 3) / 15
ref = F.conv2d(x.double(), w.double(), padding=1)
assert (ops.conv3x3_winograd(x, ops.winograd_weight(w, panels=True)).double() - ref).abs().max() < 1e-5
a, wl, b = torch.randn(19, 37, generator=g), torch.randn(48, 37, generator=g), torch.randn(48, generator=g)
ref = F.linear(a.double(), wl.double(), b.double())
assert (ops.panel_linear(a, ops.panel_weight(wl), b).double() - ref).abs().max() < 1e-5
w = torch.randn(32, 24, 3, 3) / 15
ref = F.conv2d(x.double(), w.double(), padding=1)
assert (ops.conv3x3_panels(x, ops.conv3x3_panel_weight(w)).double() - ref).abs().max() < 1e-5
print(_native.cpu_isa() if _native.available() else "composite")
"""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Every CPU kernel build this CPU can run (the dispatcher refuses to force one it cannot).
_FLAGS = _cpu_flags()
_ISAS = (
    ["default"]
    + (["avx2"] if {"avx2", "fma"} <= _FLAGS else [])
    + (["avx512"] if {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _FLAGS else [])
)


@pytest.mark.parametrize(
    "env",
    [{"DDPM_FAST_CPU_ISA": isa} for isa in _ISAS] + [{"DDPM_FAST_DISABLE_NATIVE": "1"}],
    ids=[f"isa-{isa}" for isa in _ISAS] + ["no-native"],
)
def test_other_kernel_builds_in_subprocess(env):
    """Each kernel build the CPU supports (baseline, AVX2, AVX-512) and the pure-PyTorch fallback give results
    within the float64 bounds."""
    if "DDPM_FAST_CPU_ISA" in env and not _native.available():
        pytest.skip("native extension unavailable")
    res = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_CHECK],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (env["DDPM_FAST_CPU_ISA"].upper() if "DDPM_FAST_CPU_ISA" in env else "composite")


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@native
def test_torch_gemm_avx512_follows_the_cpu_vendor():
    """torch's GEMM (MKL) has AVX-512 kernels on Intel CPUs with AVX-512 only (see csrc/cpu/kernels.h)."""
    if "DDPM_FAST_TORCH_GEMM_AVX512" in os.environ:
        pytest.skip("DDPM_FAST_TORCH_GEMM_AVX512 is set")
    assert _native.torch_gemm_avx512() == (_cpu_vendor() == "GenuineIntel" and "avx512f" in _FLAGS)


# Tests whose code path depends on torch_gemm_avx512(): the attention's two products (our GEMM or torch's) and the
# UNet's Winograd tiles (conv.own_gemm_planes).
_GEMM_CHOICE_TESTS = [
    "tests/test_ops.py::test_attention_matches_reference",
    "tests/test_ops.py::test_attention_on_unet_views_and_transposes",
    "tests/test_fast_path.py::test_unet_runs_every_conv_packed_and_channels_last",
    "tests/test_fast_path.py::test_unet_batch16_runs_all_eligible_convs_as_winograd",
]


@native
@pytest.mark.parametrize("value", ["0", "1"])
def test_both_gemm_choices_in_subprocess(value):
    """Both answers of torch_gemm_avx512 (DDPM_FAST_TORCH_GEMM_AVX512 forces one), whichever CPU runs the tests: the
    tests of what depends on it pass either way."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "DDPM_FAST_TORCH_GEMM_AVX512": value}
    check = "from ddpm_fast import _native; print(_native.torch_gemm_avx512())"
    res = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == str(value == "1"), res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_GEMM_CHOICE_TESTS],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    bad = subprocess.run(
        [sys.executable, "-c", check],
        env={**os.environ, "DDPM_FAST_TORCH_GEMM_AVX512": "yes"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "DDPM_FAST_TORCH_GEMM_AVX512 must be 0 or 1" in bad.stderr


@native
def test_forcing_an_unknown_isa_is_an_error():
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; from ddpm_fast import ops; "
            "ops.scheduler_step(torch.ones(3), torch.ones(3), None, (1.0, 0.0), (1.0, 0.0, 0.0))",
        ],
        env={**os.environ, "DDPM_FAST_CPU_ISA": "sse9"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "DDPM_FAST_CPU_ISA must be auto, default, avx2 or avx512" in res.stderr


def test_attention_wrapper_routes_short_cpu_sequences_to_sdpa():
    """Below CPU_ATTENTION_MIN_KEYS keys the wrapper uses PyTorch's SDPA (faster there); above, the native op."""
    g = torch.Generator().manual_seed(5)
    for s in (ops.CPU_ATTENTION_MIN_KEYS - 1, ops.CPU_ATTENTION_MIN_KEYS + 3):
        q, k, v = (torch.randn(2, 3, s, 40, generator=g) for _ in range(3))
        with torch.inference_mode():
            out = ops.attention(q, k, v)
            sdpa = F.scaled_dot_product_attention(q, k, v)
            native = torch.ops.ddpm_fast.attention.default(q, k, v, None) if ops.native_available() else sdpa
        expected = sdpa if s < ops.CPU_ATTENTION_MIN_KEYS else native
        assert torch.equal(out, expected)
        torch.testing.assert_close(out, sdpa, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- winograd conv

# (N, C, O, H, W). With 2 threads (CI) on AVX-512: (2, 100, 72, 37, 29) runs the per-thread pipeline with our GEMM
# in 2-3 blocks per thread (C, O not multiples of 16, O not of 32); (1, 256, 256, 6, 5) has a transformed weight
# over 3 MB and few tiles: the batched schedule. test_conv3x3_winograd_schedules forces each schedule.
WINO_SHAPES = [
    (1, 8, 16, 7, 5),
    (2, 13, 9, 1, 1),
    (3, 24, 40, 6, 9),
    (1, 3, 8, 2, 3),
    (2, 64, 64, 16, 16),
    (1, 9, 17, 33, 2),
    (2, 100, 72, 37, 29),
    (1, 256, 256, 6, 5),
]


def _wino_case(shape, seed):
    n, c, o, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(o, c, 3, 3, generator=g) / (9 * c) ** 0.5
    return x, weight, torch.randn(o, generator=g), torch.randn(n, o, h, w, generator=g)


@pytest.mark.parametrize("tile", [2, 4], ids=["F2", "F4"])
@pytest.mark.parametrize("shape", WINO_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
def test_conv3x3_winograd_matches_float64_conv(shape, fmt, tile):
    """The native kernel and the PyTorch composite of the same algorithm against F.conv2d in float64, with and
    without bias / residual / SiLU / output scale; within 2x the direct fp32 convolution's own error + 1e-6 (F2)
    or 4x + 1e-5 of the output's largest value (F4). Odd sizes leave partial tiles at the right and bottom edges."""
    x, w, b, r = _wino_case(shape, seed_of(shape, fmt, tile))
    x = _layout(x, fmt)
    _check_winograd(
        x, w, ops.winograd_weight(w, tile), tile, ((None, None, False, 1.0), (b, r, True, 2.0), (b, None, False, 0.5))
    )


def _check_winograd(x, w, u, tile, cases):
    """The native op and its composite on weight form ``u`` against F.conv2d in float64 for each (bias, residual,
    silu, output scale) case, with test_conv3x3_winograd_matches_float64_conv's bounds."""
    for bias, res, silu, scale in cases:
        ref = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), padding=1)
        direct = F.conv2d(x, w, bias, padding=1)
        if res is not None:
            ref, direct = ref + res.double(), direct + res
        if silu:
            ref, direct = F.silu(ref), F.silu(direct)
        ref, direct = ref / scale, direct / scale
        with torch.inference_mode():
            out = ops.conv3x3_winograd(x, u, bias, residual=res, silu=silu, output_scale=scale)
        composite = ops._conv3x3_winograd_composite(x, u, bias, res, silu, scale)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        # F(4x4)'s transforms carry entries up to 8 (F(2x2)'s are 0 or 1), so its error is a multiple of the direct
        # convolution's; over 40 seeds of every case it stayed under 1.6e-5 (F4) and 1e-6 (F2) of the output's
        # largest value: these bounds leave 2.5x of that
        peak = ref.abs().max().item()
        bound = 2 * _err(direct, ref) + 2.5e-6 * peak if tile == 2 else 4 * _err(direct, ref) + 4e-5 * peak
        assert _err(out, ref) <= bound and _err(composite, ref) <= bound, (_err(out, ref), _err(composite, ref), bound)


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_weight_is_g_g_gt(tile):
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    g = torch.tensor(ops._WINOGRAD[tile][1], dtype=torch.float64)
    u = ops.winograd_weight(w, tile)
    p = tile + 2
    assert u.shape == (p * p, 3, 5) and u.dtype == torch.float32
    for o, c in ((0, 0), (4, 2)):
        torch.testing.assert_close(u[:, c, o].double().reshape(p, p), g @ w[o, c] @ g.T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="3, 3"):
        ops.winograd_weight(torch.randn(4, 4, 5, 5), tile)


def test_winograd_matrices_compute_the_correlation():
    """A^T [(G g G^T) * (B^T d B)] A is the 3x3 correlation of the (m+2)x(m+2) patch d, in float64."""
    for tile, (bt, g, at) in ops._WINOGRAD.items():
        bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (bt, g, at))
        d, k = torch.randn(tile + 2, tile + 2, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
        y = at @ ((g @ k @ g.T) * (bt @ d @ bt.T)) @ at.T
        ref = F.conv2d(d[None, None], k[None, None])[0, 0]
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="tile"):
        ops.winograd_weight(torch.randn(4, 4, 3, 3), 3)


@pytest.mark.parametrize("tile", [2, 4])
def test_conv3x3_winograd_composite_has_gradients(tile):
    x, w, b, r = _wino_case((1, 4, 6, 5, 5), 3)
    x.requires_grad_(True)
    u = ops.winograd_weight(w, tile)
    y = ops.conv3x3_winograd(x, u, b, residual=r, silu=True)
    assert y.grad_fn is not None
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().requires_grad_(True)
    (gref,) = torch.autograd.grad(F.silu(F.conv2d(x2, w, b, padding=1) + r).sum(), x2)
    torch.testing.assert_close(gx, gref, rtol=1e-4, atol=1e-5)


@native
def test_conv3x3_winograd_opcheck_compile_and_bad_inputs():
    x, w, b, r = _wino_case((2, 16, 8, 5, 7), 4)
    u = ops.winograd_weight(w)
    op = torch.ops.ddpm_fast.conv3x3_winograd.default
    for uu in (u, ops.winograd_weight(w, 4)):
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.library.opcheck(op, (xx, uu, b, r, True, 2.0))
            torch.library.opcheck(op, (xx, uu, None, None, False, 1.0))
    torch._dynamo.reset()
    fn = lambda x, r: ops.conv3x3_winograd(x, u, b, residual=r, silu=True) + 1  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, r), fn(x, r))
    cases = [
        (lambda: ops.conv3x3_winograd(x, u[:, :5]), ValueError, "winograd_weight"),
        (lambda: op(x, u[:, :5], None, None, False, 1.0), RuntimeError, "weight must be"),
        (lambda: ops.conv3x3_winograd(x, torch.cat([u, u[:9]])), ValueError, "16 or 36"),
        (lambda: op(x, torch.cat([u, u[:9]]), None, None, False, 1.0), RuntimeError, "16 or 36"),
        (lambda: ops.conv3x3_winograd(x.double(), u), ValueError, "float32"),
        (lambda: op(x.double(), u, None, None, False, 1.0), RuntimeError, "float32"),
        (lambda: ops.conv3x3_winograd(x, u, b[:3]), ValueError, "bias"),
        (lambda: op(x, u, None, r[:, :, :2], False, 1.0), RuntimeError, "residual"),
        (lambda: ops.conv3x3_winograd(x, u, output_scale=0.0), ValueError, "output_scale"),
        (lambda: op(x, u, None, None, False, 0.0), RuntimeError, "output_scale"),
        (lambda: ops.conv3x3_winograd(x[0], u), ValueError, "4-D"),
    ]
    for fn_, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn_()
    with pytest.raises(ValueError, match="device"):
        ops.conv3x3_winograd(x, u, torch.randn(8, device="meta"))


_WINO_SCHEDULE_CHECK = """
import sys, torch, torch.nn.functional as F
from ddpm_fast import ops
# (N, C, O, H, W): odd sizes and partial tiles, C and O off multiples of 16 (and O of the GEMM's 32 columns),
# O < 32, one image and several, tiles per thread from 1 to several blocks.
shapes = [(1, 8, 16, 7, 5), (2, 13, 9, 1, 1), (3, 24, 40, 6, 9), (2, 100, 72, 37, 29), (1, 33, 3, 20, 21),
          (4, 64, 96, 12, 12), (1, 17, 48, 70, 3)]
for threads in (1, 3):
    torch.set_num_threads(threads)
    for n, c, o, h, w in shapes:
        g = torch.Generator().manual_seed(n * 7919 + c * 31 + o)
        x = torch.randn(n, c, h, w, generator=g)
        wt = torch.randn(o, c, 3, 3, generator=g) / (9 * c) ** 0.5
        b, r = torch.randn(o, generator=g), torch.randn(n, o, h, w, generator=g)
        for tile in (2, 4):
            u = ops.winograd_weight(wt, tile)
            for fmt in (torch.channels_last, torch.contiguous_format):
                xx = x.contiguous(memory_format=fmt)
                for bias, res, silu, scale in ((None, None, False, 1.0), (b, r, True, 2.0), (b, None, False, 0.5)):
                    ref = F.conv2d(xx.double(), wt.double(), None if bias is None else bias.double(), padding=1)
                    direct = F.conv2d(xx, wt, bias, padding=1)
                    if res is not None:
                        ref, direct = ref + res.double(), direct + res
                    if silu:
                        ref, direct = F.silu(ref), F.silu(direct)
                    ref, direct = ref / scale, direct / scale
                    with torch.inference_mode():
                        out = torch.ops.ddpm_fast.conv3x3_winograd(xx, u, bias, res, silu, scale)
                    e, ed = (out.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item()
                    bound = 2 * ed + 1e-6 if tile == 2 else 4 * ed + 1e-5 * ref.abs().max().item()
                    assert e <= bound, (threads, (n, c, o, h, w), tile, fmt, silu, e, bound)
print("ok")
"""


@native
@pytest.mark.parametrize(
    "isa, schedule",
    [(_ISAS[-1], s) for s in ("pipeline", "pipeline_torch", "batched")] + [("default", "pipeline_torch")],
)
def test_conv3x3_winograd_schedules(isa, schedule):
    """Every schedule of the CPU Winograd op (DDPM_FAST_WINOGRAD_SCHEDULE forces one; the automatic choice depends
    on the weight size, tile count, threads and L2 size), on the best kernel build and the baseline one, with 1 and 3
    threads, against float64 with test_conv3x3_winograd_matches_float64_conv's bounds."""
    env = {**os.environ, "DDPM_FAST_CPU_ISA": isa, "DDPM_FAST_WINOGRAD_SCHEDULE": schedule}
    res = subprocess.run(
        [sys.executable, "-c", _WINO_SCHEDULE_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@native
def test_conv3x3_winograd_unknown_schedule_is_an_error():
    env = {**os.environ, "DDPM_FAST_WINOGRAD_SCHEDULE": "fastest"}
    code = (
        "import torch; from ddpm_fast import ops; x = torch.randn(1, 4, 5, 5); "
        "u = ops.winograd_weight(torch.randn(4, 4, 3, 3)); "
        "torch.ops.ddpm_fast.conv3x3_winograd(x, u, None, None, False, 1.0)"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "DDPM_FAST_WINOGRAD_SCHEDULE must be auto, pipeline" in res.stderr


# ---------------------------------------------------------------------------------------------- panel GEMM

# (M, K, N): the 4x4 level at batch 1 (16 rows, 9 x 256 inputs), one row, odd row and input counts (register
# blocks of 16 / 6 rows plus tails), one panel, no inputs.
PANEL_SHAPES = [(16, 2304, 256), (1, 5, 16), (37, 19, 48), (17, 300, 32), (6, 1, 64), (3, 0, 16)]


def _panel_case(shape, seed):
    m, k, n = shape
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / max(k, 1) ** 0.5
    return x, w, torch.randn(n, generator=g), torch.randn(m, n, generator=g)


@native
@pytest.mark.parametrize("shape", PANEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["contiguous", "strided"])
def test_panel_linear_matches_float64_and_linear(shape, fmt):
    """x @ w.T + bias (+ other) on the panel weight against F.linear in float64 (and fp32 F.linear's own error),
    with and without bias and other, rows in place or strided (a column slice of a wider tensor, a transposed
    view that the op copies), and the composite."""
    x, w, b, other = _panel_case(shape, seed_of(shape, fmt))
    if fmt == "strided":
        m, k = x.shape
        x = torch.cat([x, torch.randn(m, 3)], 1)[:, :k]  # unit column stride, row stride k + 3
        other = other.t().contiguous().t()  # column stride m: copied by the op
    u = ops.panel_weight(w)
    assert u.shape == (w.shape[0] // 16, w.shape[1], 16) and u.is_contiguous()
    for bias, oth in ((None, None), (b, None), (b, other), (None, other)):
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        same = F.linear(x, w, bias)
        if oth is not None:
            ref, same = ref + oth.double(), same + oth
        with torch.inference_mode():
            out = ops.panel_linear(x, u, bias, oth)
        composite = ops._panel_linear_composite(x, u, bias, oth)
        assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
        _assert_close_rule(out, same, ref, torch.float32, f"bias={bias is not None} other={oth is not None}")
        _assert_close_rule(composite, same, ref, torch.float32, "composite")


@native
def test_panel_linear_opcheck_compile_and_bad_inputs():
    x, w, b, other = _panel_case((7, 13, 32), 11)
    u = ops.panel_weight(w)
    op = torch.ops.ddpm_fast.panel_linear.default
    for args in ((x, u, b, other), (x, u, None, None), (x[:, :13], u, b, None)):
        torch.library.opcheck(op, args)
    torch._dynamo.reset()
    fn = lambda x, o: ops.panel_linear(x, u, b, o) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, other), fn(x, other))
    cases = [
        (lambda: op(x, u[:, :5], None, None), RuntimeError, "weight must be"),
        (lambda: ops.panel_linear(x, u[..., :8]), ValueError, "panel_weight"),
        (lambda: ops.panel_linear(x, u.reshape(-1, 16)), ValueError, "weight must be"),
        (lambda: ops.panel_linear(x[None], u), ValueError, "2-D"),
        (lambda: ops.panel_linear(x.double(), u), ValueError, "float32"),
        (lambda: ops.panel_linear(x.bfloat16(), u.bfloat16()), ValueError, "float32"),
        (lambda: op(x, u.double(), None, None), RuntimeError, "weight has dtype"),
        (lambda: ops.panel_linear(x, u, b[:16]), ValueError, "bias must have shape"),
        (lambda: ops.panel_linear(x, u, None, other[:3]), ValueError, "other must have"),
        (lambda: ops.panel_linear(x, u, None, other.int()), ValueError, "other"),
        (lambda: ops.panel_weight(torch.randn(20, 4)), ValueError, "multiple of 16"),
        (lambda: ops.panel_weight(torch.randn(16, 4, 1)), ValueError, "multiple of 16"),
        (lambda: ops.panel_weight(torch.ones(16, 4, dtype=torch.int64)), TypeError, "floating-point"),
    ]
    for fn_, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn_()
    with pytest.raises(ValueError, match="device"):
        ops.panel_linear(x, u, torch.randn(32, device="meta"))


@native
@pytest.mark.parametrize("threads", [1, 3])
def test_panel_linear_threads_split_the_panels(threads):
    """Any thread count (panels split into contiguous ranges, some threads without a panel) gives the same result
    as one thread, bit for bit: each output column is computed by one thread in one order."""
    x, w, b, other = _panel_case((16, 100, 80), 3)  # 5 panels
    u = ops.panel_weight(w)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.panel_linear(x, u, b, other)
        torch.set_num_threads(threads)
        assert torch.equal(ops.panel_linear(x, u, b, other), one)
    finally:
        torch.set_num_threads(previous)


# (N, C_in, C_out, H, W): the 4x4 level at batch 1, odd channel and pixel counts, one pixel.
CONV_PANEL_SHAPES = [(1, 256, 256, 4, 4), (2, 7, 32, 3, 5), (1, 13, 16, 1, 1), (3, 5, 48, 4, 4)]


def _conv_panel_case(shape, seed):
    n, c, o, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x, wt = torch.randn(n, c, h, w, generator=g), torch.randn(o, c, 3, 3, generator=g) / max(9 * c, 1) ** 0.5
    return x, wt, torch.randn(o, generator=g), torch.randn(n, o, h, w, generator=g)


@native
@pytest.mark.parametrize("shape", CONV_PANEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_conv3x3_panels_matches_float64_and_conv(shape, fmt):
    """conv(x) + bias (+ residual) as the panel GEMM over im2col rows built in the op, against F.conv2d in float64
    (and fp32 F.conv2d's own error), with and without bias and residual, both memory formats (the residual in the
    other one), and the composite; the panel weight unpacks to the (kh, kw, c)-ordered GEMM weight."""
    x, w, b, r = _conv_panel_case(shape, seed_of(shape, fmt))
    x, r = _layout(x, fmt), _layout(r, "channels_last" if fmt == "contiguous" else "contiguous")
    u = ops.conv3x3_panel_weight(w)
    o, c = w.shape[:2]
    assert u.shape == (o // 16, 9 * c, 16) and u.is_contiguous()
    unpacked = u.transpose(1, 2).reshape(o, 9 * c)
    assert torch.equal(unpacked, w.permute(0, 2, 3, 1).reshape(o, 9 * c))
    for bias, res in ((None, None), (b, None), (b, r), (None, r)):
        ref = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), padding=1)
        same = F.conv2d(x, w, bias, padding=1)
        if res is not None:
            ref, same = ref + res.double(), same + res
        with torch.inference_mode():
            out = ops.conv3x3_panels(x, u, bias, res)
        composite = ops._conv3x3_panels_composite(x, u, bias, res)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last)
        what = f"bias={bias is not None} residual={res is not None}"
        _assert_close_rule(out, same, ref, torch.float32, what)
        _assert_close_rule(composite, same, ref, torch.float32, "composite " + what)


@native
def test_conv3x3_panels_opcheck_compile_and_bad_inputs():
    x, w, b, r = _conv_panel_case((2, 5, 32, 3, 4), 12)
    u = ops.conv3x3_panel_weight(w)
    op = torch.ops.ddpm_fast.conv3x3_panels.default
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        for args in ((xx, u, b, r), (xx, u, None, None)):
            torch.library.opcheck(op, args)
    torch._dynamo.reset()
    fn = lambda x, r: ops.conv3x3_panels(x, u, b, r) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, r), fn(x, r))
    cases = [
        (lambda: op(x, u[:, :5], None, None), RuntimeError, "weight must be"),
        (lambda: ops.conv3x3_panels(x, u[..., :8]), ValueError, "conv3x3_panel_weight"),
        (lambda: ops.conv3x3_panels(x[:, :4], u), ValueError, r"9 C_in=36"),
        (lambda: ops.conv3x3_panels(x[0], u), ValueError, "4-D"),
        (lambda: ops.conv3x3_panels(x.double(), u), ValueError, "float32"),
        (lambda: ops.conv3x3_panels(x.bfloat16(), u.bfloat16()), ValueError, "float32"),
        (lambda: op(x, u.double(), None, None), RuntimeError, "weight has dtype"),
        (lambda: ops.conv3x3_panels(x, u, b[:16]), ValueError, r"bias must have shape \(32\)"),
        (lambda: ops.conv3x3_panels(x, u, None, r[:, :16]), ValueError, "residual must have"),
        (lambda: ops.conv3x3_panels(x, u, None, r.int()), ValueError, "residual"),
        (lambda: ops.conv3x3_panel_weight(torch.randn(20, 4, 3, 3)), ValueError, "multiple of 16"),
        (lambda: ops.conv3x3_panel_weight(torch.randn(16, 4, 1, 1)), ValueError, "3, 3"),
        (lambda: ops.conv3x3_panel_weight(torch.ones(16, 4, 3, 3, dtype=torch.int64)), TypeError, "floating-point"),
    ]
    for fn_, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn_()
    with pytest.raises(ValueError, match="device"):
        ops.conv3x3_panels(x, u, torch.randn(32, device="meta"))
    # No input channels: the bias plus the residual (F.conv2d itself returns no output channels there).
    empty = ops.conv3x3_panel_weight(torch.randn(32, 0, 3, 3))
    out = ops.conv3x3_panels(x[:, :0], empty, b, r)
    assert torch.equal(out, b.view(1, -1, 1, 1) + r) and out.is_contiguous(memory_format=torch.channels_last)


@native
@pytest.mark.parametrize("threads", [1, 3])
def test_conv3x3_panels_threads_split_the_panels(threads):
    """Any thread count gives the one-thread result bit for bit (each output column by one thread, one order)."""
    x, w, b, r = _conv_panel_case((1, 11, 80, 4, 4), 5)  # 5 panels
    u = ops.conv3x3_panel_weight(w)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.conv3x3_panels(x, u, b, r)
        torch.set_num_threads(threads)
        assert torch.equal(ops.conv3x3_panels(x, u, b, r), one)
    finally:
        torch.set_num_threads(previous)


@native
@pytest.mark.parametrize("tile", [2, 4], ids=["F2", "F4"])
@pytest.mark.parametrize(
    "shape",
    [(1, 256, 256, 8, 8), (2, 13, 48, 7, 5), (1, 64, 16, 1, 1), (3, 40, 32, 9, 6)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_conv3x3_winograd_panels_match_float64(shape, fmt, tile):
    """The Winograd op on the column-panel weight (winograd_weight(panels=True): the 8x8 level at batch 1) against
    F.conv2d in float64 with test_conv3x3_winograd_matches_float64_conv's bounds, and the composite on it."""
    x, w, b, r = _wino_case(shape, seed_of(shape, fmt, tile, "panels"))
    x = _layout(x, fmt)
    u = ops.winograd_weight(w, tile, panels=True)
    p = (tile + 2) ** 2
    assert u.shape == (p, w.shape[0] // 16, w.shape[1], 16)
    unpacked = u.permute(0, 2, 1, 3).reshape(p, w.shape[1], -1)
    torch.testing.assert_close(unpacked, ops.winograd_weight(w, tile), rtol=0, atol=0)
    _check_winograd(x, w, u, tile, ((None, None, False, 1.0), (b, r, True, 2.0)))


@native
def test_conv3x3_winograd_panels_opcheck_and_bad_inputs():
    x, w, b, r = _wino_case((2, 16, 32, 5, 7), 4)
    u = ops.winograd_weight(w, panels=True)
    op = torch.ops.ddpm_fast.conv3x3_winograd.default
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(op, (xx, u, b, r, True, 2.0))
    cases = [
        (lambda: op(x, u[..., :8], None, None, False, 1.0), RuntimeError, "weight must be"),
        (lambda: op(x, u[:, :, :5], None, None, False, 1.0), RuntimeError, "weight must be"),
        (lambda: op(x, u, b[:16], None, False, 1.0), RuntimeError, r"bias must have shape \(32\)"),
        (lambda: op(x, u, None, r[:, :16], False, 1.0), RuntimeError, "residual"),
        (lambda: ops.winograd_weight(torch.randn(24, 16, 3, 3), panels=True), ValueError, "multiple of 16"),
    ]
    for fn_, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn_()
