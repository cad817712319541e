"""DDPMScheduler / DDIMScheduler against diffusers 0.42.1 (the oracle), on both backends.

Tolerance: the reference backend repeats diffusers' float32 arithmetic and must agree to float32
rounding; the fused backend reassociates the same float32 scalars into one affine update, so it
agrees to ~1e-6 (we assert 1e-5, scaled by the magnitude of ``x0`` where epsilon prediction divides
by a tiny sqrt(alpha_bar)).
"""

from __future__ import annotations

import json
import pickle

import diffusers
import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import ops
from ddpm_fast.schedulers import (
    DDIMScheduler,
    DDIMSchedulerOutput,
    DDPMScheduler,
    DDPMSchedulerOutput,
    betas_for_alpha_bar,
    randn_tensor,
    rescale_zero_terminal_snr,
)
from ddpm_fast.utils.outputs import BaseOutput

BACKENDS = ("fused", "reference")
DDPM_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
DDIM_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "linspace", "trailing")
SHAPE = (2, 3, 5, 4)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with ddpm_fast.backend(request.param):
        yield request.param


# -- helpers -------------------------------------------------------------------------------------------


def _tensors(seed: int, shape=SHAPE, out_channels: int | None = None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample = (torch.randn(shape, generator=g) * 1.5).to(dtype)
    oshape = (shape[0], out_channels or shape[1], *shape[2:])
    model_output = torch.randn(oshape, generator=g).to(dtype)
    if out_channels:  # learned variance: second half is the interpolation frac in [-1, 1]
        model_output[:, shape[1] :] = torch.tanh(model_output[:, shape[1] :])
    return model_output, sample


def _assert_close(ours, theirs, what, rtol=1e-5, atol=1e-5):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _compare_steps(
    ours,
    theirs,
    timesteps,
    step_kwargs=None,
    seed=0,
    out_channels=None,
    dtype=torch.float32,
    rtol=1e-5,
    atol=1e-5,
    fresh_sample_each_step=False,
    chain=True,
    scale_atol=False,
):
    """Run the same step sequence in both schedulers with equally seeded generators and compare.

    ``chain``: feed each step's prev_sample into the next (else every step gets a fresh finite sample).
    ``scale_atol``: for half precision, allow ``atol`` per unit of ``|sample| / sqrt(alpha_bar_t)``, the size
    of the terms whose difference is ``x0`` (rounding there is amplified by 1 / sqrt(alpha_bar_t)).
    """
    step_kwargs = dict(step_kwargs or {})
    g_ours = torch.Generator().manual_seed(seed + 1)
    g_theirs = torch.Generator().manual_seed(seed + 1)
    model_output, sample = _tensors(seed, out_channels=out_channels, dtype=dtype)
    x_ours, x_theirs = sample, sample.clone()
    for i, t in enumerate(timesteps):
        if i and fresh_sample_each_step:
            model_output, fresh = _tensors(seed + 100 + i, out_channels=out_channels, dtype=dtype)
            if not chain:
                x_ours, x_theirs = fresh, fresh.clone()
        tol = atol
        if scale_atol:
            tol = atol * max(1.0, float(x_theirs.abs().max()) / float(theirs.alphas_cumprod[int(t)]) ** 0.5)
        a = ours.step(model_output, t, x_ours, generator=g_ours, **step_kwargs)
        b = theirs.step(model_output.clone(), t, x_theirs, generator=g_theirs, **step_kwargs)
        _assert_close(
            a.pred_original_sample, b.pred_original_sample, f"pred_original_sample at t={int(t)}", rtol=rtol, atol=tol
        )
        _assert_close(a.prev_sample, b.prev_sample, f"prev_sample at t={int(t)}", rtol=rtol, atol=tol)
        x_ours, x_theirs = a.prev_sample, b.prev_sample
    # Both consumed the same random numbers.
    assert torch.equal(g_ours.get_state(), g_theirs.get_state())


def _dummy_sample_deter():
    """diffusers' tests/schedulers/test_schedulers.py SchedulerCommonTest.dummy_sample_deter."""
    batch_size, num_channels, height, width = 4, 3, 8, 8
    num_elems = batch_size * num_channels * height * width
    sample = torch.arange(num_elems).reshape(num_channels, height, width, batch_size) / num_elems
    return sample.permute(3, 0, 1, 2)


def _dummy_model(sample, t):
    """diffusers' SchedulerCommonTest.dummy_model."""
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.device).to(sample.dtype)
    return sample * t / (t + 1)


