"""Kernel microbenchmarks: each native op against the PyTorch ops it replaces, side by side in one run.

For GroupNorm+SiLU (with and without the time-embedding add), attention, the Winograd 3x3 convolution and
the scheduler step, at the shapes of the cifar10-32 and 256-px google/ddpm UNets, batch 1 and 16: the median
PyTorch time, the median fused time, the speedup, and the fused op's effective bandwidth next to a copy
bandwidth measured in the same run. The two sides are timed in interleaved rounds so machine noise hits both alike.

    python -m ddpm_fast.bench kernels [--json PATH] [--quick] [--dtype float32] [--rounds 7] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import ddpm_fast
import torch.nn.functional as F

from .. import _native, ops

# (N, C, H, W, groups): cifar10-32 UNet (128..256 channels, 32..4 px) and 256-px UNet (128..512, 256..8 px).
GN_SHAPES = [
    (1, 256, 16, 16), (1, 128, 32, 32), (16, 128, 32, 32), (1, 256, 8, 8), (16, 256, 16, 16),
    (1, 128, 256, 256), (1, 256, 64, 64), (1, 512, 16, 16), (16, 512, 16, 16),
]
GN_QUICK = [(1, 256, 16, 16), (1, 128, 32, 32), (16, 128, 32, 32)]
# (B, H, S, D): head_dim = channels, one head; S = 16x16 (both models) and 8x8 / 4x4 mid blocks.
ATTN_SHAPES = [(1, 1, 256, 256), (1, 1, 256, 512), (16, 1, 256, 256), (16, 1, 256, 512), (1, 1, 64, 256), (1, 1, 1024, 512)]
ATTN_QUICK = [(1, 1, 256, 256), (1, 1, 256, 512)]
# (N, C_in, C_out, H): the 3x3 stride-1 convolutions that take the Winograd path in both UNets.
CONV_SHAPES = [(1, 128, 128, 32), (1, 256, 256, 16), (1, 512, 256, 16), (1, 384, 128, 32), (16, 128, 128, 32),
               (16, 256, 256, 8), (1, 128, 128, 256), (1, 256, 256, 64)]
CONV_QUICK = [(1, 128, 128, 32), (1, 256, 256, 16)]
STEP_SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (1, 3, 256, 256), (16, 3, 256, 256)]
STEP_QUICK = [(1, 3, 32, 32)]


def _time_pair(fns: dict[str, Callable[[], object]], rounds: int, min_time: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds."""
    for fn in fns.values():  # warm up, and size the inner loop so one round takes >= min_time
        fn()
    reps = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        dt = max(time.perf_counter() - t0, 1e-7)
        reps[name] = max(1, min(1000, int(min_time / dt)))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / reps[name])
    return {n: statistics.median(s) for n, s in samples.items()}


def copy_bandwidth(rounds: int) -> float:
    """GB/s of a 64 MB tensor copy (read + write counted), the memory ceiling for elementwise work."""
    src = torch.randn(16 * 1024 * 1024)
    dst = torch.empty_like(src)
    t = _time_pair({"copy": lambda: dst.copy_(src)}, rounds)["copy"]
    return 2 * src.numel() * 4 / t / 1e9


def _row(op: str, shape, extra: dict, t_torch: float, t_fused: float, nbytes: int, baseline: str) -> dict:
    return {
        "op": op, "shape": list(shape), **extra, "baseline": baseline,
        "torch_ms": t_torch * 1e3, "fused_ms": t_fused * 1e3, "speedup": t_torch / t_fused,
        "fused_GBps": nbytes / t_fused / 1e9,
    }


def bench_group_norm(shapes, dtype, rounds) -> list[dict]:
    rows = []
    for n, c, h, w in shapes:
        x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
        gamma, beta, temb = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype), torch.randn(n, c, dtype=dtype)
        nbytes = 2 * x.numel() * x.element_size()
        t = _time_pair({
            "torch": lambda: F.silu(F.group_norm(x, 32, gamma, beta, 1e-5)),
            "fused": lambda: ops.group_norm_silu(x, 32, gamma, beta, 1e-5),
        }, rounds)
        rows.append(_row("group_norm_silu", (n, c, h, w), {"temb": False}, t["torch"], t["fused"], nbytes,
                         "F.silu(F.group_norm(x))"))
        t = _time_pair({
            "torch": lambda: F.silu(F.group_norm(x + temb[:, :, None, None], 32, gamma, beta, 1e-5)),
            "fused": lambda: ops.group_norm_silu(x, 32, gamma, beta, 1e-5, temb=temb),
        }, rounds)
        rows.append(_row("group_norm_silu", (n, c, h, w), {"temb": True}, t["torch"], t["fused"], nbytes,
                         "F.silu(F.group_norm(x + temb[:, :, None, None]))"))
    return rows


