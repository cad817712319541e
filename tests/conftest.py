"""Shared test settings.

Tests use tiny models, for which one thread is fastest and immune to OpenMP stalls when the machine is
busy; set DDPM_FAST_TEST_THREADS to change that.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("DDPM_FAST_TEST_THREADS", "1")))
