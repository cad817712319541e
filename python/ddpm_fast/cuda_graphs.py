"""CUDA-graph replay of the whole denoising step (UNet forward + scheduler update) for a fixed batch and shape.

At batch 1 the cifar10-32 UNet is a few hundred small kernels per step, so on a GPU the step is bound by
kernel launches.  :class:`DenoiseStepGraph` records one step into a CUDA graph and replays it for every
timestep of the loop.  Everything that changes from step to step lives on the device:

* the scheduler's :meth:`~ddpm_fast.schedulers.scheduling_utils.SchedulerMixin.step_plan` (timesteps and each
  step's fused coefficients) is copied into device tables once per call; the graph's UNet reads timestep
  ``idx``, its scheduler update is the native :func:`ddpm_fast.ops.scheduler_step_table`, which reads row ``idx``
  of the coefficient table on the device, and the graph then increments ``idx`` itself;
* the sample is a static buffer the graph updates in place;
* the step noise is drawn outside the graph with the caller's generator, in the same shape, dtype, device
  and order as the eager loop (so the same seed gives the same images), and copied into a static buffer; a step
  that draws none has a noise scale of 0 in its row, which the op skips.

So a step costs one noise draw (when the scheduler draws one), one copy and one graph launch.

Graphs are used only where that is safe: CUDA device, fused backend, UNet in eval mode, a scheduler whose
every step the fused op can express (no thresholding, no learned variance), and a UNet that passes a
capture with synchronisation checks on.  A capture is redone when any of the UNet's parameters changed
(however: see :mod:`ddpm_fast.models.prepared`); a failed capture falls back to the eager loop with one
warning.  Turn graphs off with ``pipe.enable_cuda_graphs(False)`` or ``DDPM_FAST_CUDA_GRAPHS=0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from . import fast_path, ops
from .models.prepared import module_signature
from .utils.warn import warn_once

__all__ = ["DenoiseStepGraph", "GraphCache", "cuda_graphs_env_enabled", "sample_with_graph"]

_ENV = "DDPM_FAST_CUDA_GRAPHS"


def cuda_graphs_env_enabled() -> bool:
    """``DDPM_FAST_CUDA_GRAPHS`` unset/1/true/on enables graphs (the default); 0/false/off disables them."""
    return fast_path.env_flag(_ENV, "1")


class DenoiseStepGraph:
    """One denoising step (``unet`` + fused scheduler update) on static device buffers, optionally graphed.

    ``capture=False`` runs the same step program eagerly (any device): the tests use that to check the
    program against the pipeline's own loop on the CPU.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        sample_like: torch.Tensor,
        clip: float | None,
        table_size: int,
        *,
        capture: bool = True,
        warmup: int = 2,
    ):
        if table_size < 1:
            raise ValueError(f"table_size must be >= 1, got {table_size}")
        self.unet = unet
        self.clip = clip
        self.device = sample_like.device
        self.dtype = sample_like.dtype
        self.shape = tuple(sample_like.shape)
        self.memory_format = (
            torch.channels_last
            if sample_like.dim() == 4
            and sample_like.is_contiguous(memory_format=torch.channels_last)
            and not sample_like.is_contiguous()
            else torch.contiguous_format
        )
        self.table_size = table_size
        self.sample = torch.zeros(self.shape, device=self.device, dtype=self.dtype).contiguous(
            memory_format=self.memory_format
        )
        self.noise = torch.zeros_like(self.sample)
        self.t_table = torch.zeros(table_size, device=self.device, dtype=torch.long)
        self.coef_table = torch.zeros(table_size, 6, device=self.device, dtype=torch.float32)
        self.idx = torch.zeros(1, device=self.device, dtype=torch.long)
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture(warmup)

    # -- the step program ----------------------------------------------------------------------------
    def _step(self) -> None:
        t = self.t_table.index_select(0, self.idx)  # (1,): broadcast over the batch by the UNet
        eps = self.unet(self.sample, t, return_dict=False)[0]
        prev, _ = ops.scheduler_step_table(eps, self.sample, self.noise, self.coef_table, self.idx, self.clip)
        self.sample.copy_(prev)
        self.idx.add_(1)

    def _capture(self, warmup: int) -> None:
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, got {self.device}")
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        previous_mode = torch.cuda.get_sync_debug_mode()
        with torch.cuda.stream(stream), torch.no_grad():
            # Warm-up on a side stream (cuDNN/cuBLAS autotuning and workspace allocation happen here), with
            # host synchronisation made an error: a step that syncs cannot be captured.
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(max(1, warmup)):
                    self.idx.zero_()
                    self._step()
            finally:
                torch.cuda.set_sync_debug_mode(previous_mode)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        self.idx.zero_()
        with torch.no_grad(), torch.cuda.graph(graph):
            self._step()
        torch.cuda.synchronize(self.device)
        self.graph = graph

    # -- running -------------------------------------------------------------------------------------
    def load(self, plan, image: torch.Tensor) -> None:
        """Copy ``plan``'s tables and the starting ``image`` into the static buffers."""
        n = len(plan.timesteps)
        if n > self.table_size:
            raise ValueError(f"{n} steps do not fit a table of {self.table_size}")
        if tuple(image.shape) != self.shape or image.dtype != self.dtype:
            raise ValueError(
                f"image {tuple(image.shape)} {image.dtype} does not match the graph's {self.shape} {self.dtype}"
            )
        if plan.clip != self.clip:
            raise ValueError("the plan's clip range differs from the captured one")
        pin = self.device.type == "cuda"
        ts = torch.tensor(plan.timesteps, dtype=torch.long)
        cs = plan.table()  # rounded from float64 once, as the eager fused step's scalars are
        if pin:
            ts, cs = ts.pin_memory(), cs.pin_memory()
        self.t_table[:n].copy_(ts, non_blocking=pin)
        self.coef_table[:n].copy_(cs, non_blocking=pin)
        self.idx.zero_()
        self.noise.zero_()
        self.sample.copy_(image)

    def step(self, noise: torch.Tensor | None) -> None:
        """Advance one timestep; ``noise`` is that step's unit noise (None when the scheduler draws none)."""
        if noise is not None:
            self.noise.copy_(noise)
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self._step()

    def run(
        self,
        plan,
        image: torch.Tensor,
        draw_noise: Callable[[], torch.Tensor],
        progress: Callable[[Iterable], Iterable] | None = None,
    ) -> torch.Tensor:
        """The whole loop: returns the final sample (a new tensor, in ``image``'s memory format)."""
        self.load(plan, image)
        steps: Iterable[int] = range(len(plan.timesteps))
        if progress is not None:
            steps = progress(steps)
        for i in steps:
            self.step(draw_noise() if plan.draws_noise[i] else None)
        return self.sample.clone(memory_format=torch.preserve_format)


