"""The CPU kernels' memory pool (csrc/cpu/pool.cpp): large outputs and scratch come from blocks the pool keeps,
the values are those of unpooled outputs, and the pool can be inspected, emptied, limited and turned off."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import subprocess
import sys
import threading

import pytest
import torch

from ddpm_fast import _native, ops

CL = torch.channels_last


def _pool_serves_tensors() -> bool:
    """Whether this torch gives the pool's tensors a deleter (torch_from_blob, torch >= 2.11)."""
    if not _native.available():
        return False
    limit = ops.cpu_memory_stats()["limit_bytes"]
    ops.set_cpu_cache_limit(1 << 30)
    y = ops.group_norm_silu(torch.randn(4, 64, 64, 64), 8)
    served = ops.cpu_memory_stats()["live_bytes"] > 0
    del y
    ops.set_cpu_cache_limit(limit)
    return served


pytestmark = pytest.mark.skipif(
    not _pool_serves_tensors(), reason="native extension unavailable, or a torch without torch_from_blob"
)


def _big_input(seed: int = 0) -> torch.Tensor:  # 4 MiB of fp32, channels_last
    return torch.randn(4, 64, 64, 64, generator=torch.Generator().manual_seed(seed)).to(memory_format=CL)


@pytest.fixture
def pool_on():
    before = ops.cpu_memory_stats()["limit_bytes"]
    ops.set_cpu_cache_limit(1 << 30)
    yield
    ops.set_cpu_cache_limit(before)


def test_large_outputs_reuse_pooled_blocks(pool_on):
    x = _big_input()
    ops.empty_cpu_cache()
    start = ops.cpu_memory_stats()
    y = ops.group_norm_silu(x, 8)
    during = ops.cpu_memory_stats()
    assert during["live_bytes"] - start["live_bytes"] >= y.numel() * 4
    assert during["misses"] == start["misses"] + 1
    del y
    after = ops.cpu_memory_stats()
    assert after["live_bytes"] == start["live_bytes"] and after["cached_bytes"] >= x.numel() * 4
    y = ops.group_norm_silu(x, 8)  # the same class: served from the cache
    again = ops.cpu_memory_stats()
    assert again["hits"] == after["hits"] + 1 and again["misses"] == after["misses"]
    assert again["cached_bytes"] == after["cached_bytes"] - (again["live_bytes"] - after["live_bytes"])
    del y


def test_small_outputs_bypass_the_pool(pool_on):
    x = torch.randn(2, 16, 8, 8)
    start = ops.cpu_memory_stats()
    y = ops.group_norm_silu(x, 4)
    assert ops.cpu_memory_stats()["misses"] == start["misses"] and ops.cpu_memory_stats()["hits"] == start["hits"]
    del y


