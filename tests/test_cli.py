"""The `ddpm-fast` command line end to end: sample, train, resume, diffusers interop, and clean errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.cli import main
from ddpm_fast.sampling import batch_indices, image_seed, load_png, pending_batches, write_png_atomic

TINY_TRAIN = [
    "--resolution",
    "8",
    "--block-out-channels",
    "8,16",
    "--norm-num-groups",
    "4",
    "--attention-levels",
    "1",
    "--batch-size",
    "4",
    "--warmup-steps",
    "1",
    "--log-every",
    "1",
    "--num-threads",
    "1",
    "--quiet",
]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Six tiny grayscale images (non-square: centre-cropped on load) and a text file that is skipped."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8), mode="L").save(d / f"img{i}.png")
    (d / "notes.txt").write_text("not an image; ignored")
    return d


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "model"
    code = main(
        [
            "train",
            "--data",
            str(image_folder),
            "--output",
            str(out),
            "--max-steps",
            "3",
            "--checkpoint-every",
            "2",
            *TINY_TRAIN,
        ]
    )
    assert code == 0
    return out


# -- sample ---------------------------------------------------------------------------------------


def test_sample_shipped_model_writes_pngs_and_grid(tmp_path, capsys):
    out = tmp_path / "s"
    code, _, err = run_cli(
        capsys,
        "sample",
        "--num-images",
        3,
        "--batch-size",
        2,
        "--steps",
        3,
        "--output",
        out,
        "--grid",
        "--quiet",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert pngs(out) == ["000000.png", "000001.png", "000002.png", "grid.png"]
    img = load_png(out / "000000.png")
    assert img.shape == (16, 16, 1) and img.dtype == np.uint8
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_image_i_independent_of_batch_size(tmp_path, capsys):
    """Image i starts from the same noise whatever the batch: pixels agree up to float rounding."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, bs in ((a, 5), (b, 2)):
        code, _, err = run_cli(
            capsys,
            "sample",
            "--num-images",
            5,
            "--batch-size",
            bs,
            "--steps",
            4,
            "--scheduler",
            "ddim",
            "--output",
            folder,
            "--quiet",
            "--device",
            "cpu",
        )
        assert code == 0, err
    diffs = [np.abs(load_png(a / n).astype(int) - load_png(b / n).astype(int)).max() for n in pngs(a)]
    assert max(diffs) <= 1, diffs  # measured 0 on CPU float32; one uint8 level of rounding allowed
    # and different images really differ
    assert np.abs(load_png(a / "000000.png").astype(int) - load_png(a / "000001.png").astype(int)).max() > 10


