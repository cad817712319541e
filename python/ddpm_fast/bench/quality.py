"""Sample quality of a digits model, judged by a classifier trained on the real digits (:mod:`ddpm_fast.quality`).

Samples ``--num-images`` digits with 1000-step DDPM and with 50-step DDIM (per-image seeds as ``ddpm-fast
sample``), and reports mean classifier confidence and class balance next to the same figures for held-out real
digits and uniform noise. With ``--grid-dir``, also a 100-image grid PNG per schedule.

    python -m ddpm_fast.bench quality                       # the shipped model, 1000 images
    python -m ddpm_fast.bench quality --model runs/digits --num-images 500 --device cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from . import common

NOTES = (
    "mean_confidence: mean top-class probability of the digit classifier; balance: entropy of the predicted "
    "class fractions / log(10); real_held_out and uniform_noise are the two ends of the scale."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument(
        "--json", default=None, metavar="PATH", help="output JSON (default bench/results/<machine>/quality.json)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped ddpm-digits)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--schedules", default="ddpm:1000,ddim:50", help="comma list of scheduler:steps")
    p.add_argument("--grid-dir", default=None, help="write grid-<scheduler>-<steps>.png here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.rounds = 1
    device = common.setup_device(p, args)
    if args.num_images < 1 or args.batch_size < 1:
        p.error("--num-images and --batch-size must be >= 1")
    schedules = []
    for spec in common.comma_list(args.schedules):
        name, _, steps = spec.partition(":")
        if name not in ("ddpm", "ddim") or not steps.isdigit() or int(steps) < 1:
            p.error(f"bad schedule {spec!r}: expected ddpm:STEPS or ddim:STEPS")
        schedules.append((name, int(steps)))

    import ddpm_fast
    from ddpm_fast import DDIMScheduler, DDPMPipeline, DDPMScheduler
    from ddpm_fast.quality import held_out_accuracy, quality_report, reference_reports
    from ddpm_fast.sampling import batch_indices, make_grid, sample_images
    from ddpm_fast.weights import shipped_model_path

    model = args.model or shipped_model_path()
    pipe = DDPMPipeline.from_pretrained(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    resolution = pipe.unet.config.sample_size

    out_path = common.output_path(args.json, "quality", device)
    report = common.new_report(
        "quality",
        argv,
        device,
        {
            "model": "shipped ddpm-digits" if args.model is None else model,
            "num_images": args.num_images,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "schedules": [f"{n}:{s}" for n, s in schedules],
            "backend": ddpm_fast.get_backend(),
        },
        NOTES,
    )
    report["classifier_held_out_accuracy"] = held_out_accuracy()
    report["references"] = reference_reports(resolution=resolution)
    for name, steps in schedules:
        cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[name]
        pipe.scheduler = cls.from_config(base_config)
        t0 = time.perf_counter()
        with torch.inference_mode():
            images = sample_images(pipe, batch_indices(args.num_images, args.batch_size), args.seed, steps)
        wall = time.perf_counter() - t0
        stack = np.stack([images[i] for i in range(args.num_images)])
        row = {"schedule": f"{name}-{steps}", **quality_report(stack), "wall_s": round(wall, 2)}
        report["results"].append(row)
        print(
            f"{name}-{steps}: confidence {row['mean_confidence']:.3f}, balance {row['balance']:.3f}, "
            f"min class {row['min_class_fraction']:.3f} ({wall:.1f} s)",
            flush=True,
        )
        if args.grid_dir:
            Path(args.grid_dir).mkdir(parents=True, exist_ok=True)
            make_grid(list(stack[:100]), nrow=10, scale=4).save(Path(args.grid_dir) / f"grid-{name}-{steps}.png")
        common.write_json(out_path, report)
    for ref, r in report["references"].items():
        print(
            f"{ref}: confidence {r['mean_confidence']:.3f}, balance {r['balance']:.3f}, "
            f"min class {r['min_class_fraction']:.3f}"
        )
    common.write_json(out_path, report)
    print(f"# wrote {out_path}")
    return 0
