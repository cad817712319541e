"""The UNet engines the ``unet`` and ``sample`` benchmarks compare, all built from one random-weight state dict.

=================================  ==================================================================================
variant                            what runs the UNet forward
=================================  ==================================================================================
``diffusers_eager``                diffusers' ``UNet2DModel`` (SDPA attention)
``diffusers_channels_last``        the same with channels_last weights
``onnxruntime``                    ``torch.onnx.export(dynamo=False, opset_version=17)`` of diffusers' UNet with fixed
                                   shapes; an ``InferenceSession`` with ``ORT_ENABLE_ALL``, intra-op threads =
                                   ``torch.get_num_threads()``, inter-op 1 (CUDA: CUDAExecutionProvider with I/O
                                   binding, when the installed onnxruntime has it); fp32 only
``openvino``                       ``openvino.convert_model(module, example_input=...)``, ``compile_model(..., "CPU",
                                   {PERFORMANCE_HINT: LATENCY, INFERENCE_NUM_THREADS: n, INFERENCE_PRECISION_HINT:
                                   f32})``; CPU and fp32 only
``diffusers_compile``              ``torch.compile`` of diffusers' UNet with channels_last weights (as diffusers'
                                   guide does; inductor, default mode)
``diffusers_compile_max_autotune`` the same with ``mode="max-autotune"``
``ddpm_fast_compile``              ``torch.compile(fullgraph=True)`` of ddpm_fast's UNet
``ddpm_fast``                      ddpm_fast's ``UNet2DModel``, eager, fused path
``ddpm_fast_noplans``              the same with CPU forward plans off (every call decides its ops in Python)
``ddpm_fast_reference``            ddpm_fast's UNet on the reference backend (the pure-PyTorch mirror of diffusers)
=================================  ==================================================================================

ONNX Runtime and OpenVINO are optional dependencies of the benchmark only (``pip install onnxruntime openvino onnx
onnxscript``): when one is missing, or cannot run the requested device or dtype, its variant is recorded as skipped
with the reason. Export, conversion and compilation times are reported in ``setup_s``, apart from the run times;
``torch.compile`` compiles lazily, so its compile time is in ``first_call_s``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .common import ARCHS

VARIANTS: dict[str, str] = {
    "diffusers_eager": "diffusers UNet2DModel, eager",
    "diffusers_channels_last": "diffusers UNet2DModel, channels_last weights",
    "onnxruntime": "ONNX Runtime (ORT_ENABLE_ALL), fixed-shape export of diffusers' UNet",
    "openvino": "OpenVINO CPU plugin (LATENCY, f32), converted from diffusers' UNet",
    "diffusers_compile": "torch.compile(diffusers UNet)",
    "diffusers_compile_max_autotune": 'torch.compile(diffusers UNet, mode="max-autotune")',
    "ddpm_fast_compile": "torch.compile(ddpm_fast UNet, fullgraph=True)",
    "ddpm_fast": "ddpm_fast UNet2DModel, eager (fused path)",
    "ddpm_fast_noplans": "ddpm_fast UNet2DModel, eager (fused path), CPU forward plans off",
    "ddpm_fast_reference": "ddpm_fast UNet2DModel on the reference backend",
}
PEERS = (
    "diffusers_eager",
    "diffusers_channels_last",
    "onnxruntime",
    "openvino",
    "diffusers_compile",
    "diffusers_compile_max_autotune",
)
ENGINE_PEERS = ("onnxruntime", "openvino")  # "the best inference engine" of the targets


class Skipped(Exception):
    """This variant cannot run here; the message says why (recorded in the JSON, not an error)."""


@dataclass
class Engine:
    name: str
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sample, timesteps (B,) long) -> noise pred
    module: torch.nn.Module | None = None  # the torch module, when the engine is one (pipelines use it)
    setup_s: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    """What every engine of one (architecture, dtype, batch) is built from."""

    arch_config: dict[str, Any]
    state: dict[str, torch.Tensor]  # fp32 CPU state dict
    device: torch.device
    dtype: torch.dtype
    batch: int
    compile_backend: str = "inductor"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ddpm_fast_bench_")))

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.arch_config
        x = torch.zeros(self.batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
        return x, torch.full((self.batch,), 500, dtype=torch.long)


def random_state(arch_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """The random weights every engine loads: diffusers' initialisation when diffusers is installed."""
    torch.manual_seed(seed)
    try:
        import diffusers

        model = diffusers.UNet2DModel(**arch_config)
    except ImportError:
        import ddpm_fast

        model = ddpm_fast.UNet2DModel(**arch_config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cpu_unet_and_inputs(arch: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """ddpm_fast's UNet of ``arch`` on :func:`random_state`'s weights (seed 0), in eval mode, with the input the CPU
    scripts in bench/ time: a ``randn`` sample (generator seed 1) and timestep 500 for every image."""
    import ddpm_fast

    cfg = ARCHS[arch]["unet"]
    unet = ddpm_fast.UNet2DModel(**cfg)
    unet.load_state_dict(random_state(cfg, 0))
    size = cfg["sample_size"]
    x = torch.randn(batch, cfg["in_channels"], size, size, generator=torch.Generator().manual_seed(1))
    return unet.eval(), x, torch.full((batch,), 500, dtype=torch.long)


def _diffusers_unet(src: Source, *, dtype: torch.dtype | None = None, device: torch.device | None = None):
    try:
        import diffusers
    except ImportError as exc:
        raise Skipped(f"diffusers not installed ({exc})") from None
    unet = diffusers.UNet2DModel(**src.arch_config)
    unet.load_state_dict(src.state)
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # not the "modules that should be kept in float32: []" notice
    try:
        unet = unet.to(device=device or src.device, dtype=dtype or src.dtype)
    finally:
        diffusers.utils.logging.set_verbosity(level)
    return unet.eval().requires_grad_(False)


def _fast_unet(src: Source):
    import ddpm_fast

    unet = ddpm_fast.UNet2DModel(**src.arch_config)
    unet.load_state_dict(src.state)
    return unet.to(device=src.device, dtype=src.dtype).eval().requires_grad_(False)


def _torch_engine(name: str, module: torch.nn.Module, setup: dict[str, float], **info) -> Engine:
    def forward(x, t):
        return module(x, t, return_dict=False)[0]

    return Engine(name, forward, module, setup, info)


def _compile(module: torch.nn.Module, src: Source, mode: str | None, fullgraph: bool = False):
    kwargs: dict[str, Any] = {"backend": src.compile_backend, "fullgraph": fullgraph}
    info: dict[str, Any] = {"backend": src.compile_backend, "mode": mode or "default", "fullgraph": fullgraph}
    if mode and src.compile_backend == "inductor":
        kwargs["mode"] = mode
    elif mode:
        info["mode"] = f"{mode} (ignored: only inductor takes a mode)"
    return torch.compile(module, **kwargs), info


class _SampleOnly(torch.nn.Module):
    """diffusers' UNet as ``(sample, timesteps) -> tensor``, the graph the exporters trace."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep, return_dict=False)[0]


def _fp32_only(name: str, src: Source) -> None:
    if src.dtype != torch.float32:
        raise Skipped(f"{name} is benchmarked in fp32 only (the export is fp32)")


def _onnxruntime(src: Source) -> Engine:
    _fp32_only("onnxruntime", src)
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as exc:
        raise Skipped(f"onnxruntime not installed ({exc}): pip install onnxruntime onnx onnxscript") from None
    providers = ort.get_available_providers()
    if src.device.type == "cuda" and "CUDAExecutionProvider" not in providers:
        raise Skipped(
            f"this onnxruntime has no CUDAExecutionProvider (providers: {providers}); "
            "install onnxruntime-gpu to benchmark it on CUDA"
        )
    wrapper = _SampleOnly(_diffusers_unet(src, dtype=torch.float32, device=torch.device("cpu")))
    path = src.workdir / f"unet_b{src.batch}.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            src.example(),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["sample", "timestep"],
            output_names=["noise"],
        )
    export_s = time.perf_counter() - t0
    del wrapper
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    provider = "CUDAExecutionProvider" if src.device.type == "cuda" else "CPUExecutionProvider"
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=[provider])
    session_s = time.perf_counter() - t0
    info = {
        "version": ort.__version__,
        "provider": provider,
        "intra_op_threads": options.intra_op_num_threads,
        "opset": 17,
    }
    if src.device.type == "cpu":

        def forward(x, t):
            out = session.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
            return torch.from_numpy(out)
    else:  # I/O binding on the torch tensors' device memory: no host copies
        binding = session.io_binding()
        x0, _ = src.example()
        out = torch.empty(x0.shape[0], src.arch_config["out_channels"], *x0.shape[2:], device=src.device)

        def forward(x, t):
            x, t = x.contiguous(), t.contiguous()
            binding.bind_input("sample", "cuda", 0, np.float32, list(x.shape), x.data_ptr())
            binding.bind_input("timestep", "cuda", 0, np.int64, list(t.shape), t.data_ptr())
            binding.bind_output("noise", "cuda", 0, np.float32, list(out.shape), out.data_ptr())
            torch.cuda.current_stream().synchronize()  # inputs written on torch's stream
            session.run_with_iobinding(binding)
            return out

    return Engine("onnxruntime", forward, None, {"export": export_s, "session": session_s}, info)


def _openvino(src: Source) -> Engine:
    _fp32_only("openvino", src)
    if src.device.type != "cpu":
        raise Skipped("OpenVINO is benchmarked on its CPU plugin only")
    try:
        import openvino as ov
    except ImportError as exc:
        raise Skipped(f"openvino not installed ({exc}): pip install openvino") from None
    wrapper = _SampleOnly(_diffusers_unet(src, dtype=torch.float32, device=torch.device("cpu")))
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = ov.convert_model(wrapper, example_input=src.example())
    convert_s = time.perf_counter() - t0
    del wrapper
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": "f32",
    }
    t0 = time.perf_counter()
    compiled = ov.Core().compile_model(model, "CPU", config)
    compile_s = time.perf_counter() - t0
    request = compiled.create_infer_request()

    def forward(x, t):
        request.infer([x.numpy(), t.numpy()])
        return torch.from_numpy(request.get_output_tensor(0).data)

    info = {"version": ov.__version__, "config": {k: str(v) for k, v in config.items()}}
    return Engine("openvino", forward, None, {"convert": convert_s, "compile": compile_s}, info)


def variant_scope(name: str) -> contextlib.AbstractContextManager:
    """The ddpm_fast setting a ``ddpm_fast*`` variant runs under (reference backend, plans off, or none)."""
    import ddpm_fast

    if name == "ddpm_fast_reference":
        return ddpm_fast.backend("reference")
    if name == "ddpm_fast_noplans":
        return ddpm_fast.fast_path.cpu_plans(False)
    return contextlib.nullcontext()


def build(name: str, src: Source) -> Engine:
    """The engine ``name`` (see :data:`VARIANTS`); raises :class:`Skipped` when it cannot run here."""
    t0 = time.perf_counter()
    if name in ("diffusers_eager", "diffusers_channels_last", "diffusers_compile", "diffusers_compile_max_autotune"):
        unet = _diffusers_unet(src)
        if name != "diffusers_eager":
            unet = unet.to(memory_format=torch.channels_last)  # compile variants too: what diffusers' guide does
        info: dict[str, Any] = {}
        if name.startswith("diffusers_compile"):
            unet, info = _compile(unet, src, "max-autotune" if name.endswith("max_autotune") else None)
        return _torch_engine(name, unet, {"build": time.perf_counter() - t0}, **info)
    if name in ("ddpm_fast", "ddpm_fast_compile", "ddpm_fast_reference", "ddpm_fast_noplans"):
        unet = _fast_unet(src)
        info = {}
        if name == "ddpm_fast_compile":
            unet, info = _compile(unet, src, None, fullgraph=True)
        engine = _torch_engine(name, unet, {"build": time.perf_counter() - t0}, **info)
        if name in ("ddpm_fast_reference", "ddpm_fast_noplans"):
            inner = engine.forward

            def forward(x, t):
                with variant_scope(name):
                    return inner(x, t)

            engine.forward = forward
        return engine
    if name == "onnxruntime":
        return _onnxruntime(src)
    if name == "openvino":
        return _openvino(src)
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


class EngineUNet(torch.nn.Module):
    """An engine in the place of a pipeline's UNet: the ``config``, ``device`` and ``dtype`` a pipeline reads, and
    ``forward(sample, timestep) -> .sample``, the timestep broadcast to the batch as the exported graph takes it."""

    def __init__(self, engine: Engine, arch_config: dict[str, Any], device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.engine = engine
        self.config = types.SimpleNamespace(**arch_config)
        self.register_buffer("anchor", torch.empty(0, device=device, dtype=dtype), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device).to(torch.long).reshape(-1).expand(sample.shape[0])
        out = self.engine.forward(sample, t.contiguous()).to(sample.device)
        return types.SimpleNamespace(sample=out) if return_dict else (out,)


@contextlib.contextmanager
def quiet_tracing():
    """Silence the tracer warnings diffusers' UNet raises while it is exported or compiled."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