def bench_attention(shapes, dtype, rounds) -> list[dict]:
    rows = []
    for b, h, s, d in shapes:
        contiguous = [torch.randn(b, h, s, d, dtype=dtype) for _ in range(3)]
        # The UNet's layout: one (B, S, 3C) projection split into (B, 1, S, C) views.
        packed = torch.randn(b, s, 3 * d, dtype=dtype)
        views = [t.unsqueeze(1) for t in packed.split(d, dim=-1)] if h == 1 else contiguous
        for layout, (q, k, v) in (("contiguous", contiguous), ("unet_views", views)):
            if layout == "unet_views" and h != 1:
                continue
            nbytes = 4 * b * h * s * d * q.element_size()
            t = _time_pair({
                "torch": lambda: F.scaled_dot_product_attention(q, k, v),
                "fused": lambda: ops.attention(q, k, v),
            }, rounds)
            row = _row("attention", (b, h, s, d), {"layout": layout}, t["torch"], t["fused"], nbytes,
                       "F.scaled_dot_product_attention")
            row["fused_GFLOPs"] = 4 * b * h * s * s * d / t["fused"] / 1e9
            rows.append(row)
    return rows


def bench_conv3x3(shapes, dtype, rounds) -> list[dict]:
    """Winograd F(2x2, 3x3) and F(4x4, 3x3) against F.conv2d (what diffusers runs) and against the same
    convolution on the packed oneDNN path (ddpm_fast's own alternative), fp32 channels_last, bias and residual
    folded in. One row per tile size; all four are timed side by side."""
    from ..models.conv import Conv2d

    rows = []
    if dtype != torch.float32:
        return rows  # the Winograd op is fp32 only
    for n, c, o, h in shapes:
        x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
        res = torch.randn(n, o, h, h).contiguous(memory_format=torch.channels_last)
        conv = Conv2d(c, o, 3, padding=1).eval()
        with torch.no_grad():
            w, b = conv.weight.detach(), conv.bias.detach()
            u = {tile: ops.winograd_weight(w, tile) for tile in (2, 4)}
            packed = conv
            t = _time_pair({
                "torch": lambda: F.conv2d(x, w, b, padding=1) + res,
                "packed": lambda: _packed_only(packed, x, res),
                "F2": lambda: ops.conv3x3_winograd(x, u[2], b, residual=res),
                "F4": lambda: ops.conv3x3_winograd(x, u[4], b, residual=res),
            }, rounds)
        for tile in (2, 4):
            row = _row("conv3x3_winograd", (n, c, o, h, h), {"layout": f"F{tile}x{tile} +residual"}, t["torch"],
                       t[f"F{tile}"], (x.numel() + 2 * res.numel()) * 4, "F.conv2d(x, w, b, padding=1) + residual")
            row["tile"] = tile
            row["packed_ms"] = t["packed"] * 1e3
            row["speedup_vs_packed"] = t["packed"] / t[f"F{tile}"]
            row["fused_equiv_GFLOPs"] = 2 * n * c * o * 9 * h * h / t[f"F{tile}"] / 1e9
            rows.append(row)
    return rows


def _packed_only(conv, x, res):
    """The layer's packed oneDNN path: Winograd switched off for the call."""
    with ddpm_fast.winograd(0):
        return conv.forward_fused(x, res)


