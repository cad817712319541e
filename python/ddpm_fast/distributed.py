"""Running ``ddpm-fast sample`` / ``train`` under ``torchrun``: one process per device, on one or several machines.

The launcher (``torchrun`` / ``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the
process group: backend ``nccl`` when the job runs on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), ``gloo`` on CPU.
Without those variables (or with ``WORLD_SIZE=1``) everything here degrades to a no-op for one process, so the
commands have one code path.

Failure handling. A rank that raises does not simply exit while its peers wait for it in a collective until
the timeout: the commands call :meth:`Distributed.run` / :meth:`Distributed.check` after every unit of work
(a sample batch, a training step), which all-reduce a per-rank status. When any rank failed, every rank stops:
the failing one with its own error, the others with :class:`PeerFailedError` naming the failed ranks. A rank that
dies hard (killed, segfault) is caught by torchrun, which tears the whole local group down; a peer on another
machine stops at the collective timeout (``--dist-timeout``, default 30 minutes).

Test-only failure injection (used by tests/test_distributed.py, not a user feature): with
``DDPM_FAST_TEST_FAIL_AFTER_BATCHES=K`` a process raises after finishing ``K`` sample batches or training steps
(``DDPM_FAST_TEST_FAIL_RANK=r`` restricts that to rank ``r``); ``DDPM_FAST_TEST_FAIL_HARD=1`` makes it exit at once
with ``os._exit(3)`` instead, as if killed, and ``DDPM_FAST_TEST_FAIL_HARD=stop`` makes it stop itself with
``SIGSTOP`` (POSIX) so that a test can ``SIGKILL`` it at that known point (it stays stopped until then).
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
FAIL_AFTER_ENV = "DDPM_FAST_TEST_FAIL_AFTER_BATCHES"
FAIL_RANK_ENV = "DDPM_FAST_TEST_FAIL_RANK"
FAIL_HARD_ENV = "DDPM_FAST_TEST_FAIL_HARD"


class PeerFailedError(RuntimeError):
    """Another rank failed; this one stops too (its own work was fine)."""


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise RuntimeError(f"{name} is not set: launch distributed runs with torchrun")
        return default
    try:
        return int(text)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={text!r} is not an integer") from None


def launched_by_torchrun() -> bool:
    """True when the torchrun environment asks for more than one process."""
    return "WORLD_SIZE" in os.environ and _env_int("WORLD_SIZE") > 1


@dataclass
class Distributed:
    """This process's place in the job; every method is a no-op (or the identity) for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints progress and writes shared files (npz, checkpoints, loss.csv)."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return torch.distributed.get_backend() if self.enabled else None

    def _comm_device(self) -> torch.device:
        # nccl only moves CUDA tensors; gloo only CPU ones.
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                torch.distributed.barrier(device_ids=[self.device.index])
            else:
                torch.distributed.barrier()

    def check(self, ok: bool, what: str, count: float = 0) -> float:
        """All ranks report whether ``what`` went fine and a number (items finished, a loss); returns the sum.

        Raises :class:`PeerFailedError` on the ranks that were fine when any other rank was not; a rank that
        reports ``ok=False`` gets the total back and is expected to raise its own error.
        """
        if not self.enabled:
            return count
        # float64: exact for item counts, and a sum of float32 losses adds no rounding that matters.
        status = torch.zeros(self.world_size, 2, dtype=torch.float64, device=self._comm_device())
        status[self.rank, 0] = float(count)
        status[self.rank, 1] = 0 if ok else 1
        torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.SUM)
        status = status.cpu()
        failed = [r for r in range(self.world_size) if status[r, 1].item()]
        if ok and failed:
            ranks = ", ".join(map(str, failed))
            raise PeerFailedError(
                f"rank {ranks} failed during {what} (its error is printed above); all {self.world_size} ranks stopped"
            )
        return float(status[:, 0].sum().item())

    def run(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` on this rank, then :meth:`check` with every rank: a failure anywhere stops everyone."""
        try:
            result = fn()
        except Exception:
            self.check(False, what)
            raise
        self.check(True, what)
        return result

    def all_mean(self, value: float) -> float:
        """Mean of ``value`` over the ranks (float64 so the average does not add rounding of its own)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.item() / self.world_size

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.enabled = False


def resolve_device(name: str | None, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``--device`` → a device; under torchrun, CUDA means ``cuda:LOCAL_RANK``."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (use cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if distributed:
            if device.index is not None:
                raise ValueError(f"--device {name}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise ValueError(
                    f"LOCAL_RANK {local_rank} has no GPU: this machine has {count}; "
                    f"use --nproc-per-node {count} or fewer"
                )
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Distributed:
    """Join the torchrun job described by the environment (or return a single-process :class:`Distributed`).

    ``device`` is ``--device`` (``None``: CUDA when available). The process group uses ``nccl`` on CUDA and
    ``gloo`` on CPU; ``timeout_s`` bounds how long a collective waits for a missing peer.
    """
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    if not launched_by_torchrun():
        return Distributed(device=resolve_device(device))
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} is not: launch with torchrun"
        )
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    dev = resolve_device(device, local_rank, distributed=True)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev  # binds the communicator to this rank's GPU from the start
    torch.distributed.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, device=dev, enabled=True)


def maybe_inject_failure(rank: int, done: int) -> None:
    """Test-only: fail after ``done`` units when ``DDPM_FAST_TEST_FAIL_AFTER_BATCHES`` asks for it (see module doc)."""
    after = os.environ.get(FAIL_AFTER_ENV)
    if after is None or done != int(after):
        return
    only = os.environ.get(FAIL_RANK_ENV)
    if only is not None and int(only) != rank:
        return
    hard = os.environ.get(FAIL_HARD_ENV)
    if hard == "1":
        sys.stderr.flush()
        os._exit(3)
    if hard == "stop":
        import signal

        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)  # a test SIGKILLs the stopped process; it never runs on
        return
    raise RuntimeError(f"test-only failure injected on rank {rank} after {done} batch(es) ({FAIL_AFTER_ENV})")


def shard(items: list[T], rank: int, world_size: int) -> list[T]:
    """Round-robin share of ``items`` for ``rank``: item ``k`` goes to rank ``k % world_size``.

    Round-robin keeps ranks within one item of each other, also for a resumed run's scattered leftovers.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return items[rank::world_size]
