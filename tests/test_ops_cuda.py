"""CUDA kernels of ``torch.ops.ddpm_fast``: every op against a float64 reference and the PyTorch op it replaces.

Rule (from flash-attention's tests): the kernel's error against float64 must be no worse than twice the error of
the same-precision PyTorch implementation, plus a small floor. Odd sizes, both memory formats, strided views,
unaligned storage, large means, bad inputs, ``torch.library.opcheck`` and CUDA-graph capture.
Skipped without a CUDA GPU.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_rule

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

# On a GPU machine the extension must be there with its CUDA library loaded: a missing build is a failure, not a
# skip.
_native = importlib.import_module("ddpm_fast._native")
importlib.import_module("ddpm_fast.ops")  # registers the fake kernels
_native.load()  # raises NativeExtensionError saying why the extension is unusable
if not _native.has_cuda():
    raise RuntimeError(f"ddpm_fast's CUDA kernels are not loaded on a machine with a GPU: {_native.cuda_error()}")

OPS = torch.ops.ddpm_fast
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _randn(shape, seed, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=_gen(seed), device=DEV, dtype=torch.float32) * scale + shift).to(dtype)


def _assert_close_rule(ours: torch.Tensor, theirs: torch.Tensor, ref64: torch.Tensor, dtype, what: str):
    assert_close_rule(ours, theirs, ref64, dtype, what, relative=True)


def _opcheck(op, args):
    """Full opcheck (schema, autograd registration, fake kernel, AOT dispatch): every op has a fake in ddpm_fast.ops."""
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------ group_norm_silu


def _gn_ref(x, groups, w, b, eps, temb, silu):
    if temb is not None:
        x = x + temb[:, :, None, None] if x.dim() == 4 else x + temb.reshape(*temb.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, groups, w, b, eps)
    return F.silu(y) if silu else y


def _gn_case(shape, groups, dtype, channels_last, silu, use_temb, affine=True, shift=0.0, seed=0, param_dtype=None):
    N, C = shape[0], shape[1]
    x = _randn(shape, seed, dtype, shift=shift)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pdt = param_dtype or dtype
    w = _randn((C,), seed + 1, pdt, scale=0.5, shift=1.0) if affine else None
    b = _randn((C,), seed + 2, pdt, scale=0.5) if affine else None
    temb = _randn((N, C), seed + 3, dtype) if use_temb else None
    eps = 1e-6 if shift else 1e-5
    ours = OPS.group_norm_silu(x, groups, w, b, eps, temb, silu)
    # PyTorch in the same precision (fp32 params promoted like a module would: cast to x's dtype).
    pw = None if w is None else w.to(dtype)
    pb = None if b is None else b.to(dtype)
    theirs = _gn_ref(x, groups, pw, pb, eps, temb, silu)
    ref64 = _gn_ref(
        x.double(),
        groups,
        None if w is None else w.double(),
        None if b is None else b.double(),
        eps,
        None if temb is None else temb.double(),
        silu,
    )
    return x, ours, theirs, ref64


GN_SHAPES = [
    ((1, 256, 16, 16), 32),  # batch 1: split-reduction path
    ((2, 64, 8, 8), 32),  # cpg 2
    ((1, 96, 5, 7), 32),  # odd H, W
    ((3, 48, 9, 9), 16),  # cpg 3: no vector path along C
    ((2, 40, 1, 1), 8),  # H = W = 1 (contiguous and channels_last at once)
    ((4, 128, 32, 32), 32),
    ((1, 512, 8, 8), 32),
    ((2, 12, 3, 5), 1),  # one group
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", GN_SHAPES, ids=lambda v: str(v))
def test_group_norm_silu_matches_reference(shape, groups, dtype, channels_last):
    for silu, use_temb in [(True, True), (False, False)]:
        x, ours, theirs, ref64 = _gn_case(shape, groups, dtype, channels_last, silu, use_temb)
        _assert_close_rule(ours, theirs, ref64, dtype, f"group_norm_silu{shape} g={groups} silu={silu} temb={use_temb}")
        fmt = torch.channels_last if channels_last and not x.is_contiguous() else torch.contiguous_format
        assert ours.is_contiguous(memory_format=fmt), "output must keep the input's memory format"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_silu_no_affine_and_fp32_params(dtype):
    x, ours, theirs, ref64 = _gn_case((2, 64, 6, 6), 32, dtype, True, True, True, affine=False)
    _assert_close_rule(ours, theirs, ref64, dtype, "no weight/bias")
    x, ours, theirs, ref64 = _gn_case((2, 64, 6, 6), 32, dtype, False, True, True, param_dtype=torch.float32)
    _assert_close_rule(ours, theirs, ref64, dtype, "fp32 weight/bias")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "dtype,shift", [(torch.float32, 1e4), (torch.float16, 300.0), (torch.bfloat16, 500.0)], ids=str
)
def test_group_norm_silu_large_mean_is_stable(dtype, shift, channels_last):
    # |mean| >> std: E[x^2] - E[x]^2 would lose every digit here; Welford/Chan must not.
    for shape in [(1, 256, 16, 16), (2, 64, 7, 9)]:
        x, ours, _, ref64 = _gn_case(shape, 32, dtype, channels_last, False, False, shift=shift)
        err = (ours.double() - ref64).abs().max().item()
        # x itself is exact in both; errors come from the fp32 mean (|mean| * 2^-24 / std) and output rounding.
        tol = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype] * ref64.abs().max().item()
        assert err <= tol, f"large mean {shift} {dtype} {shape}: error {err:.3g} > {tol:.3g}"


def test_group_norm_silu_strided_unaligned_and_3d():
    base = _randn((2 * 64 * 8 * 8 + 1,), 5)
    x = base[1:].view(2, 64, 8, 8)  # storage offset 1: unaligned, scalar path
    out = OPS.group_norm_silu(x, 32, None, None, 1e-5, None, True)
    torch.testing.assert_close(out, F.silu(F.group_norm(x, 32, eps=1e-5)), atol=2e-5, rtol=1e-5)
    y = _randn((2, 64, 8, 16), 6)[..., ::2]  # non-contiguous: copied to contiguous first
    out = OPS.group_norm_silu(y, 32, None, None, 1e-5, None, False)
    torch.testing.assert_close(out, F.group_norm(y, 32, eps=1e-5), atol=2e-5, rtol=1e-5)
    z = _randn((3, 64, 37), 7)
    out = OPS.group_norm_silu(z, 16, None, None, 1e-5, None, True)
    torch.testing.assert_close(out, F.silu(F.group_norm(z, 16, eps=1e-5)), atol=2e-5, rtol=1e-5)
    empty = torch.empty(0, 64, 4, 4, device=DEV)
    assert OPS.group_norm_silu(empty, 32, None, None, 1e-5, None, True).shape == empty.shape


def test_raw_op_bad_input_raises_in_a_fresh_process():
    """On an H200 (torch 2.11) the first bad-input call below crashed the process instead of raising;
    run it in a child so a crash is reported as this test's failure, not the end of the session."""
    import subprocess
    import sys

    code = (
        "import torch, ddpm_fast.ops\n"
        "x = torch.randn(2, 64, 4, 4, device='cuda')\n"
        "try:\n"
        "    torch.ops.ddpm_fast.group_norm_silu(x, 3, None, None, 1e-5, None, True)\n"
        "except RuntimeError as e:\n"
        "    assert 'divisible' in str(e), e\n"
        "    print('raised')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "raised" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_wrapper_bad_inputs_raise_before_the_kernel():
    from ddpm_fast import ops

    x = _randn((2, 64, 4, 4), 8)
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm_silu(x, 3)
    with pytest.raises((ValueError, TypeError), match="weight"):
        ops.group_norm_silu(x, 32, torch.ones(63, device=DEV))


def test_group_norm_silu_bad_inputs():
    test_raw_op_bad_input_raises_in_a_fresh_process()  # a crash here would take the whole run down
    x = _randn((2, 64, 4, 4), 8)
    with pytest.raises(RuntimeError, match="divisible"):
        OPS.group_norm_silu(x, 3, None, None, 1e-5, None, True)
    with pytest.raises(RuntimeError, match="weight"):
        OPS.group_norm_silu(x, 32, torch.ones(63, device=DEV), None, 1e-5, None, True)
    with pytest.raises(RuntimeError, match="temb"):
        OPS.group_norm_silu(x, 32, None, None, 1e-5, torch.ones(2, 32, device=DEV), True)
    with pytest.raises(RuntimeError, match="bias"):
        OPS.group_norm_silu(x, 32, None, torch.ones(64), 1e-5, None, True)  # CPU bias, CUDA x
    with pytest.raises(RuntimeError, match="dtype"):
        OPS.group_norm_silu(x.to(torch.int32), 32, None, None, 1e-5, None, True)
    with pytest.raises(RuntimeError, match="num_groups"):
        OPS.group_norm_silu(x, 0, None, None, 1e-5, None, True)


def test_group_norm_silu_opcheck():
    for cl in (False, True):
        x = _randn((2, 64, 5, 5), 9)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        args = (x, 32, _randn((64,), 10), _randn((64,), 11), 1e-5, _randn((2, 64), 12), True)
        _opcheck(OPS.group_norm_silu.default, args)
    _opcheck(
        OPS.group_norm_silu.default, (_randn((1, 256, 16, 16), 13, torch.float16), 32, None, None, 1e-6, None, False)
    )


# ------------------------------------------------------------------------------------------------ attention


def _attn_ref64(q, k, v, scale):
    s = scale if scale is not None else q.shape[-1] ** -0.5
    w = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * s, dim=-1)
    return w @ v.double()


