"""Shared test settings.

Tests use tiny models, for which one thread is fastest and immune to OpenMP stalls when the machine is
busy; set DDPM_FAST_TEST_THREADS to change that.
"""

import os

import pytest
import torch

import ddpm_fast

torch.set_num_threads(int(os.environ.get("DDPM_FAST_TEST_THREADS", "1")))


@pytest.fixture
def fused_backend():
    """The fused backend for the test (modules that need it: ``pytestmark = pytest.mark.usefixtures(...)``)."""
    previous = ddpm_fast.get_backend()
    ddpm_fast.set_backend("fused")
    yield
    ddpm_fast.set_backend(previous)
