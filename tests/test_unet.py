"""UNet2DModel against diffusers 0.42.1 (the oracle): same state-dict keys, outputs within 1e-4 on perturbed
(all non-zero) weights, on both backends, over a grid of tiny configs covering every block and embedding type."""

from __future__ import annotations

import pytest
import torch

import ddpm_fast
from ddpm_fast import fast_path, ops
from ddpm_fast.models import UNet2DModel, UNet2DOutput
from ddpm_fast.models.unet_2d_blocks import get_down_block, get_mid_block, get_up_block

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4

BASE = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)

SKIP = dict(
    BASE,
    down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
    up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
)

# name -> (config overrides, input (H, W), forward kwargs builder)
CASES = {
    "default_blocks": dict(),
    "ddpm_cifar_like": dict(
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        attention_head_dim=None,
        norm_eps=1e-6,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    "resnet_blocks": dict(
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        layers_per_block=2,
    ),
    "attn_resnet_resample": dict(
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
    ),
    "skip_blocks_fourier": dict(SKIP, time_embedding_type="fourier", flip_sin_to_cos=True),
    "skip_blocks_3_levels": dict(
        SKIP,
        block_out_channels=(32, 64, 64),
        sample_size=16,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
    ),
    "learned_time": dict(time_embedding_type="learned", num_train_timesteps=100),
    "class_embeds": dict(num_class_embeds=10),
    "class_timestep": dict(class_embed_type="timestep"),
    "class_identity": dict(class_embed_type="identity"),
    "scale_shift": dict(resnet_time_scale_shift="scale_shift"),
    "scale_shift_attn_groups": dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4),
    "head_dim_none": dict(attention_head_dim=None),
    "head_dim_16": dict(attention_head_dim=16),
    "head_dim_12_not_divisor": dict(attention_head_dim=12),
    "non_square": dict(sample_size=(16, 8)),
    "no_mid_block": dict(mid_block_type=None),
    "no_mid_attention": dict(add_attention=False),
    "gelu_centered_embdim": dict(
        act_fn="gelu",
        center_input_sample=True,
        time_embedding_dim=48,
        in_channels=4,
        out_channels=2,
        mid_block_scale_factor=1.5,
    ),
}


