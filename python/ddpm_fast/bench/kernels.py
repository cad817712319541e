"""Kernel benchmark: each native op (through :mod:`ddpm_fast.ops`) against the PyTorch ops it replaces, at every
shape the UNets run, on the CPU or a CUDA GPU, with one shape list and one JSON schema for both.

The shapes are read off the models: ddpm_fast's UNet of each architecture runs once on the meta device (reference
backend) and every GroupNorm (with SiLU after it, with the time-embedding add before it, or plain inside
attention), attention, 3x3 stride-1 convolution and the scheduler step's sample is recorded, at each requested
batch size; each row says which (architecture, batch) uses it and how many times per forward. The PyTorch side and
the fused side are timed in interleaved rounds (CUDA events on the GPU); rows give both medians, the speedup
(PyTorch / fused) as a ratio of medians and as the median of per-round ratios, the outputs' max |diff|, and the fused
op's effective GB/s (every input read once, every output written once).

    python -m ddpm_fast.bench kernels [--device cpu|cuda] [--dtypes fp32] [--ops ...] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import ddpm_fast

from .. import _native, fast_path, ops
from . import common

OPS = ("attention", "scheduler_step", "scheduler_step_table", "group_norm_silu", "conv3x3_winograd")
DEFAULT_CONFIGS = [("cifar10-32", 1), ("cifar10-32", 16), ("cifar10-32", 64), ("256px", 1), ("256px", 8)]
QUICK_CONFIGS = [("cifar10-32", 1), ("256px", 1)]
# The scheduler-step coefficients timed (any finite values do: the op's cost does not depend on them).
STEP_COEFS = (1.02, -0.2, 0.3, 0.7, 0.0, 0.05)  # a_x, a_e, c0, c1, c2, noise_scale
STEP_CLIP = 1.0

NOTES = (
    "torch_ms / fused_ms: medians over interleaved rounds of one call; speedup = torch_ms / fused_ms; "
    "speedup_per_round = median over rounds of torch / fused; fused_GBps counts every input read once and every "
    "output written once; max_abs_diff compares the fused output with the PyTorch one; 'others' are further "
    "candidates timed in the same rounds (speedup_of_fused = their median / fused_ms); used_by lists the "
    "(architecture, batch) forwards that run the shape, with calls per forward."
)


# -- the shapes the UNets run ------------------------------------------------------------------------------


def traced_layers(arch: str) -> dict[str, dict[tuple, int]]:
    """Per batch-1 forward of ``arch``: ``{"group_norm_silu": {(variant, C, H, W, groups, eps): calls}, "attention":
    {(heads, S, D): calls}, "conv3x3_winograd": {(C_in, C_out, H, W): calls}}``, by running ddpm_fast's UNet on
    the meta device under the reference backend (every layer is then the plain nn module diffusers uses)."""
    from ..models.attention import Attention

    cfg = common.ARCHS[arch]["unet"]
    with torch.device("meta"):
        unet = ddpm_fast.UNet2DModel(**cfg).eval()
    found: dict[str, dict[tuple, int]] = {"group_norm_silu": {}, "attention": {}, "conv3x3_winograd": {}}

    def count(kind: str, key: tuple) -> None:
        found[kind][key] = found[kind].get(key, 0) + 1

    def hook(name: str, module: torch.nn.Module):
        def pre(mod, args):
            x = args[0]
            if isinstance(mod, Attention):
                _, c, h, w = x.shape
                count("attention", (mod.heads, h * w, mod.inner_dim // mod.heads))
                if mod.group_norm is not None:  # the attention's GroupNorm runs on the 4-D input, no SiLU
                    g = mod.group_norm
                    count("group_norm_silu", ("plain", c, h, w, g.num_groups, g.eps))
            elif isinstance(mod, torch.nn.GroupNorm):
                if name.endswith(".group_norm"):
                    return  # counted with its Attention above
                variant = "temb" if name.endswith("norm2") else "silu"
                count("group_norm_silu", (variant, x.shape[1], x.shape[2], x.shape[3], mod.num_groups, mod.eps))
            elif (
                isinstance(mod, torch.nn.Conv2d)
                and mod.kernel_size == (3, 3)
                and mod.stride == (1, 1)
                and mod.padding == (1, 1)
                and mod.dilation == (1, 1)
                and mod.groups == 1
            ):
                count("conv3x3_winograd", (mod.in_channels, mod.out_channels, x.shape[2], x.shape[3]))

        return module.register_forward_pre_hook(pre)

    handles = [
        hook(n, m) for n, m in unet.named_modules() if isinstance(m, (Attention, torch.nn.GroupNorm, torch.nn.Conv2d))
    ]
    size = cfg["sample_size"]
    with torch.no_grad(), ddpm_fast.backend("reference"):
        unet(torch.empty(1, cfg["in_channels"], size, size, device="meta"), torch.tensor([10], device="meta"))
    for h in handles:
        h.remove()
    return found


def unet_cases(configs: list[tuple[str, int]], wanted: set[str]) -> list[dict[str, Any]]:
    """One case per distinct (op, variant, shape) over the (arch, batch) configs, in op order."""
    cases: dict[tuple, dict[str, Any]] = {}

    def add(op: str, variant: str, shape: tuple, params: dict, use: str) -> None:
        key = (op, variant, shape, tuple(sorted(params.items())))
        case = cases.setdefault(
            key, {"op": op, "variant": variant, "shape": list(shape), "params": params, "used_by": []}
        )
        case["used_by"].append(use)

    traces = {arch: traced_layers(arch) for arch in dict.fromkeys(a for a, _ in configs)}
    for arch, batch in configs:
        cfg = common.ARCHS[arch]["unet"]
        for (heads, s, d), n in traces[arch]["attention"].items():
            for layout in ("unet_views", "contiguous"):
                add("attention", layout, (batch, heads, s, d), {}, f"{arch} b{batch} x{n}")
        sample = (batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
        add("scheduler_step", "clip", sample, {}, f"{arch} b{batch} x1 per step")
        add("scheduler_step_table", "clip", sample, {}, f"{arch} b{batch} x1 per step (CUDA graphs)")
        for (variant, c, h, w, groups, eps), n in traces[arch]["group_norm_silu"].items():
            add("group_norm_silu", variant, (batch, c, h, w), {"groups": groups, "eps": eps}, f"{arch} b{batch} x{n}")
        for (ci, co, h, w), n in traces[arch]["conv3x3_winograd"].items():
            add("conv3x3_winograd", "residual", (batch, ci, co, h, w), {}, f"{arch} b{batch} x{n}")
    order = {op: i for i, op in enumerate(OPS)}
    return sorted((c for c in cases.values() if c["op"] in wanted), key=lambda c: order[c["op"]])


# -- per-op benchmarks: each returns the candidates to time (name -> fn), the output pair to compare and facts


def _randn(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _group_norm_case(case, dtype, device, gen):
    n, c, h, w = case["shape"]
    groups, eps = case["params"]["groups"], case["params"]["eps"]
    x = _randn((n, c, h, w), dtype, device, gen).contiguous(memory_format=torch.channels_last)
    gamma, beta, temb = (
        _randn((c,), dtype, device, gen),
        _randn((c,), dtype, device, gen),
        _randn((n, c), dtype, device, gen),
    )
    variant = case["variant"]
    if variant == "temb":
        baseline = "F.silu(F.group_norm(x + temb[:, :, None, None]))"
        torch_fn = lambda: F.silu(F.group_norm(x + temb[:, :, None, None], groups, gamma, beta, eps))
        fused = lambda: ops.group_norm_silu(x, groups, gamma, beta, eps, temb=temb)
    elif variant == "silu":
        baseline = "F.silu(F.group_norm(x))"
        torch_fn = lambda: F.silu(F.group_norm(x, groups, gamma, beta, eps))
        fused = lambda: ops.group_norm_silu(x, groups, gamma, beta, eps)
    else:
        baseline = "F.group_norm(x)"
        torch_fn = lambda: F.group_norm(x, groups, gamma, beta, eps)
        fused = lambda: ops.group_norm_silu(x, groups, gamma, beta, eps, silu=False)
    return (
        {"torch": torch_fn, "fused": fused},
        baseline,
        {"bytes": 2 * x.numel() * x.element_size(), "layout": "channels_last"},
    )


class _SeesSDPA(TorchFunctionMode):
    """Notes whether F.scaled_dot_product_attention ran inside the block."""

    called = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.called = True
        return func(*args, **(kwargs or {}))


def _routes_to_sdpa(fn: Callable[[], Any]) -> bool:
    """Whether ``fn`` (an ops.attention call) ends in PyTorch's SDPA rather than the native kernel."""
    with torch.inference_mode(), _SeesSDPA() as seen:
        fn()
    return seen.called


