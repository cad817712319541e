"""Layer by layer, which GEMM the CPU kernels should use: ddpm_fast's AVX-512 GEMM or torch's (MKL), at the UNets'
Winograd and attention shapes. Two child processes alternate in every round, one with
``DDPM_FAST_TORCH_GEMM_AVX512=0`` (our GEMM: the pipeline schedule at every size, attention's products on it) and one
with ``=1`` (the choices made on an Intel CPU: torch's GEMM for large Winograd weights and for attention), each
timing every case ``--calls`` times after two untimed calls, a round's time being the median. F(2x2) and F(4x4) both
run at each Winograd shape, on a plain (planes, C, O) weight (the column-panel schedule does not depend on this
choice). Medians, per-round ratios (``torch / ours``) and the outputs' max |diff| go to ``--json``.

    python bench/gemm_choice.py --rounds 5 --json bench/results/<machine>/gemm_choice.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddpm_fast import ops
from ddpm_fast.bench import common

ENV = "DDPM_FAST_TORCH_GEMM_AVX512"
SETTINGS = {"ours": "0", "torch": "1"}
# (batch, C_in, C_out, H, W): the cifar10-32 UNet's levels at batch 1 and 16, the 256-px UNet's at batch 1.
WINOGRAD = [
    (1, 128, 128, 32, 32),
    (1, 256, 128, 32, 32),
    (1, 256, 256, 32, 32),
    (1, 256, 256, 16, 16),
    (1, 512, 256, 16, 16),
    (1, 256, 256, 8, 8),
    (16, 128, 128, 32, 32),
    (16, 256, 256, 16, 16),
    (1, 128, 128, 128, 128),
    (1, 256, 256, 64, 64),
    (1, 512, 512, 32, 32),
    (1, 512, 512, 16, 16),
]
# (batch, heads, tokens, head dim): the attention blocks' shapes (cifar10-32 at 16x16, the 256-px UNet's 16x16 and
# a 32x32 one).
ATTENTION = [(1, 1, 256, 256), (1, 1, 256, 512), (1, 1, 1024, 128)]
TINY_WINOGRAD = [(1, 64, 64, 8, 8)]
TINY_ATTENTION = [(1, 1, 64, 32)]


def _cases(tiny: bool):
    """(name, function) pairs, inputs made from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, c, o, h, w in TINY_WINOGRAD if tiny else WINOGRAD:
        x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(o, c, 3, 3, generator=g) / (3 * c**0.5), torch.randn(o, generator=g)
        for tile in (2, 4):
            u = ops.winograd_weight(weight, tile)
            name = f"winograd F{tile} b{n} {c}->{o} {h}x{w}"
            out.append((name, lambda x=x, u=u, b=bias: ops.conv3x3_winograd(x, u, b)))
    for b, heads, length, dim in TINY_ATTENTION if tiny else ATTENTION:
        q, k, v = (torch.randn(b, heads, length, dim, generator=g) for _ in range(3))
        out.append((f"attention b{b} h{heads} {length}x{dim}", lambda q=q, k=k, v=v: ops.attention(q, k, v)))
    return out


def _child(args) -> None:
    """One process's share of a round: each case's median of ``--calls`` calls, and its output."""
    times, outs = {}, {}
    with torch.inference_mode():
        for name, fn in _cases(args.tiny):
            for _ in range(2):
                fn()
            ts = []
            for _ in range(args.calls):
                start = time.perf_counter()
                outs[name] = fn()
                ts.append((time.perf_counter() - start) * 1e3)
            times[name] = statistics.median(ts)
    torch.save({"ms": times, "out": outs}, args.child)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=9, help="timed calls per case and child process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="one small case of each kind (for the tests)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one child process of a round
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        _child(args)
        return {}
    result = f"/tmp/gemm_choice_{os.getpid()}.pt"
    argv_child = [sys.executable, __file__, "--calls", str(args.calls), "--threads", str(args.threads)]
    argv_child += ["--child", result] + (["--tiny"] if args.tiny else [])
    ms: dict[str, dict[str, list[float]]] = {}
    outs: dict[str, dict] = {}
    env = {k: v for k, v in os.environ.items() if k != ENV}
    for r in range(args.rounds):
        for setting in SETTINGS if r % 2 == 0 else reversed(list(SETTINGS)):
            subprocess.run(argv_child, env={**env, ENV: SETTINGS[setting]}, check=True)
            got = torch.load(result)
            for name, t in got["ms"].items():
                ms.setdefault(name, {s: [] for s in SETTINGS})[setting].append(t)
            outs[setting] = got["out"]
    os.remove(result)
    cases = {}
    for name, per in ms.items():
        ratios = [t / o for o, t in zip(per["ours"], per["torch"])]
        cases[name] = {
            "ms": per,
            "ms_median": {s: statistics.median(v) for s, v in per.items()},
            "speedup_of_ours": statistics.median(per["torch"]) / statistics.median(per["ours"]),
            "speedup_of_ours_per_round": statistics.median(ratios),
            "max_abs_diff": (outs["ours"][name] - outs["torch"][name]).abs().max().item(),
        }
        c = cases[name]
        print(
            f"{name:36s} ours {c['ms_median']['ours']:8.3f} ms  torch's {c['ms_median']['torch']:8.3f} ms  "
            f"ours {c['speedup_of_ours']:.2f}x (per round {c['speedup_of_ours_per_round']:.2f}x)  "
            f"max|d| {c['max_abs_diff']:.1e}"
        )
    report = common.script_report(
        "gemm_choice",
        " ".join(f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False)),
        "ms per call",
        cases=cases,
    )
    if args.json:
        common.write_json(Path(args.json), report)
    return report


if __name__ == "__main__":
    main()
