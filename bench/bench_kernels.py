"""Kernel microbenchmarks (thin wrapper): same as ``python -m ddpm_fast.bench kernels``."""

import sys

from ddpm_fast.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