def _attention_case(case, dtype, device, gen):
    b, h, s, d = case["shape"]
    if case["variant"] == "unet_views":  # the UNet's layout: one (B, S, 3HD) projection split into strided views
        packed = _randn((b, s, 3 * h * d), dtype, device, gen)
        q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in packed.split(h * d, dim=-1))
    else:
        q, k, v = (_randn((b, h, s, d), dtype, device, gen) for _ in range(3))
    fns: dict[str, Callable[[], Any]] = {
        "torch": lambda: F.scaled_dot_product_attention(q, k, v),
        "fused": lambda: ops.attention(q, k, v),
    }
    facts: dict[str, Any] = {"bytes": 4 * b * h * s * d * q.element_size(), "flops": 4.0 * b * h * s * s * d}
    if _routes_to_sdpa(fns["fused"]):
        # ops.attention sends this shape to SDPA (its routing rule); time the kernel itself too, to show why.
        facts["route"] = "SDPA" + (
            f" (CPU, fewer than ops.CPU_ATTENTION_MIN_KEYS={ops.CPU_ATTENTION_MIN_KEYS} keys)"
            if device.type == "cpu" and s < ops.CPU_ATTENTION_MIN_KEYS
            else ""
        )
        fns["kernel"] = lambda: torch.ops.ddpm_fast.attention.default(q, k, v, None)
    return fns, "F.scaled_dot_product_attention", facts


