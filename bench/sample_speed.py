#!/usr/bin/env python
"""Sampling speed, ddpm_fast against diffusers side by side: see ``ddpm_fast/bench/sample.py``.

    python bench/sample_speed.py                                  # CPU: cifar10-32 b1/b16, 256-px b1; fp32 + bf16
    python bench/sample_speed.py --device cuda --json OUT.json    # GPU: fp32/fp16/bf16, b1/16/64 (+ 256-px b1/8)
"""

import sys

from ddpm_fast.bench.sample import main

if __name__ == "__main__":
    sys.exit(main())
