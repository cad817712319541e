"""The panel GEMM layer by layer (CPU): ``ops.panel_linear`` against oneDNN's packed linear at the UNet's few-row GEMM
shapes, and the Winograd op on a column-panel weight against its other schedules at the 8x8 level, each also
against a plain read of the same weight bytes (``sum``: what streaming it costs). Interleaved rounds; in each round
every candidate is timed once after reading a 600 MB buffer ("cold": the weight comes from memory, as in a forward
with the caches flushed) and once more straight after ("warm"). Medians, per-round ratios, JSON.

    python bench/panel_gemm.py --rounds 21 --json bench/results/<machine>/panel_gemm.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_fast import ops
from ddpm_fast.bench import common

# (rows, K, N): the 4x4 level at batch 1 (im2col of 256 and 512 channels), its 1x1 shortcut, the mid attention's
# QKV; then 32 and 64 rows (batch 2, the 8x8 level's shortcuts), where oneDNN's GEMM keeps them.
LINEAR_SHAPES = [(16, 2304, 256), (16, 4608, 256), (16, 512, 256), (16, 256, 768), (32, 2304, 256), (64, 2304, 256)]
# (N, C_in, C_out, H): the 8x8 level at batch 1 (16 F(2x2) tiles), at batch 2 (32) and the 16x16 level (64).
WINOGRAD_SHAPES = [(1, 256, 256, 8), (1, 512, 256, 8), (2, 256, 256, 8), (1, 256, 256, 16)]


def _rounds(fns: dict, rounds: int, flush: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    times = {state: {name: [] for name in fns} for state in ("cold", "warm")}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for r in range(rounds):
            names = list(fns) if r % 2 == 0 else list(reversed(fns))
            for name in names:
                flush.sum()
                for state in ("cold", "warm"):
                    t0 = time.perf_counter()
                    fns[name]()
                    times[state][name].append((time.perf_counter() - t0) * 1e6)
    return times


def _summary(times: dict[str, dict[str, list[float]]], ours: str, base: str) -> dict:
    out = {}
    for state, per in times.items():
        out[state] = {name: statistics.median(v) for name, v in per.items()}
        out[f"{state}_speedup_of_{ours}"] = statistics.median(per[base]) / statistics.median(per[ours])
        out[f"{state}_speedup_of_{ours}_per_round"] = common.per_round_ratio(per[base], per[ours])
    return out


def linear_rows(rounds: int, flush: torch.Tensor) -> list[dict]:
    rows = []
    for m, k, n in LINEAR_SHAPES:
        gen = torch.Generator().manual_seed(m * 31 + k + n)
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
        b, other = torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
        panels, packed = ops.panel_weight(w), torch.ops.mkldnn._reorder_linear_weight(w, m)
        fns = {
            "panel_linear": lambda: ops.panel_linear(x, panels, b, other),
            "onednn_packed": lambda: torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, b, "add"),
            "read_weight": lambda: panels.sum(),
        }
        times = _rounds(fns, rounds, flush)
        ref = F.linear(x.double(), w.double(), b.double()) + other.double()
        err = (fns["panel_linear"]().double() - ref).abs().max().item()
        rows.append(
            {
                "op": "linear",
                "shape": [m, k, n],
                "weight_MB": w.numel() * 4 / 1e6,
                "us": times,
                **_summary(times, "panel_linear", "onednn_packed"),
                "max_abs_err_vs_float64": err,
            }
        )
    return rows


def winograd_rows(rounds: int, flush: torch.Tensor) -> list[dict]:
    rows = []
    for n, c, o, h in WINOGRAD_SHAPES:
        gen = torch.Generator().manual_seed(n * 7 + c + o + h)
        x = torch.randn(n, c, h, h, generator=gen).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(o, c, 3, 3, generator=gen) / (9 * c) ** 0.5, torch.randn(o, generator=gen)
        u, up = ops.winograd_weight(w, 2), ops.winograd_weight(w, 2, panels=True)
        fns = {
            "panels": lambda: ops.conv3x3_winograd(x, up, b),
            "planes_auto": lambda: ops.conv3x3_winograd(x, u, b),
            "read_weight": lambda: up.sum(),
        }
        times = _rounds(fns, rounds, flush)
        rows.append(
            {
                "op": "conv3x3_winograd F2",
                "shape": [n, c, o, h, h],
                "weight_MB": u.numel() * 4 / 1e6,
                "us": times,
                **_summary(times, "panels", "planes_auto"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flush-mb", type=int, default=600, help="MB read before each cold call (tests: small)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    flush = torch.ones(args.flush_mb * 2**20 // 4)
    rows = linear_rows(args.rounds, flush) + winograd_rows(args.rounds, flush)
    for r in rows:
        ours, base = ("panel_linear", "onednn_packed") if r["op"] == "linear" else ("panels", "planes_auto")
        print(
            f"{r['op']:20s} {str(r['shape']):22s} {r['weight_MB']:4.1f} MB  "
            + "  ".join(
                f"{s}: {ours} {r[s][ours]:6.0f} us, {base} {r[s][base]:6.0f} us, read {r[s]['read_weight']:5.0f} us "
                f"({r[f'{s}_speedup_of_{ours}']:.2f}x, per round {r[f'{s}_speedup_of_{ours}_per_round']:.2f}x)"
                for s in ("cold", "warm")
            )
        )
    if args.json:
        arguments = " ".join(f"--{k} {v}" for k, v in vars(args).items() if v)
        report = common.script_report("panel_gemm", arguments, "us per call, medians over rounds", results=rows)
        common.write_json(Path(args.json), report)


if __name__ == "__main__":
    main()
