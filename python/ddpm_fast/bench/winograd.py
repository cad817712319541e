"""The Winograd convolutions' share of a UNet forward (CPU): two copies of one random-weight ddpm_fast UNet, one run
with the Winograd path (F(4x4) or F(2x2), as each layer chooses: ``ddpm_fast.winograd(4)``) and one baseline (every
convolution on packed oneDNN, ``winograd(0)``, or with ``--baseline f2`` F(2x2) only, ``winograd(2)``), timed in
interleaved rounds in one process. Reports both medians, the ratio (of the medians and per round), the outputs'
max |diff| and which convolution paths each ran (``ddpm_fast.fast_path.record_paths``).

    python -m ddpm_fast.bench winograd --arch cifar10-32 --batch 1 --rounds 15
    python -m ddpm_fast.bench winograd --arch 256px --batch 1 --rounds 3
    python -m ddpm_fast.bench winograd --baseline f2      # F(4x4) where layers choose it, against F(2x2) only
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

import ddpm_fast

from . import common

BASELINES = {"packed": (0, "every convolution on packed oneDNN"), "f2": (2, "Winograd F(2x2) only")}
NOTES = (
    "ms_median: one UNet forward (timestep 500), median over interleaved rounds; speedup = baseline median / "
    "winograd median; speedup_per_round = median over rounds of baseline / winograd; paths: calls per path "
    "in one forward."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.bench winograd", description=__doc__.split("\n\n")[0])
    common.add_common_args(p, rounds=15)
    p.add_argument("--arch", default="cifar10-32", choices=list(common.ARCHS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--baseline",
        default="packed",
        choices=list(BASELINES),
        help="packed: every convolution on packed oneDNN; f2: Winograd with F(2x2) only",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error("the Winograd convolutions are CPU kernels: --device cpu only")
    device = common.setup_device(p, args)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    base, (base_tile, base_what) = args.baseline, BASELINES[args.baseline]
    cfg = common.ARCHS[args.arch]["unet"]
    torch.manual_seed(args.seed)
    model = ddpm_fast.UNet2DModel(**cfg).eval().requires_grad_(False)
    models = {"winograd": (model, 4), base: (copy.deepcopy(model), base_tile)}  # each copy keeps its own weights
    size = cfg["sample_size"]
    x = torch.randn(args.batch, cfg["in_channels"], size, size).contiguous(memory_format=torch.channels_last)
    t = torch.full((args.batch,), 500)

    def forward(unet, tile):
        def run():
            with torch.inference_mode(), ddpm_fast.winograd(tile):
                return unet(x, t).sample

        return run

    out_path = common.output_path(args.json, "winograd", device)
    report = common.new_report(
        "winograd",
        argv,
        device,
        {"arch": args.arch, "batch": args.batch, "rounds": args.rounds, "baseline": f"{base}: {base_what}"},
        NOTES,
    )
    variants = common.compare_variants(
        {name: forward(m, tile) for name, (m, tile) in models.items()},
        rounds=args.rounds,
        device=device,
        ref="winograd",
        diff_ref=base,
        record=list(models),
    )
    row: dict[str, Any] = {
        "arch": args.arch,
        "batch": args.batch,
        "baseline": base,
        "threads": torch.get_num_threads(),
        "unit": "ms per UNet forward",
        "variants": variants,
    }
    w, b = variants["winograd"], variants[base]
    if "ms_median" in w and "ms_median" in b:
        row.update(
            speedup=b["speedup_of_winograd"],
            speedup_per_round=b["speedup_of_winograd_per_round"],
            max_abs_diff=w["max_abs_diff_vs_" + base],
        )
        print(
            f"{args.arch} batch {args.batch}: Winograd {w['ms_median']:.1f} ms, {base_what} {b['ms_median']:.1f} ms "
            f"per UNet forward: {row['speedup']:.2f}x (per round {row['speedup_per_round']:.2f}x), "
            f"max |diff| {row['max_abs_diff']:.1e}"
        )
        for name in models:
            print(
                f"  {name} paths: "
                + ", ".join(f"{k} {v}" for k, v in variants[name]["paths"].items() if k.startswith("conv:"))
            )
    else:
        print(f"ERROR: {w.get('error') or b.get('error')}")
    report["results"].append(row)
    common.write_json(out_path, report)
    print(f"# wrote {out_path}")
    return 0 if "speedup" in row else 1