def _pair(name, **config):
    ours = getattr(ddpm_fast, name)(**config)
    theirs = getattr(diffusers, name)(**config)
    return ours, theirs


# -- tables and timesteps --------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", DDPM_SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
def test_ddpm_tables_bitwise(schedule, rescale):
    ours, theirs = _pair("DDPMScheduler", beta_schedule=schedule, rescale_betas_zero_snr=rescale)
    for name in ("betas", "alphas", "alphas_cumprod", "timesteps"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.init_noise_sigma == theirs.init_noise_sigma and ours.order == theirs.order == 1


@pytest.mark.parametrize("schedule", DDIM_SCHEDULES)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_tables_bitwise(schedule, set_alpha_to_one):
    ours, theirs = _pair("DDIMScheduler", beta_schedule=schedule, set_alpha_to_one=set_alpha_to_one)
    for name in ("betas", "alphas_cumprod", "final_alpha_cumprod", "timesteps"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_beta_helpers_match_diffusers():
    from diffusers.schedulers import scheduling_ddpm as d

    for kind in ("cosine", "exp", "laplace"):
        assert torch.equal(
            betas_for_alpha_bar(100, alpha_transform_type=kind), d.betas_for_alpha_bar(100, alpha_transform_type=kind)
        )
    betas = torch.linspace(1e-4, 0.02, 50)
    assert torch.equal(rescale_zero_terminal_snr(betas.clone()), d.rescale_zero_terminal_snr(betas.clone()))
    with pytest.raises(ValueError, match="alpha_transform_type"):
        betas_for_alpha_bar(10, alpha_transform_type="cubic")


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(
    "n_train,n_steps,offset",
    [(1000, 1, 0), (1000, 7, 1), (1000, 50, 0), (1000, 333, 2), (1000, 1000, 0), (50, 3, 0), (10, 10, 0)],
)
def test_set_timesteps_matches_diffusers(name, spacing, n_train, n_steps, offset):
    if offset and n_steps * (n_train // n_steps) - (n_train // n_steps) + offset >= n_train:
        pytest.skip("offset runs past the table")
    ours, theirs = _pair(name, num_train_timesteps=n_train, timestep_spacing=spacing, steps_offset=offset)
    ours.set_timesteps(n_steps)
    theirs.set_timesteps(n_steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    assert ours.num_inference_steps == theirs.num_inference_steps
    assert len(ours) == len(theirs) == n_train


def test_ddpm_previous_timestep_matches_diffusers():
    ours, theirs = _pair("DDPMScheduler")
    for t in (999, 500, 1, 0):
        assert ours.previous_timestep(t) == theirs.previous_timestep(t)
    for sched in (ours, theirs):
        sched.set_timesteps(timesteps=[900, 400, 30, 2])
    for t in (900, 400, 30, 2):
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
        assert int(ours.previous_timestep(torch.tensor(t))) == int(theirs.previous_timestep(torch.tensor(t)))
    for sched in (ours, theirs):
        sched.set_timesteps(7)
    for t in ours.timesteps:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))


def test_ddim_previous_timestep_is_diffusers_formula():
    sched = DDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(3)
    # diffusers steps 666 -> 333 although the next table entry is 332: the quirk is kept so numbers match.
    assert [int(sched.previous_timestep(t)) for t in sched.timesteps] == [666, 333, -1]
    assert sched.timesteps.tolist() == [999, 666, 332]


# -- DDPM step grid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("schedule", DDPM_SCHEDULES)
def test_ddpm_step_matches_diffusers(backend, schedule, variance_type, prediction_type, spacing):
    config = dict(
        beta_schedule=schedule, variance_type=variance_type, prediction_type=prediction_type, timestep_spacing=spacing
    )
    learned = variance_type in ("learned", "learned_range")
    out_channels = 2 * SHAPE[1] if learned else None
    if variance_type == "fixed_large_log":
        # diffusers takes sqrt(log(beta)) = NaN here; we use exp(0.5 * log(beta)) = sqrt(beta), which is
        # diffusers' fixed_large (up to float rounding).
        config["variance_type"] = "fixed_large"
    ours = DDPMScheduler(**{**config, "variance_type": variance_type})
    theirs = diffusers.DDPMScheduler(**config)
    ours.set_timesteps(7)
    theirs.set_timesteps(7)
    ts = ours.timesteps.tolist()
    _compare_steps(ours, theirs, ts[:3] + ts[-2:], out_channels=out_channels, fresh_sample_each_step=True)


def test_ddpm_fixed_large_log_is_finite_where_diffusers_is_nan():
    model_output, sample = _tensors(3)
    theirs = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    out = theirs.step(model_output, 500, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isnan(out).all()  # the defect we fix
    for b in BACKENDS:
        with ddpm_fast.backend(b):
            ours = DDPMScheduler(variance_type="fixed_large_log")
            got = ours.step(model_output, 500, sample, generator=torch.Generator().manual_seed(0)).prev_sample
            want = (
                diffusers.DDPMScheduler(variance_type="fixed_large")
                .step(model_output, 500, sample, generator=torch.Generator().manual_seed(0))
                .prev_sample
            )
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    log_var = DDPMScheduler(variance_type="fixed_large_log")._get_variance(500)
    torch.testing.assert_close(
        log_var, torch.log(diffusers.DDPMScheduler()._get_variance(500, variance_type="fixed_large"))
    )


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ddpm_get_variance_matches_diffusers(variance_type):
    ours, theirs = _pair("DDPMScheduler", variance_type=variance_type)
    for t in (0, 1, 487, 999):
        assert torch.equal(ours._get_variance(t), theirs._get_variance(t))
    # diffusers' own published values (tests/schedulers/test_scheduler_ddpm.py)
    if variance_type == "fixed_small":
        assert abs(float(ours._get_variance(0))) < 1e-5
        assert abs(float(ours._get_variance(487)) - 0.00979) < 1e-5
        assert abs(float(ours._get_variance(999)) - 0.02) < 1e-5


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip", [(True, 0.5), (True, 2.0), (False, 1.0)])
@pytest.mark.parametrize("thresholding", [None, (0.9, 1.5), (0.995, 3.0)])
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_clipping_and_thresholding(backend, name, prediction_type, clip, thresholding):
    config = dict(prediction_type=prediction_type, clip_sample=clip[0], clip_sample_range=clip[1])
    if thresholding:
        config.update(thresholding=True, dynamic_thresholding_ratio=thresholding[0], sample_max_value=thresholding[1])
    ours, theirs = _pair(name, **config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    kwargs = {"eta": 0.5} if name == "DDIMScheduler" else {}
    _compare_steps(ours, theirs, ours.timesteps.tolist(), kwargs, fresh_sample_each_step=True)


# -- DDIM step grid --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", DDIM_SCHEDULES)
def test_ddim_step_matches_diffusers(backend, schedule, prediction_type, spacing, eta, use_clipped):
    ours, theirs = _pair(
        "DDIMScheduler", beta_schedule=schedule, prediction_type=prediction_type, timestep_spacing=spacing
    )
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    _compare_steps(
        ours,
        theirs,
        ours.timesteps.tolist(),
        {"eta": eta, "use_clipped_model_output": use_clipped},
        fresh_sample_each_step=True,
    )


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_set_alpha_to_one_and_variance_noise(backend, set_alpha_to_one, prediction_type):
    ours, theirs = _pair(
        "DDIMScheduler", set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type, steps_offset=1
    )
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    model_output, sample = _tensors(4)
    for t in ours.timesteps:
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)))
        a = ours.step(model_output, t, sample, eta=0.8, variance_noise=noise)
        b = theirs.step(model_output, t, sample, eta=0.8, variance_noise=noise)
        _assert_close(a.prev_sample, b.prev_sample, f"t={int(t)}")
        _assert_close(a.pred_original_sample, b.pred_original_sample, f"x0 t={int(t)}")


def test_ddim_variance_matches_diffusers():
    ours, theirs = _pair("DDIMScheduler")
    for t, p in ((0, -1), (420, 400), (980, 960), (999, 0), (487, 486)):
        assert torch.equal(ours._get_variance(t, p), theirs._get_variance(t, p))
    # diffusers' published values
    assert abs(float(ours._get_variance(420, 400)) - 0.14771) < 1e-5
    assert abs(float(ours._get_variance(980, 960)) - 0.32460) < 1e-5
    assert abs(float(ours._get_variance(999, 998)) - 0.02) < 1e-5


# -- special configurations ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_custom_timesteps(backend, prediction_type, variance_type):
    custom = [999, 800, 511, 200, 37, 1, 0]
    ours, theirs = _pair("DDPMScheduler", prediction_type=prediction_type, variance_type=variance_type)
    ours.set_timesteps(timesteps=custom)
    theirs.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.custom_timesteps
    out_channels = 2 * SHAPE[1] if variance_type == "learned_range" else None
    _compare_steps(ours, theirs, custom, out_channels=out_channels, fresh_sample_each_step=True)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("steps_offset", [1, 5])
def test_steps_offset(backend, name, steps_offset):
    ours, theirs = _pair(name, steps_offset=steps_offset)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    kwargs = {"eta": 0.3} if name == "DDIMScheduler" else {}
    _compare_steps(ours, theirs, ours.timesteps.tolist(), kwargs, fresh_sample_each_step=True)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_rescale_betas_zero_snr(backend, name, prediction_type, spacing):
    # With zero terminal SNR, epsilon prediction divides by sqrt(alpha_bar_999) = 0 at t=999: diffusers gives
    # inf/NaN there and so must we (the fused path hands such steps to the reference code). Later steps get
    # fresh finite samples: how inf inputs propagate through reassociated arithmetic is not specified.
    ours, theirs = _pair(
        name, rescale_betas_zero_snr=True, prediction_type=prediction_type, timestep_spacing=spacing, clip_sample=False
    )
    assert float(ours.alphas_cumprod[-1]) == 0.0
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    kwargs = {"eta": 0.5} if name == "DDIMScheduler" else {}
    _compare_steps(ours, theirs, ours.timesteps.tolist(), kwargs, fresh_sample_each_step=True, chain=False)


def test_trained_betas_roundtrip(tmp_path):
    betas = np.linspace(1e-4, 0.02, 100, dtype=np.float32) ** 1.1
    for name in ("DDPMScheduler", "DDIMScheduler"):
        ours, theirs = _pair(name, num_train_timesteps=100, trained_betas=betas)
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
        ours.save_pretrained(tmp_path / name)
        loaded = getattr(diffusers, name).from_pretrained(tmp_path / name)
        assert torch.equal(loaded.betas, ours.betas)
    as_tensor = DDPMScheduler(num_train_timesteps=100, trained_betas=torch.from_numpy(betas))
    json.loads(as_tensor.to_json_string())  # tensor input still gives a serialisable config
    assert torch.equal(as_tensor.betas, torch.from_numpy(betas))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_other_dtypes(backend, name, dtype):
    ours, theirs = _pair(name)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    kwargs = {"eta": 1.0} if name == "DDIMScheduler" else {}
    # Half precision: diffusers rounds after every op in the tensor dtype, the fused op rounds differently
    # (a few ulps of the largest term); float64 must agree to 1e-5 like float32.
    eps = torch.finfo(dtype).eps
    tol = 1e-5 if dtype == torch.float64 else 8 * eps
    _compare_steps(
        ours,
        theirs,
        ours.timesteps.tolist(),
        kwargs,
        dtype=dtype,
        rtol=tol,
        atol=tol,
        fresh_sample_each_step=True,
        scale_atol=dtype != torch.float64,
    )


def test_mixed_dtypes_promote_like_diffusers(backend):
    ours, theirs = _pair("DDPMScheduler")
    model_output, sample = _tensors(1)
    a = ours.step(model_output.half(), 500, sample, generator=torch.Generator().manual_seed(0))
    b = theirs.step(model_output.half(), 500, sample, generator=torch.Generator().manual_seed(0))
    assert a.prev_sample.dtype == b.prev_sample.dtype == torch.float32
    torch.testing.assert_close(a.prev_sample, b.prev_sample)


# -- diffusers' published full-loop numbers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction_type,want_sum,want_mean", [("epsilon", 258.9606, 0.3372), ("v_prediction", 202.0296, 0.2631)]
)
def test_ddpm_full_loop_published_numbers(backend, prediction_type, want_sum, want_mean):
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type=prediction_type,
    )
    sample = _dummy_sample_deter()
    generator = torch.manual_seed(0)  # diffusers' test uses the global CPU generator
    for t in reversed(range(len(scheduler))):
        sample = scheduler.step(_dummy_model(sample, t), t, sample, generator=generator).prev_sample
    assert abs(sample.abs().sum().item() - want_sum) < 1e-2
    assert abs(sample.abs().mean().item() - want_mean) < 1e-3


