"""``BaseOutput``: the return type of models, schedulers and pipelines.

Behaves like diffusers' ``BaseOutput``: a dataclass whose non-``None`` fields are also the entries of an
ordered dict, so ``out.prev_sample``, ``out["prev_sample"]`` and ``out[0]`` all work, and ``to_tuple()``
gives the same tuple that ``return_dict=False`` returns.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields, is_dataclass
from typing import Any


class BaseOutput(OrderedDict):
    """Ordered-dict dataclass base; subclasses are declared with ``@dataclass``.

    Fields that are ``None`` are left out of the dict view (and so of ``to_tuple()`` and integer indexing),
    as in diffusers.
    """

    def __init_subclass__(cls) -> None:
        # Register as a pytree node so DistributedDataParallel / torch.compile can see inside outputs.
        try:
            import torch.utils._pytree as pytree
        except ImportError:  # pragma: no cover - torch is a hard dependency, kept defensive for docs builds
            return
        try:
            pytree.register_pytree_node(
                cls,
                pytree._dict_flatten,
                lambda values, context: cls(**pytree._dict_unflatten(values, context)),
                serialized_type_name=f"{cls.__module__}.{cls.__name__}",
            )
        except (ValueError, AttributeError):  # already registered (module reloaded) or old torch
            pass

    def __post_init__(self) -> None:
        class_fields = fields(self)
        if not class_fields:
            raise ValueError(f"{type(self).__name__} has no fields")
        for f in class_fields:
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} does not support removing or bulk-updating entries")

    __delitem__ = setdefault = pop = popitem = update = _refuse

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):
        if not is_dataclass(self):
            return super().__reduce__()
        fn, _args, *rest = super().__reduce__()
        return (fn, tuple(getattr(self, f.name) for f in fields(self)), *rest)

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-``None`` fields, in declaration order."""
        return tuple(self[k] for k in self.keys())
