"""DDPMPipeline against diffusers 0.42.1: same seed, same images; loading, saving, devices, bad input."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

import ddpm_fast
from helpers import FUSED_TOL, REFERENCE_TOL

diffusers = pytest.importorskip("diffusers")

# Max |Δ| of "np" images after >= 10 steps. The reference backend mirrors diffusers op for op (it is
# in fact bitwise equal); the fused kernels round differently (~3e-6 per UNet forward), which these
# random, untrained UNets amplify over a trajectory, so the fused backend gets the fast path's bound.
TOL_IMAGE, TOL_IMAGE_FUSED = REFERENCE_TOL, FUSED_TOL


def tol() -> float:
    return TOL_IMAGE_FUSED if ddpm_fast.get_backend() == "fused" else TOL_IMAGE


def assert_images_close(a: np.ndarray, b: np.ndarray, atol: float | None = None) -> None:
    assert a.shape == b.shape
    assert np.isfinite(a).all() and np.isfinite(b).all()
    diff = float(np.abs(a - b).max())
    assert diff <= (tol() if atol is None else atol), diff


def tiny_unet_config(**overrides) -> dict:
    config = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    )
    config.update(overrides)
    return config


def make_unets(seed: int = 0, **overrides):
    """A diffusers UNet with every weight non-zero, and ours loaded with the same weights."""
    config = tiny_unet_config(**overrides)
    torch.manual_seed(seed)
    theirs = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = ddpm_fast.UNet2DModel(**config).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def run_both(
    theirs_unet, ours_unet, scheduler_kwargs, steps=10, batch_size=2, seed=0, scheduler_class="DDPMScheduler", **call
):
    theirs = diffusers.DDPMPipeline(theirs_unet, getattr(diffusers, scheduler_class)(**scheduler_kwargs))
    ours = ddpm_fast.DDPMPipeline(ours_unet, getattr(ddpm_fast, scheduler_class)(**scheduler_kwargs))
    theirs.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=batch_size, num_inference_steps=steps, output_type="np", **call)
    a = theirs(generator=torch.Generator().manual_seed(seed), **kwargs).images
    b = ours(generator=torch.Generator().manual_seed(seed), **kwargs).images
    return a, b


@pytest.fixture(scope="module")
def unets():
    return make_unets()


@pytest.fixture(params=["fused", "reference"])
def each_backend(request):
    with ddpm_fast.backend(request.param):
        yield request.param


# -- same seed, same images ----------------------------------------------------------------------

SCHEDULER_GRID = [
    dict(beta_schedule=b, variance_type=v, prediction_type=p, timestep_spacing=s)
    for (b, v, p), s in zip(
        itertools.product(
            ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"],
            ["fixed_small", "fixed_small_log", "fixed_large"],
            ["epsilon", "sample", "v_prediction"],
        ),
        itertools.cycle(["leading", "linspace", "trailing"]),
    )
]


@pytest.mark.parametrize("scheduler_kwargs", SCHEDULER_GRID, ids=lambda d: "-".join(d.values()))
def test_ddpm_scheduler_grid_matches_diffusers(unets, scheduler_kwargs, each_backend):
    a, b = run_both(*unets, scheduler_kwargs)
    assert a.shape == b.shape == (2, 8, 8, 3)
    assert_images_close(a, b)


@pytest.mark.parametrize(
    "scheduler_kwargs",
    [
        dict(clip_sample=False),
        dict(clip_sample=True, clip_sample_range=0.5),
        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
        dict(thresholding=True, prediction_type="v_prediction"),
        dict(steps_offset=1, timestep_spacing="leading"),
        dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
        dict(num_train_timesteps=200, beta_end=0.05),
        dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist()),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items() if k != "trained_betas") or "trained_betas",
)
def test_ddpm_scheduler_options_match_diffusers(unets, scheduler_kwargs, each_backend):
    a, b = run_both(*unets, scheduler_kwargs)
    assert_images_close(a, b)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_matches_diffusers(variance_type, each_backend):
    theirs, ours = make_unets(out_channels=6)
    if variance_type == "learned":  # the raw predicted variance must be positive, or both libraries give NaN
        with torch.no_grad():
            theirs.conv_out.weight[3:] *= 0.01
            theirs.conv_out.bias[3:] = 0.02
        ours.load_state_dict(theirs.state_dict())
    a, b = run_both(theirs, ours, dict(variance_type=variance_type))
    assert_images_close(a, b)


@pytest.mark.parametrize(
    "scheduler_kwargs",
    [
        dict(),
        dict(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=False),
        dict(prediction_type="sample", beta_schedule="scaled_linear", timestep_spacing="linspace"),
        dict(beta_schedule="squaredcos_cap_v2", clip_sample=False, steps_offset=1),
        dict(thresholding=True),
        dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "default",
)
def test_ddim_scheduler_in_pipeline_matches_diffusers(unets, scheduler_kwargs, each_backend):
    a, b = run_both(*unets, scheduler_kwargs, scheduler_class="DDIMScheduler")
    assert_images_close(a, b)


UNET_GRID = {
    "attn-blocks": dict(),
    "resnet-updown": dict(
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
    ),
    "skip-blocks": dict(  # their attention hard-codes 32 groups
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        block_out_channels=(32, 64),
        norm_num_groups=8,
    ),
    # (fourier time embeddings take log(t): NaN at t = 0 in both libraries, so they are tested
    # at the UNet level in test_unet.py, not in a DDPM loop)
    "learned-time": dict(time_embedding_type="learned", num_train_timesteps=1000),
    "scale-shift": dict(resnet_time_scale_shift="scale_shift"),
    "head-dim-none": dict(attention_head_dim=None),
    "head-dim-2": dict(attention_head_dim=2),
    "no-mid-block": dict(mid_block_type=None),
    "non-square": dict(sample_size=(8, 16)),
    "cifar-like": dict(
        freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None
    ),
}


@pytest.mark.parametrize("name", list(UNET_GRID))
def test_unet_config_grid_matches_diffusers(name, each_backend):
    overrides = dict(UNET_GRID[name])
    theirs, ours = make_unets(**overrides)
    a, b = run_both(theirs, ours, dict(variance_type="fixed_large"))
    assert_images_close(a, b)


# -- diffusers' own published expectation ----------------------------------------------------------


def test_diffusers_tiny_pipeline_slice():
    """diffusers' DDPMPipeline fast test: its tiny UNet (seed 0), 2 steps, CPU generator seed 0."""
    config = dict(
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    torch.manual_seed(0)
    unet = ddpm_fast.UNet2DModel(**config)  # same module order as diffusers, so the same random init
    pipe = ddpm_fast.DDPMPipeline(unet=unet, scheduler=ddpm_fast.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    image = pipe(generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=2, output_type="np").images
    expected = np.array([0.0, 0.9996672, 0.00329116, 1.0, 0.9995991, 1.0, 0.0060907, 0.00115037, 0.0])
    assert image.shape == (1, 8, 8, 3)
    assert np.abs(image[0, -3:, -3:, -1].flatten() - expected).max() < 1e-2  # diffusers' own tolerance
    tuple_image = pipe(
        generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=2, output_type="np", return_dict=False
    )[0]
    assert np.array_equal(image, tuple_image)


# -- RNG: generator forms ---------------------------------------------------------------------------


def test_generator_list_matches_diffusers(unets):
    theirs_unet, ours_unet = unets
    theirs = diffusers.DDPMPipeline(theirs_unet, diffusers.DDPMScheduler())
    ours = ddpm_fast.DDPMPipeline(ours_unet, ddpm_fast.DDPMScheduler())
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]  # noqa: E731
    a = theirs(batch_size=3, generator=gens(), num_inference_steps=10, output_type="np").images
    b = ours(batch_size=3, generator=gens(), num_inference_steps=10, output_type="np").images
    assert_images_close(a, b)
    # Image i depends only on generator i: a batch of one with generator 4 reproduces image 1.
    c = ours(
        batch_size=1, generator=[torch.Generator().manual_seed(4)], num_inference_steps=10, output_type="np"
    ).images
    assert np.abs(c[0] - b[1]).max() <= 1e-5


def test_global_rng_matches_diffusers(unets):
    theirs_unet, ours_unet = unets
    theirs = diffusers.DDPMPipeline(theirs_unet, diffusers.DDPMScheduler())
    ours = ddpm_fast.DDPMPipeline(ours_unet, ddpm_fast.DDPMScheduler())
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    torch.manual_seed(123)
    a = theirs(batch_size=2, num_inference_steps=10, output_type="np").images
    torch.manual_seed(123)
    b = ours(batch_size=2, num_inference_steps=10, output_type="np").images
    assert_images_close(a, b)


# -- output types -----------------------------------------------------------------------------------


def test_output_types(unets):
    _, unet = unets
    pipe = ddpm_fast.DDPMPipeline(unet, ddpm_fast.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    np_images = pipe(batch_size=2, generator=g(), num_inference_steps=3, output_type="np").images
    pt_images = pipe(batch_size=2, generator=g(), num_inference_steps=3, output_type="pt").images
    pil_images = pipe(batch_size=2, generator=g(), num_inference_steps=3).images
    assert np_images.dtype == np.float32 and np_images.shape == (2, 8, 8, 3)
    assert isinstance(pt_images, torch.Tensor) and pt_images.shape == (2, 3, 8, 8)
    assert np.array_equal(pt_images.permute(0, 2, 3, 1).numpy(), np_images)
    assert len(pil_images) == 2 and pil_images[0].size == (8, 8) and pil_images[0].mode == "RGB"
    assert np.array_equal(np.asarray(pil_images[1]), (np_images[1] * 255).round().astype(np.uint8))
    assert 0.0 <= np_images.min() and np_images.max() <= 1.0


def test_single_channel_pil_is_mode_L():
    _, unet = make_unets(in_channels=1, out_channels=1)
    pipe = ddpm_fast.DDPMPipeline(unet, ddpm_fast.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    image = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=2).images[0]
    assert image.mode == "L" and image.size == (8, 8)


def test_progress_bar_config(unets, capsys):
    _, unet = unets
    pipe = ddpm_fast.DDPMPipeline(unet, ddpm_fast.DDPMScheduler())
    pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np")
    assert "3/3" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np")
    assert capsys.readouterr().err == ""


# -- loading and saving ------------------------------------------------------------------------------


def _images(pipe, steps=10, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=steps, output_type="np", **kw
    ).images


def test_diffusers_saved_pipeline_loads_here_and_back(unets, tmp_path):
    theirs_unet, _ = unets
    theirs = diffusers.DDPMPipeline(theirs_unet, diffusers.DDPMScheduler(variance_type="fixed_large"))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path / "theirs")
    assert isinstance(ours.scheduler, ddpm_fast.DDPMScheduler)
    assert ours.scheduler.config.variance_type == "fixed_large"
    expected = _images(theirs)
    assert_images_close(_images(ours), expected)

    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert (tmp_path / "ours" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    back = diffusers.DDPMPipeline.from_pretrained(tmp_path / "ours")
    assert_images_close(_images(back), expected)


def test_flat_legacy_layout_with_bin_and_old_attention_names(unets, tmp_path):
    """The original google checkpoints: config.json, scheduler_config.json and a .bin side by side."""
    theirs_unet, _ = unets
    state = theirs_unet.state_dict()
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    folder = tmp_path / "flat"
    folder.mkdir()
    torch.save(legacy, folder / "diffusion_pytorch_model.bin")
    theirs_unet.save_config(folder)
    diffusers.DDPMScheduler(variance_type="fixed_large").save_config(folder)
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    ours = ddpm_fast.DDPMPipeline.from_pretrained(folder)
    theirs = diffusers.DDPMPipeline(theirs_unet, diffusers.DDPMScheduler(variance_type="fixed_large"))
    assert_images_close(_images(ours), _images(theirs))


def test_scheduler_override_and_ddim(unets, tmp_path):
    theirs_unet, ours_unet = unets
    ddpm_fast.DDPMPipeline(ours_unet, ddpm_fast.DDPMScheduler()).save_pretrained(tmp_path / "p")
    ddim = ddpm_fast.DDIMScheduler.from_pretrained(tmp_path / "p", subfolder="scheduler")
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path / "p", scheduler=ddim)
    assert isinstance(ours.scheduler, ddpm_fast.DDIMScheduler)
    theirs = diffusers.DDPMPipeline(theirs_unet, diffusers.DDIMScheduler())
    assert_images_close(_images(ours), _images(theirs))


def test_torch_dtype_and_to(unets, tmp_path):
    _, ours_unet = unets
    ddpm_fast.DDPMPipeline(ours_unet, ddpm_fast.DDPMScheduler()).save_pretrained(tmp_path / "p")
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    assert set(pipe.components) == {"unet", "scheduler"}
    images = _images(pipe, steps=3)
    assert images.dtype == np.float32 and np.isfinite(images).all()  # bf16 → float32 numpy (diffusers raises)
    assert pipe.to(torch.float32) is pipe and pipe.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        pipe.to(torch.int64)


def test_fp16_variant(unets, tmp_path):
    _, ours_unet = unets
    pipe = ddpm_fast.DDPMPipeline(ours_unet, ddpm_fast.DDPMScheduler())
    pipe.save_pretrained(tmp_path / "p", variant="fp16")
    assert (tmp_path / "p" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path / "p", variant="fp16")
    assert_images_close(_images(loaded, steps=3), _images(pipe, steps=3))


def _fake_hub_cache(cache: os.PathLike, repo_id: str, source: os.PathLike) -> None:
    """Lay out ``source`` as huggingface_hub's cache would hold a downloaded snapshot of ``repo_id``."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(source, os.path.join(repo, "snapshots", commit))


def test_hub_id_offline_from_cache(unets, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    _, ours_unet = unets
    pipe = ddpm_fast.DDPMPipeline(ours_unet, ddpm_fast.DDPMScheduler())
    pipe.save_pretrained(tmp_path / "src")
    _fake_hub_cache(tmp_path / "cache", "someone/tiny-ddpm", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = ddpm_fast.DDPMPipeline.from_pretrained("someone/tiny-ddpm", cache_dir=str(tmp_path / "cache"))
    assert_images_close(_images(loaded, steps=3), _images(pipe, steps=3))
    with pytest.raises(OSError, match="someone/missing"):
        ddpm_fast.DDPMPipeline.from_pretrained("someone/missing", cache_dir=str(tmp_path / "cache"))


def test_hub_id_without_huggingface_hub(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError("no huggingface_hub")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(OSError, match="pip install huggingface_hub"):
        ddpm_fast.DDPMPipeline.from_pretrained("google/ddpm-cat-256")


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-1), "batch_size"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=1001), "num_inference_steps"),
        (dict(output_type="latent"), "output_type"),
        (dict(batch_size=2, generator=[torch.Generator()]), "generator"),
        (dict(generator="seed"), "generator"),
    ],
)
def test_bad_call_arguments(unets, kwargs, match):
    _, unet = unets
    pipe = ddpm_fast.DDPMPipeline(unet, ddpm_fast.DDPMScheduler())
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(**kwargs)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ddpm_fast.DDPMPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        ddpm_fast.DDPMPipeline.from_pretrained(tmp_path / "empty")


def test_bad_components(unets):
    _, unet = unets
    with pytest.raises(TypeError, match="scheduler"):
        ddpm_fast.DDPMPipeline(unet, scheduler=object())
    with pytest.raises(TypeError, match="unet"):
        ddpm_fast.DDPMPipeline(unet=object(), scheduler=ddpm_fast.DDPMScheduler())
