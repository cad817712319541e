"""Benchmarks, one entry point: ``python -m ddpm_fast.bench <subcommand> [--device cpu|cuda] ...`` (also
``ddpm-fast bench ...``). Subcommands: ``kernels`` (each native op against the PyTorch ops it replaces),
``unet`` (UNet forward against diffusers, ONNX Runtime, OpenVINO, torch.compile), ``sample`` (whole pipelines),
``winograd`` (the Winograd convolutions' share of a forward), ``quality`` (sample quality of the digits model),
``summary`` (markdown tables of result files). See bench/README.md."""