def _outputs(x: torch.Tensor) -> list[torch.Tensor]:
    """Each pooled kernel once: GroupNorm+SiLU (one input and two), both Winograd tiles (output and scratch),
    attention."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 64, 3, 3, generator=gen) * 0.05
    q = torch.randn(2, 2, 1024, 256, generator=gen)  # a 4 MiB output
    return [
        ops.group_norm_silu(x, 8, torch.randn(64, generator=gen), torch.randn(64, generator=gen)),
        ops.group_norm_silu_cat(x, x * 0.5 - 1.0, 16, torch.randn(128, generator=gen), None),
        ops.conv3x3_winograd(x, ops.winograd_weight(w, 2), residual=x, silu=True),
        ops.conv3x3_winograd(x, ops.winograd_weight(w, 4), torch.randn(64, generator=gen)),
        ops.attention(q, q * 0.5, q * 0.25),
    ]


def test_pooled_outputs_equal_unpooled(pool_on):
    x = _big_input(3)
    pooled = _outputs(x)
    del pooled
    pooled = _outputs(x)  # second round: every output in a reused block
    assert ops.cpu_memory_stats()["hits"] > 0
    ops.set_cpu_cache_limit(0)
    start = ops.cpu_memory_stats()
    plain = _outputs(x)
    assert ops.cpu_memory_stats()["live_bytes"] == start["live_bytes"]  # off: nothing more from the pool
    for a, b in zip(pooled, plain):
        assert torch.equal(a, b)
        assert a.stride() == b.stride() and a.dtype == b.dtype


def test_empty_cache_keeps_live_tensors(pool_on):
    x = _big_input(5)
    y = ops.group_norm_silu(x, 8)
    expected = y.clone()
    z = ops.group_norm_silu(_big_input(6), 8)
    del z
    ops.empty_cpu_cache()
    assert ops.cpu_memory_stats()["cached_bytes"] == 0
    for seed in range(3):  # new blocks must not land on y's
        ops.group_norm_silu(_big_input(10 + seed), 8).fill_(float("nan"))
    assert torch.equal(y, expected)


def test_limit_bounds_the_cached_bytes(pool_on):
    ops.empty_cpu_cache()
    x = _big_input()
    start = ops.cpu_memory_stats()["live_bytes"]
    ys = [ops.group_norm_silu(x, 8) for _ in range(4)]
    block = (ops.cpu_memory_stats()["live_bytes"] - start) // 4
    ops.set_cpu_cache_limit(2 * block)
    del ys
    assert ops.cpu_memory_stats()["cached_bytes"] == 2 * block  # two kept, two freed


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit_is_refused(bad):
    with pytest.raises(ValueError, match="limit_bytes"):
        ops.set_cpu_cache_limit(bad)


def test_bad_environment_value_names_the_variable():
    code = "import torch; from ddpm_fast import ops; ops.group_norm_silu(torch.randn(4, 64, 64, 64), 8)"
    env = {**os.environ, "DDPM_FAST_CPU_POOL_MB": "lots"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DDPM_FAST_CPU_POOL_MB" in proc.stderr


def test_environment_turns_the_pool_off():
    code = (
        "import torch; from ddpm_fast import ops; y = ops.group_norm_silu(torch.randn(4, 64, 64, 64), 8); "
        "s = ops.cpu_memory_stats(); print(s['limit_bytes'], s['live_bytes'])"
    )
    env = {**os.environ, "DDPM_FAST_CPU_POOL_MB": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "0"]


def test_threads_share_the_pool(pool_on):
    x = [_big_input(20 + i) for i in range(4)]
    expected = [ops.group_norm_silu(t, 8) for t in x]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(10):
            if not torch.equal(ops.group_norm_silu(x[i], 8), expected[i]):
                errors.append(f"thread {i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _child(queue) -> None:
    y = ops.group_norm_silu(_big_input(), 8)
    del y
    queue.put(float(ops.group_norm_silu(_big_input(), 8).sum()))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_uses_the_pool(pool_on):
    y = ops.group_norm_silu(_big_input(), 8)  # a block in use across the fork
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    value = queue.get(timeout=120)
    proc.join(timeout=120)
    assert proc.exitcode == 0
    assert value == pytest.approx(float(y.sum()), rel=1e-5)


def test_pooled_outputs_behave_like_torch_tensors(pool_on):
    """opcheck on outputs from the pool, and what a user does with a tensor: pickle, share across processes, view
    as numpy, grow in place (refused, as for any tensor that wraps foreign memory, with torch's message)."""
    x = _big_input(7)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (x, 8, None, None, 1e-5, None, True))
    y = ops.group_norm_silu(x, 8)
    assert ops.cpu_memory_stats()["live_bytes"] > 0
    buf = io.BytesIO()
    torch.save(y, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), y)
    shared = y.clone().share_memory_()
    assert shared.is_shared() and torch.equal(shared, y)
    assert y.numpy().sum() == pytest.approx(float(y.sum()), rel=1e-4)
    with pytest.raises(RuntimeError, match="resiz"):
        y.resize_(2 * y.numel())
