"""Config handling shared by models and schedulers, file-compatible with diffusers' ConfigMixin.

A class lists its config keys as ``__init__`` parameters and decorates ``__init__`` with
:func:`register_to_config`; the bound arguments become a read-only ``config``.  ``config.json`` /
``scheduler_config.json`` files written here load in diffusers and the other way round.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .hub import resolve_file

# Written into saved configs so diffusers reads them without complaint; the value is the diffusers
# release this package is compatible with, not our own version.
DIFFUSERS_COMPAT_VERSION = "0.42.1"


def read_json_object(path: str | os.PathLike) -> dict:
    """Load a JSON file that must hold an object; clear ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


class FrozenDict(OrderedDict):
    """An ordered dict whose items are also attributes and which refuses mutation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_FrozenDict__frozen", True)

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only; use from_config(config, key=value) to change it")

    __delitem__ = setdefault = pop = popitem = update = clear = _refuse

    def __setattr__(self, name, value):
        if getattr(self, "_FrozenDict__frozen", False):
            self._refuse()
        super().__setattr__(name, value)

    def __setitem__(self, name, value):
        if getattr(self, "_FrozenDict__frozen", False):
            self._refuse()
        super().__setitem__(name, value)

    def __reduce__(self):
        return (type(self), (dict(self),))


def _json_value(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


class ConfigMixin:
    """Base for classes whose constructor arguments are their serialisable config."""

    config_name: str | None = None
    ignore_for_config: tuple[str, ...] = ()

    def register_to_config(self, **kwargs) -> None:
        kwargs.pop("kwargs", None)
        current = dict(getattr(self, "_internal_dict", {}))
        current.update(kwargs)
        self._internal_dict = FrozenDict(current)

    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def _init_keys(cls) -> set[str]:
        params = inspect.signature(cls.__init__).parameters
        return {k for k, p in params.items() if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - set(
            cls.ignore_for_config
        )

    @classmethod
    def extract_init_dict(cls, config: dict, **kwargs) -> tuple[dict, dict, dict]:
        """Split ``config`` (+ overriding ``kwargs``) into constructor arguments, unused and hidden keys."""
        used_defaults = set(config.get("_use_default_values", []))
        config = {k: v for k, v in config.items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config)
        expected = cls._init_keys()
        init: dict[str, Any] = {}
        for key in expected:
            if key in kwargs:
                init[key] = kwargs.pop(key)
            elif key in config:
                init[key] = config[key]
        unused = {k: v for k, v in config.items() if k not in init and not k.startswith("_")}
        unused.update(kwargs)
        hidden = {k: v for k, v in original.items() if k not in init}
        return init, unused, hidden

    @classmethod
    def from_config(cls, config: dict | None = None, return_unused_kwargs: bool = False, **kwargs):
        """Build an instance from a config dict (for example another instance's ``.config``).

        Keys the class does not know are ignored (so a DDPMScheduler config builds a DDIMScheduler);
        keyword arguments override config values.
        """
        if config is None:
            raise ValueError("from_config() needs a config dict as its first argument")
        if not isinstance(config, dict):
            raise TypeError(
                f"from_config() takes a config dict, got {type(config).__name__}; "
                f"use {cls.__name__}.from_pretrained(path) to load from a path"
            )
        init, unused, hidden = cls.extract_init_dict(dict(config), **kwargs)
        obj = cls(**init)
        # Keep keys such as _class_name / _diffusers_version visible in .config, as diffusers does.
        hidden = {k: v for k, v in hidden.items() if k.startswith("_")}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        obj.register_to_config(**hidden)
        return (obj, unused) if return_unused_kwargs else obj

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> dict:
        """Read ``config_name`` from a file, a local folder (optionally ``subfolder``) or a hub id."""
        path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder, **hub_kwargs)
        return read_json_object(path)

    def to_json_string(self) -> str:
        data = {k: _json_value(v) for k, v in self.config.items() if k not in ("_use_default_values", "_ignore_files")}
        data["_class_name"] = type(self).__name__
        data["_diffusers_version"] = DIFFUSERS_COMPAT_VERSION
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike) -> str:
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a folder")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"


def register_to_config(init):
    """Decorator for ``__init__``: record every (defaulted) argument in ``self.config``."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        given = set(bound.arguments) - {"self"}
        bound.apply_defaults()
        ignore = set(getattr(self, "ignore_for_config", ()))
        values = {k: v for k, v in bound.arguments.items() if k != "self" and k not in ignore}
        values.pop("kwargs", None)
        defaults = sorted(k for k in values if k not in given)
        self.register_to_config(**values, _use_default_values=defaults)
        init(self, *args, **kwargs)

    return wrapper
