#!/usr/bin/env python
"""The Winograd convolutions' share of a UNet forward: two copies of one random-weight UNet (cifar10-32 or 256-px
architecture), one run with the Winograd path (F(4x4) or F(2x2), as each layer chooses) and one baseline (every
convolution on packed oneDNN, or with ``--baseline f2`` Winograd F(2x2) only), timed in interleaved rounds in one
process. Reports both medians, the median of per-round ratios and the outputs' max difference; ``--json`` writes
them.

    python bench/winograd_ab.py --arch cifar10-32 --batch 1 --rounds 15
    python bench/winograd_ab.py --arch 256px --batch 1 --rounds 3 --json out.json
    python bench/winograd_ab.py --baseline f2      # F(4x4) where layers choose it, against F(2x2) only
"""

import argparse
import copy
import json
import statistics
import sys
import time

import torch

import ddpm_fast
from ddpm_fast.bench.sample import ARCHS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="cifar10-32", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--baseline", default="packed", choices=["packed", "f2"],
                   help="packed: every convolution on packed oneDNN; f2: Winograd with F(2x2) only")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    base = args.baseline

    torch.manual_seed(0)
    winograd = ddpm_fast.UNet2DModel(**ARCHS[args.arch]["unet"]).eval()
    baseline = copy.deepcopy(winograd)  # each copy keeps its own prepared weights
    size = ARCHS[args.arch]["unet"]["sample_size"]
    x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    t = torch.full((args.batch,), 500)

    def forward(model, on):
        with ddpm_fast.winograd(4 if on else 2 if base == "f2" else 0):
            start = time.perf_counter()
            out = model(x, t).sample
            return time.perf_counter() - start, out

    times = {"winograd": [], base: []}
    with torch.inference_mode():
        _, y_w = forward(winograd, True)  # warm-up: prepares the weights
        _, y_p = forward(baseline, False)
        for _ in range(args.rounds):
            times["winograd"].append(forward(winograd, True)[0])
            times[base].append(forward(baseline, False)[0])
    result = {
        "arch": args.arch, "batch": args.batch, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "baseline": base,
        "ms_median": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "speedup": statistics.median(times[base]) / statistics.median(times["winograd"]),
        "speedup_per_round_median": statistics.median(p / w for p, w in zip(times[base], times["winograd"])),
        "max_abs_diff": (y_w - y_p).abs().max().item(),
        "ms": {k: [s * 1e3 for s in v] for k, v in times.items()},
    }
    label = {"packed": "packed oneDNN", "f2": "F(2x2) only"}[base]
    print(f"{args.arch} batch {args.batch}: Winograd {result['ms_median']['winograd']:.1f} ms, {label} "
          f"{result['ms_median'][base]:.1f} ms per UNet forward: {result['speedup']:.2f}x "
          f"(per round {result['speedup_per_round_median']:.2f}x), max |diff| {result['max_abs_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
