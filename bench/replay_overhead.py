"""What a CPU forward plan's replay spends outside the kernels: one process, interleaved rounds, medians, JSON.

Per round it times the UNet forward (``unet(x, t)``: input checks, the plan's state check, the replay), the
recorded graph alone, the graph with every op but the view ops replaced by its recorded output (the graph's
Python and its views), the graph with every op replaced (its Python alone), and the plan's state check
(``_State.current()``: every module's children, parameters and buffers, eval mode, hooks). The forward minus the
graph is the Python around the replay; the graph minus the fully stubbed graph is what the ops cost to run,
dispatch included.

    python bench/replay_overhead.py --batch 1 --rounds 41 --json bench/results/<machine>/replay_overhead_b1.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from ddpm_fast.bench import common, engines

# aten ops that return views: kept real in the "views only" variant.
VIEW_OPS = {"alias", "as_strided", "expand", "narrow", "permute", "select", "slice", "split", "t", "transpose"}
VIEW_OPS |= {"unfold", "unsqueeze", "view", "_unsafe_view"}


def _is_view(node: torch.fx.Node) -> bool:
    """An aten view op, called as an op overload or (models/plans.py's replay) as a Tensor method."""
    if node.op == "call_method":
        return True
    target = str(node.target)
    return target.startswith("aten.") and target.split(".")[1] in VIEW_OPS


def stubbed(graph: torch.fx.GraphModule, inputs, keep_views: bool) -> torch.fx.GraphModule:
    """A copy of ``graph`` whose call_function nodes (all, or all but the view ops) return the value they produced
    for ``inputs``."""
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            values[node.name] = out = super().run_node(node)
            return out

    Recorder(graph).run(*inputs)
    copy_ = torch.fx.GraphModule(graph, copy.deepcopy(graph.graph))
    for node in copy_.graph.nodes:
        if node.op not in ("call_function", "call_method") or (keep_views and _is_view(node)):
            continue

        def constant(*args, _value=values[node.name], **kwargs):
            return _value

        constant.__name__ = f"recorded_{node.name}"
        node.op, node.target = "call_function", constant
    copy_.recompile()
    return copy_


def measure(arch: str, batch: int, rounds: int) -> dict:
    unet, x, t = engines.cpu_unet_and_inputs(arch, batch)
    with torch.inference_mode():
        for _ in range(3):  # prepared weights, then the plan recorded (models/plans.py)
            unet(x, t)
        plans = unet._plans
        (graph,) = plans.graphs()
        inputs = (x, unet._timesteps(t, x))
        views, python = stubbed(graph, inputs, True), stubbed(graph, inputs, False)
        state = plans._state
        candidates = {
            "forward": lambda: unet(x, t),
            "graph": lambda: graph(*inputs),
            "graph_views_only": lambda: views(*inputs),
            "graph_python_only": lambda: python(*inputs),
            "state_check": state.current,
        }
        times = {name: [] for name in candidates}
        for _ in range(rounds):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    ops = [n for n in graph.graph.nodes if n.op in ("call_function", "call_method")]
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {
        "arch": arch,
        "batch": batch,
        "graph_ops": len(ops),
        "graph_view_ops": sum(map(_is_view, ops)),
        "graph_constants": sum(n.op == "get_attr" for n in graph.graph.nodes),
        "ms_median": medians,
        "ms": times,
        "around_replay_ms": medians["forward"] - medians["graph"],
        "views_ms": medians["graph_views_only"] - medians["graph_python_only"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="cifar10-32", choices=sorted(common.ARCHS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = measure(args.arch, args.batch, args.rounds)
    finally:
        torch.set_num_threads(before)
    m = report["ms_median"]
    print(
        f"{args.arch} batch {args.batch}: forward {m['forward']:.2f} ms, graph {m['graph']:.2f} ms "
        f"({report['graph_ops']} ops, {report['graph_view_ops']} views, {report['graph_constants']} constants); "
        f"graph with views only {m['graph_views_only']:.3f} ms, Python only {m['graph_python_only']:.3f} ms; "
        f"state check {m['state_check']:.3f} ms"
    )
    if args.json:
        arguments = " ".join(sys.argv[1:] if argv is None else argv)
        report = common.script_report("replay_overhead", arguments, "ms per call, medians over rounds", **report)
        common.write_json(Path(args.json), report)


if __name__ == "__main__":
    main()