def test_refuses_overwrite_then_overwrite_and_resume(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sample", "--num-images", 3, "--batch-size", 2, "--steps", 2, "--output", out, "--quiet", "--device", "cpu"]
    assert run_cli(capsys, *args)[0] == 0
    first = {n: load_png(out / n) for n in pngs(out)}
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert run_cli(capsys, *args, "--overwrite")[0] == 0
    assert all(np.array_equal(first[n], load_png(out / n)) for n in first)  # same seeds, same images
    (out / "000002.png").unlink()
    marker = os.stat(out / "000000.png").st_mtime_ns
    assert pending_batches(3, 2, out) == [[2]]
    assert run_cli(capsys, *args, "--resume")[0] == 0
    assert pngs(out) == ["000000.png", "000001.png", "000002.png"]
    assert os.stat(out / "000000.png").st_mtime_ns == marker  # finished images untouched
    assert np.array_equal(first["000002.png"], load_png(out / "000002.png"))


def test_seed_and_batch_helpers(tmp_path):
    assert batch_indices(5, 2) == [[0, 1], [2, 3], [4]]
    assert image_seed(0, 1) == image_seed(0, 1) != image_seed(0, 2) != image_seed(1, 1)
    g1 = torch.Generator().manual_seed(image_seed(7, 3))
    g2 = torch.Generator().manual_seed(image_seed(7, 3))
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    write_png_atomic(np.zeros((4, 4, 1), np.uint8), tmp_path / "x.png")
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    with pytest.raises(TypeError):
        write_png_atomic(np.zeros((4, 4), np.float32), tmp_path / "y.png")
    assert not (tmp_path / "y.png").exists() and len(list(tmp_path.iterdir())) == 1


# -- train ----------------------------------------------------------------------------------------


def test_train_layout_sample_and_load_in_diffusers(trained, tmp_path, capsys):
    for name in (
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "loss.csv",
        "checkpoint-3/training_state.pt",
        "checkpoint-2/unet/diffusion_pytorch_model.safetensors",
    ):
        assert (trained / name).is_file(), name
    rows = (trained / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,elapsed_s" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]

    out = tmp_path / "s"
    code, _, err = run_cli(
        capsys,
        "sample",
        "--model",
        trained,
        "--num-images",
        2,
        "--steps",
        2,
        "--output",
        out,
        "--quiet",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert load_png(out / "000000.png").shape == (8, 8, 1)

    import diffusers

    import ddpm_fast

    theirs = diffusers.DDPMPipeline.from_pretrained(trained)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(trained)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    a = theirs(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    b = ours(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_train_resume_matches_uninterrupted(image_folder, trained, tmp_path, capsys):
    """Stopping after 3 steps and resuming to 5 gives the same weights as 5 steps straight."""
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    assert (
        run_cli(
            capsys,
            "train",
            "--data",
            image_folder,
            "--output",
            straight,
            "--max-steps",
            5,
            "--checkpoint-every",
            2,
            *TINY_TRAIN,
        )[0]
        == 0
    )
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)  # the fixture stopped at step 3 (cosine schedule depends on max_steps)
    shutil.rmtree(resumed / "checkpoint-3")
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        image_folder,
        "--output",
        resumed,
        "--max-steps",
        5,
        "--checkpoint-every",
        2,
        *TINY_TRAIN,
    )
    assert code == 0, err
    assert "resuming from" in out and "step 2/5" in out
    w1 = load_file(straight / "unet/diffusion_pytorch_model.safetensors")
    w2 = load_file(resumed / "unet/diffusion_pytorch_model.safetensors")
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    rows = [r.split(",")[0] for r in (resumed / "loss.csv").read_text().splitlines()[1:]]
    assert rows == ["1", "2", "3", "4", "5"]  # row 3 of the interrupted run was replaced, not duplicated


def test_train_refuses_resume_with_other_model(trained, image_folder, tmp_path, capsys):
    import shutil

    other = tmp_path / "o"
    shutil.copytree(trained, other)
    args = [a if a != "8,16" else "8,8" for a in TINY_TRAIN]
    code, _, err = run_cli(capsys, "train", "--data", image_folder, "--output", other, "--max-steps", 4, *args)
    assert code == 2 and "block_out_channels" in err and err.count("\n") == 1


def test_train_digits_builtin(tmp_path, capsys):
    out = tmp_path / "d"
    code, _, err = run_cli(capsys, "train", "--data", "digits", "--output", out, "--max-steps", 1, *TINY_TRAIN)
    assert code == 0, err
    import json

    cfg = json.loads((out / "unet/config.json").read_text())
    assert cfg["in_channels"] == 1 and cfg["sample_size"] == 8


# -- errors ---------------------------------------------------------------------------------------


def _bad_cases(tmp: Path) -> dict[str, list]:
    empty = tmp / "empty"
    empty.mkdir()
    texts = tmp / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello")
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"not a png at all")
    blocker = tmp / "file"
    blocker.write_text("a file where a folder should be")
    out = tmp / "out"
    return {
        "missing model": (["sample", "--model", tmp / "no-such-model", "--output", out], "does not exist"),
        "empty data": (["train", "--data", empty, "--output", out], "holds no images"),
        "non-image data": (["train", "--data", texts, "--output", out], "holds no images"),
        "corrupt image": (["train", "--data", corrupt, "--output", out, *TINY_TRAIN], "cannot read image"),
        "missing data": (["train", "--data", tmp / "nope", "--output", out], "does not exist"),
        "zero images": (["sample", "--num-images", 0, "--output", out], "--num-images"),
        "unwritable output": (["sample", "--num-images", 1, "--steps", 1, "--output", blocker / "sub"], "not writable"),
        "output is a file": (["sample", "--num-images", 1, "--output", blocker], "not a folder"),
        "unknown scheduler": (["sample", "--scheduler", "euler", "--output", out], "euler"),
        "steps too many": (["sample", "--steps", 5000, "--num-images", 1, "--output", out, "--quiet"], "--steps"),
        "bad channels": (["train", "--data", "digits", "--output", out, "--block-out-channels", "12,16"], "divisible"),
        "unknown command": (["paint"], "paint"),
    }


BAD_CASES = [
    "missing model",
    "empty data",
    "non-image data",
    "corrupt image",
    "missing data",
    "zero images",
    "unwritable output",
    "output is a file",
    "unknown scheduler",
    "steps too many",
    "bad channels",
    "unknown command",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_error(case, tmp_path, capsys):
    argv, needle = _bad_cases(tmp_path)[case]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("ddpm-fast: error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err


def test_console_entry_no_traceback(tmp_path):
    """Through a real process (`python -m ddpm_fast`): one line on stderr, exit status 2."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpm_fast",
            "sample",
            "--model",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("ddpm-fast: error: --model")


def test_bench_forwards_argv(monkeypatch):
    import ddpm_fast.bench.__main__ as bench_main

    seen = {}

    def fake_main(argv):
        seen["argv"] = list(argv)
        return 3

    monkeypatch.setattr(bench_main, "main", fake_main)
    assert main(["bench", "kernels", "--quick"]) == 3
    assert seen["argv"] == ["kernels", "--quick"]


@pytest.mark.parametrize("torchrun", [False, True])
def test_run_exits_with_mains_status_and_skips_finalization_under_torchrun(torchrun, monkeypatch, capsys):
    """``run`` (the console script and ``python -m ddpm_fast``) exits with main's status; a torchrun rank leaves
    through ``os._exit`` after flushing, so no Gloo worker can still be releasing tensors while the interpreter
    finalizes."""
    from ddpm_fast import cli

    monkeypatch.setattr(cli, "main", lambda argv=None: 3)
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    if torchrun:
        monkeypatch.setenv("WORLD_SIZE", "2")
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as info:
        cli.run([])
    assert info.value.code == 3
    assert exits == ([3] if torchrun else [])


def test_module_entry_point_exits_with_the_status():
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_fast", "sample", "--num-images", "0"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "error" in proc.stderr