def test_ddim_full_loop_published_numbers(backend):
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=True
    )
    scheduler.set_timesteps(10)
    sample = _dummy_sample_deter()
    for t in scheduler.timesteps:
        sample = scheduler.step(_dummy_model(sample, t), t, sample, 0.0).prev_sample
    assert abs(sample.abs().sum().item() - 172.0067) < 1e-2
    assert abs(sample.abs().mean().item() - 0.223967) < 1e-3


# -- training helpers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_noise_and_velocity_match_diffusers(name, dtype):
    ours, theirs = _pair(name, beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    noise = torch.randn(SHAPE, generator=g).to(dtype)
    for ts in (torch.tensor([0, 999]), torch.tensor([17, 500], dtype=torch.int32), torch.tensor(321)):
        assert torch.equal(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts))
        assert torch.equal(ours.get_velocity(x, noise, ts), theirs.get_velocity(x, noise, ts))
    with pytest.raises(ValueError, match="timesteps"):
        ours.add_noise(x, noise, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="noise"):
        ours.add_noise(x, noise[:1], torch.tensor([0, 1]))


def test_scale_model_input_is_identity():
    x = torch.randn(SHAPE)
    for cls in (DDPMScheduler, DDIMScheduler):
        assert cls().scale_model_input(x, 3) is x


