"""``python -m ddpm_fast.bench <subcommand> [options]``: dispatches to ddpm_fast.bench.<subcommand>.main."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "kernels": "each native op against the PyTorch ops it replaces, at the UNets' shapes",
    "unet": "UNet forward: ddpm_fast against diffusers, ONNX Runtime, OpenVINO, torch.compile",
    "sample": "whole sampling runs against diffusers' pipeline (peers: only the UNet call on the engine)",
    "winograd": "one UNet forward with and without the Winograd convolutions (CPU)",
    "quality": "sample quality of the digits model, judged by a classifier",
    "summary": "markdown tables of benchmark JSON files",
}


def usage() -> str:
    lines = ["usage: python -m ddpm_fast.bench <subcommand> [options]   (<subcommand> --help for its options)", ""]
    lines += [f"  {name:9} {what}" for name, what in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"unknown subcommand {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"ddpm_fast.bench.{argv[0]}").main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
