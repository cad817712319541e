"""Forward plans: a model's fused CPU forward recorded once per input signature and replayed as straight-line code.

At batch 1 the UNet's fused forward is a few hundred small ops, and deciding each one in Python (which path,
which prepared copy, which memory format) costs as much as a large share of the arithmetic. A plan records the
ops one forward actually ran (``make_fx`` in real mode: the aten, oneDNN and ddpm_fast ops with the prepared
weights as constants) and replays that op list on later calls with inputs of the same shapes, dtypes and
strides, under the same :mod:`~ddpm_fast.fast_path` policy. A replay runs the same kernels on the same operands,
so its output equals the eager forward's bit for bit. The replay calls its view ops as Tensor methods, every
other op through its C++ entry point (:class:`_Direct`), and reads its constants as plain attributes
(:func:`_for_replay`): ``OpOverload.__call__``'s Python frame, an overload's boxed call and ``nn.Module.__getattr__``
cost a microsecond or more each, for each of a batch-1 forward's ~450 ops and ~270 constants.

A plan is only replayed while it is still the forward the model would run:

* it is recorded on the second call with a given input signature, after an eager call with it (which built the
  prepared copies, so the recording holds only the forward's own ops; a recording that prepared a weight is
  dropped and tried again on the next call);
* every call checks that every module still holds the same children, parameters and buffers (by identity),
  that no parameter or buffer changed (data pointer, version counter, uses of ``.data``:
  :mod:`~ddpm_fast.models.prepared`), that every module is in eval mode and that no forward hook is registered,
  on a submodule or globally; any difference drops the plans and the call runs eagerly (and records again on the
  next one). The check touches every module and tensor object, which a forward's weights have pushed out of the
  caches: a visible share of a batch-1 forward (``bench/replay_overhead.py``). Inside :func:`steady_model` (the
  pipelines' denoising loops, where nothing runs between two steps that could change the model) each model's state
  is checked at its first call in the block only.

:func:`ddpm_fast.fast_path.use_cpu_plan` says when plans may be used at all (``DDPM_FAST_CPU_PLANS=0`` or
``with ddpm_fast.fast_path.cpu_plans(False)`` turns them off). A replay adds the paths its recording noted to an
active :func:`~ddpm_fast.fast_path.record_paths` block, so path counts read the same either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .. import fast_path
from ..utils.warn import warn_once
from .prepared import TrackedParameter, _signature, trackable

__all__ = ["ForwardPlans", "steady_model"]

_FAILED = object()  # recording raised: this signature runs eagerly from now on

# Inside steady_model(): id(ForwardPlans) -> the _State found current at its first call in the block.
_STEADY: contextvars.ContextVar[dict[int, "_State"] | None] = contextvars.ContextVar("ddpm_fast_steady", default=None)


@contextlib.contextmanager
def steady_model() -> Iterator[None]:
    """``with steady_model(): ...``: the models called in the block (this thread or task only) do not change between
    their calls, so each checks its state (:meth:`_State.current`) at its first call in the block only. For a
    denoising loop, whose steps run the scheduler between two UNet calls and nothing that could touch the UNet;
    nested blocks start their own record."""
    token = _STEADY.set({})
    try:
        yield
    finally:
        _STEADY.reset(token)


def _meta(t: torch.Tensor | None) -> tuple | None:
    """What a recording depends on: shape, strides, dtype, device (not the storage offset: a pipeline's timestep
    is a view of a different element of its schedule at every step)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device)


def _tensor_versions(tensors) -> list[tuple]:
    return [(t.data_ptr(), t._version, t.__dict__.get("_ddpm_fast_data_uses", 0)) for t in tensors]


def _versions(model: nn.Module) -> list[tuple] | None:
    """The versions of every parameter and buffer (None when one has no version counter)."""
    try:
        return _tensor_versions([*model.parameters(), *model.buffers()])
    except RuntimeError:  # inference tensors
        return None