# -- RNG consumption ----------------------------------------------------------------------------------------


def test_rng_consumption_order(backend):
    model_output, sample = _tensors(0)
    g = torch.Generator().manual_seed(0)
    ddpm = DDPMScheduler()
    state = g.get_state()
    ddpm.step(model_output, 0, sample, generator=g)
    assert torch.equal(g.get_state(), state), "DDPM must not draw at t=0"
    ddpm.step(model_output, 1, sample, generator=g)
    assert not torch.equal(g.get_state(), state), "DDPM draws at t>0"

    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    state = g.get_state()
    ddim.step(model_output, 0, sample, eta=0.0, generator=g)
    ddim.step(model_output, 900, sample, eta=0.0, generator=g)
    assert torch.equal(g.get_state(), state), "DDIM with eta=0 must not draw"
    ddim.step(model_output, 0, sample, eta=0.5, generator=g)
    assert not torch.equal(g.get_state(), state), "DDIM with eta>0 draws at t=0 too"
    state = g.get_state()
    ddim.step(model_output, 900, sample, eta=0.5, variance_noise=torch.zeros(SHAPE))
    assert torch.equal(g.get_state(), state)


def test_generator_lists_match_diffusers(backend):
    ours, theirs = _pair("DDPMScheduler")
    model_output, sample = _tensors(0)
    for make in (
        lambda: [torch.Generator().manual_seed(i) for i in range(SHAPE[0])],
        lambda: [torch.Generator().manual_seed(7)],
    ):
        a = ours.step(model_output, 10, sample, generator=make()).prev_sample
        b = theirs.step(model_output, 10, sample, generator=make()).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- fused path is really used -------------------------------------------------------------------------------


