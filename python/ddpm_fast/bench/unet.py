"""UNet forward only: ddpm_fast's UNet against diffusers (eager, channels_last, torch.compile), ONNX Runtime,
OpenVINO and torch.compile of ddpm_fast's UNet, all with the same random weights and thread count, side by side.

For each (architecture, dtype, batch): every variant (see ``ddpm_fast.bench.engines``) is built (export /
conversion time in ``setup_s``), called once (``first_call_s``, where torch.compile compiles), then timed in
interleaved rounds on one fixed input (timestep 500). Reports per variant the median ms per forward, the ratio to
ddpm_fast (of the medians and per round), achieved GFLOP/s, and the max |diff| of its output against diffusers
eager; the issues' targets are evaluated on what was measured.

    python -m ddpm_fast.bench unet                                   # CPU: cifar10-32 b1, b16; 256px b1; fp32
    python -m ddpm_fast.bench unet --device cuda --dtypes fp16 --configs 256px:8,cifar10-32:64
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from typing import Any

import torch

from . import common, engines

CPU_CONFIGS = [("cifar10-32", 1), ("cifar10-32", 16), ("256px", 1)]
CUDA_CONFIGS = [
    ("cifar10-32", 1),
    ("cifar10-32", 16),
    ("cifar10-32", 64),
    ("cifar10-32", 256),
    ("256px", 1),
    ("256px", 8),
    ("256px", 32),
]
CPU_VARIANTS = [
    "diffusers_eager",
    "diffusers_channels_last",
    "onnxruntime",
    "openvino",
    "diffusers_compile",
    "ddpm_fast_compile",
    "ddpm_fast_noplans",
    "ddpm_fast",
]
CUDA_VARIANTS = [
    "diffusers_eager",
    "diffusers_channels_last",
    "onnxruntime",
    "diffusers_compile",
    "diffusers_compile_max_autotune",
    "ddpm_fast_compile",
    "ddpm_fast",
]

NOTES = (
    "ms_median: median over interleaved rounds of one UNet forward (a fixed input, timestep 500); "
    "speedup_of_ddpm_fast = variant median / ddpm_fast median; speedup_of_ddpm_fast_per_round = median over rounds "
    "of variant / ddpm_fast; max_abs_diff_vs_diffusers_eager compares outputs; setup_s = build / export / convert "
    "times, first_call_s = the first forward (torch.compile compiles there); gflops_achieved uses the FLOP count of "
    "diffusers' ops (FlopCounterMode)."
)


def plan(args, device: torch.device, parser: argparse.ArgumentParser) -> list[tuple[str, str, int]]:
    """(arch, dtype, batch) rows, dtype-major (a run cut short has measured the first dtype everywhere)."""
    try:
        dtypes = common.comma_list(
            args.dtypes or ("fp32" if device.type == "cpu" else "fp16,bf16,fp32"), choices=list(common.DTYPES)
        )
        if args.configs:
            configs = common.parse_configs(args.configs)
        else:
            configs = CPU_CONFIGS if device.type == "cpu" else CUDA_CONFIGS
            if args.archs:
                archs = common.comma_list(args.archs, choices=list(common.ARCHS))
                if args.batches:
                    batches = common.comma_list(args.batches, int)
                    configs = [(a, b) for a in archs for b in batches]
                else:
                    configs = [(a, b) for a, b in configs if a in archs] or [(a, 1) for a in archs]
            elif args.batches:
                batches = common.comma_list(args.batches, int)
                configs = [(a, b) for a in dict.fromkeys(a for a, _ in configs) for b in batches]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    return [(arch, dt, batch) for dt in dtypes for arch, batch in configs]


def bench_row(
    arch: str, dtype_name: str, batch: int, device: torch.device, variants: list[str], args
) -> dict[str, Any]:
    cfg = common.ARCHS[arch]["unet"]
    dtype = common.DTYPES[dtype_name]
    gflop = common.count_gflop(arch) * batch
    row: dict[str, Any] = {
        "arch": arch,
        "dtype": dtype_name,
        "batch": batch,
        "unit": "ms per UNet forward",
        "gflop_per_forward": gflop,
        "threads": torch.get_num_threads(),
        "variants": {},
    }
    src = engines.Source(cfg, engines.random_state(cfg, args.seed), device, dtype, batch, args.compile_backend)
    gen = torch.Generator("cpu").manual_seed(args.seed + 1)
    x = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=gen)
    x = x.to(device=device, dtype=dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    built: dict[str, engines.Engine] = {}
    for name in variants:
        try:
            with common.time_limit(args.timeout), engines.quiet_tracing():
                built[name] = engines.build(name, src)
        except engines.Skipped as exc:
            row["variants"][name] = {"skipped": str(exc)}
        except (Exception, common.BenchTimeout) as exc:
            row["variants"][name] = {
                "error": f"build: {type(exc).__name__}: {exc}"[:2000],
                "trace": traceback.format_exc(limit=4),
            }

    def call(engine: engines.Engine):
        def run():
            with torch.inference_mode():
                return engine.forward(x, t)

        return run

    with engines.quiet_tracing():
        measured = common.compare_variants(
            {name: call(e) for name, e in built.items()},
            rounds=args.rounds,
            device=device,
            timeout=args.timeout,
            record=[n for n in built if n.startswith("ddpm_fast")],
        )
    for name in variants:
        if name in built:
            entry = measured[name]
            entry["setup_s"] = built[name].setup_s
            if built[name].info:
                entry["info"] = built[name].info
            if "ms_median" in entry:
                entry["gflops_achieved"] = gflop / (entry["ms_median"] / 1e3)
            row["variants"][name] = entry
    del built, src
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_row(row: dict[str, Any]) -> None:
    head = f"{row['arch']:>10} {row['dtype']:>4} b{row['batch']:<4}"
    if "error" in row:
        print(f"{head} ERROR {row['error'][:200]}", flush=True)
        return
    for name, e in row["variants"].items():
        if "skipped" in e:
            print(f"{head} {name:<31} skipped: {e['skipped'][:150]}", flush=True)
        elif "error" in e:
            print(f"{head} {name:<31} ERROR {e['error'][:150]}", flush=True)
        else:
            ratio = e.get("speedup_of_ddpm_fast")
            extra = f"  ddpm_fast {ratio:5.2f}x (per round {e['speedup_of_ddpm_fast_per_round']:.2f}x)" if ratio else ""
            diff = e.get("max_abs_diff_vs_diffusers_eager")
            setup = sum(e.get("setup_s", {}).values())
            unit = "ms/step" if "step" in row["unit"] else "ms/fwd"
            print(
                f"{head} {name:<31} {e['ms_median']:10.2f} {unit} {e['gflops_achieved']:8.1f} GFLOP/s{extra}"
                f"{'' if diff is None else f'  max|d| {diff:.1e}'}  setup {setup:.1f}s first {e['first_call_s']:.1f}s",
                flush=True,
            )


def add_variant_args(p: argparse.ArgumentParser, cpu_default: list[str], cuda_default: list[str]) -> None:
    p.add_argument(
        "--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: cpu fp32; cuda fp16,bf16,fp32)"
    )
    p.add_argument(
        "--configs", default=None, metavar="ARCH:BATCH,...", help="explicit rows, e.g. 256px:8,cifar10-32:64"
    )
    p.add_argument("--archs", default=None, help="comma list of " + ", ".join(common.ARCHS) + " (filters the defaults)")
    p.add_argument("--batches", default=None, help="comma list of batch sizes for every --archs")
    p.add_argument(
        "--variants",
        default=None,
        help="comma list of "
        + ", ".join(engines.VARIANTS)
        + f" (default cpu: {','.join(cpu_default)}; cuda: {','.join(cuda_default)})",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the *_compile variants (default inductor; 'eager' for smoke runs)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds a variant's build, first call or one round may take (default cpu 900, cuda 300)",
    )
    p.add_argument("--budget", type=float, default=None, help="stop starting new rows after this many seconds")


def variant_list(args, device: torch.device, parser, cpu_default, cuda_default, known) -> list[str]:
    try:
        return (
            common.comma_list(args.variants, choices=list(known))
            if args.variants
            else list(cpu_default if device.type == "cpu" else cuda_default)
        )
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))


def run_rows(
    subcommand: str,
    argv,
    parser,
    args,
    device,
    variants,
    bench,
    printer,
    notes,
    settings: dict[str, Any] | None = None,
    descriptions: dict[str, str] | None = None,
) -> int:
    """The driver ``unet`` and ``sample`` share: rows in order under --budget, JSON after each, targets at the end."""
    rows = plan(args, device, parser)
    if args.timeout is None:
        args.timeout = 900.0 if device.type == "cpu" else 300.0
    out_path = common.output_path(args.json, subcommand, device)
    report = common.new_report(
        subcommand,
        argv,
        device,
        {
            "rows": [f"{a} {d} b{b}" for a, d, b in rows],
            "variants": variants,
            "rounds": args.rounds,
            "compile_backend": args.compile_backend,
            "timeout": args.timeout,
            "budget": args.budget,
            **(settings or {}),
        },
        notes,
    )
    report["variant_descriptions"] = {v: (descriptions or engines.VARIANTS).get(v, "") for v in variants}
    common.write_json(out_path, report)
    deadline = common.Deadline(args.budget)
    start = time.time()
    for arch, dt, batch in rows:
        if deadline.expired():
            report["results"].append({"arch": arch, "dtype": dt, "batch": batch, "skipped": "--budget reached"})
            continue
        try:
            row = bench(arch, dt, batch, device, variants, args)
        except Exception as exc:  # one broken row must not lose the others
            row = {
                "arch": arch,
                "dtype": dt,
                "batch": batch,
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                "trace": traceback.format_exc(limit=6),
                "variants": {},
            }
        row["loadavg_after"] = common.safe(lambda: [round(v, 2) for v in __import__("os").getloadavg()])
        report["results"].append(row)
        printer(row)
        report["targets"] = common.evaluate_targets(report["results"], device)
        common.write_json(out_path, report)
    report["targets"] = common.evaluate_targets(report["results"], device)
    report["wall_seconds"] = time.time() - start
    common.write_json(out_path, report)
    for check in report["targets"]:
        if check["measured"] is None:
            continue  # its row or variant was not run (the JSON lists it)
        m, r = check["measured"], check["measured_per_round"]
        shown = "n/a" if m is None else f"{m:.2f}x" + ("" if r is None else f" (per round {r:.2f}x)")
        print(f"target {check['what']}: >= {check['goal']}x, measured {shown}")
    print(f"# wrote {out_path}")
    failed = any("error" in r or any("error" in e for e in r.get("variants", {}).values()) for r in report["results"])
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.bench unet", description=__doc__.split("\n\n")[0])
    common.add_common_args(p, rounds=7)
    add_variant_args(p, CPU_VARIANTS, CUDA_VARIANTS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    device = common.setup_device(p, args)
    variants = variant_list(args, device, p, CPU_VARIANTS, CUDA_VARIANTS, engines.VARIANTS)
    print(
        f"# {common.machine_name(device)}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"variants {','.join(variants)}"
    )
    return run_rows("unet", argv, p, args, device, variants, bench_row, print_row, NOTES)
