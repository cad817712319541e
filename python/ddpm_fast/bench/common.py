"""What every benchmark subcommand shares: the model configurations, interleaved timing, medians and per-round
ratios, the environment record, the machine's name, the JSON envelope and its writing, and time limits.

Timing rule: the candidates of one comparison are timed in interleaved rounds (round 1: a, b, c; round 2: a, b,
c; ...), so a noisy machine slows all of them alike; each reports the median over rounds, and each ratio is given
twice: the ratio of the medians and the median of the per-round ratios (the steadier one on a noisy machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

SCHEMA = "ddpm_fast.bench/1"

# The google/ddpm architectures with random weights; "tiny" is the same block types at a size that runs in
# milliseconds (smoke runs and the tests).
ARCHS: dict[str, dict[str, Any]] = {
    "cifar10-32": {
        "unet": {
            "act_fn": "silu",
            "attention_head_dim": None,
            "block_out_channels": [128, 256, 256, 256],
            "center_input_sample": False,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "downsample_padding": 0,
            "flip_sin_to_cos": False,
            "freq_shift": 1,
            "in_channels": 3,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-06,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 32,
            "time_embedding_type": "positional",
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            "clip_sample": True,
            "variance_type": "fixed_large",
        },
    },
    "256px": {
        "unet": {
            "act_fn": "silu",
            "attention_head_dim": None,
            "block_out_channels": [128, 128, 256, 256, 512, 512],
            "center_input_sample": False,
            "down_block_types": [
                "DownBlock2D",
                "DownBlock2D",
                "DownBlock2D",
                "DownBlock2D",
                "AttnDownBlock2D",
                "DownBlock2D",
            ],
            "downsample_padding": 0,
            "flip_sin_to_cos": False,
            "freq_shift": 1,
            "in_channels": 3,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-06,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 256,
            "time_embedding_type": "positional",
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            "clip_sample": True,
            "variance_type": "fixed_small",
        },
    },
    "tiny": {
        "unet": {
            "act_fn": "silu",
            "attention_head_dim": None,
            "block_out_channels": [32, 64],
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "in_channels": 3,
            "out_channels": 3,
            "layers_per_block": 1,
            "norm_num_groups": 32,
            "sample_size": 32,
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            "clip_sample": True,
            "variance_type": "fixed_large",
        },
    },
}

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def count_gflop(arch: str) -> float:
    """GFLOP of one batch-1 UNet forward of ``arch``, counted by torch's FlopCounterMode on ddpm_fast's UNet on the
    meta device (reference backend: the ops diffusers runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    import ddpm_fast

    cfg = ARCHS[arch]["unet"]
    with torch.device("meta"):
        unet = ddpm_fast.UNet2DModel(**cfg).eval()
    counter = FlopCounterMode(display=False)
    size = cfg["sample_size"]
    with torch.no_grad(), ddpm_fast.backend("reference"), counter:
        unet(torch.empty(1, cfg["in_channels"], size, size, device="meta"), torch.tensor([10], device="meta"))
    return counter.get_total_flops() / 1e9


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# -- command-line helpers --------------------------------------------------------------------------------


def comma_list(text: str | None, cast: Callable[[str], Any] = str, choices: Sequence[Any] | None = None) -> list[Any]:
    """``"a,b"`` -> ``["a", "b"]`` (cast, checked against ``choices``); raises argparse.ArgumentTypeError."""
    if text is None or text == "":
        return []
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = cast(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad item {item!r} in {text!r}") from None
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"unknown {item!r}; choose from {', '.join(map(str, choices))}")
        out.append(value)
    return out


def parse_configs(text: str) -> list[tuple[str, int]]:
    """``"cifar10-32:1,256px:8"`` -> ``[("cifar10-32", 1), ("256px", 8)]``."""
    out = []
    for item in comma_list(text):
        arch, _, batch = item.partition(":")
        if arch not in ARCHS or not batch.isdigit() or int(batch) < 1:
            raise argparse.ArgumentTypeError(f"bad config {item!r}: expected ARCH:BATCH with ARCH in {list(ARCHS)}")
        out.append((arch, int(batch)))
    return out


def add_common_args(parser: argparse.ArgumentParser, *, rounds: int) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    parser.add_argument(
        "--json", default=None, metavar="PATH", help="output JSON (default bench/results/<machine>/<subcommand>.json)"
    )
    parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved timed rounds, >= 1 (default {rounds})")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads; every engine gets the same count (0: leave torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def setup_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Apply --threads and check --device / --rounds; returns the device."""
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.exit(2, f"{parser.prog}: CUDA is not available on this machine\n")
        torch.backends.cudnn.benchmark = True
    return device


# -- timing ----------------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class BenchTimeout(Exception):
    """A benchmark step ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`BenchTimeout` in the main thread after ``seconds`` (Unix main thread only; else no limit)."""
    import threading

    if not seconds or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
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


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """``(seconds, result)`` of one call, the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    *,
    device: torch.device | str = "cpu",
    min_time: float = 0.0,
    warmup: int = 1,
    max_reps: int = 1000,
    timeout: float | None = None,
    settle: float | None = None,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per call of each function, one figure per round, the functions timed in turn within each round.

    ``warmup`` untimed calls each first; a round repeats a function until it has run ``min_time`` seconds (its
    repetition count is fixed before the first round), so microsecond kernels are timed over many calls. On CUDA
    a round is timed with CUDA events around the calls. A function that raises (or runs past ``timeout`` seconds
    in one round) is dropped and its error returned; the others go on. Returns ``(samples, errors)``.

    On the CPU each timed call is followed by an untimed pause of ``settle`` seconds (default: 0.05 for calls
    longer than 1 ms): ONNX Runtime's and OpenVINO's pool threads keep spinning for a while after their run (it
    is part of their speed), and on a machine with as many cores as threads they would otherwise steal the CPU
    from whichever variant runs next."""
    device = torch.device(device)
    live = dict(fns)
    errors: dict[str, str] = {}
    samples: dict[str, list[float]] = {name: [] for name in fns}

    def guarded(name: str, body: Callable[[], Any]) -> Any:
        try:
            with time_limit(timeout):
                return body()
        except (Exception, BenchTimeout) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
            live.pop(name, None)
            samples.pop(name, None)
            return None

    for name, fn in list(live.items()):
        for _ in range(warmup):
            if name in live:
                guarded(name, fn)
    reps: dict[str, int] = {}
    for name, fn in list(live.items()):
        dt = guarded(name, lambda fn=fn: timed(fn, device)[0])
        if dt is not None:
            reps[name] = max(1, min(max_reps, int(min_time / max(dt, 1e-7)))) if min_time > 0 else 1

    def one_round(fn: Callable[[], Any], n: int) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    for _ in range(rounds):
        for name, fn in list(live.items()):
            seconds = guarded(name, lambda fn=fn, n=reps[name]: one_round(fn, n))
            if seconds is not None:
                samples[name].append(seconds)
                pause = settle if settle is not None else (0.05 if seconds > 1e-3 else 0.0)
                if device.type == "cpu" and pause:
                    time.sleep(pause)
    return samples, errors


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def per_round_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]``."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def variant_stats(
    samples: Sequence[float], *, ref: Sequence[float] | None = None, ref_name: str = "ddpm_fast", scale: float = 1e3
) -> dict[str, Any]:
    """``ms`` (per round), ``ms_median``, ``ms_min``; with ``ref`` (the reference's per-round seconds) also
    ``speedup_of_<ref_name>`` (this median / the reference's) and ``speedup_of_<ref_name>_per_round``."""
    out: dict[str, Any] = {
        "ms": [s * scale for s in samples],
        "ms_median": median(samples) * scale,
        "ms_min": min(samples) * scale,
    }
    if ref:
        out[f"speedup_of_{ref_name}"] = median(samples) / median(ref)
        out[f"speedup_of_{ref_name}_per_round"] = per_round_ratio(samples, ref)
    return out


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference (in float32) of two tensors / arrays, or of two tuples of them."""
    import numpy as np

    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)

    def arr(x):
        return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)

    return max(float(np.abs(arr(x) - arr(y)).max()) if np.size(arr(x)) else 0.0 for x, y in zip(a, b))


# -- environment and the machine's name ----------------------------------------------------------------


def safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags


def cpu_isa_tag(flags: set[str] | None = None) -> str:
    """The widest vector ISA this CPU has, as the results folders name it: avx512, avx2, neon, sve or generic."""
    flags = _cpuinfo()[1] if flags is None else flags
    for tag, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("sve", "sve"), ("neon", "asimd"), ("neon", "neon")):
        if flag in flags:
            return tag
    return "neon" if platform.machine() in ("arm64", "aarch64") else "generic"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_name(device: torch.device | str = "cpu") -> str:
    """The results folder of this machine: the GPU's name for CUDA (``nvidia-h200``), else ``cpu-<vendor>-
    <family>-<isa>`` from /proc/cpuinfo (``cpu-intel-xeon-avx512``, ``cpu-amd-epyc-avx2``)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name(0))
    return cpu_machine_name(*_cpuinfo())