def _step_torch(eps, x, noise, a_x, a_e, c0, c1, c2, ns, clip):
    """The step as diffusers computes it: elementwise PyTorch ops in the sample's dtype."""
    x0 = (a_x * x + a_e * eps).clamp(-clip, clip)
    return c0 * x0 + c1 * x + c2 * eps + ns * noise, x0


def _scheduler_cases(case, dtype, device, gen):
    shape = case["shape"]
    eps, x, noise = (_randn(shape, dtype, device, gen) for _ in range(3))
    a_x, a_e, c0, c1, c2, ns = STEP_COEFS
    fns: dict[str, Callable[[], Any]] = {"torch": lambda: _step_torch(eps, x, noise, *STEP_COEFS, STEP_CLIP)}
    if case["op"] == "scheduler_step":
        fns["fused"] = lambda: ops.scheduler_step(eps, x, noise, (a_x, a_e), (c0, c1, c2), ns, STEP_CLIP)
        baseline = "PyTorch elementwise ops (diffusers' step arithmetic)"
        # whole scheduler steps, the host-side work included, for context
        t_step = 500
        try:
            import diffusers

            ref = diffusers.DDPMScheduler(num_train_timesteps=1000)
            ref.set_timesteps(1000)
            g1 = torch.Generator(device).manual_seed(0)
            fns["diffusers DDPMScheduler.step"] = lambda: ref.step(eps, t_step, x, generator=g1)
        except ImportError:
            pass
        fast = ddpm_fast.DDPMScheduler(num_train_timesteps=1000)
        fast.set_timesteps(1000)
        g2 = torch.Generator(device).manual_seed(0)
        fns["ddpm_fast DDPMScheduler.step"] = lambda: fast.step(eps, t_step, x, generator=g2)
    else:
        table = torch.tensor([STEP_COEFS] * 4, dtype=torch.float32, device=device)
        index = torch.tensor([2], dtype=torch.long, device=device)

        def torch_table():  # what a CUDA graph replays without the op: coefficients read on the device
            r = table.index_select(0, index)[0].to(dtype)
            x0 = (r[0] * x + r[1] * eps).clamp(-STEP_CLIP, STEP_CLIP)
            return r[2] * x0 + r[3] * x + r[4] * eps + r[5] * noise, x0

        fns["torch"] = torch_table
        fns["fused"] = lambda: ops.scheduler_step_table(eps, x, noise, table, index, STEP_CLIP)
        baseline = "PyTorch elementwise ops, coefficients indexed on the device"
    return fns, baseline, {"bytes": 5 * x.numel() * x.element_size()}


