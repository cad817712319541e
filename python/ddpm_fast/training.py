"""DDPM training (Ho et al. 2020): ε-prediction MSE at uniformly drawn timesteps, AdamW with linear warm-up
then cosine decay, an EMA of the weights, checkpoints in the diffusers pipeline layout, exact resume.

Layout of ``output``::

    output/model_index.json, unet/, scheduler/     final pipeline (EMA weights), loads in ddpm_fast and diffusers
    output/checkpoint-<step>/                      same pipeline layout (EMA weights) + training_state.pt
    output/loss.csv                                step, mean loss since the previous row, lr, wall seconds

All randomness (batch indices, timesteps, noise, flips) comes from one CPU ``torch.Generator`` seeded with
``seed``; its state is checkpointed, so an interrupted run resumed from its last checkpoint takes the same
steps as an uninterrupted one.

Under torchrun (``train(cfg, dist)`` with several ranks) the model is wrapped in DistributedDataParallel and
``batch_size`` is the *global* batch: every rank draws the whole global batch from the same generator (same
indices, flips, timesteps and noise as one process) and trains on its contiguous slice of ``batch_size /
world_size`` samples; DDP averages the gradients, which equals the one-process mean over the global batch.
So a run on W processes follows the one-process run up to float rounding, and either can resume the other's
checkpoints. Only rank 0 writes (checkpoints, loss.csv, the final pipeline) and keeps the EMA.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .configuration import DIFFUSERS_COMPAT_VERSION

TRAINING_STATE = "training_state.pt"
LOSS_CSV = "loss.csv"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in each checkpoint; resume checks the model part)."""

    data: str
    output: str
    resolution: int = 16
    channels: int | None = None
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_levels: tuple[int, ...] = (1,)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    max_steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    hflip: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2
    log_every: int = 10
    device: str = "cpu"
    num_threads: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    # Fields that shape the model or the objective; a resume with other values would silently train
    # something else, so it is refused.
    MODEL_FIELDS = (
        "resolution",
        "block_out_channels",
        "layers_per_block",
        "norm_num_groups",
        "attention_levels",
        "num_train_timesteps",
        "beta_schedule",
    )

    def validate(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")

        for name in (
            "resolution",
            "max_steps",
            "batch_size",
            "layers_per_block",
            "norm_num_groups",
            "num_train_timesteps",
            "checkpoint_every",
            "log_every",
            "checkpoints_total_limit",
        ):
            positive(name)
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"--block-out-channels must be positive integers, got {self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"--block-out-channels {list(self.block_out_channels)} must all be divisible by "
                f"--norm-num-groups {self.norm_num_groups}"
            )
        n = len(self.block_out_channels)
        if any(not 0 <= a < n for a in self.attention_levels):
            raise ValueError(f"--attention-levels must be in 0..{n - 1}, got {list(self.attention_levels)}")
        factor = 2 ** (n - 1)
        if self.resolution % factor:
            raise ValueError(f"--resolution {self.resolution} must be divisible by {factor} for {n} UNet levels")
        if not self.learning_rate > 0:
            raise ValueError(f"--lr must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"--beta-schedule {self.beta_schedule!r} is not one of linear, scaled_linear, squaredcos_cap_v2"
            )
        if self.channels not in (None, 1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, sort_keys=True)


def unet_config(cfg: TrainConfig, channels: int) -> dict:
    """The ``UNet2DModel`` config for ``cfg``: plain blocks, attention blocks at ``attention_levels``."""
    n = len(cfg.block_out_channels)
    down = tuple("AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if (n - 1 - i) in cfg.attention_levels else "UpBlock2D" for i in range(n))
    return dict(
        sample_size=cfg.resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=8,
    )


def scheduler_config(cfg: TrainConfig) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=True,
        variance_type="fixed_small",
        prediction_type="epsilon",
    )