class _State:
    """What the model's plans were recorded against: which module holds which children, parameters and buffers
    (by identity), and every parameter's and buffer's data pointer, version and ``.data`` uses."""

    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.layout = self._layout()
        self.tensors = [*model.parameters(), *model.buffers()] if self.layout is not None else []
        for t in self.tensors:
            _signature(t)  # makes each parameter a TrackedParameter, so that edits through .data are seen
        self.versions = self._versions()

    def _layout(self) -> list[int] | None:
        """None when a module is in train mode or has a forward hook; else the ids of every module's children,
        parameters and buffers, each group preceded by its length."""
        out: list[int] = []
        for m in self.modules:
            if m.training or m._forward_hooks or m._forward_pre_hooks:
                return None
            for d in (m._modules, m._parameters, m._buffers):
                out.append(len(d))
                out.extend(map(id, d.values()))
        return out

    def _versions(self) -> list[tuple]:
        return _tensor_versions(self.tensors)

    def current(self) -> bool:
        if fast_path.global_forward_hooks():
            return False
        return self._layout() == self.layout and self._versions() == self.versions

    def current_in(self, plans: "ForwardPlans") -> bool:
        """:meth:`current`, taken as known inside :func:`steady_model` once it held for ``plans`` there."""
        steady = _STEADY.get()
        if steady is None:
            return self.current()
        if steady.get(id(plans)) is self:
            return True
        if self.current():
            steady[id(plans)] = self
            return True
        return False


def _trackable(model: nn.Module) -> bool:
    """Whether every parameter and buffer has a version counter (not made under inference mode)."""
    return all(trackable(p) for p in model.parameters()) and not any(b.is_inference() for b in model.buffers())


def direct_replay() -> bool:
    """Whether recorded graphs are rewritten for replay (:func:`_for_replay`): where torch's op overloads hold their
    C++ entry point as ``_op`` (every torch this package supports; ``bench/ab_paths.py --choice direct_replay``
    turns it off to measure it)."""
    return callable(getattr(torch.ops.aten.add.Tensor, "_op", None))


class _Direct(functools.partial):
    """An op overload called through its C++ entry point, ``overload._op``: the call ``OpOverload.__call__`` makes,
    without its Python frame (``functools.partial`` calls it from C). It prints as the overload, so a graph's
    targets read as recorded; the generated code names it after the overload."""

    def __new__(cls, overload: torch._ops.OpOverload):
        self = super().__new__(cls, overload._op)
        self.overload = overload
        self.__name__ = str(overload).replace(".", "_")
        return self

    def __repr__(self) -> str:
        return str(self.overload)

    __str__ = __repr__


# View ops whose Tensor method takes the overload's arguments in the same order: PyTorch's Python argument parser
# (a method call) costs less than the boxed call of even an overload's C++ entry point, and a forward has ~250.
_VIEW_METHODS = {
    torch.ops.aten.view.default: "view",
    torch.ops.aten.permute.default: "permute",
    torch.ops.aten.transpose.int: "transpose",
    torch.ops.aten.unfold.default: "unfold",
    torch.ops.aten.select.int: "select",
    torch.ops.aten.t.default: "t",
    torch.ops.aten.unsqueeze.default: "unsqueeze",
    torch.ops.aten.expand.default: "expand",
    torch.ops.aten.as_strided.default: "as_strided",
}