def _conv_case(case, dtype, device, gen):
    from ..models.conv import Conv2d, conv_path

    n, c, o, h, w = case["shape"]
    x = _randn((n, c, h, w), dtype, device, gen).contiguous(memory_format=torch.channels_last)
    res = _randn((n, o, h, w), dtype, device, gen).contiguous(memory_format=torch.channels_last)
    # built outside inference mode (a layer whose parameters were made inside it cannot prepare weights)
    conv = Conv2d(c, o, 3, padding=1).eval().requires_grad_(False)
    wt, b = conv.weight.detach(), conv.bias.detach()
    u = {tile: ops.winograd_weight(wt, tile) for tile in (2, 4)}

    def packed():  # the packed oneDNN convolution itself, whichever path the layer would take
        return conv._packed(x, res, False)

    with torch.inference_mode():
        choice = conv_path(conv, x, res)
        with fast_path.record_paths() as paths:
            packed()
    fns = {
        "torch": lambda: F.conv2d(x, wt, b, padding=1) + res,
        "F2": lambda: ops.conv3x3_winograd(x, u[2], b, residual=res),
        "F4": lambda: ops.conv3x3_winograd(x, u[4], b, residual=res),
        "packed oneDNN": packed,
    }
    facts = {
        "bytes": (x.numel() + 2 * res.numel()) * 4,
        "direct_flops": 2.0 * n * c * o * 9 * h * w,
        "layer_path": choice,
        "paths": {"packed oneDNN": sorted(p for p in paths if p.startswith("conv:"))},
    }
    return fns, "F.conv2d(x, w, b, padding=1) + residual", facts


BUILDERS = {
    "group_norm_silu": _group_norm_case,
    "attention": _attention_case,
    "scheduler_step": _scheduler_cases,
    "scheduler_step_table": _scheduler_cases,
    "conv3x3_winograd": _conv_case,
}


