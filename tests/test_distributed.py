"""``ddpm-fast`` under torchrun on CPU (gloo): world-size-independent samples, npz, crash + resume, DDP training.

Each torchrun launch costs a few seconds of start-up, so runs are module fixtures shared by several tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_fast.cli import main
from ddpm_fast.distributed import Distributed, PeerFailedError, init_distributed, maybe_inject_failure, shard
from ddpm_fast.sampling import load_png, remove_stale_temp_files, write_npz

NUM_IMAGES, BATCH = 7, 2  # 4 batches, the last one short: uneven shares on 2 ranks
SAMPLE_ARGS = [
    "--num-images",
    NUM_IMAGES,
    "--batch-size",
    BATCH,
    "--steps",
    3,
    "--seed",
    5,
    "--device",
    "cpu",
    "--threads",
    1,
    "--quiet",
]
TRAIN_ARGS = [
    "--data",
    "digits",
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
    "--max-steps",
    "4",
    "--checkpoint-every",
    "2",
    "--num-threads",
    "1",
    "--device",
    "cpu",
    "--quiet",
    # Adam turns float noise in near-zero gradients (attention key biases have none in exact arithmetic)
    # into steps of up to lr, so the weight tolerance below is meaningful relative to lr: 1e-5 = 10% of a step.
    "--lr",
    "1e-4",
]
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv, nproc: int = 2, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N -m ddpm_fast ARGV`` on localhost."""
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("DDPM_FAST_TEST")}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "ddpm_fast",
        *map(str, argv),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-level RGB UNet (with attention) and a 50-step scheduler, saved as a pipeline folder."""
    from ddpm_fast import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    folder = tmp_path_factory.mktemp("model")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "s"
    assert main(["sample", "--model", str(tiny_model), "--output", str(out), *map(str, SAMPLE_ARGS)]) == 0
    return out


@pytest.fixture(scope="module")
def two_ranks(tiny_model, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("two") / "s"
    proc = torchrun("sample", "--model", tiny_model, "--output", out, *SAMPLE_ARGS[:-1])  # with progress bars
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


# -- sampling -------------------------------------------------------------------------------------


def test_two_ranks_byte_identical_to_one_process(one_process, two_ranks):
    out2, _ = two_ranks
    a, b = png_bytes(one_process), png_bytes(out2)
    assert sorted(a) == [f"{i:06d}.png" for i in range(NUM_IMAGES)]
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []
    assert len(set(a.values())) == NUM_IMAGES  # the images really differ from one another


def test_npz_holds_every_image_once_in_index_order(one_process, two_ranks):
    for folder in (one_process, two_ranks[0]):
        npzs = list(folder.glob("*.npz"))
        assert [p.name for p in npzs] == [f"samples_{NUM_IMAGES}x8x8x3.npz"]
        with np.load(npzs[0]) as f:
            assert list(f.keys()) == ["arr_0"]
            arr = f["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (NUM_IMAGES, 8, 8, 3)
        for i in range(NUM_IMAGES):
            assert np.array_equal(arr[i], load_png(folder / f"{i:06d}.png"))
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temp or token files


def test_progress_and_summary_on_rank_0_only(two_ranks):
    _, proc = two_ranks
    err = proc.stderr
    assert err.count("wrote 7 image(s)") == 1 and "on 2 ranks (1 CPU thread(s) per process)" in err
    # One progress bar, counting every rank's images. tqdm draws a bar's 0% state once; its 100% state
    # may be drawn twice (last update, then close), so count the starts.
    assert err.count("images:   0%") == 1 and "images: 100%" in err


def test_killed_rank_then_resume_completes_without_duplicates(tiny_model, one_process, tmp_path):
    """Rank 1 dies hard after one batch; torchrun stops the job; a rerun with --resume finishes it."""
    out = tmp_path / "s"
    args = ["sample", "--model", tiny_model, "--output", out, *SAMPLE_ARGS]
    crashed = torchrun(
        *args,
        env={
            "DDPM_FAST_TEST_FAIL_AFTER_BATCHES": "1",
            "DDPM_FAST_TEST_FAIL_RANK": "1",
            "DDPM_FAST_TEST_FAIL_HARD": "1",
        },
    )
    assert crashed.returncode != 0
    done = png_bytes(out)
    # Batch 1 (rank 1's first) is on disk, batch 3 (rank 1's second) is not; no npz for an unfinished run.
    assert {"000002.png", "000003.png"} <= done.keys() and "000006.png" not in done
    assert not list(out.glob("*.npz"))
    (out / ".000006.png.leftover.tmp").write_bytes(b"half a png from a killed writer")
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in done}

    rerun = torchrun(*args, "--resume")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = png_bytes(out)
    assert final == png_bytes(one_process)  # none missing, none extra, every byte as in one process
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in mtimes.items())  # finished images not redone
    with np.load(out / f"samples_{NUM_IMAGES}x8x8x3.npz") as f:
        assert f["arr_0"].shape[0] == NUM_IMAGES
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# -- training -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_one(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train1") / "m"
    assert main(["train", "--output", str(out), *TRAIN_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def trained_two(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """DDP on 2 ranks: rank 1 raises before step 3, then a rerun resumes from checkpoint-2."""
    out = tmp_path_factory.mktemp("train2") / "m"
    failed = torchrun(
        "train",
        "--output",
        out,
        *TRAIN_ARGS,
        env={"DDPM_FAST_TEST_FAIL_AFTER_BATCHES": "2", "DDPM_FAST_TEST_FAIL_RANK": "1"},
    )
    resumed = torchrun("train", "--output", out, *TRAIN_ARGS)
    return out, failed, resumed


def test_failing_rank_stops_training_with_clear_errors(trained_two):
    out, failed, _ = trained_two
    assert failed.returncode != 0
    err = failed.stderr
    assert "ddpm-fast: error: rank 1: test-only failure injected on rank 1 after 2 batch(es)" in err
    assert "ddpm-fast: error: rank 0: rank 1 failed during training step 3" in err


def test_ddp_resume_matches_one_process(trained_one, trained_two):
    """2 ranks x 2 samples == 1 process x 4 samples, through a failure and a resume (checkpoint-2)."""
    from safetensors.torch import load_file

    out2, _, resumed = trained_two
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming from") == 1 and "step 2/4" in resumed.stdout  # rank 0 only
    rows1 = [r.split(",") for r in (trained_one / "loss.csv").read_text().splitlines()[1:]]
    rows2 = [r.split(",") for r in (out2 / "loss.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows2] == ["1", "2", "3", "4"]  # one writer, no duplicated rows after the resume
    for a, b in zip(rows1, rows2):
        # The logged loss is the global-batch mean: same samples, timesteps and noise as one process.
        assert abs(float(a[1]) - float(b[1])) < 2e-6, (a, b)
    s1 = torch.load(trained_one / "checkpoint-4/training_state.pt", weights_only=True)
    s2 = torch.load(out2 / "checkpoint-4/training_state.pt", weights_only=True)
    init = torch.load(trained_one / "checkpoint-2/training_state.pt", weights_only=True)["model"]
    moved = sorted((s1["model"][k] - init[k]).abs().max().item() for k in init)
    assert moved[len(moved) // 2] > 5e-5  # steps 3-4 moved most tensors by ~1 Adam step, 5x the tolerance
    for k, v in s1["model"].items():
        torch.testing.assert_close(s2["model"][k], v, rtol=0, atol=1e-5, msg=k)
    e1 = load_file(trained_one / "unet/diffusion_pytorch_model.safetensors")
    e2 = load_file(out2 / "unet/diffusion_pytorch_model.safetensors")
    assert e1.keys() == e2.keys()
    for k in e1:
        torch.testing.assert_close(e2[k], e1[k], rtol=0, atol=1e-5, msg=k)


def test_batch_must_divide_over_ranks(tmp_path):
    from ddpm_fast.training import TrainConfig, train

    cfg = TrainConfig(data="digits", output=str(tmp_path / "m"), batch_size=3)
    with pytest.raises(ValueError, match=r"--batch-size 3 \(the global batch\) must be divisible by the 2 processes"):
        train(cfg, Distributed(rank=0, world_size=2))  # refused before any collective
    assert not (tmp_path / "m").exists()


# -- units (no processes) -------------------------------------------------------------------------


def test_shard_round_robin_covers_every_batch_once():
    items = list(range(11))
    for world in (1, 2, 3, 5, 16):
        shares = [shard(items, r, world) for r in range(world)]
        assert sorted(sum(shares, [])) == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        shard(items, 2, 2)


def test_single_process_fallback(monkeypatch):
    for v in LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)
    d = init_distributed("cpu")
    assert (d.enabled, d.rank, d.world_size, d.is_main, d.device) == (False, 0, 1, True, torch.device("cpu"))
    assert d.check(True, "x", 3) == 3 and d.broadcast({"a": 1}) == {"a": 1} and d.run("x", lambda: 7) == 7
    d.barrier()
    d.close()
    with pytest.raises(ValueError, match="--dist-timeout"):
        init_distributed("cpu", timeout_s=0)
    with pytest.raises(ValueError, match="--device"):
        init_distributed("tpu")


def test_bad_launch_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(RuntimeError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not: launch with torchrun"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed("cpu")


def test_failure_injection_is_opt_in(monkeypatch):
    monkeypatch.delenv("DDPM_FAST_TEST_FAIL_AFTER_BATCHES", raising=False)
    maybe_inject_failure(0, 0)  # nothing set: nothing happens
    monkeypatch.setenv("DDPM_FAST_TEST_FAIL_AFTER_BATCHES", "2")
    monkeypatch.setenv("DDPM_FAST_TEST_FAIL_RANK", "1")
    maybe_inject_failure(0, 2)  # other rank
    maybe_inject_failure(1, 1)  # not yet
    with pytest.raises(RuntimeError, match="test-only failure injected on rank 1 after 2"):
        maybe_inject_failure(1, 2)


def test_peer_failure_message_names_the_failed_rank():
    """check() with a real 1-rank gloo group: a failed rank gets the total back, a good one passes."""
    import torch.distributed as td

    port = free_port()
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        d = Distributed(rank=0, world_size=1, enabled=True)
        assert d.check(True, "x", 2.5) == 2.5
        assert d.check(False, "x", 1) == 1  # own failure: the caller raises its own error
        assert d.broadcast([1, 2]) == [1, 2]
        with pytest.raises(ZeroDivisionError):
            d.run("dividing", lambda: 1 / 0)
        assert issubclass(PeerFailedError, RuntimeError)
    finally:
        td.destroy_process_group()


def test_write_npz_refuses_missing_or_mixed_images(tmp_path):
    from ddpm_fast.sampling import write_png_atomic

    for i in range(3):
        write_png_atomic(np.full((4, 4, 3), i, np.uint8), tmp_path / f"{i:06d}.png")
    path = write_npz(tmp_path, 3)
    with np.load(path) as f:
        assert f["arr_0"][:, 0, 0, 0].tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="000003.png is missing.*one folder they all share"):
        write_npz(tmp_path, 4, tmp_path / "x.npz")
    write_png_atomic(np.zeros((5, 5, 3), np.uint8), tmp_path / "000001.png")
    with pytest.raises(ValueError, match="different runs"):
        write_npz(tmp_path, 3, tmp_path / "y.npz")
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.npz").exists()
    (tmp_path / ".000001.png.abc.tmp").write_bytes(b"")
    assert remove_stale_temp_files(tmp_path) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_two_rank_checkpoint_resumes_in_one_process(trained_one, trained_two, tmp_path):
    """World size is not part of a checkpoint: 1 process continues the 2-rank run's checkpoint-2."""
    import shutil

    from safetensors.torch import load_file

    out2, _, _ = trained_two
    assert json.loads((out2 / "checkpoint-2/unet/config.json").read_text())["sample_size"] == 8
    resumed = tmp_path / "m"
    resumed.mkdir()
    shutil.copytree(out2 / "checkpoint-2", resumed / "checkpoint-2")
    assert main(["train", "--output", str(resumed), *TRAIN_ARGS]) == 0
    e1 = load_file(trained_one / "unet/diffusion_pytorch_model.safetensors")
    e2 = load_file(resumed / "unet/diffusion_pytorch_model.safetensors")
    for k in e1:
        torch.testing.assert_close(e2[k], e1[k], rtol=0, atol=1e-5, msg=k)