class GraphCache:
    """The pipeline's graphs, keyed by everything a capture depends on; failures are remembered."""

    def __init__(self, max_entries: int = 4):
        self.enabled = True
        self.max_entries = max_entries
        self._graphs: dict[tuple, tuple[tuple, DenoiseStepGraph]] = {}  # key -> (parameter signature, graph)
        self._failed: dict[tuple, tuple[tuple, str]] = {}  # key -> (parameter signature, why)
        self.last_used = False  # whether the latest sampling call replayed a graph
        self.last_reason: str | None = None  # why it did not, if it did not

    def clear(self) -> None:
        self._graphs.clear()
        self._failed.clear()

    def usable(self, unet: torch.nn.Module, image: torch.Tensor) -> str | None:
        """None when graphs may be used for this call, else the reason they are not."""
        if not self.enabled:
            return "disabled (enable_cuda_graphs(False))"
        if not cuda_graphs_env_enabled():
            return f"disabled ({_ENV}=0)"
        if image.device.type != "cuda" or not torch.cuda.is_available():
            return "not a CUDA device"
        if not fast_path.fused_backend():
            return "reference backend"
        if unet.training:
            return "unet in training mode"
        if torch.is_grad_enabled():
            return "gradients enabled"
        return None

    def get(self, unet: torch.nn.Module, image: torch.Tensor, plan, table_size: int) -> DenoiseStepGraph | None:
        key = (
            id(unet),
            tuple(image.shape),
            image.dtype,
            str(image.device),
            plan.clip,
            table_size,
            image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous(),
        )
        # A graph bakes in parameter addresses and the prepared copies made while capturing: after any change to
        # a parameter (new storage, in place, through .data) it is captured again.
        signature = module_signature(unet)
        if self._failed.get(key, (None,))[0] == signature:
            self.last_reason = self._failed[key][1]
            return None
        entry = self._graphs.pop(key, None)
        if entry is not None and entry[0] == signature:
            self._graphs[key] = entry  # most recently used last
            return entry[1]
        del entry  # release the stale graph's memory before capturing its successor
        try:
            graph = DenoiseStepGraph(unet, image, plan.clip, table_size, capture=True)
        except RuntimeError as exc:  # a step that syncs or an op capture refuses: run the eager loop
            reason = f"capture failed: {type(exc).__name__}: {exc}"
            self._failed[key] = (signature, reason)
            self.last_reason = reason
            warn_once(f"cuda-graph-capture-{type(exc).__name__}", f"ddpm_fast: CUDA graph {reason}; running eagerly")
            try:
                torch.cuda.synchronize(image.device)
            except RuntimeError:  # the failed capture left an error on the stream; the eager loop reports it
                pass
            return None
        if len(self._graphs) >= self.max_entries:
            self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = (signature, graph)
        return graph


def sample_with_graph(
    cache: GraphCache,
    unet: torch.nn.Module,
    scheduler,
    image: torch.Tensor,
    draw_noise: Callable[[], torch.Tensor],
    progress: Callable[[Sequence], Iterable] | None = None,
) -> torch.Tensor | None:
    """Run the sampling loop through a CUDA graph; None (nothing done) when graphs cannot be used."""
    cache.last_used = False
    reason = cache.usable(unet, image)
    if reason is None:
        plan = scheduler.step_plan() if hasattr(scheduler, "step_plan") else None
        if plan is None:
            reason = "scheduler configuration not expressible as the fused step"
        else:
            table_size = max(int(scheduler.config.num_train_timesteps), len(plan.timesteps))
            graph = cache.get(unet, image, plan, table_size)
            if graph is not None:
                out = graph.run(plan, image, draw_noise, progress)
                cache.last_used = True
                cache.last_reason = None
                return out
            reason = cache.last_reason
    cache.last_reason = reason
    return None
