"""Ops and the pipeline under torch.inference_mode with several threads (the CLI's setting).

Worker threads of at::parallel_for do not inherit the caller's InferenceMode; the rest of the suite runs
single-threaded (conftest), where every parallel region runs inline and this cannot show.
"""

import pytest
import torch

import ddpm_fast
from ddpm_fast import ops


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _each_op():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 9, 7, generator=g).to(memory_format=torch.channels_last)
    w, b, temb = torch.randn(64, generator=g), torch.randn(64, generator=g), torch.randn(2, 64, generator=g)
    q, k, v = (torch.randn(2, 1, 300, 40, generator=g) for _ in range(3))
    e, s, n = (torch.randn(4, 3, 16, 16, generator=g) for _ in range(3))
    return {
        "group_norm_silu": lambda: ops.group_norm_silu(x, 8, w, b, 1e-5, temb=temb),
        "attention": lambda: ops.attention(q, k, v),
        "scheduler_step": lambda: ops.scheduler_step(e, s, n, (1.2, -0.3), (0.9, 0.1, 0.0), 0.05, 1.0)[0],
    }


@pytest.mark.parametrize("name", ["group_norm_silu", "attention", "scheduler_step"])
def test_op_under_inference_mode(name, two_threads):
    fn = _each_op()[name]
    expected = fn()
    with torch.inference_mode():
        got = fn()
    assert got.is_inference()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_shipped_pipeline_under_inference_mode(two_threads):
    from ddpm_fast.weights import shipped_model_path

    pipe = ddpm_fast.DDPMPipeline.from_pretrained(shipped_model_path())
    pipe.set_progress_bar_config(disable=True)
    run = lambda: (
        pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    )  # noqa: E731
    expected = run()
    with torch.inference_mode():
        got = run()
    assert abs(got - expected).max() == 0


def test_pipeline_loaded_inside_inference_mode_keeps_the_packed_path(two_threads):
    """A model loaded inside inference_mode still runs on prepared (packed / Winograd) weights, prepared once:
    from_pretrained and .to() make normal parameters there, whose in-place changes the prepared copies can see
    (inference tensors have no version counter)."""
    import warnings

    from ddpm_fast import fast_path
    from ddpm_fast.weights import shipped_model_path

    run = lambda p: (
        p(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    )  # noqa: E731
    outside = ddpm_fast.DDPMPipeline.from_pretrained(shipped_model_path())
    outside.set_progress_bar_config(disable=True)
    expected = run(outside)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # an unpreparable weight warns
        pipe = ddpm_fast.DDPMPipeline.from_pretrained(shipped_model_path()).to(torch.float32)
        pipe.set_progress_bar_config(disable=True)
        assert not any(p.is_inference() for p in pipe.unet.parameters())
        with fast_path.record_paths() as stats:
            got = run(pipe)
        with fast_path.record_paths() as again:
            run(pipe)
        assert not any(key.startswith("prepare:") for key in again), again  # prepared once, not per call
    assert stats["conv:packed"] > 0 and stats["conv:plain"] == 0, stats
    assert abs(got - expected).max() == 0