class _CountingOp:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize(
    "name,config,step_kwargs,expect_fused",
    [
        ("DDPMScheduler", {}, {}, True),
        ("DDPMScheduler", {"variance_type": "fixed_large", "prediction_type": "v_prediction"}, {}, True),
        ("DDPMScheduler", {"thresholding": True}, {}, False),
        ("DDPMScheduler", {"variance_type": "learned_range"}, {}, False),
        ("DDIMScheduler", {"prediction_type": "sample"}, {"eta": 0.5, "use_clipped_model_output": True}, True),
        ("DDIMScheduler", {"thresholding": True}, {}, False),
    ],
)
def test_fused_path_selection(monkeypatch, name, config, step_kwargs, expect_fused):
    counter = _CountingOp(ops.scheduler_step)
    monkeypatch.setattr(ops, "scheduler_step", counter)
    sched = getattr(ddpm_fast, name)(**config)
    sched.set_timesteps(4)
    out_channels = 2 * SHAPE[1] if "learned" in config.get("variance_type", "") else None
    model_output, sample = _tensors(0, out_channels=out_channels)
    with ddpm_fast.backend("fused"):
        for t in sched.timesteps:
            sample = sched.step(model_output, t, sample, **step_kwargs).prev_sample
    assert counter.calls == (4 if expect_fused else 0)
    if expect_fused:
        assert len(sched._coef_cache) == 4  # one cached coefficient set per (t, prev_t)
    with ddpm_fast.backend("reference"):
        sched.step(model_output, sched.timesteps[0], sample, **step_kwargs)
    assert counter.calls == (4 if expect_fused else 0)