def _for_replay(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph`` making the same calls on the same operands with less Python around each: the view ops of
    ``_VIEW_METHODS`` as Tensor method calls, every other op overload wrapped in :class:`_Direct`, and every
    constant it reads (the parameters, the prepared weights) a plain instance attribute, read from the instance
    dict instead of through ``nn.Module.__getattr__``."""
    if not direct_replay():
        return graph
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target in _VIEW_METHODS and not node.kwargs:
            node.op, node.target = "call_method", _VIEW_METHODS[node.target]
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = _Direct(node.target)
        elif node.op == "get_attr":
            for store in (graph._parameters, graph._buffers):
                if node.target in store:
                    graph.__dict__[node.target] = store.pop(node.target)
    graph.recompile()
    return graph


class _Plan:
    """A recorded forward: ``graph`` (the fx.GraphModule, over the non-None inputs) and the paths it noted."""

    __slots__ = ("graph", "notes")

    def __init__(self, graph: torch.fx.GraphModule, notes: Counter):
        self.graph, self.notes = graph, notes

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        fast_path.add_notes(self.notes)
        return self.graph(*(t for t in inputs if t is not None))


class ForwardPlans:
    """The plans of one model, keyed by input signature and policy (at most ``limit``, the oldest dropped)."""

    def __init__(self, limit: int = 4):
        self.limit = limit
        self._plans: dict[tuple, _Plan | object] = {}
        self._state: _State | None = None
        # The input signature and parameter versions of the last eager call: a recording follows an eager call
        # with both the same, whose prepared copies are then current.
        self._seen: tuple | None = None
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._state = None
            self._seen = None

    def __len__(self) -> int:
        return sum(isinstance(p, _Plan) for p in self._plans.values())

    def graphs(self) -> list[torch.fx.GraphModule]:
        """The recorded graphs (for inspection)."""
        return [p.graph for p in self._plans.values() if isinstance(p, _Plan)]

    # Plans hold recorded graphs and a lock, which neither pickle nor deepcopy: a copy starts empty.
    def __getstate__(self) -> dict:
        return {"limit": self.limit}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["limit"])

    def __deepcopy__(self, memo) -> "ForwardPlans":
        return ForwardPlans(self.limit)

    def run(self, model: nn.Module, forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None]):
        """``forward(*inputs)`` (a function of tensors and Nones only, returning a tensor): replayed from a plan
        where one is current, otherwise eagerly (recording a plan when this signature was seen just before)."""
        key = (fast_path.current(), tuple(_meta(t) for t in inputs))
        state = self._state
        if state is not None and not state.current_in(self):
            self.clear()  # the model changed: every plan may be stale
            state = None
        plan = self._plans.get(key) if state is not None else None
        if isinstance(plan, _Plan):
            fast_path.note("plan:replay")
            return plan(*inputs)
        if plan is _FAILED:
            return forward(*inputs)
        seen = (key, _versions(model))
        if self._seen != seen:
            self._seen = seen
            return forward(*inputs)
        with self._lock:
            if self._state is None:
                if not _trackable(model):
                    self._plans[key] = _FAILED
                    return forward(*inputs)
                state = _State(model)
                if state.layout is None:  # hooks or train mode: a recording would leave them out
                    self._seen = None
                    return forward(*inputs)
                self._state = state
            plan = self._record(model, forward, inputs)
            if plan is None:  # a weight was prepared while recording: the next call records again
                return forward(*inputs)
            if len(self._plans) >= self.limit:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        if isinstance(plan, _Plan):
            fast_path.note("plan:record")
            return plan(*inputs)
        return forward(*inputs)

    def _record(self, model: nn.Module, forward: Callable, inputs: Sequence[torch.Tensor | None]):
        from torch.fx.experimental.proxy_tensor import make_fx

        # Recorded outside inference mode: inside it, make_fx takes other decompositions (nearest upsampling as
        # an index op, 6x slower at batch 16) and records inference inputs as copies. The graph takes the tensors
        # only; the Nones stay where they were.
        with torch.inference_mode(False):
            examples = [t.clone() for t in inputs if t is not None]
        present = [t is not None for t in inputs]

        def tensors_only(*tensors: torch.Tensor) -> torch.Tensor:
            it = iter(tensors)
            return forward(*(next(it) if p else None for p in present))

        # make_fx refuses parameter subclasses: tracked parameters record as the plain ones they are.
        tracked = [t for t in model.parameters() if type(t) is TrackedParameter]
        try:
            for t in tracked:
                t.__class__ = nn.Parameter
            with (
                fast_path.record_paths() as notes,
                torch.inference_mode(False),
                torch.no_grad(),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                graph = make_fx(tensors_only, tracing_mode="real")(*examples)
        except Exception as exc:  # noqa: BLE001 (any failure: this signature stays eager, which is always right)
            if any(k.startswith("prepare:") for k in notes):
                return None  # a stale prepared copy was rebuilt while recording: record again next time
            warn_once(
                "cpu-plan-failed",
                f"ddpm_fast: recording a CPU forward plan failed ({type(exc).__name__}: {exc}); "
                "this input signature runs eagerly",
                stacklevel=4,
            )
            return _FAILED
        finally:
            for t in tracked:
                t.__class__ = TrackedParameter
        if any(k.startswith("prepare:") for k in notes):
            return None
        return _Plan(_for_replay(graph), notes)
