"""``python -m ddpm_fast.bench <subcommand> [options]``: dispatches to ddpm_fast.bench.<subcommand>.main."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "kernels": "ddpm_fast.bench.kernels",
    "sample": "ddpm_fast.bench.sample",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(f"usage: python -m ddpm_fast.bench {{{','.join(SUBCOMMANDS)}}} [options]  (--help after one for its options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