ATTN_SHAPES = [
    (1, 1, 256, 256, 256),  # cifar10-32 UNet (split-K path)
    (1, 1, 256, 256, 512),  # 256-px UNet head dim
    (2, 3, 37, 37, 64),
    (1, 2, 100, 100, 7),  # odd D
    (1, 1, 1, 1, 1),
    (2, 1, 33, 33, 130),
    (1, 2, 50, 70, 64),  # L != S
    (1, 1, 77, 45, 511),
    (1, 1, 64, 64, 384),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,L,S,D", ATTN_SHAPES, ids=lambda v: str(v))
def test_attention_matches_reference(B, H, L, S, D, dtype):
    q = _randn((B, H, L, D), 20, dtype)
    k = _randn((B, H, S, D), 21, dtype)
    v = _randn((B, H, S, D), 22, dtype)
    for scale in (None, 0.3):
        ours = OPS.attention(q, k, v, scale)
        theirs = F.scaled_dot_product_attention(q, k, v, scale=scale)
        _assert_close_rule(
            ours, theirs, _attn_ref64(q, k, v, scale), dtype, f"attention {(B, H, L, S, D)} scale={scale}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_long_sequence(dtype):
    q, k, v = (_randn((1, 1, 4096, 64), 30 + i, dtype) for i in range(3))
    ours = OPS.attention(q, k, v, None)
    theirs = F.scaled_dot_product_attention(q, k, v)
    _assert_close_rule(ours, theirs, _attn_ref64(q, k, v, None), dtype, "attention S=4096")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_strided_views(dtype):
    # The UNet hands views of one packed projection: (B, S, 3, H, D) -> three (B, H, S, D) views, last stride 1.
    B, S, H, D = 2, 64, 2, 96
    qkv = _randn((B, S, 3, H, D), 40, dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    ours = OPS.attention(q, k, v, None)
    theirs = F.scaled_dot_product_attention(q, k, v)
    _assert_close_rule(ours, theirs, _attn_ref64(q, k, v, None), dtype, "packed-qkv views")
    # Last-dim stride != 1: copied inside the op.
    kt = _randn((B, H, D, S), 41, dtype).transpose(-1, -2)
    ours = OPS.attention(q, kt, v, None)
    theirs = F.scaled_dot_product_attention(q, kt, v)
    _assert_close_rule(ours, theirs, _attn_ref64(q, kt, v, None), dtype, "transposed k")
    # Unaligned storage offset: scalar loads.
    buf = _randn((B * H * S * D + 1,), 42, dtype)
    qu = buf[1:].view(B, H, S, D)
    ours = OPS.attention(qu, k, v, None)
    _assert_close_rule(
        ours, F.scaled_dot_product_attention(qu, k, v), _attn_ref64(qu, k, v, None), dtype, "unaligned q"
    )
    # 3-D input (B, S, D).
    q3 = _randn((3, 20, 32), 43, dtype)
    ours = OPS.attention(q3, q3, q3, None)
    _assert_close_rule(ours, F.scaled_dot_product_attention(q3, q3, q3), _attn_ref64(q3, q3, q3, None), dtype, "3-D")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_value_dim_differs(dtype):
    # SDPA allows v's head dim to differ from q/k's; so does the kernel.
    q, k = _randn((2, 1, 45, 24), 44, dtype), _randn((2, 1, 60, 24), 45, dtype)
    for dv in (40, 300):
        v = _randn((2, 1, 60, dv), 46, dtype)
        ours = OPS.attention(q, k, v, None)
        _assert_close_rule(ours, F.scaled_dot_product_attention(q, k, v), _attn_ref64(q, k, v, None), dtype, f"Dv={dv}")


def test_attention_large_scores_are_stable():
    # Scores around 1e3: the online softmax must subtract the running max.
    q = _randn((1, 1, 128, 64), 50, scale=4.0)
    k = _randn((1, 1, 128, 64), 51, scale=4.0)
    v = _randn((1, 1, 128, 64), 52)
    ours = OPS.attention(q, k, v, 1.0)
    ref = _attn_ref64(q, k, v, 1.0)
    theirs = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert torch.isfinite(ours).all()
    # fp32 rounding of scores of size ~1e3 moves the weights by ~1e-4 in both implementations.
    err, err_torch = (ours.double() - ref).abs().max().item(), (theirs.double() - ref).abs().max().item()
    assert err <= max(2 * err_torch, 1e-3 * ref.abs().max().item()), f"large scores: {err:.3g} vs torch {err_torch:.3g}"


def test_attention_bad_inputs():
    q = _randn((1, 1, 8, 16), 60)
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
        big = _randn((1, 1, 8, 520), 61)
        OPS.attention(big, big, big, None)
    with pytest.raises(RuntimeError, match="dtype"):
        OPS.attention(q, q.half(), q, None)
    with pytest.raises(RuntimeError, match="head dim"):
        OPS.attention(q, _randn((1, 1, 8, 8), 62), q, None)
    with pytest.raises(RuntimeError, match="sequence length"):
        OPS.attention(q, q, _randn((1, 1, 9, 16), 63), None)
    with pytest.raises(RuntimeError, match="k is on cpu"):
        OPS.attention(q, q.cpu(), q, None)


def test_attention_opcheck():
    q, k, v = (_randn((1, 2, 40, 24), 70 + i) for i in range(3))
    _opcheck(OPS.attention.default, (q, k, v, None))
    _opcheck(OPS.attention.default, (q.half(), k.half(), v.half(), 0.5))


# ------------------------------------------------------------------------------------------------ scheduler_step

COEFS = dict(a_x=1.0 / 0.8, a_e=-0.6 / 0.8, c0=0.7, c1=0.25, c2=0.0, noise_scale=0.1)


def _step_ref(e, s, n, a_x, a_e, c0, c1, c2, noise_scale, clip):
    x0 = a_x * s + a_e * e
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    prev = c0 * x0 + c1 * s + c2 * e
    if n is not None:
        prev = prev + noise_scale * n
    return prev, x0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 17, 19), (7,), (4, 5, 3, 3)], ids=str)
