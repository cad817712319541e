"""Sample quality of a digits model, judged by a classifier trained on the real digits (ddpm_fast.quality).

Samples ``--num-images`` digits with 1000-step DDPM and with 50-step DDIM (per-image seeds as ``ddpm-fast
sample``), and reports mean classifier confidence and class balance next to the same figures for held-out real
digits and uniform noise. Writes JSON (default ``bench/results/sample_quality-<device>.json``) and, with
``--grid-dir``, a 100-image grid PNG per schedule.

    python bench/sample_quality.py                       # the shipped model, 1000 images
    python bench/sample_quality.py --model runs/digits --num-images 500 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped ddpm-digits)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--schedules", default="ddpm:1000,ddim:50", help="comma list of scheduler:steps")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/sample_quality-<device>.json)")
    p.add_argument("--grid-dir", default=None, help="write grid-<scheduler>-<steps>.png here")
    args = p.parse_args(argv)

    import ddpm_fast
    from ddpm_fast import DDIMScheduler, DDPMPipeline, DDPMScheduler
    from ddpm_fast.quality import held_out_accuracy, quality_report, reference_reports
    from ddpm_fast.sampling import batch_indices, make_grid, sample_images
    from ddpm_fast.weights import shipped_model_path

    model = args.model or shipped_model_path()
    pipe = DDPMPipeline.from_pretrained(model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    resolution = pipe.unet.config.sample_size

    result = {
        "model": os.path.relpath(model) if args.model is None else model,
        "num_images": args.num_images,
        "seed": args.seed,
        "device": str(args.device),
        "device_name": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "ddpm_fast_backend": ddpm_fast.get_backend(),
        "classifier_held_out_accuracy": held_out_accuracy(),
        **reference_reports(resolution=resolution),
        "generated": {},
    }
    for spec in args.schedules.split(","):
        name, steps = spec.split(":")
        steps = int(steps)
        cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[name]
        pipe.scheduler = cls.from_config(base_config)
        t0 = time.perf_counter()
        with torch.inference_mode():
            images = sample_images(pipe, batch_indices(args.num_images, args.batch_size), args.seed, steps)
        wall = time.perf_counter() - t0
        stack = np.stack([images[i] for i in range(args.num_images)])
        report = quality_report(stack)
        report["wall_s"] = round(wall, 2)
        result["generated"][f"{name}-{steps}"] = report
        print(f"{name}-{steps}: confidence {report['mean_confidence']:.3f}, balance {report['balance']:.3f}, "
              f"min class {report['min_class_fraction']:.3f} ({wall:.1f} s)", flush=True)
        if args.grid_dir:
            Path(args.grid_dir).mkdir(parents=True, exist_ok=True)
            make_grid(list(stack[:100]), nrow=10, scale=4).save(Path(args.grid_dir) / f"grid-{name}-{steps}.png")
    for ref in ("real_held_out", "uniform_noise"):
        r = result[ref]
        print(f"{ref}: confidence {r['mean_confidence']:.3f}, balance {r['balance']:.3f}, "
              f"min class {r['min_class_fraction']:.3f}")

    out = Path(args.output or Path(__file__).parent / "results" / f"sample_quality-{torch.device(args.device).type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
