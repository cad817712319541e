"""Checkpoint I/O against diffusers 0.42.1: files written by either library load in the other with equal
outputs; legacy attention names; fp16 variants; sharded safetensors; use_safetensors rules; refused pickles;
and clear errors for missing/unexpected/mis-shaped keys, truncated files and bad paths."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from ddpm_fast import checkpoints
from ddpm_fast.checkpoints import CheckpointError
from ddpm_fast.models import UNet2DModel

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=None,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


@pytest.fixture(scope="module")
def ref_model():
    """diffusers model with every tensor perturbed (all non-zero)."""
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**CONFIG).eval()
    gen = torch.Generator().manual_seed(1)
    model.load_state_dict({k: v + torch.randn(v.shape, generator=gen) * 0.02 for k, v in model.state_dict().items()})
    return model


def inputs():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([3, 900])


def out(model, dtype=torch.float32):
    sample, t = inputs()
    with torch.no_grad():
        return model(sample.to(dtype), t).sample.float()


def assert_same_outputs(a, b, tol=1e-5):
    err = (out(a) - out(b)).abs().max().item()
    assert err < tol, err


def write_config(folder: pathlib.Path, model) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **dict(model.config)}, default=list))


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_diffusers_checkpoint_loads_here(tmp_path, ref_model, safe):
    ref_model.save_pretrained(tmp_path, safe_serialization=safe)
    ours = UNet2DModel.from_pretrained(tmp_path)
    assert not ours.training and ours.dtype == torch.float32
    assert ours.config._name_or_path == os.fspath(tmp_path)
    assert_same_outputs(ours, ref_model)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_our_checkpoint_loads_in_diffusers(tmp_path, ref_model, safe):
    ours = UNet2DModel(**CONFIG)
    ours.load_state_dict(ref_model.state_dict())
    ours.save_pretrained(tmp_path, safe_serialization=safe)
    expected = "diffusion_pytorch_model.safetensors" if safe else "diffusion_pytorch_model.bin"
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", expected])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel" and config["block_out_channels"] == [32, 64]
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path)
    assert_same_outputs(loaded, ref_model)
    assert_same_outputs(UNet2DModel.from_pretrained(tmp_path), ref_model)


def test_subfolder_and_config_override(tmp_path, ref_model):
    ref_model.save_pretrained(tmp_path / "unet")
    ours = UNet2DModel.from_pretrained(tmp_path, subfolder="unet", sample_size=16)
    assert ours.config.sample_size == 16
    assert_same_outputs(ours, ref_model)


def test_fp16_variant(tmp_path, ref_model):
    half = diffusers.UNet2DModel.from_config(ref_model.config)
    half.load_state_dict(ref_model.state_dict())
    half.half().save_pretrained(tmp_path, variant="fp16")
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.fp16.safetensors")

    ours16 = UNet2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    ref16 = diffusers.UNet2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert ours16.dtype == ref16.dtype == torch.float16
    for (k, a), (_, b) in zip(ours16.state_dict().items(), ref16.state_dict().items()):
        assert torch.equal(a, b), k
    # Without torch_dtype the weights are upcast to float32, as diffusers does.
    ours32 = UNet2DModel.from_pretrained(tmp_path, variant="fp16")
    ref32 = diffusers.UNet2DModel.from_pretrained(tmp_path, variant="fp16")
    assert ours32.dtype == ref32.dtype == torch.float32
    assert_same_outputs(ours32, ref32)
    with pytest.raises(FileNotFoundError, match="variant"):
        UNet2DModel.from_pretrained(tmp_path, variant="ema")


def test_our_fp16_variant_loads_in_diffusers(tmp_path, ref_model):
    ours = UNet2DModel(**CONFIG)
    ours.load_state_dict(ref_model.state_dict())
    ours.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_torch_dtype_bfloat16(tmp_path, ref_model):
    ref_model.save_pretrained(tmp_path)
    ours = UNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.device == torch.device("cpu")
    err = (out(ours, torch.bfloat16) - out(ref_model)).abs().max().item()
    assert err < 0.1
    with pytest.raises(ValueError, match="torch_dtype"):
        UNet2DModel.from_pretrained(tmp_path, torch_dtype="half-ish")


def test_sharded_safetensors(tmp_path, ref_model):
    ref_model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    assert_same_outputs(UNet2DModel.from_pretrained(tmp_path), ref_model)


def legacy_state_dict(model) -> dict:
    """The state dict with the old attention names the original google checkpoints use."""
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    result = {}
    for k, v in model.state_dict().items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in k or f".attentions.1.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        result[k] = v
    return result


def test_flat_legacy_bin_with_old_attention_names(tmp_path, ref_model):
    state = legacy_state_dict(ref_model)
    assert any(".query.weight" in k for k in state) and any(".proj_attn.bias" in k for k in state)
    write_config(tmp_path, ref_model)
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    ours = UNet2DModel.from_pretrained(tmp_path)
    assert_same_outputs(ours, ref_model)
    assert_same_outputs(ours, diffusers.UNet2DModel.from_pretrained(tmp_path))


# -- which file is read --------------------------------------------------------------------------


def test_use_safetensors_choice(tmp_path, ref_model):
    write_config(tmp_path, ref_model)
    state = ref_model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save({k: v + 1 for k, v in state.items()}, tmp_path / "diffusion_pytorch_model.bin")
    key = "conv_out.bias"
    default = UNet2DModel.from_pretrained(tmp_path)
    safe = UNet2DModel.from_pretrained(tmp_path, use_safetensors=True)
    pickle_only = UNet2DModel.from_pretrained(tmp_path, use_safetensors=False)
    assert torch.equal(default.state_dict()[key], state[key])
    assert torch.equal(safe.state_dict()[key], state[key])
    assert torch.equal(pickle_only.state_dict()[key], state[key] + 1)

    os.remove(tmp_path / "diffusion_pytorch_model.safetensors")
    assert torch.equal(UNet2DModel.from_pretrained(tmp_path).state_dict()[key], state[key] + 1)
    with pytest.raises(FileNotFoundError, match="use_safetensors=True"):
        UNet2DModel.from_pretrained(tmp_path, use_safetensors=True)


# -- refused and broken files ------------------------------------------------------------------------


class _TouchOnUnpickle:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, ref_model):
    write_config(tmp_path, ref_model)
    marker = tmp_path / "pwned"
    state = dict(ref_model.state_dict())
    state["conv_out.bias"] = _TouchOnUnpickle(str(marker))
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")

    with pytest.raises(CheckpointError, match="refusing to load.*diffusion_pytorch_model.bin"):
        UNet2DModel.from_pretrained(tmp_path)
    assert not marker.exists()

    # The payload is live: an unrestricted unpickler does run it (so the check above can fail).
    torch.load(tmp_path / "diffusion_pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_non_state_dict_pickle(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="state dict"):
        checkpoints.load_state_dict(tmp_path / "x.bin")


def _saved_state(tmp_path, ref_model, mutate):
    write_config(tmp_path, ref_model)
    state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    mutate(state)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path, ref_model):
    def mutate(state):
        del state["conv_in.bias"]
        state["extra.weight"] = torch.zeros(1)
        state["conv_out.weight"] = torch.zeros(3, 32, 1, 1)

    _saved_state(tmp_path, ref_model, mutate)
    with pytest.raises(CheckpointError) as info:
        UNet2DModel.from_pretrained(tmp_path)
    msg = str(info.value)
    for part in (
        "1 missing key(s): conv_in.bias",
        "1 unexpected key(s): extra.weight",
        "conv_out.weight: checkpoint (3, 32, 1, 1) vs model (3, 32, 3, 3)",
        "diffusion_pytorch_model.safetensors",
    ):
        assert part in msg, msg


def test_config_that_does_not_match_weights(tmp_path, ref_model):
    ref_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_out_channels"] = [32, 32]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json belong.*mis-shaped"):
        UNet2DModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_truncated_file(tmp_path, ref_model, safe):
    ref_model.save_pretrained(tmp_path, safe_serialization=safe)
    name = "diffusion_pytorch_model.safetensors" if safe else "diffusion_pytorch_model.bin"
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=name):
        UNet2DModel.from_pretrained(tmp_path)


def test_missing_paths_and_files(tmp_path, ref_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UNet2DModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet2DModel.from_pretrained(tmp_path)
    write_config(tmp_path, ref_model)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors.*diffusion_pytorch_model.bin"):
        UNet2DModel.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="not_an_option"):
        UNet2DModel.from_pretrained(tmp_path, not_an_option=1)


def test_unknown_hub_id_offline(monkeypatch):
    pytest.importorskip("huggingface_hub")
    with pytest.raises(OSError, match="no-such-org/no-such-unet"):
        UNet2DModel.from_pretrained("no-such-org/no-such-unet", local_files_only=True)


def test_legacy_key_fix_only_touches_attention_blocks():
    state = {"a.query.weight": torch.zeros(1), "b.query.weight": torch.zeros(1), "a.proj_attn.bias": torch.zeros(1)}
    checkpoints.fix_legacy_attention_keys(state, ["a"])
    assert sorted(state) == ["a.to_out.0.bias", "a.to_q.weight", "b.query.weight"]
