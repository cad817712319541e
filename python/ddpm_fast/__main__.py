"""``python -m ddpm_fast``: the same command line as ``ddpm-fast``."""

import sys

from .cli import main

sys.exit(main())
