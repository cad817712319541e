"""Fault injection: bad files, interrupted runs, clobbered files, impossible schedules, weights changed behind the
fast path's back, and tensors on mixed devices.

Each case breaks one thing the way a user, a crash or a hostile model folder would, then checks the specific
error class and that the message names the file and the field (or the argument), or that the result is still
right. Every case fails on code that accepts the fault silently or reports it without naming its cause. Tiny
models and 2-3 steps keep the module at a few seconds.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ddpm_fast
from ddpm_fast import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    UNet2DModel,
    _native,
    fast_path,
    ops,
)
from ddpm_fast.checkpoints import CheckpointError, load_sharded_safetensors
from ddpm_fast.cli import main
from ddpm_fast.models import prepared
from ddpm_fast.sampling import write_npz, write_png_atomic

INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")
SAMPLE = ["--steps", 2, "--device", "cpu", "--threads", 1, "--quiet"]


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    assert err.startswith("ddpm-fast: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny 1-channel 8x8 pipeline (with attention) and a 20-step DDPM scheduler."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    folder = tmp_path_factory.mktemp("model") / "pipe"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(folder)
    return folder


@pytest.fixture
def pipe_copy(model, tmp_path) -> Path:
    folder = tmp_path / "pipe"
    shutil.copytree(model, folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def names(path: Path, *fields: str) -> str:
    """A regex that matches a message naming ``path`` and every field, in that order."""
    return re.escape(str(path)) + "".join(f".*{re.escape(repr(f))}" for f in fields)


# -- config.json / scheduler_config.json ------------------------------------------------------------------------

UNET_FIELDS = [
    ("block_out_channels", [-8, 16], "must be positive"),
    ("block_out_channels", [], "must not be empty"),
    ("in_channels", -1, "must be positive"),
    ("out_channels", 0, "must be positive"),
    ("in_channels", "1", "must be an integer"),
    ("sample_size", [8], "must be an integer, a list of 2 integers or null"),
    ("sample_size", -8, "must be positive"),
    ("norm_num_groups", True, "must be an integer"),
    ("attention_head_dim", 2.5, "must be an integer or null"),
    ("attention_head_dim", 0, "must be positive"),
    ("down_block_types", "DownBlock2D", "must be a list of strings"),
    ("up_block_types", 5, "must be a list of strings"),
    ("layers_per_block", None, "must be an integer"),
    ("dropout", 2, "must be in [0, 1]"),
    ("norm_eps", float("nan"), "must be finite"),
    ("center_input_sample", "false", "must be true or false"),  # a non-empty string is truthy: silently on
    ("flip_sin_to_cos", 1, "must be true or false"),
    ("mid_block_scale_factor", 0, "must be > 0"),
    ("num_class_embeds", -1, "must be positive"),
    ("downsample_padding", -1, "must be >= 0"),
    ("act_fn", None, "must be a string"),
]


@pytest.mark.parametrize("field,value,problem", UNET_FIELDS, ids=[f"{f}={json.dumps(v)}" for f, v, _ in UNET_FIELDS])
def test_unet_config_field_named(pipe_copy, field, value, problem):
    config = pipe_copy / "unet" / "config.json"
    edit_json(config, **{field: value})
    with pytest.raises(ValueError, match=names(config, field) + ".*" + re.escape(problem)):
        DDPMPipeline.from_pretrained(pipe_copy)


SCHEDULER_FIELDS = [
    ("num_train_timesteps", "20", "must be an integer"),
    ("num_train_timesteps", 0, "must be positive"),
    ("beta_start", "0.0001", "must be a number"),
    ("beta_end", float("inf"), "must be finite"),
    ("clip_sample", "false", "must be true or false"),
    ("thresholding", 1, "must be true or false"),
    ("trained_betas", {"a": 1}, "must be a list of numbers or null"),
    ("steps_offset", -1, "must be >= 0"),
    ("steps_offset", 1.5, "must be an integer"),
    ("variance_type", 5, "must be a string"),
    ("prediction_type", None, "must be a string"),
    ("clip_sample_range", [1], "must be a number"),
]


@pytest.mark.parametrize(
    "field,value,problem", SCHEDULER_FIELDS, ids=[f"{f}={json.dumps(v)}" for f, v, _ in SCHEDULER_FIELDS]
)
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler], ids=lambda c: c.__name__)
def test_scheduler_config_field_named(pipe_copy, cls, field, value, problem):
    config = pipe_copy / "scheduler" / "scheduler_config.json"
    edit_json(config, **{field: value})
    if field == "variance_type" and cls is DDIMScheduler:
        cls.from_pretrained(pipe_copy, subfolder="scheduler")  # DDIM does not read variance_type: ignored
        return
    with pytest.raises(ValueError, match=names(config, field) + ".*" + re.escape(problem)):
        cls.from_pretrained(pipe_copy, subfolder="scheduler")


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("act_fn", "tanhh", "act_fn 'tanhh'"),
        ("block_out_channels", [8, 16, 16], "block_out_channels"),
        ("norm_num_groups", 3, "norm_num_groups"),
        ("time_embedding_type", "rotary", "time_embedding_type"),
    ],
)
def test_constructor_errors_name_the_config_file(pipe_copy, field, value, needle):
    """Values of the right type that the UNet refuses: its own message, prefixed with the file."""
    config = pipe_copy / "unet" / "config.json"
    edit_json(config, **{field: value})
    with pytest.raises(ValueError, match=re.escape(f"{config}: ") + ".*" + re.escape(needle)):
        DDPMPipeline.from_pretrained(pipe_copy)


def test_scheduler_constructor_errors_name_the_file(pipe_copy):
    config = pipe_copy / "scheduler" / "scheduler_config.json"
    edit_json(config, beta_schedule="cubic")
    with pytest.raises(NotImplementedError, match=re.escape(f"{config}: ") + ".*beta_schedule 'cubic'") as info:
        DDPMPipeline.from_pretrained(pipe_copy)
    assert isinstance(info.value, ValueError)  # still the error class the schedulers raise


@pytest.mark.parametrize(
    "content,needle",
    [
        (b'{"sample_size": 8, "in_chan', "not valid JSON"),  # truncated
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2, 3]", "does not hold a JSON object"),
        (b'"UNet2DModel"', "does not hold a JSON object"),
        (b"[" * 100000, "nested too deeply"),
    ],
)
def test_unreadable_config_json_names_the_file(pipe_copy, content, needle):
    config = pipe_copy / "unet" / "config.json"
    config.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(config)) + ".*" + needle):
        DDPMPipeline.from_pretrained(pipe_copy)


def test_missing_config_names_the_file(pipe_copy):
    (pipe_copy / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDPMPipeline.from_pretrained(pipe_copy)


def test_use_default_values_must_be_a_list(pipe_copy):
    config = pipe_copy / "unet" / "config.json"
    edit_json(config, _use_default_values=5)
    with pytest.raises(ValueError, match=names(config, "_use_default_values")):
        UNet2DModel.from_pretrained(pipe_copy, subfolder="unet")


def test_keyword_override_replaces_a_bad_field(pipe_copy):
    """A field given as a keyword argument is not read from the file, so a bad value there does not matter."""
    edit_json(pipe_copy / "unet" / "config.json", sample_size="eight")
    assert UNet2DModel.from_pretrained(pipe_copy, subfolder="unet", sample_size=8).config.sample_size == 8


def test_null_sample_size_refused_by_the_pipeline(pipe_copy):
    config = pipe_copy / "unet" / "config.json"
    edit_json(config, sample_size=None)
    with pytest.raises(ValueError, match=names(config, "sample_size")):
        DDPMPipeline.from_pretrained(pipe_copy)


def test_good_configs_still_load(model):
    """The checks pass real configs: ours, and the shipped model's (trained and saved by ddpm-fast train)."""
    from ddpm_fast.weights import shipped_model_path

    for folder in (model, shipped_model_path()):
        pipe = DDPMPipeline.from_pretrained(folder)
        assert pipe.unet.config.sample_size in (8, 16)


