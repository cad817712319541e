"""The ``ddpm-fast`` command line (also ``python -m ddpm_fast``): ``sample``, ``train`` and ``bench``.

Expected failures (bad arguments, missing files, unwritable folders) print one line,
``ddpm-fast: error: <message>``, to stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "ddpm-fast"
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("ddpm", "ddim")


class CLIError(Exception):
    """An error whose message is the whole story for the user."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before its error; the contract here is one line.
    def error(self, message: str):
        raise CLIError(f"{self.prog.split(' ', 1)[-1] + ': ' if ' ' in self.prog else ''}{message}")


def _int_at_least(name: str, minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_int(name: str):
    return _int_at_least(name, 1)


def _non_negative_int(name: str):
    return _int_at_least(name, 0)


def _int_list(name: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fast DDPM sampling and training, compatible with diffusers checkpoints.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{sample,train,bench}", parser_class=_Parser)

    s = sub.add_parser("sample", help="generate images as PNG files")
    s.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped ddpm-digits model)")
    s.add_argument("--num-images", type=_positive_int("--num-images"), default=16)
    s.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64)
    s.add_argument(
        "--steps",
        type=_positive_int("--steps"),
        default=None,
        help="denoising steps (default: 1000 for ddpm, 50 for ddim)",
    )
    s.add_argument("--scheduler", choices=SCHEDULERS, default="ddpm")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    s.add_argument("--seed", type=_non_negative_int("--seed"), default=0)
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    s.add_argument("--output", default="samples", help="folder for DIR/000000.png, ... (default: ./samples)")
    s.add_argument("--grid", action="store_true", help="also write DIR/grid.png")
    group = s.add_mutually_exclusive_group()
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace images, grid and .npz that already exist (nothing is replaced without it)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="keep existing images (each is decoded: damaged ones are sampled again), sample only the missing ones",
    )
    s.add_argument("--backend", choices=("fused", "reference"), default=None, help="implementation (default: fused)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument(
        "--num-threads",
        "--threads",
        dest="num_threads",
        type=_positive_int("--num-threads"),
        default=None,
        help="torch CPU threads per process (default: torch's choice, which is "
        "OMP_NUM_THREADS=1 under torchrun); CPU pixels can depend on it, so keep it fixed across runs",
    )
    npz = s.add_mutually_exclusive_group()
    npz.add_argument(
        "--npz",
        default=None,
        metavar="PATH",
        help="where rank 0 writes all images as one .npz, key arr_0, uint8 NxHxWxC (default: DIR/samples_NxHxWxC.npz)",
    )
    npz.add_argument("--no-npz", action="store_true", help="write PNGs only")
    s.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for a missing peer before failing (default: 1800)",
    )

    t = sub.add_parser("train", help="train a DDPM on a folder of images or the built-in digits")
    t.add_argument("--data", required=True, help="folder of images, or 'digits' (scikit-learn's 8x8 digits)")
    t.add_argument("--output", required=True, help="folder for checkpoints, loss.csv and the final pipeline")
    t.add_argument("--resolution", type=_positive_int("--resolution"), default=16)
    t.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: 1 if all images are grayscale")
    t.add_argument("--block-out-channels", type=_int_list("--block-out-channels"), default=(32, 64, 64))
    t.add_argument("--layers-per-block", type=_positive_int("--layers-per-block"), default=1)
    t.add_argument("--norm-num-groups", type=_positive_int("--norm-num-groups"), default=8)
    t.add_argument(
        "--attention-levels",
        type=_int_list("--attention-levels"),
        default=(1,),
        help="UNet levels (0 = full resolution) with attention blocks; '' for none",
    )
    t.add_argument("--num-train-timesteps", type=_positive_int("--num-train-timesteps"), default=1000)
    t.add_argument("--beta-schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2"), default="linear")
    t.add_argument("--max-steps", type=_positive_int("--max-steps"), default=2000)
    t.add_argument("--batch-size", type=_positive_int("--batch-size"), default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup-steps", type=_non_negative_int("--warmup-steps"), default=100)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--hflip", action="store_true", help="random horizontal flips (off: digits are not symmetric)")
    t.add_argument("--seed", type=_non_negative_int("--seed"), default=0)
    t.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=500)
    t.add_argument("--checkpoints-total-limit", type=_positive_int("--checkpoints-total-limit"), default=2)
    t.add_argument("--log-every", type=_positive_int("--log-every"), default=10)
    t.add_argument("--device", default="cpu")
    t.add_argument(
        "--num-threads",
        type=_positive_int("--num-threads"),
        default=None,
        help="torch CPU threads (default: torch's choice)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for a missing peer before failing (default: 1800)",
    )

    sub.add_parser("bench", help="benchmarks (all arguments go to python -m ddpm_fast.bench)", add_help=False)
    return parser


