"""Sampling speed: ddpm_fast's DDPMPipeline against diffusers', side by side in one process.

Both libraries get the same random weights (cifar10-32 and 256-px google/ddpm architectures) and the same
seed; every configuration (architecture, dtype, batch) times each variant in interleaved rounds and
reports the median ms per denoising step (a whole ``pipe(...)`` call divided by its step count), the
ratio to ddpm_fast, the achieved GFLOP/s against a ceiling measured in the same run, and the largest
difference between the images (``output_type="np"``).  Results go to JSON as they come, so a run cut
short still leaves what it measured.  Every variant is guarded: an error or a timeout is recorded in the
JSON and the run goes on.

    python -m ddpm_fast.bench sample                      # CPU defaults
    python bench/sample_speed.py --device cuda --json bench/results/gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ARCHS: dict[str, dict[str, Any]] = {
    "cifar10-32": {
        "unet": {
            "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
            "center_input_sample": False,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        },
        "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": True,
                      "variance_type": "fixed_large"},
        "gflop_per_image": 12.1,
    },
    "256px": {
        "unet": {
            "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 128, 256, 256, 512, 512],
            "center_input_sample": False,
            "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                 "DownBlock2D"],
            "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 256, "time_embedding_type": "positional",
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
        },
        "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": True,
                      "variance_type": "fixed_small"},
        "gflop_per_image": 497.0,
    },
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BenchTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise BenchTimeout in the main thread after ``seconds`` (Unix; no-op elsewhere or when None/0)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise BenchTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_capability": _safe(lambda: torch.backends.cpu.get_cpu_capability()),
        "threads": torch.get_num_threads(), "loadavg": _safe(lambda: list(os.getloadavg())),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    env["diffusers"] = _safe(lambda: __import__("diffusers").__version__)
    env["git_commit"] = _safe(
        lambda: subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    )
    with contextlib.suppress(Exception):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu_model"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        env["gpu"] = _safe(lambda: torch.cuda.get_device_name(device))
        env["cuda"] = torch.version.cuda
        env["cudnn"] = _safe(lambda: torch.backends.cudnn.version())
    with contextlib.suppress(Exception):
        from ddpm_fast.models.conv import mkldnn_conv_supported

        env["packed_conv_native"] = {name: mkldnn_conv_supported(dt) for name, dt in DTYPES.items()}
    with contextlib.suppress(Exception):
        import ddpm_fast._C as _C  # noqa: F401

        env["native_extension"] = True
    env.setdefault("native_extension", False)
    return env


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"


# -- ceilings --------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device, dtypes: list[str]) -> dict[str, Any]:
    """GFLOP/s of the best case this run can get: a packed oneDNN 3x3 conv (CPU) or a large matmul (GPU)."""
    out: dict[str, Any] = {}
    for name in dtypes:
        dt = DTYPES[name]
        try:
            if device.type == "cpu":
                out[name] = _cpu_conv_ceiling(dt)
            else:
                out[name] = _gpu_matmul_ceiling(device, dt)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _best_time(fn: Callable[[], Any], device: torch.device, repeats: int = 5, inner: int = 3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def _cpu_conv_ceiling(dt: torch.dtype) -> dict[str, Any]:
    from ddpm_fast.models.conv import Conv2d, mkldnn_conv_supported

    n, c, hw = 4, 256, 16
    conv = Conv2d(c, c, 3, padding=1).to(dt)
    x = torch.randn(n, c, hw, hw).to(dt).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t = _best_time(lambda: conv(x), torch.device("cpu"))
    flops = 2 * n * c * c * 9 * hw * hw
    return {"gflops": flops / t / 1e9, "what": f"packed 3x3 conv {n}x{c}x{hw}x{hw}",
            "native_lowp": mkldnn_conv_supported(dt) if dt != torch.float32 else True}


def _gpu_matmul_ceiling(device: torch.device, dt: torch.dtype) -> dict[str, Any]:
    m = 8192
    a = torch.randn(m, m, device=device, dtype=dt)
    b = torch.randn(m, m, device=device, dtype=dt)
    with torch.no_grad():
        t = _best_time(lambda: a @ b, device, repeats=5, inner=5)
    return {"gflops": 2 * m**3 / t / 1e9, "what": f"{m}x{m} matmul (tf32 {torch.backends.cuda.matmul.allow_tf32})"}


def count_gflop(arch: str, device: torch.device) -> float:
    """GFLOP of one batch-1 UNet forward, counted by torch's FlopCounterMode on diffusers' model."""
    from diffusers import UNet2DModel as DUNet
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ARCHS[arch]["unet"]
    unet = DUNet(**cfg).to(device).eval()
    size = cfg["sample_size"]
    x = torch.randn(1, cfg["in_channels"], size, size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, 10)
    del unet
    return counter.get_total_flops() / 1e9


# -- variants --------------------------------------------------------------------------------------------


def build_pipelines(arch: str, dtype: torch.dtype, device: torch.device, variants: list[str], seed: int = 0):
    """``{variant: pipeline}`` for the requested variants, all with the same random weights."""
    import diffusers

    import ddpm_fast

    cfg = ARCHS[arch]
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**cfg["unet"]).eval()
    state = ref.state_dict()
    pipes: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for variant in variants:
        try:
            if variant.startswith("ddpm_fast"):
                unet = ddpm_fast.UNet2DModel(**cfg["unet"])
                unet.load_state_dict(state)
                unet = unet.to(device=device, dtype=dtype).eval()
                pipe = ddpm_fast.DDPMPipeline(unet=unet, scheduler=ddpm_fast.DDPMScheduler(**cfg["scheduler"]))
                if variant == "ddpm_fast_nograph":
                    pipe.enable_cuda_graphs(False)
                elif variant == "ddpm_fast_reference":
                    pipe = _ReferenceBackend(pipe)
            elif variant.startswith("diffusers"):
                unet = diffusers.UNet2DModel(**cfg["unet"])
                unet.load_state_dict(state)
                unet = unet.to(device=device, dtype=dtype).eval()
                if variant in ("diffusers_channels_last", "diffusers_compile"):
                    unet = unet.to(memory_format=torch.channels_last)
                if variant == "diffusers_compile":
                    unet = torch.compile(unet)
                pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**cfg["scheduler"]))
            else:
                raise ValueError(f"unknown variant {variant!r}")
            pipe.set_progress_bar_config(disable=True)
            pipes[variant] = pipe
        except Exception as exc:
            errors[variant] = f"build: {type(exc).__name__}: {exc}"
    del ref, state
    return pipes, errors


class _ReferenceBackend:
    """A ddpm_fast pipeline run under the reference backend (what the fused path is checked against)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def set_progress_bar_config(self, **kwargs):
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(self, *args, **kwargs):
        import ddpm_fast

        with ddpm_fast.backend("reference"):
            return self.pipe(*args, **kwargs)


