"""``python -m ddpm_fast``: the same command line as ``ddpm-fast``."""

from .cli import run

run()
