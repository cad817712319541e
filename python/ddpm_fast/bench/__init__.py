"""Benchmarks: ``python -m ddpm_fast.bench kernels`` (native ops against PyTorch) and
``python -m ddpm_fast.bench sample`` (whole pipelines against diffusers)."""