def cpu_machine_name(model: str, flags: set[str]) -> str:
    """``cpu-<vendor>-<family>-<isa>`` from a /proc/cpuinfo model name and flag set: the model's first two words
    without trademarks, numbers and filler ("AMD EPYC 7B13 64-Core Processor" -> ``cpu-amd-epyc-avx2``)."""
    words = re.sub(r"\((r|tm)\)", " ", model.lower()).replace("-", " ").split()
    drop = {"cpu", "processor", "genuine", "authentic", "with", "radeon", "graphics"}
    words = [w for w in words if w not in drop and not re.search(r"\d", w) and "@" not in w]
    family = "-".join(words[:2]) or _slug(platform.machine()) or "unknown"
    return f"cpu-{_slug(family)}-{cpu_isa_tag(flags)}"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions, hardware and load: what a reader needs to judge a figure."""
    from .. import _native

    device = torch.device(device)
    model, flags = _cpuinfo()
    env: dict[str, Any] = {
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "cpu_isa": cpu_isa_tag(flags),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sve", "asimd"))),
        "torch_cpu_capability": safe(lambda: torch.backends.cpu.get_cpu_capability()),
        "loadavg": safe(lambda: [round(x, 2) for x in os.getloadavg()]),
        "native_extension": _native.available(),
        "native_load_error": _native.load_error(),
        "native_cuda": _native.has_cuda(),
        "native_cpu_isa": _native.cpu_isa(),
        "native_cuda_error": _native.cuda_error(),
        "native_target_torch": _native.target_version(),
        "versions": {m: _version(m) for m in ("diffusers", "numpy", "onnxruntime", "openvino", "onnx")},
        "git_commit": safe(
            lambda: (
                subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=10,
                    cwd=Path(__file__).resolve().parent,
                ).stdout.strip()
                or None
            )
        ),
    }
    if device.type == "cuda":
        env["gpu"] = safe(lambda: torch.cuda.get_device_name(device))
        env["gpu_sm_count"] = safe(lambda: torch.cuda.get_device_properties(device).multi_processor_count)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = safe(lambda: torch.backends.cudnn.version())
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


# -- the JSON envelope ------------------------------------------------------------------------------------


def results_root() -> Path:
    """``bench/results`` of the checkout this package runs from, else ``./bench/results``."""
    checkout = Path(__file__).resolve().parents[3] / "bench" / "results"
    return checkout if checkout.is_dir() else Path.cwd() / "bench" / "results"


def output_path(requested: str | None, subcommand: str, device: torch.device | str) -> Path:
    return Path(requested) if requested else results_root() / machine_name(device) / f"{subcommand}.json"


def new_report(
    subcommand: str, argv: Sequence[str] | None, device: torch.device | str, settings: dict[str, Any], notes: str
) -> dict[str, Any]:
    """The envelope every subcommand writes: schema, command, machine, environment, settings, notes, results."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "schema": SCHEMA,
        "subcommand": subcommand,
        "command": " ".join(["python", "-m", "ddpm_fast.bench", subcommand, *args]),
        "machine": machine_name(device),
        "device": str(device),
        "environment": environment(device),
        "settings": settings,
        "notes": notes,
        "results": [],
    }


