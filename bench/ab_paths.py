"""A/B of one CPU fast-path choice inside ddpm_fast's UNet forward: the same weights twice, one model with the
choice on and one with it off, interleaved rounds, the caches flushed before every timed call (as the peers'
calls do in ``python -m ddpm_fast.bench unet``). Each model records its own forward plan with its setting.

    python bench/ab_paths.py --choice packed_linear --batch 1 --rounds 21 --json OUT.json
    python bench/ab_paths.py --choice taps --batch 1 --rounds 21

Choices: ``packed_linear`` (oneDNN's packed linear for the GEMM convolutions and attention's projections, off:
``addmm``), ``taps`` (conv_out as one GEMM against its nine taps, off: packed oneDNN).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ddpm_fast
from ddpm_fast.bench import common, engines
from ddpm_fast.models import conv, linear

CHOICES = {"packed_linear": (linear, "usable"), "taps": (conv, "_taps")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--choice", choices=sorted(CHOICES), required=True)
    p.add_argument("--arch", default="cifar10-32", choices=sorted(common.ARCHS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    module, name = CHOICES[args.choice]
    real = getattr(module, name)
    cfg = common.ARCHS[args.arch]["unet"]
    size = cfg["sample_size"]
    x = torch.randn(args.batch, cfg["in_channels"], size, size, generator=torch.Generator().manual_seed(1))
    t = torch.full((args.batch,), 500, dtype=torch.long)
    flush = torch.ones(600 * 2**20 // 4)  # read before each call: larger than the L3 this machine reports
    models = {}
    for setting in ("on", "off"):
        unet = ddpm_fast.UNet2DModel(**cfg)
        unet.load_state_dict(engines.random_state(cfg, 0))
        models[setting] = unet.eval()
    times: dict[str, list[float]] = {k: [] for k in models}

    def use(setting: str) -> None:
        setattr(module, name, real if setting == "on" else (lambda *a, **k: False))

    with torch.inference_mode():
        outs = {}
        for setting, unet in models.items():
            use(setting)
            for _ in range(3):  # eager, record, replay
                outs[setting] = unet(x, t).sample
        for r in range(args.rounds):
            for setting, unet in models.items():
                use(setting)
                flush.sum()  # a read, so that no dirty lines are written back during the timed call
                time.sleep(0.05)
                start = time.perf_counter()
                unet(x, t)
                times[setting].append((time.perf_counter() - start) * 1e3)
    use("on")
    ratios = [off / on for on, off in zip(times["on"], times["off"])]
    report = {
        "command": "python bench/ab_paths.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "environment": common.environment("cpu"),
        "choice": args.choice,
        "arch": args.arch,
        "batch": args.batch,
        "unit": "ms per UNet forward",
        "ms": times,
        "ms_median": {k: statistics.median(v) for k, v in times.items()},
        "speedup_of_on": statistics.median(times["off"]) / statistics.median(times["on"]),
        "speedup_of_on_per_round": statistics.median(ratios),
        "max_abs_diff": (outs["on"] - outs["off"]).abs().max().item(),
    }
    print(
        f"{args.choice} {args.arch} b{args.batch}: on {report['ms_median']['on']:.2f} ms, "
        f"off {report['ms_median']['off']:.2f} ms, on is {report['speedup_of_on']:.3f}x "
        f"(per round {report['speedup_of_on_per_round']:.3f}x), max|d| {report['max_abs_diff']:.1e}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
