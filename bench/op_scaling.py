"""Where a UNet forward's extra threads go, op by op (CPU): the same forward under torch.profiler at 1 and N threads,
alternating in every round of one process, the caches flushed before every forward (as in
``python -m ddpm_fast.bench unet``). For every (op, input shapes) it reports the median time per forward at each
thread count, the speedup and the loss, ``t_N - t_1 / N``: what N threads spend beyond a perfect split of the
1-thread time. Rows are sorted by loss. The profiler adds a few microseconds per op, alike at both counts; each
round also times one forward without it (the wall times and their speedup). Medians over rounds, JSON.

    python bench/op_scaling.py --batch 1 --rounds 7 --json bench/results/<machine>/op_scaling_b1.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ddpm_fast.bench import common, engines


def _profiled_forward(fn) -> dict[tuple[str, str], tuple[float, int]]:
    """(op, input shapes) -> (self time in ms, calls) of one call of fn."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return {
        (e.key, str(e.input_shapes)): (e.self_cpu_time_total / 1e3, e.count)
        for e in prof.key_averages(group_by_input_shape=True)
    }


def measure(arch: str, batch: int, threads: int, rounds: int, flush_mb: int) -> dict:
    unet, x, t = engines.cpu_unet_and_inputs(arch, batch)
    flush = torch.ones(flush_mb * 2**20 // 4)
    counts = (1, threads)
    per_op: dict[int, dict[tuple[str, str], list[float]]] = {n: {} for n in counts}  # ms per round
    calls: dict[tuple[str, str], int] = {}
    wall = {n: [] for n in counts}
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for _ in range(3):  # prepared weights, then the forward plan recorded (models/plans.py)
                unet(x, t)
            for r in range(rounds):
                for n in counts if r % 2 == 0 else reversed(counts):
                    torch.set_num_threads(n)
                    unet(x, t)  # untimed: the thread pool at its new size
                    flush.sum()
                    start = time.perf_counter()
                    unet(x, t)
                    wall[n].append((time.perf_counter() - start) * 1e3)
                    flush.sum()
                    for key, (ms, count) in _profiled_forward(lambda: unet(x, t)).items():
                        per_op[n].setdefault(key, []).append(ms)
                        calls[key] = count
    finally:
        torch.set_num_threads(before)
    rows = []
    for key in calls:
        t1, tn = (statistics.median(per_op[n].get(key, [0.0])) for n in counts)  # 0: not run at that count
        rows.append(
            {
                "op": key[0],
                "input_shapes": key[1],
                "calls": calls[key],
                "ms_1_thread": t1,
                f"ms_{threads}_threads": tn,
                "speedup": t1 / tn if tn > 0 else None,
                "loss_ms": tn - t1 / threads,
            }
        )
    rows.sort(key=lambda row: -row["loss_ms"])
    w1, wn = (statistics.median(wall[n]) for n in counts)
    return {
        "arch": arch,
        "batch": batch,
        "threads": threads,
        "wall_ms": {"1": w1, str(threads): wn, "speedup": w1 / wn, "rounds": wall},
        "op_total_ms": {str(n): sum(statistics.median(v) for v in per_op[n].values()) for n in counts},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="cifar10-32", choices=sorted(common.ARCHS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="N: the thread count compared with 1")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--flush-mb", type=int, default=600, help="MB read before every forward (tests: small)")
    p.add_argument("--top", type=int, default=15, help="rows printed")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads < 2:
        p.error("--threads must be at least 2")
    report = measure(args.arch, args.batch, args.threads, args.rounds, args.flush_mb)
    w, ops_ms, n = report["wall_ms"], report["op_total_ms"], args.threads
    print(
        f"{args.arch} batch {args.batch}: forward {w['1']:.2f} ms on 1 thread, {w[str(n)]:.2f} ms on {n} "
        f"({w['speedup']:.2f}x); profiled op time {ops_ms['1']:.2f} / {ops_ms[str(n)]:.2f} ms"
    )
    for row in report["rows"][: args.top]:
        print(
            f"loss {row['loss_ms']:6.3f} ms  {row['ms_1_thread']:7.3f} -> {row[f'ms_{n}_threads']:7.3f} ms "
            f"x{row['calls']:<3d} {row['op'][:34]:34s} {row['input_shapes'][:90]}"
        )
    if args.json:
        unit = "ms per forward, medians over rounds (op rows: profiler self time, summed over the op's calls)"
        arguments = " ".join(sys.argv[1:] if argv is None else argv)
        common.write_json(Path(args.json), common.script_report("op_scaling", arguments, unit, **report))


if __name__ == "__main__":
    main()