def _run_once(pipe, batch: int, steps: int, device: torch.device, gen_device: str, seed: int) -> tuple[float, np.ndarray]:
    generator = torch.Generator(gen_device).manual_seed(seed)
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        # "pt": diffusers cannot turn bf16 images into numpy; the [0, 1] tensors are what "np" would hold
        images = pipe(batch_size=batch, generator=generator, num_inference_steps=steps, output_type="pt").images
    _sync(device)
    seconds = time.perf_counter() - t0
    return seconds, images.detach().float().cpu().permute(0, 2, 3, 1).numpy()


def bench_config(
    arch: str, dtype_name: str, batch: int, device: torch.device, variants: list[str], *, steps: int, runs: int,
    gen_device: str, seed: int, timeout: float | None,
) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    result: dict[str, Any] = {"arch": arch, "dtype": dtype_name, "batch": batch, "steps_per_run": steps,
                              "runs": runs, "variants": {}}
    pipes, errors = build_pipelines(arch, dtype, device, variants)
    for name, err in errors.items():
        result["variants"][name] = {"error": err}
    images: dict[str, np.ndarray] = {}
    times: dict[str, list[float]] = {name: [] for name in pipes}
    alive = dict(pipes)
    # Warm-up (graph capture, compilation, weight packing), then interleaved timed rounds.
    for name in list(alive):
        try:
            with time_limit(timeout):
                _, img = _run_once(alive[name], batch, steps, device, gen_device, seed)
            images[name] = img
        except (Exception, BenchTimeout) as exc:
            result["variants"][name] = {"error": f"warmup: {type(exc).__name__}: {exc}",
                                        "trace": traceback.format_exc(limit=3)}
            alive.pop(name)
    for _ in range(runs):
        for name in list(alive):
            try:
                with time_limit(timeout):
                    seconds, _ = _run_once(alive[name], batch, steps, device, gen_device, seed)
                times[name].append(seconds * 1e3 / steps)
            except (Exception, BenchTimeout) as exc:
                result["variants"][name] = {"error": f"timed run: {type(exc).__name__}: {exc}", "ms_per_step": times[name]}
                alive.pop(name)
    gflop = ARCHS[arch]["gflop_per_image"] * batch
    for name in alive:
        samples = times[name]
        med = statistics.median(samples)
        entry = {"ms_per_step_median": med, "ms_per_step": samples, "ms_per_step_min": min(samples),
                 "gflops_achieved": gflop / (med / 1e3)}
        if device.type == "cuda" and getattr(pipes.get(name), "_cuda_graphs", None) is not None:
            cache = pipes[name]._cuda_graphs
            entry["cuda_graph_used"] = bool(getattr(cache, "last_used", False))
            entry["cuda_graph_reason"] = getattr(cache, "last_reason", None)
        result["variants"][name] = entry
    fast = result["variants"].get("ddpm_fast", {})
    if "ms_per_step_median" in fast:
        for name, entry in result["variants"].items():
            if name != "ddpm_fast" and "ms_per_step_median" in entry:
                entry["speedup_of_ddpm_fast"] = entry["ms_per_step_median"] / fast["ms_per_step_median"]
                # Rounds are interleaved, so the two times of one round share the machine's state: the median
                # of per-round ratios is steadier than the ratio of medians on a noisy machine.
                pairs = zip(entry["ms_per_step"], fast["ms_per_step"])
                entry["speedup_per_round_median"] = statistics.median(v / f for v, f in pairs)
    if "ddpm_fast" in images:
        result["max_abs_diff_vs_ddpm_fast"] = {
            name: float(np.abs(img - images["ddpm_fast"]).max()) for name, img in images.items() if name != "ddpm_fast"
        }
    del pipes, alive
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def default_plan(device: torch.device, args) -> list[tuple[str, str, int, list[str]]]:
    """(arch, dtype, batch, variants) rows; diffusers' variants are in the row's dtype."""
    rows: list[tuple[str, str, int, list[str]]] = []
    archs = args.archs.split(",")
    dtypes = args.dtypes.split(",")
    compile_v = ["diffusers_compile"] if args.compile else []
    if device.type == "cpu":
        batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 16]
        for arch in archs:
            for dt in dtypes:
                for b in batches:
                    if arch == "256px" and b != 1:
                        continue
                    if dt == "fp32":
                        extra = ["diffusers_channels_last"] + (compile_v if b == 1 else [])
                    else:
                        if b != 1 or arch != "cifar10-32":
                            continue  # lowp diffusers on the CPU is slow; batch 1 on cifar10-32 is the target
                        extra = []
                    rows.append((arch, dt, b, ["ddpm_fast", "diffusers_eager", *extra]))
    else:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 16, 64]
        # dtype-major, so a run cut short by --total-timeout has measured the first dtype (the targets' fp16)
        # on both architectures.
        for dt in dtypes:
            for arch in archs:
                arch_batches = batches if arch == "cifar10-32" else [1, 8]
                for b in arch_batches:
                    extra = ["ddpm_fast_nograph"] if arch == "cifar10-32" else []
                    rows.append((arch, dt, b, ["ddpm_fast", *extra, "diffusers_eager", "diffusers_channels_last", *compile_v]))
    return rows


