"""Kernel benchmark on a CUDA GPU: each ``torch.ops.ddpm_fast`` op against the PyTorch op(s) it replaces.

UNet shapes; CUDA events around batches of calls, median over trials; speedup = PyTorch time / ours; GB/s counts the
minimum traffic (every input read once, every output written once); max_diff is the largest absolute difference
between the two outputs (a sanity check, the tests own correctness).

    python3 bench/gpu_bench.py --json OUT/kernels.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F


def _time_ms(fn, trials: int, reps: int) -> float:
    """Median milliseconds per call over `trials` batches of `reps` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def _cases(ops):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    for shape in [(1, 256, 16, 16), (1, 128, 32, 32), (16, 128, 32, 32), (8, 512, 16, 16)]:
        for dtype in (torch.float16, torch.float32):
            N, C = shape[:2]
            x = randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w, b, temb = randn(C, dtype=dtype), randn(C, dtype=dtype), randn(N, C, dtype=dtype)
            nbytes = 2 * x.numel() * x.element_size()
            yield dict(
                op="group_norm_silu", shape=f"{tuple(shape)} cl +temb", dtype=str(dtype).replace("torch.", ""),
                ours=lambda x=x, w=w, b=b, t=temb: ops.group_norm_silu(x, 32, w, b, 1e-6, t, True),
                torch=lambda x=x, w=w, b=b, t=temb: F.silu(F.group_norm(x + t[:, :, None, None], 32, w, b, 1e-6)),
                baseline="silu(group_norm(x + temb))", bytes=nbytes, flops=None,
            )
    for B, H, S, D in [(1, 1, 256, 256), (1, 1, 256, 512), (8, 1, 256, 512)]:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            q, k, v = (randn(B, H, S, D, dtype=dtype) for _ in range(3))
            yield dict(
                op="attention", shape=str((B, H, S, D)), dtype=str(dtype).replace("torch.", ""),
                ours=lambda q=q, k=k, v=v: ops.attention(q, k, v, None),
                torch=lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                baseline="F.scaled_dot_product_attention", bytes=4 * q.numel() * q.element_size(),
                flops=4.0 * B * H * S * S * D,
            )
    coefs = (1.25, -0.75, 0.7, 0.25, 0.0, 0.1)
    for shape in [(1, 3, 32, 32), (64, 3, 256, 256)]:
        for dtype in (torch.float32, torch.float16):
            e, s, n = (randn(*shape, dtype=dtype) for _ in range(3))

            def composite(e=e, s=s, n=n):
                x0 = (coefs[0] * s + coefs[1] * e).clamp(-1.0, 1.0)
                return coefs[2] * x0 + coefs[3] * s + coefs[4] * e + coefs[5] * n, x0

            yield dict(
                op="scheduler_step", shape=str(shape), dtype=str(dtype).replace("torch.", ""),
                ours=lambda e=e, s=s, n=n: ops.scheduler_step(e, s, n, *coefs, 1.0),
                torch=composite, baseline="PyTorch elementwise composite",
                bytes=5 * s.numel() * s.element_size(), flops=None,
            )


def _max_diff(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--quick", action="store_true", help="fewer trials")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU", file=sys.stderr)
        return 2
    import ddpm_fast._C  # noqa: F401  (registers torch.ops.ddpm_fast)

    ops = torch.ops.ddpm_fast
    trials, reps = (5, 10) if args.quick else (11, 20)
    props = torch.cuda.get_device_properties(0)
    results, failures = [], 0
    t_start = time.time()
    for case in _cases(ops):
        row = {k: case[k] for k in ("op", "shape", "dtype", "baseline")}
        try:
            with torch.no_grad():
                diff = _max_diff(case["ours"](), case["torch"]())
                ours_ms = _time_ms(case["ours"], trials, reps)
                torch_ms = _time_ms(case["torch"], trials, reps)
            row.update(
                ours_us=round(ours_ms * 1e3, 2), torch_us=round(torch_ms * 1e3, 2),
                speedup=round(torch_ms / ours_ms, 3), max_diff=float(f"{diff:.3g}"),
                ours_gbps=round(case["bytes"] / ours_ms / 1e6, 1),
            )
            if case["flops"]:
                row["ours_tflops"] = round(case["flops"] / ours_ms / 1e9, 2)
                row["torch_tflops"] = round(case["flops"] / torch_ms / 1e9, 2)
        except Exception as exc:  # one broken case must not hide the others
            failures += 1
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        results.append(row)
        if "error" in row:
            print(f"{row['op']:16s} {row['shape']:28s} {row['dtype']:9s} ERROR {row['error'][:120]}", flush=True)
        else:
            extra = f"  {row['ours_tflops']:6.2f} vs {row['torch_tflops']:6.2f} TFLOP/s" if "ours_tflops" in row else ""
            print(
                f"{row['op']:16s} {row['shape']:28s} {row['dtype']:9s} ours {row['ours_us']:9.2f} us  torch "
                f"{row['torch_us']:9.2f} us  x{row['speedup']:5.2f}  {row['ours_gbps']:7.1f} GB/s  "
                f"diff {row['max_diff']:.2g}{extra}",
                flush=True,
            )
    report = {
        "device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
        "cuda": torch.version.cuda, "trials": trials, "reps": reps, "seconds": round(time.time() - t_start, 1),
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
