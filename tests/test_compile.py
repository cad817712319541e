"""``torch.compile(unet, fullgraph=True)`` on the CPU with the fused backend: one graph for the whole UNet (no
graph break), the custom ops inside it, and the compiled output equal to eager within the fused tolerance."""

from __future__ import annotations

import pytest
import torch

import ddpm_fast
from ddpm_fast import _native
from helpers import FUSED_TOL, TINY

pytestmark = pytest.mark.skipif(not _native.available(), reason=f"native extension unavailable: {_native.load_error()}")


def _model_and_inputs():
    torch.manual_seed(0)
    model = ddpm_fast.UNet2DModel(**TINY).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10])


def _targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


def test_whole_unet_is_one_graph_with_the_custom_ops():
    model, x, t = _model_and_inputs()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=record)
    with torch.no_grad():
        eager = model(x, t).sample  # the eager fused path first: its prepared weights must not disturb tracing
        out = compiled(x, t).sample
        assert len(graphs) == 1
        ops = _targets(graphs[0])
        assert "ddpm_fast.group_norm_silu.default" in ops and "ddpm_fast.attention.default" in ops, sorted(ops)
        torch.testing.assert_close(out, eager, rtol=FUSED_TOL, atol=FUSED_TOL)
        compiled(x, t)
        assert len(graphs) == 1  # guards hold: no recompilation
        with ddpm_fast.backend("reference"):  # another policy: a guard fails, the recompiled graph has no custom op
            compiled(x, t)
        assert len(graphs) == 2 and not any(op.startswith("ddpm_fast") for op in _targets(graphs[1]))


def test_inductor_output_matches_eager():
    model, x, t = _model_and_inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, t).sample
        out = torch.compile(model, fullgraph=True)(x, t).sample  # inductor, the default backend
    torch.testing.assert_close(out, eager, rtol=FUSED_TOL, atol=FUSED_TOL)