def targets(results: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The issue's speed targets, evaluated on whatever rows were measured."""

    def find(arch, dtype, batch):
        for r in results:
            if r["arch"] == arch and r["dtype"] == dtype and r["batch"] == batch:
                return r
        return None

    def speed(row, variant):
        if row is None:
            return None
        v = row["variants"].get(variant, {})
        return v.get("speedup_of_ddpm_fast")

    checks = []
    if device.type == "cpu":
        spec = [("cifar10-32", "fp32", 1, "diffusers_eager", 2.0), ("cifar10-32", "fp32", 16, "diffusers_eager", 1.2),
                ("cifar10-32", "bf16", 1, "diffusers_eager", 1.6)]
    else:
        spec = [("cifar10-32", "fp16", 1, "diffusers_eager", 3.0), ("256px", "fp16", 8, "diffusers_eager", 1.2)]
    for arch, dt, b, variant, goal in spec:
        s = speed(find(arch, dt, b), variant)
        checks.append({"what": f"{arch} {dt} batch {b} vs {variant}", "goal": goal, "measured": s,
                       "met": None if s is None else bool(s >= goal)})
    return checks


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def print_row(row: dict[str, Any]) -> None:
    head = f"{row['arch']:>10} {row['dtype']:>4} b{row['batch']:<3}"
    diffs = row.get("max_abs_diff_vs_ddpm_fast", {})
    for name, entry in row["variants"].items():
        if "error" in entry:
            print(f"{head} {name:<26} ERROR {entry['error'][:150]}", flush=True)
            continue
        ratio = entry.get("speedup_of_ddpm_fast")
        extra = f" ddpm_fast is {ratio:.2f}x (per round {entry['speedup_per_round_median']:.2f}x)" if ratio else ""
        diff = f" max|d| {diffs[name]:.2e}" if name in diffs else ""
        graph = f" graph={entry['cuda_graph_used']}" if "cuda_graph_used" in entry else ""
        print(f"{head} {name:<26} {entry['ms_per_step_median']:9.2f} ms/step  "
              f"{entry['gflops_achieved']:8.1f} GFLOP/s{extra}{diff}{graph}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_fast.bench sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--archs", default="cifar10-32,256px", help="comma list of: " + ", ".join(ARCHS))
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: cpu fp32,bf16; cuda fp32,fp16,bf16)")
    parser.add_argument("--batches", default=None, help="comma list (default: cpu 1,16; cuda 1,16,64; 256px uses 1 / 1,8)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per timed call (default cpu 10, cuda 20)")
    parser.add_argument("--steps-256", type=int, default=None, help="steps per call for 256px (default cpu 2, cuda 10)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per variant (median reported), >= 1")
    parser.add_argument("--compile", action="store_true", help="also time diffusers with torch.compile (slow to compile)")
    parser.add_argument("--variants", default=None, help="override the variant list of every row (comma list)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per variant warm-up / run (default cpu 600, cuda 180)")
    parser.add_argument("--total-timeout", type=float, default=None, help="stop starting new rows after this many seconds")
    parser.add_argument("--cpu-generator", action="store_true", help="draw noise with a CPU generator on CUDA (diffusers docs' habit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="output JSON (default bench/results/sample_speed_<device>_<time>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: nothing to do", file=sys.stderr)
        return 2
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    unknown = [a for a in args.archs.split(",") if a not in ARCHS]
    if unknown:
        parser.error(f"unknown --archs {unknown}; choose from {list(ARCHS)}")
    if args.dtypes is None:
        args.dtypes = "fp32,bf16" if device.type == "cpu" else "fp32,fp16,bf16"
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        parser.error(f"unknown --dtypes {bad}; choose from {list(DTYPES)}")
    steps = args.steps or (10 if device.type == "cpu" else 20)
    steps_256 = args.steps_256 or (2 if device.type == "cpu" else 10)
    timeout = args.timeout if args.timeout is not None else (600 if device.type == "cpu" else 180)
    gen_device = "cpu" if (device.type == "cpu" or args.cpu_generator) else device.type
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    default_dir = Path(__file__).resolve().parents[3] / "bench" / "results"
    out_path = Path(args.json) if args.json else default_dir / f"sample_speed_{device.type}_{stamp}.json"

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    payload: dict[str, Any] = {
        "command": " ".join([sys.executable, "-m", "ddpm_fast.bench", "sample", *(argv if argv is not None else sys.argv[1:])]),
        "environment": _environment(device), "device": str(device), "generator_device": gen_device,
        "notes": "ms_per_step = one pipe(...) call (noise, all steps, postprocess) / its step count; "
                 "speedup_of_ddpm_fast = variant median / ddpm_fast median (targets use it); speedup_per_round_median = "
                 "median over rounds of variant / ddpm_fast; diffusers variants run in the row's dtype.",
        "results": [],
    }
    payload["ceilings_gflops"] = measure_ceilings(device, args.dtypes.split(","))
    write_json(out_path, payload)
    gflops: dict[str, Any] = {}
    for arch in args.archs.split(","):
        gflops[arch] = _safe(lambda: count_gflop(arch, torch.device("cpu") if device.type == "cpu" else device))
        if isinstance(gflops[arch], float):
            ARCHS[arch]["gflop_per_image"] = gflops[arch]
    payload["gflop_per_image_counted"] = gflops
    start = time.time()
    for arch, dt, batch, variants in default_plan(device, args):
        if args.variants:
            variants = args.variants.split(",")
        if args.total_timeout and time.time() - start > args.total_timeout:
            payload["results"].append({"arch": arch, "dtype": dt, "batch": batch, "skipped": "total timeout"})
            continue
        n_steps = steps if arch == "cifar10-32" else steps_256
        try:
            row = bench_config(arch, dt, batch, device, variants, steps=n_steps, runs=args.runs,
                               gen_device=gen_device, seed=args.seed, timeout=timeout)
        except Exception as exc:  # keep going: one bad row must not lose the others
            row = {"arch": arch, "dtype": dt, "batch": batch, "error": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc(limit=5), "variants": {}}
        row["loadavg_after"] = _safe(lambda: list(os.getloadavg()))
        payload["results"].append(row)
        print_row(row)
        payload["targets"] = targets([r for r in payload["results"] if "variants" in r], device)
        write_json(out_path, payload)
    payload["targets"] = targets([r for r in payload["results"] if "variants" in r], device)
    payload["wall_seconds"] = time.time() - start
    write_json(out_path, payload)
    for check in payload["targets"]:
        m = check["measured"]
        print(f"target {check['what']}: >= {check['goal']}x, measured {'n/a' if m is None else f'{m:.2f}x'}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