# -- model_index.json ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("unet", 5, "must be a [library, class name] pair"),
        ("unet", "UNet2DModel", "must be a [library, class name] pair"),
        ("scheduler", {}, "must be a [library, class name] pair"),
        ("scheduler", ["diffusers"], "must be a [library, class name] pair"),
        ("unet", [None, None], "has no unet"),
        ("unet", ["diffusers", "UNet2DConditionModel"], "names class 'UNet2DConditionModel'"),
        ("scheduler", ["diffusers", "PNDMScheduler"], "names class 'PNDMScheduler'"),
    ],
)
def test_model_index_field_named(pipe_copy, field, value, needle):
    index = pipe_copy / "model_index.json"
    edit_json(index, **{field: value})
    with pytest.raises(ValueError, match=names(index, field) + ".*" + re.escape(needle)):
        DDPMPipeline.from_pretrained(pipe_copy)


@pytest.mark.parametrize("content", [b'{"_class_name": "DDPMPipe', b"[]", b"null"])
def test_unreadable_model_index_names_the_file(pipe_copy, content):
    index = pipe_copy / "model_index.json"
    index.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(index))):
        DDPMPipeline.from_pretrained(pipe_copy)


def test_cli_bad_model_file_is_one_line_naming_it(pipe_copy, tmp_path, capsys):
    edit_json(pipe_copy / "unet" / "config.json", block_out_channels=[-8, 16])
    code, err = run_cli(capsys, "sample", "--model", pipe_copy, "--output", tmp_path / "o", "--num-images", 1, *SAMPLE)
    assert code == 2
    assert str(pipe_copy / "unet" / "config.json") in one_line_error(err) and "'block_out_channels'" in err
    assert not list((tmp_path / "o").glob("*.png"))


