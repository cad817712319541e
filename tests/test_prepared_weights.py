"""Prepared weights (Winograd transforms, packed oneDNN, packed QKV) always follow the model's parameters, however
they change; raw ops given a meta tensor among CPU tensors refuse instead of returning garbage.

Each mutation case runs the fused UNet once (preparing every copy), changes the parameters one way, and compares
the fused output with the reference backend's on the changed model (fused tolerance). Each case can fail: with
the copies left stale, the outputs differ by far more than the tolerance (checked by the first test).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ddpm_fast
from ddpm_fast import _native, fast_path, ops
from ddpm_fast.models import prepared

# 64 channels and batch 4: the 16x16 level runs Winograd F(4x4), the 8x8 level F(2x2), the rest packed oneDNN,
# and the attention at 8x8 its packed QKV, so every kind of prepared copy is exercised.
CONFIG = {
    "block_out_channels": [64, 64], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "sample_size": 16,
    "norm_num_groups": 8, "attention_head_dim": None,
}
TOL = 1e-4


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return ddpm_fast.UNet2DModel(**CONFIG).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=g), torch.tensor([321])


def _fused(model, x, t):
    with torch.no_grad():
        return model(x, t).sample


def _reference(model, x, t):
    with torch.no_grad(), ddpm_fast.backend("reference"):
        return model(x, t).sample


def _conv_paths(model, x, t) -> set[str]:
    with torch.no_grad(), fast_path.record_paths() as paths:
        model(x, t)
    return {key for key in paths if key.startswith("conv:")}


def _winograd_conv(model):
    return model.down_blocks[0].resnets[0].conv1  # 64 -> 64 at 16x16: F(4x4) at batch 4


def _packed_conv(model):
    return model.conv_in  # 3 input channels: packed oneDNN


def _attention(model):
    return model.down_blocks[1].attentions[0]


def test_every_kind_of_prepared_copy_is_exercised_and_staleness_would_show():
    model = _model()
    x, t = _inputs()
    if _native.available():
        assert {"conv:winograd4", "conv:winograd2", "conv:packed"} <= _conv_paths(model, x, t)
    before = _fused(model, x, t)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)  # with the copies kept, the output would stay `before`
    assert (_reference(model, x, t) - before).abs().max() > 100 * TOL


def _edit_data_in_place(model):
    for layer in (_winograd_conv(model), _packed_conv(model), _attention(model).to_k):
        layer.weight.data.mul_(0.5)
        layer.bias.data.add_(0.25)


def _copy_through_data(model):
    # what diffusers' EMAModel.copy_to and most weight-surgery code do
    donor = _model(seed=5)
    for mine, theirs in zip(model.parameters(), donor.parameters()):
        mine.data.copy_(theirs.data)


def _diffusers_ema_copy_to(model):
    training_utils = pytest.importorskip("diffusers.training_utils")
    ema = training_utils.EMAModel(_model(seed=6).parameters(), decay=0.9)
    ema.copy_to(model.parameters())


def _load_state_dict_copy(model):
    model.load_state_dict(_model(seed=7).state_dict())


def _load_state_dict_assign(model):
    model.load_state_dict(_model(seed=8).state_dict(), assign=True)
    _edit_data_in_place(model)  # and the new (untracked until now) parameters are followed too


def _to_and_back(model):
    model.to(torch.float64)
    with torch.no_grad():
        _winograd_conv(model).weight.mul_(-1.0)
    model.to(torch.float32)


def _requires_grad_and_optimizer_step(model):
    model.requires_grad_(True)
    x, t = _inputs()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x, t).sample.square().mean().backward()  # autograd: the reference path
    opt.step()
    model.requires_grad_(False)


def _replace_parameter_objects(model):
    conv = _winograd_conv(model)
    conv.weight = nn.Parameter(conv.weight.detach() * 2)
    _attention(model).to_v.bias.data = torch.randn(64)


def _weight_norm(model):
    torch.nn.utils.parametrizations.weight_norm(_winograd_conv(model))
    with torch.no_grad():
        _winograd_conv(model).parametrizations.weight.original0.mul_(3.0)


def _inference_mode_edit(model):
    with torch.inference_mode():
        _winograd_conv(model).weight.mul_(0.25)  # normal parameters: the version counter still moves


MUTATIONS = [
    _edit_data_in_place, _copy_through_data, _diffusers_ema_copy_to, _load_state_dict_copy, _load_state_dict_assign,
    _to_and_back, _requires_grad_and_optimizer_step, _replace_parameter_objects, _weight_norm, _inference_mode_edit,
]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda f: f.__name__.strip("_"))
def test_prepared_weights_follow_the_parameters(mutate):
    model = _model()
    x, t = _inputs()
    _fused(model, x, t)  # prepares every copy
    mutate(model)
    expected = _reference(model, x, t)
    torch.testing.assert_close(_fused(model, x, t), expected, rtol=TOL, atol=TOL)
    torch.testing.assert_close(_fused(model, x, t), expected, rtol=TOL, atol=TOL)  # and stays right when cached


def test_unchanged_parameters_are_prepared_once():
    model = _model()
    x, t = _inputs()
    _fused(model, x, t)
    with torch.no_grad(), fast_path.record_paths() as paths:
        model(x, t)
        model(x, t)
    assert not [key for key in paths if key.startswith("prepare:")]
    _winograd_conv(model).weight.data.zero_()
    with torch.no_grad(), fast_path.record_paths() as paths:
        model(x, t)
    if _native.available():
        assert paths["prepare:winograd4"] == 1 and sum(v for k, v in paths.items() if k.startswith("prepare:")) == 1


def test_a_copy_of_the_model_prepares_its_own_weights():
    model = _model()
    x, t = _inputs()
    _fused(model, x, t)
    twin = copy.deepcopy(model)
    _winograd_conv(twin).weight.data.mul_(2.0)
    torch.testing.assert_close(_fused(twin, x, t), _reference(twin, x, t), rtol=TOL, atol=TOL)
    torch.testing.assert_close(_fused(model, x, t), _reference(model, x, t), rtol=TOL, atol=TOL)


def test_parameters_made_inside_inference_mode_are_not_prepared():
    with torch.inference_mode():
        model = _model()  # built there directly: inference tensors, no version counter
        x, t = _inputs()
        with pytest.warns(RuntimeWarning, match="inference_mode"):
            first = model(x, t).sample
        assert _conv_paths(model, x, t) == {"conv:plain"}
        _winograd_conv(model).weight.mul_(0.5)
        second = model(x, t).sample
        with ddpm_fast.backend("reference"):
            expected = model(x, t).sample
    torch.testing.assert_close(second, expected, rtol=TOL, atol=TOL)
    assert (second - first).abs().max() > 100 * TOL


def test_module_signature_sees_every_change():
    model = _model()
    base = prepared.module_signature(model)
    assert prepared.module_signature(model) == base
    _attention(model).to_q.weight.data.add_(1.0)
    changed = prepared.module_signature(model)
    assert changed != base
    with torch.no_grad():
        model.conv_out.bias.zero_()
    assert prepared.module_signature(model) != changed


# ---------------------------------------------------------------------------------------------- mixed devices

_native_only = pytest.mark.skipif(not _native.available(), reason="native extension unavailable")


def _raw_calls_with_one_meta_tensor():
    x = torch.randn(2, 8, 4, 4)
    meta = lambda t: t.to("meta")  # noqa: E731
    op = torch.ops.ddpm_fast
    u = ops.winograd_weight(torch.randn(8, 8, 3, 3))
    return [
        ("group_norm_silu", "weight", lambda: op.group_norm_silu(x, 4, meta(torch.randn(8)), None, 1e-5, None, True)),
        ("group_norm_silu", "temb", lambda: op.group_norm_silu(x, 4, None, None, 1e-5, meta(torch.randn(2, 8)), True)),
        ("attention", "k", lambda: op.attention(x, meta(x), x, None)),
        ("scheduler_step", "noise", lambda: op.scheduler_step(x, x, meta(x), 1, 1, 1, 1, 1, 1, None)),
        ("conv3x3_winograd", "bias", lambda: op.conv3x3_winograd(x, u, meta(torch.randn(8)), None, False, 1.0)),
    ]


@_native_only
@pytest.mark.parametrize("case", range(5))
def test_raw_op_with_a_meta_tensor_among_cpu_tensors_raises(case):
    name, arg, call = _raw_calls_with_one_meta_tensor()[case]
    with pytest.raises(RuntimeError, match=rf"{name}: .*{arg} is on meta.*one device"):
        call()


@_native_only
def test_wrappers_raise_argument_errors_for_mixed_devices():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ops.ArgumentError, match="weight is on meta"):
        ops.group_norm_silu(x, 4, torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="v is on meta"):
        ops.attention(x, x, x.to("meta"))


def test_all_meta_inputs_still_trace():
    x = torch.randn(2, 8, 4, 4, device="meta")
    y = ops.group_norm_silu(x, 4, torch.randn(8, device="meta"))
    assert y.device.type == "meta" and y.shape == x.shape