def test_scheduler_step_matches_reference(shape, dtype):
    e, s, n = (_randn(shape, 80 + i, dtype) for i in range(3))
    for noise, clip, c2 in [(n, None, 0.0), (None, 1.0, 0.05), (n, 0.5, -0.2)]:
        c = dict(COEFS, c2=c2)
        prev, x0 = OPS.scheduler_step(e, s, noise, *c.values(), clip)
        ref_prev, ref_x0 = _step_ref(
            e.double(), s.double(), None if noise is None else noise.double(), *c.values(), clip
        )
        t_prev, t_x0 = _step_ref(e, s, noise, *c.values(), clip)
        _assert_close_rule(prev, t_prev, ref_prev, dtype, f"scheduler_step prev {shape}")
        _assert_close_rule(x0, t_x0, ref_x0, dtype, f"scheduler_step x0 {shape}")


def test_scheduler_step_layouts_and_empty():
    shape = (2, 3, 9, 11)
    e, s, n = (_randn(shape, 90 + i) for i in range(3))
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (e, s, n)]
    prev, x0 = OPS.scheduler_step(*cl, *COEFS.values(), None)
    assert prev.is_contiguous(memory_format=torch.channels_last)
    ref = _step_ref(e, s, n, *COEFS.values(), None)
    torch.testing.assert_close(prev, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0, ref[1], atol=1e-5, rtol=1e-5)
    # Mixed layouts and an unaligned operand fall back to contiguous copies.
    buf = _randn((e.numel() + 1,), 95)
    eu = buf[1:].view(shape)
    prev, x0 = OPS.scheduler_step(eu, cl[1], n, *COEFS.values(), 0.9)
    ref = _step_ref(eu, s, n, *COEFS.values(), 0.9)
    torch.testing.assert_close(prev, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0, ref[1], atol=1e-5, rtol=1e-5)
    # Learned-variance models: model_output[:, :3] of a 6-channel output is a non-contiguous view.
    e6 = _randn((2, 6, 9, 11), 96)
    prev, x0 = OPS.scheduler_step(e6[:, :3], s, None, *COEFS.values(), None)
    torch.testing.assert_close(prev, _step_ref(e6[:, :3], s, None, *COEFS.values(), None)[0], atol=1e-5, rtol=1e-5)
    z = torch.empty(0, 3, 4, 4, device=DEV)
    prev, x0 = OPS.scheduler_step(z, z, None, *COEFS.values(), None)
    assert prev.shape == z.shape and x0.shape == z.shape