def script_report(script: str, arguments: str, unit: str, **fields: Any) -> dict[str, Any]:
    """The envelope of a bench/ script's JSON (bench/<script>.py): its command, the CPU environment, the unit."""
    return {
        "command": f"python bench/{script}.py {arguments}".rstrip(),
        "environment": environment("cpu"),
        "unit": unit,
        **fields,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (a run cut short leaves the last complete file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


class Deadline:
    """``--budget`` seconds from now: ``expired()`` says when to stop starting new work."""

    def __init__(self, seconds: float | None):
        self.end = None if not seconds else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() > self.end

    def left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())


# -- side-by-side comparison of whole variants (unet, sample, winograd) ------------------------------------


def _host_copy(out: Any) -> Any:
    """A CPU float32 numpy copy of an output (engines may reuse their output buffers)."""
    import numpy as np

    if isinstance(out, (tuple, list)):
        return type(out)(_host_copy(o) for o in out)
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu().numpy().copy()
    return np.array(out, dtype=np.float32, copy=True)


def compare_variants(
    candidates: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    device: torch.device | str,
    timeout: float | None = None,
    per_call: float = 1.0,
    ref: str = "ddpm_fast",
    diff_ref: str | None = "diffusers_eager",
    record: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Time whole variants side by side.

    Each candidate is called once untimed (``first_call_s``: compilation, graph capture and weight packing happen
    here; its output is kept), the ones in ``record`` once more under :func:`ddpm_fast.fast_path.record_paths`
    (``paths``: which convolution paths ran), then all in interleaved rounds. Times are divided by ``per_call``
    (steps per call for whole sampling runs). Returns per variant :func:`variant_stats` (``speedup_of_<ref>``
    against ``ref``) and ``max_abs_diff_vs_<diff_ref>``, or ``{"error": ...}`` for one that failed or timed out."""
    from .. import fast_path

    entries: dict[str, dict[str, Any]] = {}
    outputs: dict[str, Any] = {}
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in candidates.items():
        try:
            with time_limit(timeout):
                seconds, out = timed(fn, device)
                outputs[name] = _host_copy(out)
                entries[name] = {"first_call_s": seconds}
                if name in record:
                    with fast_path.record_paths() as paths:
                        fn()
                    entries[name]["paths"] = dict(sorted(paths.items()))
            live[name] = fn
        except (Exception, BenchTimeout) as exc:
            entries[name] = {"error": f"first call: {type(exc).__name__}: {exc}"[:2000]}
    samples, errors = interleaved(live, rounds, device=device, warmup=0, timeout=timeout)
    for name, err in errors.items():
        entries[name] = {"error": f"timed rounds: {err}"}
    scaled = {name: [s / per_call for s in v] for name, v in samples.items()}
    for name, seconds in scaled.items():
        entries[name].update(variant_stats(seconds, ref=scaled.get(ref) if name != ref else None, ref_name=ref))
        if diff_ref and diff_ref in outputs and name != diff_ref and name in outputs:
            entries[name][f"max_abs_diff_vs_{diff_ref}"] = max_abs_diff(outputs[name], outputs[diff_ref])
    return {name: entries[name] for name in candidates}


# -- the issues' speed targets ------------------------------------------------------------------------------

# (device type, arch, dtype, batch, against, goal): ddpm_fast must be `goal` times faster than `against`;
# "best_engine" is the faster of ONNX Runtime and OpenVINO.
TARGETS = [
    ("cpu", "cifar10-32", "fp32", 1, "diffusers_eager", 2.2),
    ("cpu", "cifar10-32", "fp32", 1, "best_engine", 1.5),
    ("cpu", "cifar10-32", "fp32", 16, "diffusers_eager", 2.2),
    ("cpu", "cifar10-32", "fp32", 16, "best_engine", 1.8),
    ("cpu", "256px", "fp32", 1, "diffusers_eager", 2.2),
    ("cpu", "256px", "fp32", 1, "best_engine", 1.6),
    ("cuda", "256px", "fp16", 8, "diffusers_eager", 1.6),
    ("cuda", "256px", "fp16", 8, "diffusers_compile_max_autotune", 1.1),
    ("cuda", "cifar10-32", "fp16", 64, "diffusers_eager", 3.0),
    ("cuda", "cifar10-32", "fp16", 1, "diffusers_eager", 10.0),
]


def evaluate_targets(rows: Sequence[dict[str, Any]], device: torch.device | str) -> list[dict[str, Any]]:
    """Each target of this device type with the ratio measured in ``rows`` (None when its row or variant is
    missing). Ratios of medians; the per-round median is given too."""
    kind = torch.device(device).type
    out = []
    for dev, arch, dt, batch, against, goal in TARGETS:
        if dev != kind:
            continue
        row = next((r for r in rows if (r.get("arch"), r.get("dtype"), r.get("batch")) == (arch, dt, batch)), None)
        measured = per_round = None
        name = against
        if row is not None:
            variants = row.get("variants", {})
            if against == "best_engine":
                timed_engines = [n for n in ("onnxruntime", "openvino") if "ms_median" in variants.get(n, {})]
                name = min(timed_engines, key=lambda n: variants[n]["ms_median"]) if timed_engines else against
            entry = variants.get(name, {})
            measured = entry.get("speedup_of_ddpm_fast")
            per_round = entry.get("speedup_of_ddpm_fast_per_round")
        out.append(
            {
                "what": f"{arch} {dt} batch {batch}: ddpm_fast vs {against}"
                + (f" ({name})" if name != against else ""),
                "goal": goal,
                "measured": measured,
                "measured_per_round": per_round,
                "met": None if measured is None else bool(measured >= goal),
            }
        )
    return out