def save_pipeline(unet, scheduler, directory: str | os.PathLike) -> None:
    """Write the diffusers ``DDPMPipeline`` folder layout (model_index.json, unet/, scheduler/)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(d / "unet")
    scheduler.save_pretrained(d / "scheduler")
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_COMPAT_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (d / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def list_checkpoints(output: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output`` as ``(step, path)``, oldest first."""
    out = Path(output)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and (p / TRAINING_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * learning_rate``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    scale = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * scale


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with the usual warm-up (as diffusers' EMAModel): early averages are not dominated by the init."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _atomic_checkpoint(output: Path, step: int, unet_ema, scheduler, state: dict, keep: int) -> Path:
    final = output / f"checkpoint-{step}"
    tmp = output / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pipeline(unet_ema, scheduler, tmp)
    torch.save(state, tmp / TRAINING_STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # a crash mid-write leaves only the .tmp folder, never a half checkpoint
    for _, old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _trim_loss_csv(path: Path, max_step: int) -> None:
    """Drop rows logged after the checkpoint being resumed (they will be trained again)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= max_step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def train(cfg: TrainConfig, dist=None) -> Path:
    """Train (or resume) and write the final pipeline to ``cfg.output``; returns that folder.

    ``dist``: a :class:`ddpm_fast.distributed.Distributed` when this process is one rank of a torchrun job
    (its device must be ``cfg.device``); ``None`` for a single process.
    """
    from .distributed import Distributed

    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    if dist is None:
        dist = Distributed(device=device)
    if cfg.batch_size % dist.world_size:
        raise ValueError(
            f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {dist.world_size} "
            "processes of the torchrun job"
        )
    return _train(cfg, dist, device)


def _prepare_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} exists and is not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"--output {str(output)!r} is not writable ({e.strerror or e})") from None


def _load_resume_state(cfg: TrainConfig, output: Path, channels: int) -> tuple[dict | None, Path | None]:
    """The newest checkpoint's training state (checked against ``cfg``) and its folder, or ``(None, None)``."""
    checkpoints = list_checkpoints(output)
    state = None
    if checkpoints:
        step0, ckpt = checkpoints[-1]
        state = torch.load(ckpt / TRAINING_STATE, map_location="cpu", weights_only=True)
        saved = json.loads(state["config"])
        for name in TrainConfig.MODEL_FIELDS:
            ours = getattr(cfg, name)
            theirs = saved[name]
            if (list(ours) if isinstance(ours, tuple) else ours) != theirs:
                raise ValueError(
                    f"cannot resume from {str(ckpt)!r}: it was trained with {name}={theirs!r}, "
                    f"this run asks for {ours!r} (use another --output to start afresh)"
                )
        if saved.get("channels_resolved") not in (None, channels):
            raise ValueError(
                f"cannot resume from {str(ckpt)!r}: it has {saved['channels_resolved']} channels, the data {channels}"
            )
        return state, ckpt
    return None, None


def _train(cfg: TrainConfig, dist, device: torch.device) -> Path:
    from torch.nn.parallel import DistributedDataParallel

    from . import DDPMScheduler, UNet2DModel
    from .data import load_training_data
    from .distributed import maybe_inject_failure
    from .fast_path import backend as use_backend

    output = Path(cfg.output)
    main = dist.is_main
    data = dist.run("loading --data", lambda: load_training_data(cfg.data, cfg.resolution, cfg.channels))
    channels = data.shape[1]

    def prepare():
        # Rank 0 owns --output; the others get its checkpoint (no shared folder needed for training).
        if not main:
            return None
        _prepare_output(output)
        state, ckpt = _load_resume_state(cfg, output, channels)
        if state is not None:
            _trim_loss_csv(output / LOSS_CSV, int(state["step"]))
        return state, ckpt

    state, ckpt = dist.broadcast(dist.run("preparing --output", prepare))

    torch.manual_seed(cfg.seed)  # the weight initialisation
    unet = UNet2DModel(**unet_config(cfg, channels)).to(device)
    scheduler = DDPMScheduler(**scheduler_config(cfg))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    elapsed_before = 0.0
    if state is not None:
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step = int(state["step"])
        elapsed_before = float(state["elapsed_s"])
        if main:
            print(f"resuming from {ckpt} (step {step}/{cfg.max_steps})", flush=True)
    model = unet
    if dist.enabled:
        model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    world, rank = dist.world_size, dist.rank
    local = cfg.batch_size // world
    lo, hi = rank * local, (rank + 1) * local

    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    cfg_json = json.dumps({**json.loads(cfg.to_json()), "channels_resolved": channels}, sort_keys=True)

    def make_state(step_now: int, elapsed: float) -> dict:
        return {
            "step": step_now,
            "model": unet.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": gen.get_state(),
            "elapsed_s": elapsed,
            "config": cfg_json,
        }

    csv_file = writer = None
    if main:
        loss_path = output / LOSS_CSV
        new_csv = not loss_path.exists()
        csv_file = open(loss_path, "a", newline="")
        writer = csv.writer(csv_file)
        if new_csv:
            writer.writerow(["step", "loss", "lr", "elapsed_s"])

    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but training must not die over a progress bar
        tqdm = None
    bar = None
    if cfg.progress and tqdm is not None and main:
        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    t_start = time.perf_counter()
    running, n_running, smooth = 0.0, 0, None
    n = data.shape[0]
    unet.train()
    try:
        with use_backend("reference"):  # autograd path of every block
            while step < cfg.max_steps:
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # Every rank draws the whole global batch (the one-process stream), then keeps its slice.
                idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)[lo:hi]
                x0 = data[idx]
                if cfg.hflip:
                    flip = (torch.rand(cfg.batch_size, generator=gen) < 0.5)[lo:hi]
                    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
                t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)[lo:hi]
                noise = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=gen)[lo:hi]
                x0, t, noise = x0.to(device), t.to(device), noise.to(device)
                a = alphas_cumprod[t].view(-1, 1, 1, 1)
                noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise

                try:
                    maybe_inject_failure(rank, step)
                    pred = model(noisy, t).sample
                    loss = F.mse_loss(pred.float(), noise)
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"training diverged at step {step} (loss {loss.item()}); try a lower --lr")
                except Exception:
                    dist.check(False, f"training step {step + 1}")
                    raise
                # Before backward: a rank that failed never reaches DDP's gradient all-reduce, so the others
                # must learn of it here rather than wait there. The same collective averages the loss.
                value = dist.check(True, f"training step {step + 1}", loss.item()) / world
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
                optimizer.step()
                if main:  # only rank 0 writes the EMA weights
                    ema_update(ema, unet, ema_decay_at(step, cfg.ema_decay))
                step += 1

                running += value
                n_running += 1
                smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
                elapsed = elapsed_before + time.perf_counter() - t_start
                if main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                    writer.writerow([step, f"{running / n_running:.6f}", f"{lr:.6g}", f"{elapsed:.1f}"])
                    csv_file.flush()
                    running, n_running = 0.0, 0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}", refresh=False)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    dist.run(
                        f"writing checkpoint-{step}",
                        lambda: (
                            main
                            and _atomic_checkpoint(
                                output, step, ema, scheduler, make_state(step, elapsed), cfg.checkpoints_total_limit
                            )
                        ),
                    )
    finally:
        if csv_file is not None:
            csv_file.close()
        if bar is not None:
            bar.close()

    if main and state is not None and step == int(state["step"]) and step >= cfg.max_steps:
        print(f"already trained to step {step}; writing the final pipeline", flush=True)
    dist.run("writing the final pipeline", lambda: main and save_pipeline(ema, scheduler, output))
    return output