def test_scheduler_step_bad_inputs():
    s = _randn((1, 3, 4, 4), 100)
    with pytest.raises(RuntimeError, match="shape"):
        OPS.scheduler_step(_randn((1, 3, 4, 5), 101), s, None, *COEFS.values(), None)
    with pytest.raises(RuntimeError, match="dtype"):
        OPS.scheduler_step(s.half(), s, None, *COEFS.values(), None)
    with pytest.raises(RuntimeError, match="noise"):
        OPS.scheduler_step(s, s, s.cpu(), *COEFS.values(), None)
    with pytest.raises(RuntimeError, match="dtype"):
        OPS.scheduler_step(s.double(), s.double(), None, *COEFS.values(), None)


def test_scheduler_step_opcheck():
    e, s, n = (_randn((2, 3, 8, 8), 110 + i) for i in range(3))
    _opcheck(OPS.scheduler_step.default, (e, s, n, *COEFS.values(), 1.0))
    _opcheck(OPS.scheduler_step.default, (e.half(), s.half(), None, *COEFS.values(), None))


# ------------------------------------------------------------------------------------------------ scheduler_step_table

# (a_x, a_e, c0, c1, c2, noise_scale) rows; the second has no noise term.
TABLE_ROWS = [tuple(COEFS.values()), (1.1, -0.3, 0.9, 0.05, 0.02, 0.0), (2.0, -1.5, 0.4, 0.6, -0.1, 0.3)]


