"""Markdown tables of benchmark JSON files (any subcommand's), e.g. for a results README or a GPU check's summary.

python -m ddpm_fast.bench summary bench/results/nvidia-h200/kernels.json bench/results/nvidia-h200/unet.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import common


def _f(value: Any, fmt: str = ".3g") -> str:
    return "" if value is None else format(value, fmt) if isinstance(value, (int, float)) else str(value)


def kernels(report: dict[str, Any]) -> list[str]:
    lines = [
        "| op | shape | dtype | variant | torch ms | fused ms | speedup (per round) | fused GB/s | max diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        shape = "x".join(map(str, r["shape"]))
        head = f"| {r['op']} | {shape} | {r['dtype']} | {r['variant']}"
        if "error" in r:
            lines.append(f"{head} | ERROR: {r['error'][:100]} | | | | |")
            continue
        note = f" (routed: {r['route']})" if "route" in r else ""
        lines.append(
            f"{head} | {r['torch_ms']:.4f} | {r['fused_ms']:.4f} | {r['speedup']:.2f}x "
            f"({r['speedup_per_round']:.2f}x){note} | {r['fused_GBps']:.1f} | {r['max_abs_diff']:.2g} |"
        )
    for s in report.get("skipped", []):
        lines.append(
            f"\nskipped: {s['op']} {s.get('dtype', '')} {'x'.join(map(str, s.get('shape', [])))}: {s['reason']}"
        )
    return lines


def rows(report: dict[str, Any]) -> list[str]:
    unit = "ms per step" if report["subcommand"] == "sample" else "ms per forward"
    header = (
        f"| model | dtype | batch | variant | {unit} | ddpm_fast speed-up (per round) | max \\|Δ\\| vs diffusers "
        "| setup s | first call s |"
    )
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        head = f"| {r['arch']} | {r['dtype']} | {r['batch']}"
        if "skipped" in r or "error" in r:
            lines.append(
                f"{head} | | {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error'][:100]} | | | | |"
            )
            continue
        for name, e in r["variants"].items():
            if "ms_median" not in e:
                why = f"skipped: {e['skipped']}" if "skipped" in e else f"ERROR: {e.get('error', '?')}"
                lines.append(f"{head} | {name} | {why[:120]} | | | | |")
                continue
            ratio = e.get("speedup_of_ddpm_fast")
            speed = "" if ratio is None else f"{ratio:.2f}x ({e['speedup_of_ddpm_fast_per_round']:.2f}x)"
            setup = sum(e.get("setup_s", {}).values())
            lines.append(
                f"{head} | {name} | {e['ms_median']:.2f} | {speed} | "
                f"{_f(e.get('max_abs_diff_vs_diffusers_eager'), '.1e')} | {setup:.1f} | {e['first_call_s']:.1f} |"
            )
    targets = [t for t in report.get("targets", []) if t["measured"] is not None]
    if targets:
        lines += ["", "| target | goal | measured (per round) | met |", "| --- | --- | --- | --- |"]
        for t in targets:
            lines.append(
                f"| {t['what']} | {t['goal']}x | {t['measured']:.2f}x "
                f"({_f(t['measured_per_round'], '.2f')}x) | {'yes' if t['met'] else 'no'} |"
            )
    return lines


def winograd(report: dict[str, Any]) -> list[str]:
    out = []
    for r in report["results"]:
        if "speedup" in r:
            out.append(
                f"- {r['arch']} batch {r['batch']}: Winograd {r['variants']['winograd']['ms_median']:.1f} ms "
                f"against {r['baseline']} {r['variants'][r['baseline']]['ms_median']:.1f} ms: "
                f"{r['speedup']:.2f}x (per round {r['speedup_per_round']:.2f}x), max |diff| {r['max_abs_diff']:.1e}"
            )
        else:
            out.append(f"- {r['arch']} batch {r['batch']}: not measured")
    return out


def quality(report: dict[str, Any]) -> list[str]:
    lines = ["| images | mean confidence | balance | min class fraction |", "| --- | --- | --- | --- |"]
    entries = [(r["schedule"], r) for r in report["results"]] + list(report.get("references", {}).items())
    for name, r in entries:
        lines.append(f"| {name} | {r['mean_confidence']:.3f} | {r['balance']:.3f} | {r['min_class_fraction']:.3f} |")
    return lines


RENDER = {"kernels": kernels, "unet": rows, "sample": rows, "winograd": winograd, "quality": quality}


def render(report: dict[str, Any], name: str = "") -> str:
    if report.get("schema") != common.SCHEMA or report.get("subcommand") not in RENDER:
        return f"{name}: not a {common.SCHEMA} file"
    env = report.get("environment", {})
    where = env.get("gpu") if report.get("device", "").startswith("cuda") else env.get("cpu_model")
    title = (
        f"### {report['subcommand']} on {report['machine']} ({where}; torch {env.get('torch')}, "
        f"{env.get('threads')} threads)"
    )
    head = [title, "", f"`{report['command']}`", ""]
    return "\n".join(head + RENDER[report["subcommand"]](report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.bench summary", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="JSON files written by the other subcommands")
    p.add_argument("--output", default=None, help="write the markdown here (default: print it)")
    args = p.parse_args(argv)
    parts = []
    for f in args.files:
        try:
            parts.append(render(json.loads(Path(f).read_text()), f))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parts.append(f"{f}: unreadable ({type(exc).__name__}: {exc})")
    text = "\n\n".join(parts) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