def _parse_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _run_distributed(args: argparse.Namespace, job) -> int:
    """Thread count, then ``job(dist)`` inside this process's (possibly single-rank) process group."""
    import torch

    from .distributed import init_distributed

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        dist = init_distributed(args.device, args.dist_timeout)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        return job(dist)
    finally:
        dist.close()


def run_sample(args: argparse.Namespace) -> int:
    """``ddpm-fast sample``, alone or as one rank of a torchrun job (see docs/distributed.md)."""
    return _run_distributed(args, lambda dist: _sample(args, dist))


def _sample(args: argparse.Namespace, dist) -> int:
    import numpy as np
    import torch

    from . import DDIMScheduler, DDPMPipeline
    from .fast_path import backend as use_backend
    from .sampling import (
        GRID_NAME,
        batch_indices,
        damaged_images,
        image_path,
        load_png,
        make_grid,
        pending_batches,
        prepare_output_dir,
        remove_stale_temp_files,
        sample_sharded,
        write_npz,
        write_png_atomic,
    )
    from .weights import shipped_model_path

    steps = args.steps if args.steps is not None else (1000 if args.scheduler == "ddpm" else 50)
    model = args.model if args.model is not None else shipped_model_path()
    if not os.path.exists(model):
        from .hub import looks_like_hub_id

        if not looks_like_hub_id(model):  # hub ids ("google/ddpm-cat-256") are resolved by from_pretrained
            raise CLIError(f"--model {model!r} does not exist")

    def plan():
        # Rank 0 alone looks at (and tidies) --output, then every rank gets the same batch list: ranks that
        # listed the folder themselves could disagree once a fast rank starts writing.
        if not dist.is_main:
            return None
        prepare_output_dir(args.output, args.num_images, overwrite=args.overwrite, resume=args.resume)
        _check_grid_target(args)
        remove_stale_temp_files(args.output)
        damaged: list[tuple[int, str]] = []
        if args.resume:
            # Every existing image is decoded; a damaged one is removed here, so its batch counts as unfinished
            # and is sampled again exactly as in an uninterrupted run (same batch, same seeds).
            damaged = damaged_images(args.num_images, args.output)
            for i, _ in damaged:
                image_path(args.output, i).unlink(missing_ok=True)
        token = None
        if dist.enabled:
            import uuid

            token = f".ddpm-fast-shared-{uuid.uuid4().hex}"  # not from torch's RNG: sampling leaves that alone
            (Path(args.output) / token).write_text("")
        batches = (
            pending_batches(args.num_images, args.batch_size, args.output)
            if args.resume
            else batch_indices(args.num_images, args.batch_size)
        )
        return batches, token, damaged

    batches, token, damaged = dist.broadcast(dist.run("preparing --output", plan))
    if damaged and dist.is_main:
        print(f"{PROG}: --resume: {_damaged_summary(args.output, damaged)}", file=sys.stderr)
    if token is not None:

        def shared_check():
            if not (Path(args.output) / token).exists():
                raise FileNotFoundError(
                    f"--output {args.output!r} on this machine is not the folder rank 0 prepared: under torchrun "
                    "on several machines it must be one shared folder (NFS or similar)"
                )

        try:
            dist.run("checking that --output is shared", shared_check)
        finally:
            if dist.is_main:
                (Path(args.output) / token).unlink(missing_ok=True)

    def load():
        pipe = DDPMPipeline.from_pretrained(model)
        if args.scheduler == "ddim":
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        num_train = pipe.scheduler.config.num_train_timesteps
        if steps > num_train:
            raise CLIError(f"--steps must be at most the model's num_train_timesteps ({num_train}), got {steps}")
        if args.eta and args.scheduler != "ddim":
            raise CLIError("--eta applies to --scheduler ddim only")
        if args.eta:
            # DDPMPipeline calls scheduler.step(..., generator=...) without eta; bind it here.
            step = pipe.scheduler.step
            pipe.scheduler.step = lambda *a, **k: step(*a, eta=args.eta, **k)
        return pipe.to(device=dist.device, dtype=_parse_dtype(args.dtype))

    pipe = dist.run("loading the model", load)
    # Rank 0 writes the .npz; where and whether it may replace a file is settled before any sampling.
    npz_path, npz_replace = dist.run(
        "checking the .npz path", lambda: _npz_target(args, pipe) if dist.is_main else (None, False)
    )

    n_todo = sum(len(b) for b in batches)
    bar = None
    if not args.quiet and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_todo, desc="images", unit="img", dynamic_ncols=True)
        pipe.set_progress_bar_config(leave=False, desc="steps", dynamic_ncols=True)
    else:
        pipe.set_progress_bar_config(disable=True)
    ctx = use_backend(args.backend) if args.backend else contextlib.nullcontext()
    try:
        with ctx, torch.inference_mode():
            # Without --overwrite an image file that appears meanwhile (another job on the folder) is not replaced.
            sample_sharded(
                pipe,
                batches,
                args.seed,
                steps,
                dist,
                out_dir=args.output,
                skip_existing=args.resume,
                progress=bar.update if bar is not None else None,
                replace=args.overwrite,
            )
    finally:
        if bar is not None:
            bar.close()

    dist.barrier()  # every rank's PNGs are on disk before rank 0 reads them back

    def finish():
        if not dist.is_main:
            return None
        written = []
        if npz_path is not None:
            written.append(str(write_npz(args.output, args.num_images, npz_path, replace=npz_replace)))
        if args.grid:
            images = [load_png(image_path(args.output, i)) for i in range(args.num_images)]
            grid = make_grid(images, scale=max(1, 128 // max(images[0].shape[:2])))
            write_png_atomic(
                np.asarray(grid), os.path.join(args.output, GRID_NAME), replace=args.overwrite or args.resume
            )
            written.append(GRID_NAME)
        return written

    written = dist.run("writing the .npz", finish)
    if dist.is_main:
        ranks = f" on {dist.world_size} ranks" if dist.enabled else ""
        extra = f" and {', '.join(written)}" if written else ""
        print(
            f"wrote {n_todo} image(s) to {args.output}{extra}{ranks} "
            f"({torch.get_num_threads()} CPU thread(s) per process)",
            file=sys.stderr,
        )
    return 0


def _damaged_summary(out_dir: str, damaged: list[tuple[int, str]], limit: int = 5) -> str:
    from .sampling import image_path

    names = [f"{image_path(out_dir, i).name} ({reason})" for i, reason in damaged[:limit]]
    more = f" and {len(damaged) - limit} more" if len(damaged) > limit else ""
    return f"{len(damaged)} damaged image(s) in {out_dir} will be sampled again: {', '.join(names)}{more}"


def _check_grid_target(args: argparse.Namespace) -> None:
    """``--grid`` replaces DIR/grid.png only with --overwrite, or with --resume (then it is this run's grid)."""
    from .sampling import GRID_NAME

    if not args.grid:
        return
    path = Path(args.output) / GRID_NAME
    if path.is_dir():
        raise CLIError(f"{path} is a folder; --grid writes the grid there")
    if os.path.lexists(path) and not (args.overwrite or args.resume):
        raise FileExistsError(
            f"{path} already exists; pass --overwrite to replace it (or --resume if it is this run's grid)"
        )


def _npz_target(args: argparse.Namespace, pipe) -> tuple[Path | None, bool]:
    """Where the .npz goes and whether it may replace an existing file; refuses to clobber before sampling.

    An existing file is replaced with --overwrite, or with --resume when it is this run's own .npz: ``arr_0``
    uint8 of this run's shape (what an earlier, finished attempt wrote). Anything else is refused.
    """
    import numpy as np

    from .sampling import default_npz_path, npz_header

    if args.no_npz:
        return None, False
    n, c, *hw = pipe.image_shape(args.num_images)
    shape = (n, *hw, c)
    path = Path(args.npz) if args.npz is not None else default_npz_path(args.output, shape)
    what = f"--npz {path}" if args.npz is not None else str(path)
    if path.is_dir():
        raise CLIError(f"{what} is a folder; --npz takes the path of the .npz file to write")
    if not path.parent.is_dir():
        raise CLIError(f"{what}: folder {str(path.parent)!r} does not exist")
    if not os.path.lexists(path):
        return path, False  # created without replacing: a file that appears meanwhile is refused, not replaced
    if args.overwrite:
        return path, True
    if args.resume:
        if npz_header(path) == (shape, np.dtype(np.uint8)):
            return path, True
        raise FileExistsError(
            f"{what} already exists and is not this run's .npz (arr_0, uint8, shape {shape}); --resume replaces "
            "only this run's own files: remove it or choose another --npz path"
        )
    raise FileExistsError(f"{what} already exists; pass --overwrite to replace it")


def run_train(args: argparse.Namespace) -> int:
    """``ddpm-fast train``, alone or as one rank of a torchrun job (DistributedDataParallel)."""
    from .training import TrainConfig, train

    return _run_distributed(args, lambda dist: _train(args, dist, TrainConfig, train))


def _train(args: argparse.Namespace, dist, TrainConfig, train) -> int:

    cfg = TrainConfig(
        data=args.data,
        output=args.output,
        resolution=args.resolution,
        channels=args.channels,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_num_groups,
        attention_levels=tuple(args.attention_levels),
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay,
        hflip=args.hflip,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        checkpoints_total_limit=args.checkpoints_total_limit,
        log_every=args.log_every,
        device=str(dist.device),
        num_threads=args.num_threads,
        progress=not args.quiet,
    )
    out = train(cfg, dist)
    if dist.is_main:
        print(f"trained pipeline written to {out}", file=sys.stderr)
    return 0


def run_bench(argv: Sequence[str]) -> int:
    """``ddpm-fast bench ...`` is ``python -m ddpm_fast.bench ...``."""
    try:
        from .bench.__main__ import main as bench_main
    except ImportError as e:
        raise CLIError(f"benchmarks are not available ({e})") from None
    try:
        return bench_main(list(argv))
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def _rank_prefix() -> str:
    """``"rank 3: "`` under a torchrun job of several processes, so each line says who failed."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return f"rank {int(os.environ['RANK'])}: "
    except (KeyError, ValueError):
        pass
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ddpm-fast`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return run_bench(argv[1:])
        args = build_parser().parse_args(argv)
        if args.version:
            from . import __version__

            print(f"{PROG} {__version__}")
            return 0
        if args.command == "sample":
            return run_sample(args)
        if args.command == "train":
            return run_train(args)
        build_parser().print_help(sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {_rank_prefix()}{message}", file=sys.stderr)
        return 2


def run(argv: Sequence[str] | None = None) -> None:
    """The ``ddpm-fast`` console script and ``python -m ddpm_fast``: :func:`main`, then exit with its status.

    A torchrun rank exits without the interpreter's finalization (``os._exit`` after flushing stdout and stderr;
    the process group is destroyed and every output file closed by then). Gloo's worker thread can still be
    dropping the last collective's work, whose tensors own Python objects, when the interpreter finalizes; its
    GIL acquire then aborts the rank ("terminate called without an active exception", pytorch/pytorch#179291),
    which the resume tests hit about once in ten runs on a loaded 2-core machine."""
    from .distributed import launched_by_torchrun

    code = main(argv)
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
