"""Weights prepared once for the fast path (packed oneDNN, Winograd transforms, packed QKV, CUDA channels_last
copies), always those of the module's current parameters.

A prepared copy is kept with a signature of every parameter it was built from and rebuilt when one differs.
The signature is O(1) and sees every documented way of changing a parameter:

* in-place ops (``with torch.no_grad(): w.mul_(2)``, ``load_state_dict`` into existing storage, optimizer steps):
  the version counter;
* new storage (``load_state_dict(assign=True)``, ``.to()``, ``param.data = t``, re-parametrisation): the data
  pointer, dtype, device and shape;
* edits through ``.data`` (``w.data.mul_(2)``, diffusers' ``EMAModel.copy_to``): ``.data`` returns an alias with
  a version counter of its own, so the version misses them. A parameter that a prepared copy depends on is
  switched (in place: same object, so optimizers and hooks are unaffected) to :class:`TrackedParameter`,
  whose ``.data`` getter counts its uses; the count is part of the signature.

Parameters that cannot be tracked this way are never prepared (the caller takes its unprepared path):
tensors created under ``torch.inference_mode`` (no version counter; ddpm_fast's loaders and ``.to()`` create
normal tensors even inside inference mode, so only a model built there directly is affected: it warns once),
and anything that is not a plain ``nn.Parameter`` (parametrised weights are recomputed on every access).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from .. import fast_path
from ..utils.warn import warn_once

__all__ = ["PreparedCache", "TrackedParameter", "module_signature", "trackable"]

T = TypeVar("T")
_DATA = torch._C.TensorBase.data  # the descriptor nn.Parameter inherits
_PARAMETER_NEW = nn.Parameter.__new__.__code__


class TrackedParameter(nn.Parameter):
    """An ``nn.Parameter`` whose ``.data`` getter counts its uses (see the module docstring)."""

    @property
    def data(self) -> torch.Tensor:
        d = self.__dict__
        d["_ddpm_fast_data_uses"] = d.get("_ddpm_fast_data_uses", 0) + 1
        return _DATA.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        _DATA.__set__(self, value)

    def detach(self) -> torch.Tensor:
        out = super().detach()
        # nn.Parameter(p) of a Parameter subclass (torch's weight_norm does it) requires p.detach() to keep p's type;
        # everywhere else a detached parameter is a plain tensor, as usual.
        if sys._getframe(1).f_code is _PARAMETER_NEW:
            out.__class__ = TrackedParameter
        return out


def trackable(t: torch.Tensor | None) -> bool:
    """Whether a copy prepared from ``t`` can be kept correct (``None``, a bias that is absent, is)."""
    if t is None:
        return True
    if type(t) is not TrackedParameter and type(t) is not nn.Parameter:  # (isinstance on Parameter is slow)
        return False
    if t.is_inference():
        warn_once(
            "inference-parameters",
            "ddpm_fast: the model's parameters were created under torch.inference_mode and have no version "
            "counter, so in-place changes to them cannot be seen; they run without prepared (packed, "
            "Winograd) weights. Build or load the model outside inference mode (from_pretrained does).",
            stacklevel=5,
        )
        return False
    return True


def _signature(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    if type(t) is nn.Parameter:
        t.__class__ = TrackedParameter  # same object: only `.data` now counts its uses
    # New storage on another device or of another dtype has another address; a view (`p.data = p.data.view(..)`)
    # may keep it: hence the shape.
    return (t.data_ptr(), t._version, t.__dict__.get("_ddpm_fast_data_uses", 0), t.shape)


def module_signature(module: nn.Module) -> tuple:
    """The signature of every parameter and buffer of ``module``: equal exactly while none of them changed
    (for state derived from a whole model, such as a captured CUDA graph)."""
    return tuple(_signature(t) for t in (*module.parameters(), *module.buffers()))


class PreparedCache:
    """Prepared copies of one module, keyed by what they are for (path, layout, input shape); at most ``limit``
    of them, the least recently used dropped first, so a layer that alternates between a few shapes does not
    re-prepare."""

    def __init__(self, limit: int = 4):
        self.limit = limit
        self._entries: dict[tuple, tuple[tuple, object]] = {}

    def get(self, key: tuple, sources: Sequence[torch.Tensor | None], build: Callable[[], T]) -> T:
        """The copy for ``key``, rebuilt with ``build()`` when any of ``sources`` changed since it was made.
        Callers check :func:`trackable` on the sources first."""
        signature = tuple(_signature(t) for t in sources)
        entry = self._entries.pop(key, None)  # (re)inserted last: the least recently used is dropped first
        if entry is not None and entry[0] == signature:
            self._entries[key] = entry
            return entry[1]  # type: ignore[return-value]
        fast_path.note(f"prepare:{key[0]}")  # before building: a plan recording must see it even if build fails
        with torch.no_grad():
            value = build()
        if len(self._entries) >= self.limit:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (signature, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # Prepared copies (oneDNN tensors among them) neither pickle nor deepcopy: a copy starts empty.
    def __getstate__(self) -> dict:
        return {"limit": self.limit, "_entries": {}}

    def __deepcopy__(self, memo) -> "PreparedCache":
        return PreparedCache(self.limit)
