"""Whole sampling runs: ddpm_fast's DDPMPipeline against diffusers' and against diffusers' pipeline with its UNet
call on ONNX Runtime, OpenVINO or torch.compile, side by side in one process.

Every variant gets the same random weights and the same seed. The peers run diffusers' ``DDPMPipeline`` and its
``DDPMScheduler`` (the step in PyTorch); only the UNet call goes to the engine. ddpm_fast's variants run
ddpm_fast's pipeline and scheduler (on CUDA with CUDA graphs; ``ddpm_fast_nograph`` without). Each variant makes one
untimed call (``first_call_s``), then every variant is timed in interleaved rounds; a time is one
``pipe(batch_size=..., num_inference_steps=..., output_type="pt")`` call divided by its step count. Reported per
variant: the median ms per step, the ratio to ddpm_fast (of the medians and per round), achieved GFLOP/s, and the
images' max |diff| against diffusers eager.

    python -m ddpm_fast.bench sample                                   # CPU: cifar10-32 b1, b16; 256px b1; fp32
    python -m ddpm_fast.bench sample --device cuda --dtypes fp16 --configs cifar10-32:64,256px:8
"""

from __future__ import annotations

import argparse
import gc
import traceback
from typing import Any

import torch

from . import common, engines, unet

VARIANTS = {**engines.VARIANTS, "ddpm_fast_nograph": "ddpm_fast's pipeline with CUDA graphs off"}
# The UNet benchmark's peers, plus (CUDA) the pipeline without graphs just before ddpm_fast.
CPU_VARIANTS = list(unet.CPU_VARIANTS)
CUDA_VARIANTS = [v for v in unet.CUDA_VARIANTS if v != "ddpm_fast"] + ["ddpm_fast_nograph", "ddpm_fast"]

NOTES = (
    "ms_median: median over interleaved rounds of one pipe(...) call (noise, every step, postprocessing) divided by "
    "its steps; speedup_of_ddpm_fast = variant median / ddpm_fast median; speedup_of_ddpm_fast_per_round = median "
    "over rounds of variant / ddpm_fast; max_abs_diff_vs_diffusers_eager compares the images (output_type 'pt', in "
    "[0, 1]); peers run diffusers' pipeline and scheduler with only the UNet call on the engine; setup_s = build / "
    "export / convert times, first_call_s = the first pipe(...) call (torch.compile compiles, CUDA graphs capture)."
)


def build_pipeline(name: str, src: engines.Source, scheduler_config: dict[str, Any]) -> tuple[Any, engines.Engine]:
    """``(pipe, engine)``: a callable taking pipe(...)'s arguments, and the engine whose UNet it runs."""
    engine = engines.build("ddpm_fast" if name == "ddpm_fast_nograph" else name, src)
    if name.startswith("ddpm_fast"):
        import ddpm_fast

        pipe = ddpm_fast.DDPMPipeline(unet=engine.module, scheduler=ddpm_fast.DDPMScheduler(**scheduler_config))
        if name == "ddpm_fast_nograph":
            pipe.enable_cuda_graphs(False)
        pipe.set_progress_bar_config(disable=True)
        if name in ("ddpm_fast_reference", "ddpm_fast_noplans"):
            inner = pipe

            def pipe(**kwargs):
                with engines.variant_scope(name):
                    return inner(**kwargs)

        return pipe, engine
    import diffusers

    model = (
        engine.module
        if engine.module is not None
        else engines.EngineUNet(engine, src.arch_config, src.device, src.dtype)
    )
    pipe = diffusers.DDPMPipeline(unet=model, scheduler=diffusers.DDPMScheduler(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe, engine


def bench_row(
    arch: str, dtype_name: str, batch: int, device: torch.device, variants: list[str], args
) -> dict[str, Any]:
    spec = common.ARCHS[arch]
    cfg = spec["unet"]
    steps = args.steps_256 if cfg["sample_size"] >= 256 else args.steps
    gflop = common.count_gflop(arch) * batch
    row: dict[str, Any] = {
        "arch": arch,
        "dtype": dtype_name,
        "batch": batch,
        "unit": "ms per denoising step",
        "steps_per_call": steps,
        "gflop_per_step": gflop,
        "threads": torch.get_num_threads(),
        "generator_device": args.generator_device,
        "variants": {},
    }
    src = engines.Source(
        cfg, engines.random_state(cfg, args.seed), device, common.DTYPES[dtype_name], batch, args.compile_backend
    )
    pipes: dict[str, Any] = {}
    built: dict[str, engines.Engine] = {}
    for name in variants:
        try:
            with common.time_limit(args.timeout), engines.quiet_tracing():
                pipes[name], built[name] = build_pipeline(name, src, spec["scheduler"])
        except engines.Skipped as exc:
            row["variants"][name] = {"skipped": str(exc)}
        except (Exception, common.BenchTimeout) as exc:
            row["variants"][name] = {
                "error": f"build: {type(exc).__name__}: {exc}"[:2000],
                "trace": traceback.format_exc(limit=4),
            }

    def call(pipe):
        def run():
            generator = torch.Generator(args.generator_device).manual_seed(args.seed)
            with torch.no_grad():
                return pipe(batch_size=batch, generator=generator, num_inference_steps=steps, output_type="pt").images

        return run

    with engines.quiet_tracing():
        measured = common.compare_variants(
            {n: call(p) for n, p in pipes.items()},
            rounds=args.rounds,
            device=device,
            timeout=args.timeout,
            per_call=steps,
        )
    for name in variants:
        if name in pipes:
            entry = measured[name]
            entry["setup_s"] = built[name].setup_s
            if built[name].info:
                entry["info"] = built[name].info
            if "ms_median" in entry:
                entry["gflops_achieved"] = gflop / (entry["ms_median"] / 1e3)
            row["variants"][name] = entry
    del pipes, built, src
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.bench sample", description=__doc__.split("\n\n")[0])
    common.add_common_args(p, rounds=5)
    unet.add_variant_args(p, CPU_VARIANTS, CUDA_VARIANTS)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per timed call (default cpu 10, cuda 20)")
    p.add_argument("--steps-256", type=int, default=None, help="steps per call for 256px (default cpu 2, cuda 10)")
    p.add_argument(
        "--cpu-generator",
        action="store_true",
        help="draw the noise with a CPU generator on CUDA (the diffusers docs' habit)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    device = common.setup_device(p, args)
    variants = unet.variant_list(args, device, p, CPU_VARIANTS, CUDA_VARIANTS, VARIANTS)
    args.steps = args.steps or (10 if device.type == "cpu" else 20)
    args.steps_256 = args.steps_256 or (2 if device.type == "cpu" else 10)
    if min(args.steps, args.steps_256) < 1:
        p.error("--steps and --steps-256 must be >= 1")
    args.generator_device = "cpu" if device.type == "cpu" or args.cpu_generator else device.type
    print(
        f"# {common.machine_name(device)}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"variants {','.join(variants)}"
    )
    settings = {"steps": args.steps, "steps_256": args.steps_256, "generator_device": args.generator_device}
    return unet.run_rows(
        "sample", argv, p, args, device, variants, bench_row, unet.print_row, NOTES, settings, VARIANTS
    )
