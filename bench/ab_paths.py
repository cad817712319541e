"""A/B of one CPU fast-path choice inside ddpm_fast's UNet forward: the same weights twice, one model with the
choice on and one with it off, interleaved rounds, the caches flushed before every timed call (as the peers'
calls do in ``python -m ddpm_fast.bench unet``). Each model records its own forward plan with its setting.

    python bench/ab_paths.py --choice packed_linear --batch 1 --rounds 21 --json OUT.json
    python bench/ab_paths.py --choice panel --batch 1 --rounds 21
    python bench/ab_paths.py --choice taps --batch 1 --rounds 21
    python bench/ab_paths.py --choice cat_free --batch 16 --rounds 11
    python bench/ab_paths.py --choice pool --arch 256px --batch 1 --rounds 7
    python bench/ab_paths.py --choice malloc_keep --arch 256px --batch 1 --rounds 7
    python bench/ab_paths.py --choice direct_replay --batch 1 --rounds 61
    python bench/ab_paths.py --choice conv_panels --batch 1 --rounds 61
    python bench/ab_paths.py --choice steady_model --batch 1 --rounds 41
    python bench/ab_paths.py --choice own_gemm --batch 1 --rounds 11 --calls 5
    python bench/ab_paths.py --choice temb_panel --batch 1 --rounds 41

Choices: ``packed_linear`` (oneDNN's packed linear for the GEMM convolutions and attention's projections, off:
``addmm``), ``panel`` (the panel GEMM for few rows and the 8x8 level's Winograd weights as column panels, off:
oneDNN's packed linear and the batched Winograd schedule), ``taps`` (conv_out as one GEMM against its nine taps, off:
packed oneDNN), ``cat_free`` (up-block resnets without the concatenation of their skip connection, off:
``torch.cat``), ``conv_panels`` (the 4x4 level's 3x3 convolutions at batch 1 as one op, the panel GEMM over im2col
rows it builds, off: the im2col rows built in Python and ``panel_linear``), ``direct_replay`` (a forward plan's replay
calls each op through its C++ entry point and reads its constants as plain attributes, off: ``OpOverload.__call__``
and ``nn.Module.__getattr__``), ``temb_panel`` (the resnets' shared time-projection GEMM on the panel GEMM, off:
``F.linear``), ``steady_model`` (DDPMPipeline's loop checks its UNet's state once per call, off: at
every step; each timed call is a pipeline call of ``--steps`` steps, and the times are per step), ``pool`` (the CPU
kernels' memory pool, off: their outputs and scratch from torch's allocator), ``malloc_keep`` (glibc told to keep
freed blocks of any size for reuse, ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` as in ``MALLOC_KEEP``,
so that torch's allocations above 32 MiB stop costing fresh zeroed pages; off: glibc's defaults), ``own_gemm``
(the kernels taken as on a CPU whose torch GEMM lacks AVX-512 kernels, ``DDPM_FAST_TORCH_GEMM_AVX512=0``: the Winograd
planes and attention on our GEMM at every size, F(4x4) from 8 tiles; off: as on an Intel CPU, ``=1``).
These are process state (and the pool spares the C library's heap): their rounds alternate between two child
processes, each timing ``--calls`` forwards after three untimed ones, a round's time being their median.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import ddpm_fast
from ddpm_fast.bench import common, engines
from ddpm_fast.models import conv, linear, plans, resnet, unet_2d
from ddpm_fast.pipelines import pipeline_ddpm

PREDICATES = {
    "packed_linear": (linear, "usable"),
    "panel": (linear, "panel_supported"),
    "taps": (conv, "_taps"),
    "conv_panels": (conv, "_panels"),
    "cat_free": (resnet, "cat_free"),
    "direct_replay": (plans, "direct_replay"),
    "steady_model": (pipeline_ddpm, "steady_model"),
    "temb_panel": (unet_2d, "time_projections_on_panels"),
}
# What a choice is replaced by when off (default: a predicate that says no).
OFF = {"steady_model": contextlib.nullcontext}
# Process-state choices, each the environment of its child processes (on, off).
MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
OWN_GEMM = "DDPM_FAST_TORCH_GEMM_AVX512"
CHILD_ENV = {
    "pool": ({}, {"DDPM_FAST_CPU_POOL_MB": "0"}),
    "malloc_keep": (MALLOC_KEEP, {}),
    "own_gemm": ({OWN_GEMM: "0"}, {OWN_GEMM: "1"}),
}
CHOICES = [*PREDICATES, *CHILD_ENV]


def _inputs(args) -> tuple[dict, torch.Tensor, torch.Tensor]:
    cfg = common.ARCHS[args.arch]["unet"]
    size = cfg["sample_size"]
    x = torch.randn(args.batch, cfg["in_channels"], size, size, generator=torch.Generator().manual_seed(1))
    return cfg, x, torch.full((args.batch,), 500, dtype=torch.long)


def _model(cfg: dict) -> ddpm_fast.UNet2DModel:
    unet = ddpm_fast.UNet2DModel(**cfg)
    unet.load_state_dict(engines.random_state(cfg, 0))
    return unet.eval()


def _child(args) -> None:
    """One process's share of a process-state choice's round: ``--calls`` timed forwards; saves their median, the
    page faults per call (fresh pages the kernel had to map and zero) and the output."""
    cfg, x, t = _inputs(args)
    unet, flush = _model(cfg), torch.ones(600 * 2**20 // 4)
    times, faults = [], []
    with torch.inference_mode():
        for i in range(3 + args.calls):
            flush.sum()
            time.sleep(0.05)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            out = unet(x, t).sample
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    torch.save({"ms": statistics.median(times), "faults": statistics.median(faults), "out": out}, args.child)


def _child_rounds(args) -> tuple[dict[str, list[float]], dict[str, torch.Tensor], dict[str, list[float]]]:
    """Times, outputs and page faults per forward (per round) of a process-state choice."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    faults: dict[str, list[float]] = {"on": [], "off": []}
    outs: dict[str, torch.Tensor] = {}
    result = f"/tmp/ab_paths_{args.choice}_{os.getpid()}.pt"
    argv = [sys.executable, __file__, "--choice", args.choice, "--arch", args.arch, "--batch", str(args.batch)]
    argv += ["--threads", str(args.threads), "--calls", str(args.calls), "--child", result]
    envs = dict(zip(("on", "off"), CHILD_ENV[args.choice]))
    for r in range(args.rounds):
        for setting in ("on", "off") if r % 2 == 0 else ("off", "on"):
            env = {k: v for k, v in os.environ.items() if k not in {*MALLOC_KEEP, "DDPM_FAST_CPU_POOL_MB", OWN_GEMM}}
            subprocess.run(argv, env={**env, **envs[setting]}, check=True)
            got = torch.load(result)
            times[setting].append(got["ms"])
            faults[setting].append(got["faults"])
            outs[setting] = got["out"]
    os.remove(result)
    return times, outs, faults


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--choice", choices=sorted(CHOICES), required=True)
    p.add_argument("--arch", default="cifar10-32", choices=sorted(common.ARCHS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=5, help="pool, malloc_keep, own_gemm: timed forwards per child process")
    p.add_argument("--steps", type=int, default=10, help="steady_model: denoising steps per timed pipeline call")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one process of a child round
    args = p.parse_args(argv)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.child:
            return _child(args)
        if args.choice in CHILD_ENV:
            times, outs, faults = _child_rounds(args)
        else:
            (times, outs), faults = _in_process_rounds(args), None
    finally:
        torch.set_num_threads(before)
    ratios = [off / on for on, off in zip(times["on"], times["off"])]
    report = common.script_report(
        "ab_paths",
        " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "ms per denoising step" if args.choice == "steady_model" else "ms per UNet forward",
        choice=args.choice,
        arch=args.arch,
        batch=args.batch,
        ms=times,
        ms_median={k: statistics.median(v) for k, v in times.items()},
        speedup_of_on=statistics.median(times["off"]) / statistics.median(times["on"]),
        speedup_of_on_per_round=statistics.median(ratios),
        max_abs_diff=(outs["on"] - outs["off"]).abs().max().item(),
        **({"page_faults_per_forward": {k: statistics.median(v) for k, v in faults.items()}} if faults else {}),
    )
    print(
        f"{args.choice} {args.arch} b{args.batch}: on {report['ms_median']['on']:.2f} ms, "
        f"off {report['ms_median']['off']:.2f} ms, on is {report['speedup_of_on']:.3f}x "
        f"(per round {report['speedup_of_on_per_round']:.3f}x), max|d| {report['max_abs_diff']:.1e}"
    )
    if args.json:
        common.write_json(Path(args.json), report)


def _in_process_rounds(args) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    cfg, x, t = _inputs(args)
    flush = torch.ones(600 * 2**20 // 4)  # read before each call: larger than the L3 this machine reports
    models = {setting: _model(cfg) for setting in ("on", "off")}
    times: dict[str, list[float]] = {k: [] for k in models}
    module, name = PREDICATES[args.choice]
    real, off = getattr(module, name), OFF.get(args.choice, lambda *a, **k: False)

    def use(setting: str) -> None:
        setattr(module, name, real if setting == "on" else off)

    if args.choice == "steady_model":  # a pipeline call of --steps steps, timed per step
        pipes = {k: ddpm_fast.DDPMPipeline(unet=m, scheduler=ddpm_fast.DDPMScheduler()) for k, m in models.items()}
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)

        def call(setting: str) -> torch.Tensor:
            gen = torch.Generator().manual_seed(0)
            return pipes[setting](args.batch, gen, args.steps, output_type="pt").images

        per_call = args.steps
    else:

        def call(setting: str) -> torch.Tensor:
            return models[setting](x, t).sample

        per_call = 1
    outs = {}
    with torch.inference_mode():
        for setting in models:
            use(setting)
            for _ in range(3):  # eager, record, replay
                outs[setting] = call(setting)
        for r in range(args.rounds):
            for setting in models if r % 2 == 0 else reversed(list(models)):
                use(setting)
                flush.sum()  # a read, so that no dirty lines are written back during the timed call
                time.sleep(0.05)
                start = time.perf_counter()
                outs[setting] = call(setting)
                times[setting].append((time.perf_counter() - start) * 1e3 / per_call)
    use("on")
    return times, outs


if __name__ == "__main__":
    main()