def _table(layout="contiguous"):
    t = torch.tensor(TABLE_ROWS, dtype=torch.float32, device=DEV)
    return t.t().contiguous().t() if layout == "column_major" else t


def _index(i, shape=(1,)):
    return torch.full(shape, i, dtype=torch.int64, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 17, 19), (7,), (4, 5, 3, 3)], ids=str)
def test_scheduler_step_table_matches_scheduler_step(shape, dtype):
    """Row index[0] read on the device gives exactly scheduler_step with that row (the same kernel), and the
    formula within the rule; a row noise_scale of 0 drops the noise term."""
    e, s, n = (_randn(shape, 140 + i, dtype) for i in range(3))
    for layout in ("contiguous", "column_major"):
        table = _table(layout)
        for i in range(len(TABLE_ROWS)):
            coefs = [float(v) for v in table[i].cpu()]
            for noise, clip in [(n, None), (None, 1.0), (n, 0.5)]:
                prev, x0 = OPS.scheduler_step_table(e, s, noise, table, _index(i, (1,) if i else ()), clip)
                want = OPS.scheduler_step(e, s, noise, *coefs, clip)
                torch.testing.assert_close(prev, want[0], atol=0, rtol=0)
                torch.testing.assert_close(x0, want[1], atol=0, rtol=0)
                used = noise if coefs[5] != 0.0 else None
                ref = _step_ref(e.double(), s.double(), None if used is None else used.double(), *coefs, clip)
                theirs = _step_ref(e, s, used, *coefs, clip)
                _assert_close_rule(prev, theirs[0], ref[0], dtype, f"scheduler_step_table prev {shape} row {i}")
                _assert_close_rule(x0, theirs[1], ref[1], dtype, f"scheduler_step_table x0 {shape} row {i}")


def test_scheduler_step_table_layouts_zero_noise_and_out_of_range_index():
    shape = (2, 3, 9, 11)
    e, s, n = (_randn(shape, 150 + i).contiguous(memory_format=torch.channels_last) for i in range(3))
    table = _table()
    prev, x0 = OPS.scheduler_step_table(e, s, n, table, _index(0), None)
    assert prev.is_contiguous(memory_format=torch.channels_last) and x0.stride() == s.stride()
    # A zero noise_scale row skips the noise term entirely (NaN noise stays out of the result).
    prev, x0 = OPS.scheduler_step_table(e, s, torch.full_like(n, float("nan")), table, _index(1), None)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    # The glue cannot read the index without a sync: the kernel writes NaN everywhere for one out of range.
    for bad in (-1, len(TABLE_ROWS), 10**9):
        for ee, ss in ((e, s), (_randn((5,), 155), _randn((5,), 156))):  # vector and scalar-tail paths
            prev, x0 = OPS.scheduler_step_table(ee, ss, None, table, _index(bad), 1.0)
            assert torch.isnan(prev).all() and torch.isnan(x0).all(), bad
    z = torch.empty(0, 3, 4, 4, device=DEV)
    prev, x0 = OPS.scheduler_step_table(z, z, None, table, _index(0), None)
    assert prev.shape == z.shape and x0.shape == z.shape