# -- step API --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_timestep_types_and_outputs(backend, name):
    sched = getattr(ddpm_fast, name)()
    sched.set_timesteps(10)
    model_output, sample = _tensors(0)
    outs = []
    for t in (900, torch.tensor(900), 900.0, np.int64(900), torch.tensor([900])):
        out = sched.step(model_output, t, sample, generator=torch.Generator().manual_seed(0))
        outs.append(out.prev_sample)
    assert all(torch.equal(o, outs[0]) for o in outs)
    out = sched.step(model_output, 900, sample, generator=torch.Generator().manual_seed(0))
    cls = DDPMSchedulerOutput if name == "DDPMScheduler" else DDIMSchedulerOutput
    assert isinstance(out, cls) and isinstance(out, BaseOutput)
    assert out[0] is out.prev_sample and out["pred_original_sample"] is out.pred_original_sample
    assert out.to_tuple() == (out.prev_sample, out.pred_original_sample)
    tup = sched.step(model_output, 900, sample, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2 and torch.equal(tup[0], out.prev_sample)
    restored = pickle.loads(pickle.dumps(out))
    assert torch.equal(restored.prev_sample, out.prev_sample)


def test_base_output_behaviour():
    out = DDPMSchedulerOutput(prev_sample=torch.ones(1))
    assert list(out.keys()) == ["prev_sample"] and out.to_tuple() == (out.prev_sample,)
    with pytest.raises(TypeError):
        out.pop("prev_sample")
    # Like diffusers: setting a field that was None sets the attribute but does not add a dict entry.
    theirs = diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput(prev_sample=torch.ones(1))
    for o in (out, theirs):
        o.pred_original_sample = torch.zeros(1)
    assert list(out.keys()) == list(theirs.keys()) and out.pred_original_sample is not None
    full = DDPMSchedulerOutput(prev_sample=torch.ones(1), pred_original_sample=torch.zeros(1))
    full.prev_sample = torch.full((1,), 2.0)
    assert float(full[0]) == 2.0 and float(full["prev_sample"]) == 2.0


# -- config, loading, saving -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_config_roundtrip_with_diffusers(tmp_path, name):
    config = dict(
        num_train_timesteps=500,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",
        steps_offset=1,
        rescale_betas_zero_snr=True,
    )
    if name == "DDPMScheduler":
        config["variance_type"] = "fixed_large"
    else:
        config["set_alpha_to_one"] = False
    ours, theirs = _pair(name, **config)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name and saved["_diffusers_version"]

    from_ours = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    from_theirs = getattr(ddpm_fast, name).from_pretrained(tmp_path / "theirs")
    init_keys = set(ours.config) - {"_use_default_values", "_class_name", "_diffusers_version"}
    for key in init_keys:
        assert from_ours.config[key] == ours.config[key], key
        assert from_theirs.config[key] == theirs.config[key], key
    assert torch.equal(from_theirs.alphas_cumprod, from_ours.alphas_cumprod)
    # subfolder layout, as inside a pipeline folder
    ours.save_pretrained(tmp_path / "pipe" / "scheduler")
    again = getattr(ddpm_fast, name).from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert {k: again.config[k] for k in init_keys} == {k: ours.config[k] for k in init_keys}
    # keyword overrides and unused kwargs
    over, unused = getattr(ddpm_fast, name).from_pretrained(
        tmp_path / "ours", return_unused_kwargs=True, num_train_timesteps=100, not_a_key=1
    )
    assert over.config.num_train_timesteps == 100 and unused == {"not_a_key": 1}


def test_configs_interchange_between_ddpm_and_ddim(backend):
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", variance_type="fixed_large", steps_offset=1)
    ddim = DDIMScheduler.from_config(ddpm.config)
    theirs = diffusers.DDIMScheduler.from_config(
        diffusers.DDPMScheduler(**{k: v for k, v in ddpm.config.items() if not k.startswith("_")}).config
    )
    for key in ("beta_schedule", "steps_offset", "num_train_timesteps"):
        assert ddim.config[key] == theirs.config[key]
    assert "variance_type" not in ddim.config
    ddim.set_timesteps(8)
    theirs.set_timesteps(8)
    _compare_steps(ddim, theirs, ddim.timesteps.tolist(), {"eta": 0.0})

    back = DDPMScheduler.from_config(ddim.config)
    assert back.config.beta_schedule == "scaled_linear" and "set_alpha_to_one" not in back.config
    assert {c.__name__ for c in ddpm.compatibles} == {"DDPMScheduler", "DDIMScheduler"}
    # a diffusers config object loads directly
    from_diffusers = DDIMScheduler.from_config(diffusers.DDPMScheduler(steps_offset=1).config)
    assert from_diffusers.config.steps_offset == 1


def test_config_is_read_only():
    sched = DDPMScheduler()
    with pytest.raises(TypeError):
        sched.config.num_train_timesteps = 10
    with pytest.raises(TypeError):
        sched.config["num_train_timesteps"] = 10
    assert sched.config.num_train_timesteps == 1000


def test_loading_a_legacy_google_config(tmp_path):
    # google/ddpm-cifar10-32's scheduler_config.json (plus a key from very old diffusers)
    legacy = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": "0.1.1",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "clip_sample": True,
        "num_train_timesteps": 1000,
        "trained_betas": None,
        "variance_type": "fixed_large",
        "tensor_format": "pt",
    }
    (tmp_path / "scheduler_config.json").write_text(json.dumps(legacy))
    for name in ("DDPMScheduler", "DDIMScheduler"):
        ours = getattr(ddpm_fast, name).from_pretrained(tmp_path)
        theirs = getattr(diffusers, name).from_pretrained(tmp_path)
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    with pytest.raises(FileNotFoundError):
        DDPMScheduler.from_pretrained(tmp_path / "missing")