# -- weights: sharded index, shard paths, truncated files ----------------------------------------------------------


@pytest.fixture
def sharded(pipe_copy) -> Path:
    """``pipe_copy/unet`` with its weights split into two shards and an index, as diffusers writes them."""
    unet = pipe_copy / "unet"
    state = load_file(unet / WEIGHTS)
    keys = sorted(state)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    weight_map = {}
    for shard, part in zip(SHARDS, halves):
        save_file({k: state[k] for k in part}, unet / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (unet / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (unet / WEIGHTS).unlink()
    return unet


def test_sharded_folder_loads(sharded, model):
    ours = UNet2DModel.from_pretrained(sharded)
    whole = UNet2DModel.from_pretrained(model / "unet")
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in ours.state_dict().items())


def _point_first_shard_at(sharded: Path, name: str) -> None:
    index = json.loads((sharded / INDEX).read_text())
    index["weight_map"] = {k: name if v == SHARDS[0] else v for k, v in index["weight_map"].items()}
    (sharded / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["parent", "absolute", "nested-dotdot"])
def test_shard_outside_the_folder_refused(sharded, where):
    """The escaping shard exists and holds the right tensors, so a loader that follows the path succeeds."""
    outside = sharded.parent / "x.safetensors"
    shutil.copy(sharded / SHARDS[0], outside)
    name = {"parent": "../x.safetensors", "absolute": str(outside), "nested-dotdot": "sub/../../x.safetensors"}[where]
    _point_first_shard_at(sharded, name)
    with pytest.raises(CheckpointError, match=names(sharded / INDEX, "weight_map") + ".*" + re.escape(repr(name))):
        UNet2DModel.from_pretrained(sharded)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_shard_symlink_out_of_the_folder_refused(sharded, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.replace(sharded / SHARDS[0], elsewhere / SHARDS[0])
    os.symlink(elsewhere / SHARDS[0], sharded / SHARDS[0])
    with pytest.raises(CheckpointError, match=names(sharded / INDEX, "weight_map") + ".*outside the model folder"):
        UNet2DModel.from_pretrained(sharded)
    # a symlink that stays inside the folder is fine
    os.unlink(sharded / SHARDS[0])
    os.replace(elsewhere / SHARDS[0], sharded / "real.safetensors")
    os.symlink("real.safetensors", sharded / SHARDS[0])
    UNet2DModel.from_pretrained(sharded)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_hub_cache_layout_with_blob_symlinks_loads(sharded, tmp_path):
    """huggingface_hub's cache links snapshot files to ../../blobs/<hash>: inside the repo's cache folder, allowed."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, unet = repo / "blobs", repo / "snapshots" / "0123abcd" / "unet"
    blobs.mkdir(parents=True)
    unet.mkdir(parents=True)
    for i, name in enumerate([INDEX, "config.json", *SHARDS]):
        shutil.copy(sharded / name, blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", unet), unet / name)
    state = load_sharded_safetensors(str(unet / INDEX), lambda shard: str(unet / shard))
    assert state.keys() == load_file(sharded / SHARDS[0]).keys() | load_file(sharded / SHARDS[1]).keys()
    # ... but a snapshot link that leaves the repo's cache folder is not
    os.unlink(unet / SHARDS[1])
    os.symlink(sharded / SHARDS[1], unet / SHARDS[1])
    with pytest.raises(CheckpointError, match="outside the model folder"):
        load_sharded_safetensors(str(unet / INDEX), lambda shard: str(unet / shard))


@pytest.mark.parametrize(
    "index,needle",
    [
        (
            {"weight_map": ["conv_in.weight", "conv_in.bias"]},
            "field 'weight_map' must be an object",
        ),  # AttributeError before
        ({"weight_map": "diffusion_pytorch_model-00001-of-00002.safetensors"}, "field 'weight_map' must be an object"),
        ({"metadata": {}}, "field 'weight_map' is missing"),
        ({"weight_map": {}}, "field 'weight_map' is empty"),
        ({"weight_map": {"conv_in.weight": 5}}, "field 'weight_map' entry 'conv_in.weight' must be a shard file name"),
        ({"weight_map": {"conv_in.weight": ""}}, "field 'weight_map' names shard ''"),
        ([1, 2], "not a valid sharded-checkpoint index"),
        ('{"weight_map": {"conv_in.weight": "diffusion_pytor', "not valid JSON"),
    ],
)
def test_bad_index_names_file_and_field(sharded, index, needle):
    (sharded / INDEX).write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(str(sharded / INDEX)) + ".*" + re.escape(needle)):
        UNet2DModel.from_pretrained(sharded)


def test_missing_shard_names_index_and_shard(sharded):
    (sharded / SHARDS[1]).unlink()
    with pytest.raises(CheckpointError, match=names(sharded / INDEX, SHARDS[1])):
        UNet2DModel.from_pretrained(sharded)


def test_truncated_shard_names_index_and_shard(sharded):
    data = (sharded / SHARDS[1]).read_bytes()
    (sharded / SHARDS[1]).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=names(sharded / INDEX, SHARDS[1]) + ".*truncated"):
        UNet2DModel.from_pretrained(sharded)


@pytest.mark.parametrize("keep", [0, 7, 100], ids=["empty", "in-header-size", "in-header"])
def test_truncated_safetensors_names_the_file(pipe_copy, keep):
    weights = pipe_copy / "unet" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        DDPMPipeline.from_pretrained(pipe_copy)


def test_model_path_that_is_a_file(pipe_copy):
    with pytest.raises(NotADirectoryError, match=re.escape(str(pipe_copy / "unet" / "config.json"))):
        UNet2DModel.from_pretrained(pipe_copy / "unet" / "config.json")
    with pytest.raises(TypeError, match="pretrained_model_name_or_path"):
        DDPMPipeline.from_pretrained(5)


# -- betas ---------------------------------------------------------------------------------------------------

BAD_BETAS = [
    (dict(beta_start=-0.001), "beta_start"),
    (dict(beta_end=1.5), "beta_end"),
    (dict(beta_start=float("nan")), "beta_start"),
    (dict(beta_end=float("inf")), "beta_end"),
    (dict(beta_schedule="scaled_linear", beta_end=-0.02), "beta_end"),  # sqrt of a negative number
    (dict(beta_schedule="scaled_linear", beta_start=4.0), "beta_start"),
    (dict(num_train_timesteps=3, trained_betas=[0.1, float("nan"), 0.2]), "trained_betas"),
    (dict(num_train_timesteps=3, trained_betas=[0.1, -0.2, 0.2]), "trained_betas"),
    (dict(num_train_timesteps=2, trained_betas=torch.tensor([0.5, 1.5])), "trained_betas"),
    (dict(num_train_timesteps=1, rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),  # 0/0: NaN
]


@pytest.mark.parametrize("kwargs,argument", BAD_BETAS, ids=[f"{k}" for k, _ in BAD_BETAS])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler], ids=lambda c: c.__name__)
def test_betas_outside_unit_interval_refused(cls, kwargs, argument):
    with pytest.raises(ValueError, match=re.escape(argument)):
        cls(**kwargs)


def test_sigmoid_schedule_bounds_checked():
    with pytest.raises(ValueError, match="beta_start"):
        DDPMScheduler(beta_schedule="sigmoid", beta_start=-1.0)


def test_betas_of_the_wrong_type_refused():
    with pytest.raises(TypeError, match="trained_betas"):
        DDPMScheduler(num_train_timesteps=2, trained_betas={"a": 0.1})
    with pytest.raises(TypeError, match="trained_betas"):
        DDPMScheduler(num_train_timesteps=2, trained_betas="0.1,0.2")
    with pytest.raises(TypeError, match="beta_end"):
        DDPMScheduler(beta_end="0.02")


def test_betas_at_the_bounds_accepted():
    sched = DDPMScheduler(num_train_timesteps=4, beta_start=0.0, beta_end=1.0)
    assert sched.betas.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    # Schedules that ignore beta_start/beta_end do not judge them.
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", beta_start=-1.0)
    DDIMScheduler(num_train_timesteps=2, trained_betas=[0.0, 1.0], beta_end=7.0)


def test_betas_from_a_config_file_name_file_and_argument(pipe_copy):
    config = pipe_copy / "scheduler" / "scheduler_config.json"
    edit_json(config, beta_end=2.0)
    with pytest.raises(ValueError, match=re.escape(f"{config}: beta_end must be a finite number in [0, 1]")):
        DDPMPipeline.from_pretrained(pipe_copy)


# -- CLI files: no clobbering, permissions -----------------------------------------------------------------------


def test_npz_onto_an_existing_file_refused(model, tmp_path, capsys):
    victim = tmp_path / "thesis.npz"
    victim.write_bytes(b"someone else's data")
    out = tmp_path / "s"
    args = ["sample", "--model", model, "--num-images", 2, "--output", out, "--npz", victim, *SAMPLE]
    code, err = run_cli(capsys, *args)
    assert code == 2 and str(victim) in one_line_error(err) and "--overwrite" in err
    assert victim.read_bytes() == b"someone else's data"
    assert not list(out.glob("*.png"))  # refused before sampling
    # --resume does not make it this run's file either
    code, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and "not this run's" in one_line_error(err)
    assert victim.read_bytes() == b"someone else's data"
    # --overwrite does replace it
    code, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err
    with np.load(victim) as f:
        assert f["arr_0"].shape == (2, 8, 8, 1)
    # and once it is this run's .npz, --resume may rewrite it
    code, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err


@pytest.mark.parametrize("existing", ["samples_2x8x8x1.npz", "grid.png"])
def test_existing_grid_or_default_npz_refused(model, tmp_path, capsys, existing):
    out = tmp_path / "s"
    out.mkdir()
    (out / existing).write_bytes(b"not from this run")
    code, err = run_cli(capsys, "sample", "--model", model, "--num-images", 2, "--output", out, "--grid", *SAMPLE)
    assert code == 2 and str(out / existing) in one_line_error(err) and "--overwrite" in err
    assert (out / existing).read_bytes() == b"not from this run"
    assert not list(out.glob("0*.png"))


def test_npz_into_a_missing_folder_refused_before_sampling(model, tmp_path, capsys):
    out = tmp_path / "s"
    code, err = run_cli(
        capsys,
        "sample",
        "--model",
        model,
        "--num-images",
        1,
        "--output",
        out,
        "--npz",
        tmp_path / "nope" / "x.npz",
        *SAMPLE,
    )
    assert code == 2 and "does not exist" in one_line_error(err) and str(tmp_path / "nope") in err
    assert not list(out.glob("*.png"))


def test_no_replace_writers_never_replace(tmp_path):
    """What the CLI uses when the target did not exist at start: a file that appears meanwhile is kept."""
    write_png_atomic(np.zeros((4, 4, 1), np.uint8), tmp_path / "000000.png")
    (tmp_path / "late.png").write_bytes(b"appeared meanwhile")
    with pytest.raises(FileExistsError, match="late.png"):
        write_png_atomic(np.zeros((4, 4, 1), np.uint8), tmp_path / "late.png", replace=False)
    (tmp_path / "late.npz").write_bytes(b"appeared meanwhile")
    with pytest.raises(FileExistsError, match="late.npz"):
        write_npz(tmp_path, 1, tmp_path / "late.npz", replace=False)
    assert (tmp_path / "late.png").read_bytes() == (tmp_path / "late.npz").read_bytes() == b"appeared meanwhile"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    write_npz(tmp_path, 1, tmp_path / "new.npz", replace=False)  # a new name is fine


def test_image_that_appears_during_a_run_is_not_replaced(model, tmp_path):
    """Without --overwrite the sampler writes images with replace=False: another job's file stays."""
    from ddpm_fast.sampling import sample_images

    pipe = DDPMPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    (tmp_path / "000001.png").write_bytes(b"another job's image")
    with pytest.raises(FileExistsError, match="000001.png"):
        sample_images(pipe, [[0, 1]], 0, 2, out_dir=tmp_path, replace=False)
    assert (tmp_path / "000001.png").read_bytes() == b"another job's image"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_umask_permissions(model, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "s"
        code, err = run_cli(capsys, "sample", "--model", model, "--num-images", 2, "--output", out, "--grid", *SAMPLE)
        assert code == 0, err
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    finally:
        os.umask(old)
    assert sorted(modes) == ["000000.png", "000001.png", "grid.png", "samples_2x8x8x1.npz"]
    assert modes == {name: 0o666 & ~umask for name in modes}, {k: oct(v) for k, v in modes.items()}


# -- interrupted and damaged runs ------------------------------------------------------------------------------


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*.png"))}


@pytest.fixture(scope="module")
def reference_run(model, tmp_path_factory) -> Path:
    """6 images in batches of 2, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "s"
    assert (
        main(
            [
                str(a)
                for a in [
                    "sample",
                    "--model",
                    model,
                    "--num-images",
                    6,
                    "--batch-size",
                    2,
                    "--seed",
                    3,
                    "--output",
                    out,
                    *SAMPLE,
                ]
            ]
        )
        == 0
    )
    return out


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    elif how == "bit-flip":  # a flipped bit in the compressed pixels: the chunk's CRC no longer matches
        at = data.index(b"IDAT") + 8
        data[at] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "garbage", "bit-flip", "empty"])
def test_resume_resamples_damaged_image_and_names_it(model, reference_run, tmp_path, capsys, how):
    out = tmp_path / "s"
    shutil.copytree(reference_run, out)
    (out / "samples_6x8x8x1.npz").unlink()
    damage(out / "000003.png", how)
    untouched = {n: os.stat(out / n).st_mtime_ns for n in ("000000.png", "000002.png", "000005.png")}
    code, err = run_cli(
        capsys,
        "sample",
        "--model",
        model,
        "--num-images",
        6,
        "--batch-size",
        2,
        "--seed",
        3,
        "--output",
        out,
        "--resume",
        *SAMPLE,
    )
    assert code == 0, err
    assert "1 damaged image(s)" in err and "000003.png" in err
    assert png_bytes(out) == png_bytes(reference_run)
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in untouched.items())  # only the damaged one rewritten


def test_damaged_image_without_resume_is_named(reference_run, tmp_path):
    """Packing the .npz over a damaged image names it (it used to say only "image file is truncated")."""
    out = tmp_path / "s"
    shutil.copytree(reference_run, out)
    damage(out / "000004.png", "truncated")
    with pytest.raises(ValueError, match=re.escape(str(out / "000004.png")) + ".*--resume"):
        write_npz(out, 6, tmp_path / "x.npz")


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")
def test_sigkilled_run_then_resume_is_byte_identical(model, reference_run, tmp_path, capsys):
    """A real SIGKILL after 2 of 3 batches; a temp file and a truncated image left behind; --resume finishes."""
    out = tmp_path / "s"
    args = ["sample", "--model", model, "--num-images", 6, "--batch-size", 2, "--seed", 3, "--output", out, *SAMPLE]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_FAST_TEST")}
    # The test hook stops the process (SIGSTOP) before its third batch, so the kill lands at a known point.
    env.update(DDPM_FAST_TEST_FAIL_AFTER_BATCHES="2", DDPM_FAST_TEST_FAIL_HARD="stop", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_fast", *map(str, args)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
            if pid and os.WIFSTOPPED(status):
                break
            if pid:  # reaped here, so Popen must not wait for it again
                proc.returncode = os.waitstatus_to_exitcode(status)
                pytest.fail(f"the run ended instead of stopping: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "the run never reached the stop point"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = -signal.SIGKILL
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert sorted(png_bytes(out)) == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert not list(out.glob("*.npz"))
    (out / ".000004.png.killed.tmp").write_bytes(b"half a png from the killed writer")
    damage(out / "000001.png", "truncated")  # e.g. copied off a full disk

    code, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert "000001.png" in err and "damaged" in err
    assert png_bytes(out) == png_bytes(reference_run)
    with np.load(out / "samples_6x8x8x1.npz") as f, np.load(reference_run / "samples_6x8x8x1.npz") as g:
        assert np.array_equal(f["arr_0"], g["arr_0"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_two_ranks_resume_over_a_damaged_image_is_byte_identical(model, reference_run, tmp_path):
    """Under torchrun rank 0 alone checks the images; both ranks then sample the same unfinished batches."""
    import socket

    out = tmp_path / "s"
    shutil.copytree(reference_run, out)
    (out / "samples_6x8x8x1.npz").unlink()
    (out / "000005.png").unlink()  # batch 2 unfinished (rank 0's second batch)
    damage(out / "000002.png", "bit-flip")  # batch 1 damaged (rank 1's first)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("DDPM_FAST_TEST")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "ddpm_fast",
        "sample",
        "--model",
        str(model),
        "--num-images",
        "6",
        "--batch-size",
        "2",
        "--seed",
        "3",
        "--output",
        str(out),
        "--resume",
        *map(str, SAMPLE),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("damaged image(s)") == 1 and "000002.png" in proc.stderr  # said once, by rank 0
    assert png_bytes(out) == png_bytes(reference_run)


# ---------------------------------------------------------------------------------------------- prepared weights
# Prepared weights (Winograd transforms, packed oneDNN, packed QKV, the shared time projections) always follow the
# model's parameters, however they change. Each mutation case runs the fused UNet once (preparing every copy),
# changes the parameters one way, and compares the fused output with the reference backend's on the changed model;
# with the copies left stale the outputs differ by far more than the tolerance (checked by the first test).

# 64 channels and batch 4: the 16x16 level runs Winograd F(4x4), the 8x8 level F(2x2), the rest packed oneDNN,
# and the attention at 8x8 its packed QKV, so every kind of prepared copy is exercised.
CONFIG = {
    "block_out_channels": [64, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "sample_size": 16,
    "norm_num_groups": 8,
    "attention_head_dim": None,
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


@pytest.mark.parametrize("max_tile", [4, 2])
def test_every_kind_of_prepared_copy_is_exercised_and_staleness_would_show(max_tile):
    # F(2x2) weights are exercised at the 8x8 level by default, except where F(4x4) takes it too
    # (conv.WINOGRAD_MIN_TILES_OWN_GEMM); ddpm_fast.winograd(2) makes every Winograd layer F(2x2).
    model = _model()
    x, t = _inputs()
    with ddpm_fast.winograd(max_tile):
        if _native.available():
            assert {f"conv:winograd{max_tile}", "conv:packed"} <= _conv_paths(model, x, t)
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
    _edit_data_in_place,
    _copy_through_data,
    _diffusers_ema_copy_to,
    _load_state_dict_copy,
    _load_state_dict_assign,
    _to_and_back,
    _requires_grad_and_optimizer_step,
    _replace_parameter_objects,
    _weight_norm,
    _inference_mode_edit,
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