def op_skip_reason(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``op`` has no rows here, or None."""
    if not _native.available():
        return f"native extension unavailable: {_native.load_error()}"
    if device.type == "cuda" and not _native.has_cuda():
        return (
            f"ddpm_fast's CUDA kernels are not loaded (ddpm_fast._native.has_cuda() is False: {_native.cuda_error()})"
        )
    if not hasattr(torch.ops.ddpm_fast, op):
        return f"torch.ops.ddpm_fast.{op} is not in this build of the extension"
    if op == "conv3x3_winograd" and device.type != "cpu":
        return "CPU-only op (CUDA convolutions go to cuDNN)"
    if op == "conv3x3_winograd" and dtype != torch.float32:
        return "fp32-only op"
    return None


def bench_case(
    case: dict[str, Any], dtype: torch.dtype, device: torch.device, rounds: int, min_time: float, seed: int
) -> list[dict[str, Any]]:
    gen = torch.Generator(device).manual_seed(seed)
    base = {
        "op": case["op"],
        "variant": case["variant"],
        "shape": case["shape"],
        "dtype": common.dtype_name(dtype),
        "used_by": case["used_by"],
    }
    fns, baseline, facts = BUILDERS[case["op"]](case, dtype, device, gen)
    with torch.inference_mode():
        outputs = {name: fns[name]() for name in ("torch", "fused", "F2", "F4") if name in fns}
        samples, errors = common.interleaved(fns, rounds, device=device, min_time=min_time)
    fused_names = ["F2", "F4"] if case["op"] == "conv3x3_winograd" else ["fused"]
    rows = []
    for fused in fused_names:
        row = {**base, "baseline": baseline}
        if case["op"] == "conv3x3_winograd":
            row["variant"] = f"F{fused[1]}x{fused[1]} +residual"
            row["tile"] = int(fused[1])
            row["layer_path"] = facts["layer_path"]
        if "route" in facts:
            row["route"] = facts["route"]
        if "torch" not in samples or fused not in samples:
            row["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items()) or "not timed"
            rows.append(row)
            continue
        t_torch, t_fused = common.median(samples["torch"]), common.median(samples[fused])
        row.update(
            {
                "torch_ms": t_torch * 1e3,
                "fused_ms": t_fused * 1e3,
                "speedup": t_torch / t_fused,
                "speedup_per_round": common.per_round_ratio(samples["torch"], samples[fused]),
                "max_abs_diff": common.max_abs_diff(outputs[fused], outputs["torch"]),
                "fused_GBps": facts["bytes"] / t_fused / 1e9,
                "torch_ms_rounds": [s * 1e3 for s in samples["torch"]],
                "fused_ms_rounds": [s * 1e3 for s in samples[fused]],
            }
        )
        if "flops" in facts:
            row["fused_GFLOPs"] = facts["flops"] / t_fused / 1e9
            row["torch_GFLOPs"] = facts["flops"] / t_torch / 1e9
        if "direct_flops" in facts:
            row["fused_equiv_GFLOPs"] = facts["direct_flops"] / t_fused / 1e9
        others = {}
        for name in fns:
            if name in ("torch", "fused", "F2", "F4"):
                continue
            if name in samples:
                others[name] = {
                    "ms": common.median(samples[name]) * 1e3,
                    "speedup_of_fused": common.median(samples[name]) / t_fused,
                }
                if name in facts.get("paths", {}):
                    others[name]["paths"] = facts["paths"][name]
            else:
                others[name] = {"error": errors.get(name, "not timed")}
        if others:
            row["others"] = others
        rows.append(row)
    return rows


def copy_bandwidth(device: torch.device, rounds: int) -> float:
    """GB/s of a 64 MB tensor copy (read + write counted): the ceiling for elementwise work."""
    src = torch.randn(16 * 1024 * 1024, device=device)
    dst = torch.empty_like(src)
    samples, _ = common.interleaved({"copy": lambda: dst.copy_(src)}, rounds, device=device, min_time=0.02)
    return 2 * src.numel() * 4 / common.median(samples["copy"]) / 1e9


def _print_row(row: dict[str, Any], copy_gbps: float) -> None:
    shape = "x".join(map(str, row["shape"]))
    head = f"{row['op']:20} {shape:18} {row['dtype']:4} {row['variant']:17}"
    if "error" in row:
        print(f"{head} ERROR {row['error'][:160]}", flush=True)
        return
    line = (
        f"{head} {row['torch_ms']:9.4f} {row['fused_ms']:9.4f} {row['speedup']:6.2f}x "
        f"({row['speedup_per_round']:5.2f}x) {row['fused_GBps']:7.1f} {100 * row['fused_GBps'] / copy_gbps:5.0f}% "
        f"{row['max_abs_diff']:8.1e}"
    )
    if "fused_GFLOPs" in row:
        line += f"  {row['fused_GFLOPs']:.0f} vs {row['torch_GFLOPs']:.0f} GFLOP/s"
    if "fused_equiv_GFLOPs" in row:
        line += f"  {row['fused_equiv_GFLOPs']:.0f} direct-GFLOP/s, layer takes {row['layer_path']}"
    for name, other in row.get("others", {}).items():
        line += f"  | {name} " + (
            f"{other['ms']:.4f} ms ({other['speedup_of_fused']:.2f}x fused)"
            if "ms" in other
            else f"ERROR {other['error'][:60]}"
        )
    if "route" in row:
        line += f"  [wrapper routes to {row['route']}]"
    print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.bench kernels", description=__doc__.split("\n\n")[0])
    common.add_common_args(p, rounds=7)
    p.add_argument(
        "--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: cpu fp32; cuda fp16,bf16,fp32)"
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma subset of {','.join(OPS)}")
    p.add_argument(
        "--configs",
        default=None,
        metavar="ARCH:BATCH,...",
        help="UNet forwards whose shapes are timed (default " + ",".join(f"{a}:{b}" for a, b in DEFAULT_CONFIGS) + ")",
    )
    p.add_argument(
        "--quick", action="store_true", help="batch 1 only (" + ",".join(f"{a}:{b}" for a, b in QUICK_CONFIGS) + ")"
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=0.02,
        help="seconds each candidate runs per round (calls are repeated to fill it; default 0.02)",
    )
    p.add_argument("--budget", type=float, default=None, help="stop starting new rows after this many seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    device = common.setup_device(p, args)
    try:
        dtypes = common.comma_list(
            args.dtypes or ("fp32" if device.type == "cpu" else "fp16,bf16,fp32"), choices=list(common.DTYPES)
        )
        wanted = common.comma_list(args.ops, choices=OPS)
        configs = (
            common.parse_configs(args.configs) if args.configs else (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
        )
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    out_path = common.output_path(args.json, "kernels", device)
    report = common.new_report(
        "kernels",
        argv,
        device,
        {
            "dtypes": dtypes,
            "ops": wanted,
            "configs": [f"{a}:{b}" for a, b in configs],
            "rounds": args.rounds,
            "min_time": args.min_time,
            "layout": "channels_last activations",
        },
        NOTES,
    )
    report["copy_GBps"] = copy_bandwidth(device, args.rounds)
    report["skipped"] = []
    print(
        f"# {report['machine']}: torch {torch.__version__}, {torch.get_num_threads()} threads, native="
        f"{_native.available()} (cpu {_native.cpu_isa()}, cuda {_native.has_cuda()}); "
        f"copy {report['copy_GBps']:.1f} GB/s"
    )
    print(
        f"{'op':20} {'shape':18} {'type':4} {'variant':17} {'torch ms':>9} {'fused ms':>9} {'speedup':>7} "
        f"{'(round)':>8} {'GB/s':>7} {'%copy':>6} {'max|d|':>8}"
    )
    cases = unet_cases(configs, set(wanted))
    deadline = common.Deadline(args.budget)
    start = time.time()
    for dtype_name in dtypes:
        for op in wanted:
            reason = op_skip_reason(op, device, common.DTYPES[dtype_name])
            if reason:
                report["skipped"].append({"op": op, "dtype": dtype_name, "reason": reason})
                print(f"{op:20} {'':18} {dtype_name:4} skipped: {reason}", flush=True)
    # shape-major, op order (attention first): a run cut short by --budget has every dtype of the first shapes
    budget_left_out = 0
    for case in cases:
        for dtype_name in dtypes:
            dtype = common.DTYPES[dtype_name]
            if op_skip_reason(case["op"], device, dtype):
                continue
            if deadline.expired():
                budget_left_out += 1
                report["skipped"].append(
                    {
                        "op": case["op"],
                        "shape": case["shape"],
                        "dtype": dtype_name,
                        "variant": case["variant"],
                        "reason": "--budget reached",
                    }
                )
                continue
            try:
                rows = bench_case(case, dtype, device, args.rounds, args.min_time, args.seed)
            except Exception as exc:  # one broken case must not hide the others
                rows = [
                    {
                        "op": case["op"],
                        "variant": case["variant"],
                        "shape": case["shape"],
                        "dtype": dtype_name,
                        "used_by": case["used_by"],
                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                    }
                ]
            for row in rows:
                report["results"].append(row)
                _print_row(row, report["copy_GBps"])
            common.write_json(out_path, report)
    if budget_left_out:
        print(f"# --budget reached: {budget_left_out} rows not timed (listed under 'skipped')")
    report["wall_seconds"] = time.time() - start
    common.write_json(out_path, report)
    print(f"# wrote {out_path}")
    return 1 if any("error" in r for r in report["results"]) else 0