def perturbed_pair(config: dict, seed: int = 0):
    """diffusers' randomly initialised model, every tensor perturbed by randn*0.02 (so nothing is zero),
    loaded strictly into both libraries."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    state = {k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.02 for k, v in ref.state_dict().items()}
    assert all(bool((v != 0).all()) for v in state.values())
    ref.load_state_dict(state, strict=True)
    ours = UNet2DModel(**config).eval()
    ours.load_state_dict(state, strict=True)
    return ref, ours


def make_inputs(config: dict, batch: int = 2, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    size = config.get("sample_size", 16)
    h, w = (size, size) if isinstance(size, int) else size
    sample = torch.randn(batch, config.get("in_channels", 3), h, w, generator=gen)
    kwargs = {}
    if config.get("time_embedding_type") == "fourier":
        timestep = torch.tensor([0.7, 3.0])[:batch]  # noise levels (log is taken), output divides by them
    elif config.get("time_embedding_type") == "learned":
        timestep = torch.tensor([5, 97])[:batch]
    else:
        timestep = torch.tensor([10, 999])[:batch]
    if config.get("num_class_embeds") is not None and config.get("class_embed_type") is None:
        kwargs["class_labels"] = torch.tensor([1, 7])[:batch]
    elif config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([3, 500])[:batch]
    elif config.get("class_embed_type") == "identity":
        dim = config.get("time_embedding_dim") or config["block_out_channels"][0] * 4
        kwargs["class_labels"] = torch.randn(batch, dim, generator=gen)
    return sample, timestep, kwargs


@pytest.fixture(scope="module")
def pairs():
    cache = {}

    def get(name):
        if name not in cache:
            config = dict(BASE, **CASES[name])
            cache[name] = (config, *perturbed_pair(config))
        return cache[name]

    return get


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(pairs, name, backend):
    config, ref, ours = pairs(name)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    sample, timestep, kwargs = make_inputs(config)
    with torch.no_grad():
        expected = ref(sample, timestep, **kwargs).sample
        with ddpm_fast.backend(backend):
            got = ours(sample, timestep, **kwargs).sample
    assert got.shape == expected.shape
    assert torch.isfinite(expected).all()
    err = (got - expected).abs().max().item()
    assert err < TOL, f"{name}/{backend}: max abs error {err:.3g}"


def test_config_matches_diffusers(pairs):
    config, ref, ours = pairs("ddpm_cifar_like")
    for key, value in ref.config.items():
        if key.startswith("_"):
            continue
        ours_value = ours.config[key]
        assert (list(ours_value) if isinstance(ours_value, tuple) else ours_value) == (
            list(value) if isinstance(value, tuple) else value
        ), key
    assert ours.num_parameters() == ref.num_parameters()
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")


@pytest.mark.parametrize(
    "timestep",
    [7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 7]), torch.tensor(7.0)],
    ids=["int", "float", "0d", "1d_len1", "1d_batch", "0d_float"],
)
def test_timestep_forms(pairs, timestep):
    config, ref, ours = pairs("default_blocks")
    sample, _, _ = make_inputs(config)
    with torch.no_grad():
        expected = ref(sample, timestep).sample
        got = ours(sample, timestep).sample
    assert (got - expected).abs().max().item() < TOL


def test_return_dict_and_tuple(pairs):
    config, _, ours = pairs("default_blocks")
    sample, timestep, _ = make_inputs(config)
    with torch.no_grad():
        out = ours(sample, timestep)
        tup = ours(sample, timestep, return_dict=False)
    assert isinstance(out, UNet2DOutput) and isinstance(tup, tuple) and len(tup) == 1
    torch.testing.assert_close(out[0], tup[0])
    torch.testing.assert_close(out["sample"], out.sample)


def test_fused_path_calls_fused_ops(pairs, monkeypatch):
    """In fused mode the resnets/attention/output norm go through ops.group_norm_silu and ops.attention."""
    config, _, ours = pairs("default_blocks")
    calls = {"gns": 0, "gns_temb": 0, "attn": 0}
    real_gns, real_attn = ops.group_norm_silu, ops.attention

    def gns(*args, **kwargs):
        calls["gns"] += 1
        calls["gns_temb"] += kwargs.get("temb") is not None
        return real_gns(*args, **kwargs)

    def attn(*args, **kwargs):
        calls["attn"] += 1
        return real_attn(*args, **kwargs)

    monkeypatch.setattr(ops, "group_norm_silu", gns)
    monkeypatch.setattr(ops, "attention", attn)
    sample, timestep, _ = make_inputs(config)
    n_resnets = sum(1 for m in ours.modules() if type(m).__name__ == "ResnetBlock2D")
    n_attn = sum(1 for m in ours.modules() if type(m).__name__ == "Attention")
    with torch.no_grad(), ddpm_fast.backend("fused"), fast_path.cpu_plans(False):  # a plan replay would skip ops.*
        ours(sample, timestep)
    assert calls["gns_temb"] == n_resnets
    assert calls["attn"] == n_attn
    assert calls["gns"] == 2 * n_resnets + n_attn + 1  # + conv_norm_out
    calls.update(gns=0, gns_temb=0, attn=0)
    with torch.no_grad(), ddpm_fast.backend("reference"):
        ours(sample, timestep)
    assert calls == {"gns": 0, "gns_temb": 0, "attn": 0}


def test_grad_enabled_uses_reference_and_trains(pairs, monkeypatch):
    config, ref, ours = pairs("default_blocks")
    sample, timestep, _ = make_inputs(config)
    monkeypatch.setattr(ops, "group_norm_silu", lambda *a, **k: pytest.fail("fused op used while training"))
    with ddpm_fast.backend("fused"):
        out = ours(sample, timestep).sample
    out.square().mean().backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    with torch.no_grad():
        expected = ref(sample, timestep).sample
    assert (out.detach() - expected).abs().max().item() < TOL
    ours.zero_grad(set_to_none=True)


def test_half_precision_forward(pairs):
    config, ref, ours = pairs("default_blocks")
    sample, timestep, _ = make_inputs(config)
    model = UNet2DModel(**config).eval()
    model.load_state_dict(ours.state_dict())
    model = model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(sample.to(torch.bfloat16), timestep).sample.float()
        expected = ref(sample, timestep).sample
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(down_block_types=("DownBlock2D", "NopeBlock2D")), "down_block_type 'NopeBlock2D'"),
        (dict(up_block_types=("AttnUpBlock2D", "NopeUp")), "up_block_type 'NopeUp'"),
        (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
        (dict(time_embedding_type="rotary"), "time_embedding_type"),
        (dict(time_embedding_type="learned"), "num_train_timesteps"),
        (dict(class_embed_type="projection"), "class_embed_type"),
        (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
        (dict(downsample_type="pool"), "downsample_type"),
        (dict(upsample_type="pool"), "upsample_type"),
        (dict(act_fn="tanhh"), "act_fn"),
        (dict(block_out_channels=(32, 64, 64)), "block_out_channels"),
        (dict(up_block_types=("UpBlock2D",)), "up_block_types"),
        (dict(norm_num_groups=7), "groups"),
        (dict(attention_head_dim=128), "attention_head_dim"),
        (dict(SKIP, in_channels=4), "in_channels"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet2DModel(**dict(BASE, **overrides))


def test_factories_name_unknown_types():
    with pytest.raises(ValueError, match="Foo"):
        get_down_block("Foo", 1, 32, 32, 128, True, 1e-5, "silu", resnet_groups=8)
    with pytest.raises(ValueError, match="Bar"):
        get_up_block("Bar", 1, 32, 32, 32, 128, True, 1e-5, "silu", resnet_groups=8)
    with pytest.raises(ValueError, match="Baz"):
        get_mid_block("Baz", 128, 32, 1e-5, "silu", 8)
    assert get_mid_block(None, 128, 32, 1e-5, "silu", 8) is None
    assert (
        type(get_down_block("UNetResDownBlock2D", 1, 32, 32, 128, True, 1e-5, "silu", resnet_groups=8)).__name__
        == "DownBlock2D"
    )


def test_bad_forward_inputs(pairs):
    config, _, ours = pairs("default_blocks")
    sample, timestep, _ = make_inputs(config)
    with torch.no_grad():
        with pytest.raises(ValueError, match="in_channels"):
            ours(torch.randn(1, 4, 16, 16), 1)
        with pytest.raises(ValueError, match="sample"):
            ours(torch.randn(3, 16, 16), 1)
        with pytest.raises(ValueError, match="multiples of 2"):
            ours(torch.randn(1, 3, 15, 16), 1)
        with pytest.raises(ValueError, match="timestep"):
            ours(sample, torch.tensor([1, 2, 3]))
        with pytest.raises(TypeError, match="timestep"):
            ours(sample, "10")
        with pytest.raises(ValueError, match="class_labels"):
            ours(sample, timestep, class_labels=torch.tensor([1, 2]))
    _, _, conditioned = pairs("class_embeds")
    with torch.no_grad(), pytest.raises(ValueError, match="class_labels"):
        conditioned(sample, timestep)


CIFAR10_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=None,
    block_out_channels=[128, 256, 256, 256],
    center_input_sample=False,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    in_channels=3,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-06,
    norm_num_groups=32,
    out_channels=3,
    sample_size=32,
    time_embedding_type="positional",
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)
DDPM_256_CONFIG = dict(
    CIFAR10_CONFIG,
    block_out_channels=[128, 128, 256, 256, 512, 512],
    sample_size=256,
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
)


@pytest.mark.parametrize(
    "config, n_params",
    [(CIFAR10_CONFIG, 35_746_307), (DDPM_256_CONFIG, 113_673_219)],
    ids=["ddpm-cifar10-32", "ddpm-256"],
)
def test_real_checkpoint_architectures(config, n_params):
    """The google/ddpm-* architectures: same keys and shapes as diffusers, published parameter counts
    (built on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        ours = UNet2DModel(**config)
        ref = diffusers.UNet2DModel(**config)
    assert ours.num_parameters() == n_params
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