# -- randn_tensor ---------------------------------------------------------------------------------------------------


def test_randn_tensor_matches_diffusers():
    from diffusers.utils.torch_utils import randn_tensor as theirs

    shape = (3, 2, 4, 4)
    for dtype in (torch.float32, torch.float16, torch.float64):
        a = randn_tensor(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        b = theirs(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        assert torch.equal(a, b) and a.dtype == dtype
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    assert torch.equal(randn_tensor(shape, generator=gens()), theirs(shape, generator=gens()))
    one = lambda: [torch.Generator().manual_seed(5)]  # noqa: E731
    assert torch.equal(randn_tensor(shape, generator=one()), theirs(shape, generator=one()))
    torch.manual_seed(3)
    a = randn_tensor(shape, device="cpu")
    torch.manual_seed(3)
    assert torch.equal(a, theirs(shape, device=torch.device("cpu")))
    assert torch.equal(randn_tensor(list(shape), generator=gens()), theirs(shape, generator=gens()))
    with pytest.raises(ValueError, match="generator"):
        randn_tensor(shape, generator=gens()[:2])
    with pytest.raises(TypeError, match="generator"):
        randn_tensor(shape, generator=1234)


# -- bad inputs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,config,match",
    [
        ("DDPMScheduler", {"beta_schedule": "cubic"}, "beta_schedule"),
        ("DDIMScheduler", {"beta_schedule": "sigmoid"}, "beta_schedule"),
        ("DDPMScheduler", {"variance_type": "huge"}, "variance_type"),
        ("DDPMScheduler", {"prediction_type": "noise"}, "prediction_type"),
        ("DDIMScheduler", {"prediction_type": "noise"}, "prediction_type"),
        ("DDPMScheduler", {"timestep_spacing": "even"}, "timestep_spacing"),
        ("DDIMScheduler", {"timestep_spacing": "even"}, "timestep_spacing"),
        ("DDPMScheduler", {"num_train_timesteps": 0}, "num_train_timesteps"),
        ("DDPMScheduler", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ("DDIMScheduler", {"num_train_timesteps": 3, "trained_betas": [0.1, 2.0, 0.3]}, "trained_betas"),
        ("DDPMScheduler", {"steps_offset": -1}, "steps_offset"),
        ("DDPMScheduler", {"clip_sample_range": 0.0}, "clip_sample_range"),
        ("DDIMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ],
)
def test_bad_config(name, config, match):
    with pytest.raises(ValueError, match=match):
        getattr(ddpm_fast, name)(**config)


def test_unknown_beta_schedule_is_also_not_implemented_error():
    with pytest.raises(NotImplementedError):  # what diffusers raises, for code that catches it
        DDPMScheduler(beta_schedule="cubic")


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize(
    "value,exc",
    [(0, ValueError), (1001, ValueError), (-3, ValueError), (2.5, ValueError), ("10", TypeError), (True, TypeError)],
)
def test_bad_num_inference_steps(name, value, exc):
    with pytest.raises(exc, match="num_inference_steps"):
        getattr(ddpm_fast, name)().set_timesteps(value)


def test_steps_offset_past_the_table():
    with pytest.raises(ValueError, match="steps_offset"):
        DDIMScheduler(steps_offset=1).set_timesteps(1000)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"timesteps": [10, 20]}, "descending"),
        ({"timesteps": [500, 500, 3]}, "descending"),
        ({"timesteps": [1000, 3]}, "train_timesteps"),
        ({"timesteps": [5, -1]}, "timesteps"),
        ({"timesteps": []}, "timesteps"),
        ({"timesteps": [9.5, 3]}, "timesteps"),
        ({"timesteps": [9, 3], "num_inference_steps": 2}, "num_inference_steps"),
        ({}, "num_inference_steps"),
    ],
)
def test_bad_custom_timesteps(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDPMScheduler().set_timesteps(**kwargs)


def test_bad_step_arguments():
    model_output, sample = _tensors(0)
    ddpm = DDPMScheduler()
    with pytest.raises(ValueError, match="timestep"):
        ddpm.step(model_output, 1000, sample)
    with pytest.raises(ValueError, match="timestep"):
        ddpm.step(model_output, -1, sample)
    with pytest.raises(ValueError, match="timestep"):
        ddpm.step(model_output, 10.5, sample)
    with pytest.raises(TypeError, match="timestep"):
        ddpm.step(model_output, "10", sample)
    with pytest.raises(ValueError, match="model_output"):
        ddpm.step(model_output[:, :2], 10, sample)
    with pytest.raises(TypeError, match="model_output"):
        ddpm.step(model_output.numpy(), 10, sample)
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 901"):
        ddpm.step(model_output, 901, sample)
    with pytest.raises(ValueError, match="twice the channels"):
        DDPMScheduler(variance_type="learned").step(model_output, 10, sample)

    ddim = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(model_output, 10, sample)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="eta"):
        ddim.step(model_output, 900, sample, eta=-0.1)
    with pytest.raises(ValueError, match="variance_noise"):
        ddim.step(model_output, 900, sample, eta=0.5, generator=torch.Generator(), variance_noise=torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="variance_noise"):
        ddim.step(model_output, 900, sample, eta=0.5, variance_noise=torch.zeros(1, 3))


# -- CUDA (runs only where a GPU is present) --------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_cuda_step_matches_cpu_diffusers(backend, name):
    ours, theirs = _pair(name)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    kwargs = {"eta": 0.5} if name == "DDIMScheduler" else {}
    model_output, sample = _tensors(0)
    x_ours, x_theirs = sample.cuda(), sample
    g_ours, g_theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)  # CPU generators
    for t in ours.timesteps:
        a = ours.step(model_output.cuda(), t, x_ours, generator=g_ours, **kwargs)
        b = theirs.step(model_output, t, x_theirs, generator=g_theirs, **kwargs)
        assert a.prev_sample.is_cuda
        torch.testing.assert_close(a.prev_sample.cpu(), b.prev_sample, rtol=1e-5, atol=1e-5)
        x_ours, x_theirs = a.prev_sample, b.prev_sample
    # the timestep table may live on the GPU too
    ours.set_timesteps(10, device="cuda")
    ours.step(model_output.cuda(), ours.timesteps[0], sample.cuda(), generator=torch.Generator("cuda"), **kwargs)