def test_scheduler_step_table_in_a_cuda_graph_follows_the_index():
    """Captured once, replayed with the index advanced in place: each replay uses that step's row."""
    e, s, n = (_randn((1, 3, 32, 32), 160 + i) for i in range(3))
    table, idx = _table(), _index(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OPS.scheduler_step_table(e, s, n, table, idx, 1.0)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync inside would fail the capture
        prev, x0 = OPS.scheduler_step_table(e, s, n, table, idx, 1.0)
    for i in (2, 0, 1):
        idx.fill_(i)
        graph.replay()
        want = OPS.scheduler_step(e, s, n, *[float(v) for v in table[i].cpu()], 1.0)
        torch.cuda.synchronize()
        torch.testing.assert_close(prev, want[0], atol=0, rtol=0)
        torch.testing.assert_close(x0, want[1], atol=0, rtol=0)


def _fake_call(op, args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        return op(*fake)


def test_scheduler_step_table_bad_inputs_and_the_fake_raises_the_same_device_errors():
    s = _randn((1, 3, 4, 4), 170)
    table, idx = _table(), _index(1)
    op = OPS.scheduler_step_table.default
    for args, text in [
        ((s, s, None, table.cpu(), idx, None), "scheduler_step_table: coefs is on cpu but sample is on cuda:0"),
        ((s, s, None, table, idx.cpu(), None), "scheduler_step_table: index is on cpu but sample is on cuda:0"),
        ((s, s, s.cpu(), table, idx, None), "scheduler_step_table: noise is on cpu but sample is on cuda:0"),
        ((s, s.cpu(), None, table, idx, None), r"scheduler_step_table \(CUDA\): sample must be a CUDA tensor"),
    ]:
        with pytest.raises(RuntimeError, match=text) as real:
            op(*args)
        with pytest.raises(RuntimeError) as fake:
            _fake_call(op, args)
        assert str(fake.value) == str(real.value).splitlines()[0]
    for args, text in [
        ((s, s, None, table.double(), idx, None), "coefs has dtype Double"),
        ((s, s, None, table[:, :4], idx, None), "coefs must be a"),
        ((s, s, None, table, idx.int(), None), "index has dtype Int"),
        ((s, s, None, table, _index(1, (2,)), None), "exactly one element"),
        ((s.half(), s, None, table, idx, None), "dtype"),
        ((_randn((1, 3, 4, 5), 171), s, None, table, idx, None), "shape"),
    ]:
        with pytest.raises(RuntimeError, match=text):
            op(*args)


def test_scheduler_step_table_opcheck():
    e, s, n = (_randn((2, 3, 8, 8), 180 + i) for i in range(3))
    _opcheck(OPS.scheduler_step_table.default, (e, s, n, _table(), _index(0), 1.0))
    _opcheck(OPS.scheduler_step_table.default, (e.half(), s.half(), None, _table("column_major"), _index(2, ()), None))


# ------------------------------------------------------------------------------------------------ CUDA graphs


def test_ops_capture_in_cuda_graph():
    # The sampler captures a whole denoising step: the kernels must not sync or allocate outside torch.
    x = _randn((1, 256, 16, 16), 120, torch.float16).contiguous(memory_format=torch.channels_last)
    temb = _randn((1, 256), 121, torch.float16)
    q, k, v = (_randn((1, 1, 256, 512), 122 + i, torch.float16) for i in range(3))
    e, s, n = (_randn((1, 3, 32, 32), 130 + i) for i in range(3))

    def step():
        y = OPS.group_norm_silu(x, 32, None, None, 1e-6, temb, True)
        a = OPS.attention(q, k, v, None)
        p, x0 = OPS.scheduler_step(e, s, n, *COEFS.values(), 1.0)
        return y, a, p, x0

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.add_(0.5)  # change an input in place: the replay must see it
    graph.replay()
    torch.cuda.synchronize()
    expected = OPS.group_norm_silu(x, 32, None, None, 1e-6, temb, True)
    torch.testing.assert_close(captured[0], expected, atol=0, rtol=0)
    for got, want in zip(captured[1:], eager[1:]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_attention_wrapper_falls_back_above_head_dim_512():
    from ddpm_fast import ops

    assert _native.limits()["cuda_attention_max_head_dim"] == 512
    q, k, v = (_randn((1, 1, 8, 520), 80 + i) for i in range(3))
    torch.testing.assert_close(ops.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


# ------------------------------------------------------------------------------------------------ attention (mma)
# The tensor-core kernel for fp16/bf16 (csrc/cuda/attention_mma_kernels.cuh) runs only when DDPM_FAST_CUDA_ATTENTION
# is "mma", and both the CUDA library (at its first attention call) and ddpm_fast.ops (at import) read the variable
# once per process. So every case here runs in a child process started with the variable set (one child for all of
# them; per-case results come back as JSON), and the routing without it in a child started without it. Under
# DDPM_FAST_CUDA_ATTENTION=mma (bench/gpu_check.sh runs the attention tests that way too) the attention tests above
# exercise the same kernel in this process. Last in the module: a child that hangs or faults on the GPU costs only its
# own tests, after every other test has run.

MMA_ENV = "DDPM_FAST_CUDA_ATTENTION"
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# (B, H, L, S, D, Dv, layout): odd L and S (1, 7, 83, 257: masking, a last key tile of one key, key splits), the
# UNets' head dims (256 at cifar10-32, 512 at 256 px) and D != Dv (a second Dv chunk past 256), batch/heads 1..8.
MMA_CASES = [
    (1, 1, 1, 1, 64, 64, "contiguous"),
    (1, 1, 7, 7, 40, 40, "contiguous"),
    (2, 3, 83, 83, 64, 64, "contiguous"),
    (1, 1, 257, 257, 256, 256, "contiguous"),
    (1, 1, 256, 256, 512, 512, "contiguous"),  # 256-px UNet, batch 1: split keys, two Dv chunks
    (8, 1, 256, 256, 512, 512, "unet_views"),  # 256-px UNet, batch 8 (0.18x SDPA on CUDA cores)
    (4, 1, 256, 256, 256, 256, "unet_views"),  # cifar10-32 UNet
    (2, 1, 16, 16, 512, 512, "unet_views"),  # 256-px mid block (4x4)
    (4, 2, 83, 257, 64, 40, "contiguous"),
    (1, 8, 7, 83, 40, 256, "contiguous"),
    (2, 1, 257, 7, 512, 64, "contiguous"),
    (3, 1, 83, 83, 256, 512, "contiguous"),
    (1, 2, 83, 257, 512, 40, "contiguous"),
    (2, 2, 64, 64, 64, 64, "transposed_k"),  # last-dim stride != 1: copied by the glue
    (1, 1, 83, 83, 64, 64, "unaligned"),  # storage offset 1: element loads instead of cp.async
    (3, 1, 20, 20, 40, 40, "3d"),
    (1, 2, 20, 33, 7, 9, "contiguous"),  # odd head dims: element loads
]
MMA_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _mma_id(case) -> str:
    B, H, L, S, D, Dv, layout = case
    return f"{B}x{H}-L{L}-S{S}-D{D}-Dv{Dv}-{layout}"


def _mma_operands(case, dtype, seed):
    B, H, L, S, D, Dv, layout = case
    if layout == "unet_views":  # one (B, S, 3HD) projection split into three (B, H, S, D) views, as the UNet does
        assert L == S and D == Dv
        packed = _randn((B, S, 3 * H * D), seed, dtype)
        q, k, v = (t.view(B, S, H, D).transpose(1, 2) for t in packed.split(H * D, dim=-1))
        assert not q.is_contiguous() and q.stride(-1) == 1
        return q, k, v
    if layout == "3d":
        assert H == 1
        return _randn((B, L, D), seed, dtype), _randn((B, S, D), seed + 1, dtype), _randn((B, S, Dv), seed + 2, dtype)
    q = _randn((B, H, L, D), seed, dtype)
    k = _randn((B, H, S, D), seed + 1, dtype)
    v = _randn((B, H, S, Dv), seed + 2, dtype)
    if layout == "transposed_k":
        k = _randn((B, H, D, S), seed + 1, dtype).transpose(-1, -2)
    elif layout == "unaligned":
        buf = _randn((q.numel() + 1,), seed + 3, dtype)
        q = buf[1:].view(q.shape)
    return q, k, v


def _cuda_kernel_names(fn) -> list[str] | None:
    """Names of ddpm_fast's CUDA kernels ``fn`` launches (torch.profiler), or None where the profiler records none."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # Kernel events carry the demangled kernel name ("void ddpm_fast::cuda::attention_mma_kernel<__half, 64>(...)");
    # the op's own CPU event is "ddpm_fast::attention".
    names = sorted({e.name for e in prof.events() if "::cuda::" in e.name})
    return names or None


def _mma_job(job: str) -> None:
    """Child-process side: run one job and print its results as one JSON line (``MMA_RESULT {...}``)."""
    from ddpm_fast import ops

    out: dict = {"env": os.environ.get(MMA_ENV), "ops_flag": getattr(ops, "CUDA_ATTENTION_MMA", None)}
    fp16 = [_randn((1, 1, 64, 64), 900 + i, torch.float16) for i in range(3)]
    out["kernels_fp16"] = _cuda_kernel_names(lambda: OPS.attention(*fp16, None))
    out["kernels_fp32"] = _cuda_kernel_names(lambda: OPS.attention(*(t.float() for t in fp16), None))
    out["wrapper_sdpa"] = {}
    for name, dtype in (*MMA_DTYPES.items(), ("fp32", torch.float32)):
        # fp32 at the 256-px batch-8 size: above CUDA_ATTENTION_MAX_WORK, SDPA with or without the variable.
        shape = (1, 1, 256, 512) if dtype != torch.float32 else (8, 1, 256, 512)
        q, k, v = (_randn(shape, 910 + i, dtype) for i in range(3))
        out["wrapper_sdpa"][name] = _calls_sdpa(lambda: ops.attention(q, k, v))
    if job == "cases":
        out["cases"] = {}
        for i, case in enumerate(MMA_CASES):
            for name, dtype in MMA_DTYPES.items():
                key = f"{_mma_id(case)}-{name}"
                try:
                    q, k, v = _mma_operands(case, dtype, 1000 + 10 * i)
                    for scale in (None, 0.3) if i % 3 == 0 else (None,):
                        ours = OPS.attention(q, k, v, scale)
                        theirs = F.scaled_dot_product_attention(q, k, v, scale=scale)
                        _assert_close_rule(ours, theirs, _attn_ref64(q, k, v, scale), dtype, f"{key} scale={scale}")
                    out["cases"][key] = "ok"
                except Exception as exc:  # every case reports; the parent test names the failing ones
                    out["cases"][key] = f"{type(exc).__name__}: {exc}"[:1500]
        out["graph"] = {}
        for name, dtype in MMA_DTYPES.items():
            for shape in ((1, 1, 256, 512), (16, 1, 256, 256)):  # with and without key splits (attn_mma_plan)
                key = f"{name}-{'x'.join(map(str, shape))}"
                try:
                    _mma_graph_check(ops, shape, dtype)
                    out["graph"][key] = "ok"
                except Exception as exc:
                    out["graph"][key] = f"{type(exc).__name__}: {exc}"[:1500]
    print("MMA_RESULT " + json.dumps(out), flush=True)


def _calls_sdpa(fn) -> bool:
    from torch.overrides import TorchFunctionMode

    class Sees(TorchFunctionMode):
        called = False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                self.called = True
            return func(*args, **(kwargs or {}))

    with Sees() as seen:
        fn()
    return seen.called


def _mma_graph_check(ops, shape, dtype) -> None:
    """ops.attention (native under the variable) captured in a CUDA graph: the replay follows an in-place change of
    q and matches the eager call bit for bit (the kernel is deterministic; the split workspace comes from the
    graph's pool)."""
    q, k, v = (_randn(shape, 950 + i, dtype) for i in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.attention(q, k, v)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.attention(q, k, v)
    q.mul_(-0.5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, ops.attention(q, k, v), atol=0, rtol=0)
    _assert_close_rule(
        captured, F.scaled_dot_product_attention(q, k, v), _attn_ref64(q, k, v, None), dtype, f"graph {shape}"
    )


@functools.lru_cache(maxsize=None)
def _mma_child(job: str, env_value: str | None) -> dict:
    """Run ``_mma_job(job)`` in a fresh interpreter with DDPM_FAST_CUDA_ATTENTION set to ``env_value`` (None:
    unset); its parsed results."""
    env = dict(os.environ)
    env.pop(MMA_ENV, None)
    if env_value is not None:
        env[MMA_ENV] = env_value
    code = f"import sys; sys.path.insert(0, {_TESTS_DIR!r}); import test_ops_cuda as t; t._mma_job({job!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MMA_RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"child process ({MMA_ENV}={env_value}) failed, rc={proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("MMA_RESULT ") :])


@pytest.mark.parametrize("dtype_name", list(MMA_DTYPES))
@pytest.mark.parametrize("case", MMA_CASES, ids=_mma_id)
def test_attention_mma_matches_reference(case, dtype_name):
    result = _mma_child("cases", "mma")["cases"][f"{_mma_id(case)}-{dtype_name}"]
    assert result == "ok", result


def test_attention_mma_runs_the_tensor_core_kernel_for_half_only():
    res = _mma_child("cases", "mma")
    assert res["env"] == "mma" and res["ops_flag"] is True, res
    if res["kernels_fp16"] is None or res["kernels_fp32"] is None:
        pytest.skip("torch.profiler recorded no CUDA kernels on this machine")
    assert any("attention_mma_kernel" in n for n in res["kernels_fp16"]), res["kernels_fp16"]
    assert not any("attention_mma_kernel" in n for n in res["kernels_fp32"]), res["kernels_fp32"]
    assert any("attention_kernel" in n for n in res["kernels_fp32"]), res["kernels_fp32"]


def test_attention_mma_wrapper_routes_half_to_the_kernel():
    res = _mma_child("cases", "mma")
    assert res["wrapper_sdpa"] == {"fp16": False, "bf16": False, "fp32": True}, res["wrapper_sdpa"]


@pytest.mark.parametrize("key", ["fp16-1x1x256x512", "fp16-16x1x256x256", "bf16-1x1x256x512", "bf16-16x1x256x256"])
def test_attention_mma_in_a_cuda_graph(key):
    result = _mma_child("cases", "mma")["graph"][key]
    assert result == "ok", result


def test_attention_without_the_variable_routes_half_precision_to_sdpa():
    res = _mma_child("routing", None)
    assert res["env"] is None and res["ops_flag"] is False, res
    assert res["wrapper_sdpa"] == {"fp16": True, "bf16": True, "fp32": True}, res["wrapper_sdpa"]
    if res["kernels_fp16"] is not None:  # the raw op in half precision runs the CUDA-core kernel
        assert not any("attention_mma_kernel" in n for n in res["kernels_fp16"]), res["kernels_fp16"]
        assert any("attention_kernel" in n for n in res["kernels_fp16"]), res["kernels_fp16"]