def bench_scheduler_step(shapes, dtype, rounds) -> list[dict]:
    rows = []
    try:
        from diffusers import DDPMScheduler as DiffusersDDPM
    except ImportError:  # diffusers is only a test dependency
        DiffusersDDPM = None
    try:
        from ddpm_fast import DDPMScheduler as FastDDPM
    except (ImportError, AttributeError):
        FastDDPM = None
    for shape in shapes:
        eps, x = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        nbytes = 5 * x.numel() * x.element_size()  # eps, x, noise in; prev, x0 out
        t_step = 500
        fns: dict[str, Callable[[], object]] = {}
        if DiffusersDDPM is not None:
            ref = DiffusersDDPM(num_train_timesteps=1000)
            ref.set_timesteps(1000)
            gen = torch.Generator().manual_seed(0)
            fns["diffusers"] = lambda: ref.step(eps, t_step, x, generator=gen)
        if FastDDPM is not None:
            fast = FastDDPM(num_train_timesteps=1000)
            fast.set_timesteps(1000)
            gen2 = torch.Generator().manual_seed(0)
            fns["ddpm_fast_scheduler"] = lambda: fast.step(eps, t_step, x, generator=gen2)
        noise = torch.randn(shape, dtype=dtype)
        fns["op"] = lambda: ops.scheduler_step(eps, x, noise, (1.02, -0.2), (0.3, 0.7, 0.0), 0.05, 1.0)
        fns["torch_composite"] = lambda: _composite_step(eps, x, noise)
        t = _time_pair(fns, rounds)
        base_name = "diffusers" if "diffusers" in t else "torch_composite"
        fused_name = "ddpm_fast_scheduler" if "ddpm_fast_scheduler" in t else "op"
        row = _row("scheduler_step", shape, {"fused": fused_name}, t[base_name], t[fused_name], nbytes,
                   "diffusers DDPMScheduler.step" if base_name == "diffusers" else "PyTorch elementwise composite")
        row["op_ms"] = t["op"] * 1e3
        row["torch_composite_ms"] = t["torch_composite"] * 1e3
        row["speedup_op_vs_baseline"] = t[base_name] / t["op"]
        rows.append(row)
    return rows


def _composite_step(eps, x, noise):
    x0 = (1.02 * x - 0.2 * eps).clamp(-1, 1)
    return 0.3 * x0 + 0.7 * x + 0.05 * noise, x0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write all figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="only the shapes with speed targets")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (medians are reported)")
    p.add_argument("--ops", default="group_norm_silu,attention,conv3x3_winograd,scheduler_step",
                   help="comma-separated subset")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    wanted = set(args.ops.split(","))
    bw = copy_bandwidth(args.rounds)
    info = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "native": _native.available(), "cpu_isa": _native.cpu_isa(), "dtype": args.dtype, "copy_GBps": bw,
    }
    print(f"# torch {info['torch']}, {info['threads']} threads, native={info['native']} ({info['cpu_isa']}), "
          f"{args.dtype}, channels_last; copy bandwidth {bw:.1f} GB/s (64 MB)")
    rows: list[dict] = []
    benches = [
        ("group_norm_silu", bench_group_norm, GN_QUICK if args.quick else GN_SHAPES),
        ("attention", bench_attention, ATTN_QUICK if args.quick else ATTN_SHAPES),
        ("conv3x3_winograd", bench_conv3x3, CONV_QUICK if args.quick else CONV_SHAPES),
        ("scheduler_step", bench_scheduler_step, STEP_QUICK if args.quick else STEP_SHAPES),
    ]
    print(f"{'op':16} {'shape':20} {'variant':24} {'torch ms':>9} {'fused ms':>9} {'speedup':>8} {'GB/s':>7} {'% copy':>6}")
    for name, fn, shapes in benches:
        if name not in wanted:
            continue
        for row in fn(shapes, dtype, args.rounds):
            rows.append(row)
            variant = (f"temb={row['temb']}" if "temb" in row else row.get("layout") or f"{row['fused']} vs base")
            print(f"{row['op']:16} {'x'.join(map(str, row['shape'])):20} {variant:24} {row['torch_ms']:9.3f} "
                  f"{row['fused_ms']:9.3f} {row['speedup']:7.2f}x {row['fused_GBps']:7.1f} "
                  f"{100 * row['fused_GBps'] / bw:5.0f}%", flush=True)
            if row["op"] == "conv3x3_winograd":
                print(f"{'':16} {'':20} {'':24} packed oneDNN {row['packed_ms']:.3f} ms: Winograd is "
                      f"{row['speedup_vs_packed']:.2f}x that, {row['fused_equiv_GFLOPs']:.0f} direct-GFLOP/s")
            if row["op"] == "scheduler_step":
                print(f"{'':16} {'':20} {'(baseline: ' + row['baseline'] + ')':24} op alone {row['op_ms']:.4f} ms "
                      f"= {row['speedup_op_vs_baseline']:.2f}x; PyTorch composite {row['torch_composite_ms']:.4f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": rows}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0
