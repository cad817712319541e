"""Random tensors drawn exactly as diffusers draws them (same seed, same numbers), and small tensor helpers."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _device_type(device: torch.device | str | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


def randn_tensor(
    shape: Sequence[int] | torch.Size,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
) -> torch.Tensor:
    """Standard-normal tensor of ``shape``, reproducing ``diffusers.utils.torch_utils.randn_tensor``.

    - A CPU generator with a non-CPU ``device`` draws on the CPU, then moves the result to ``device``.
    - A list of generators draws one ``(1, *shape[1:])`` slice per sample from ``generator[i]`` and
      concatenates them; a list of length 1 counts as a single generator.
    - ``generator=None`` uses the global RNG of ``device``.
    A CUDA generator with a CPU ``device`` is an error (as in diffusers).
    """
    if isinstance(device, str):
        device = torch.device(device)
    rand_device = device
    target = device if device is not None else torch.device("cpu")
    layout = layout or torch.strided
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("randn_tensor: shape must have at least one dimension (the batch)")

    if target.type == "neuron":  # no RNG on Neuron devices: draw on the CPU (diffusers does the same)
        rand_device = torch.device("cpu")

    if generator is not None:
        if isinstance(generator, (list, tuple)):
            if len(generator) == 0:
                raise ValueError("randn_tensor: generator is an empty list; pass None or at least one generator")
            gen_type = generator[0].device.type
        elif isinstance(generator, torch.Generator):
            gen_type = generator.device.type
        else:
            raise TypeError(
                "randn_tensor: generator must be a torch.Generator, a list of them or None, "
                f"got {type(generator).__name__}"
            )
        if gen_type != target.type and gen_type == "cpu":
            rand_device = "cpu"
        elif gen_type != target.type and gen_type == "cuda":
            raise ValueError(f"Cannot generate a {target} tensor from a generator of type {gen_type}.")

    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]

    if isinstance(generator, (list, tuple)):
        batch_size = shape[0]
        if len(generator) < batch_size:
            raise ValueError(
                f"randn_tensor: got a list of {len(generator)} generators for a batch of {batch_size}; "
                "pass one generator per sample"
            )
        one = (1,) + shape[1:]
        draws = [
            torch.randn(one, generator=generator[i], device=rand_device, dtype=dtype, layout=layout)
            for i in range(batch_size)
        ]
        return torch.cat(draws, dim=0).to(target)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype, layout=layout).to(target)
