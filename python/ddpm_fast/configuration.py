"""Config handling shared by models and schedulers, file-compatible with diffusers' ConfigMixin.

A class lists its config keys as ``__init__`` parameters and decorates ``__init__`` with
:func:`register_to_config`; the bound arguments become a read-only ``config``.  ``config.json`` /
``scheduler_config.json`` files written here load in diffusers and the other way round.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import types
import typing
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
        raise ValueError(f"{path} is not valid JSON (truncated or not a JSON file?): {e}") from None
    except RecursionError:
        raise ValueError(f"{path} is not usable JSON: it is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object ({{...}}) but {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    """How a JSON value reads in an error message: ``a list``, ``the string 'x'``, ``5``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "a list " + _short(value)
    if isinstance(value, dict):
        return "an object " + _short(value)
    if isinstance(value, str):
        return f"the string {_short(value)}"
    return _short(value)


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LoadedConfig(dict):
    """A config dict read from a file by :meth:`ConfigMixin.load_config`; ``source`` is that file's path.

    It is a plain ``dict`` otherwise. :meth:`ConfigMixin.from_config` checks such a config's fields against the
    class's constructor (JSON types, and values that cannot build a model) and names ``source`` and the field
    in every error, also in errors the constructor itself raises.
    """

    source: str = ""

    def __reduce__(self):
        return (type(self), (dict(self),), {"source": self.source})


# -- checks of config files ------------------------------------------------------------------------------
#
# Types come from the constructor's annotations (int, float, bool, str, None, tuple[...], list[...] and unions of
# them, which is every field UNet2DModel and the schedulers read); JSON true/false are not integers here and
# integers are numbers. Values: the field names below are diffusers' config names; a class is checked only on
# the fields its constructor takes.

_POSITIVE_FIELDS = frozenset(
    {
        "sample_size",
        "in_channels",
        "out_channels",
        "time_embedding_dim",
        "block_out_channels",
        "layers_per_block",
        "attention_head_dim",
        "norm_num_groups",
        "attn_norm_num_groups",
        "num_class_embeds",
        "num_train_timesteps",
    }
)
_NON_NEGATIVE_FIELDS = frozenset({"downsample_padding", "steps_offset", "norm_eps"})
_UNIT_INTERVAL_FIELDS = frozenset({"dropout"})
_NON_EMPTY_FIELDS = frozenset({"block_out_channels", "down_block_types", "up_block_types"})
_NONZERO_FIELDS = frozenset({"mid_block_scale_factor"})


def _matches(value: Any, hint: Any) -> bool:
    """Whether the JSON ``value`` fits the annotation ``hint`` (unknown annotations: yes)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and hint.__module__ == "numpy":
        return isinstance(value, hint)  # never true for JSON values: another member of the union decides
    return True


_NOUNS = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _describe(hint: Any, plural: bool = False) -> str:
    """``int | tuple[int, int] | None`` -> ``an integer, a list of 2 integers or null``."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        parts = [_describe(a) for a in typing.get_args(hint) if not (isinstance(a, type) and a.__module__ == "numpy")]
        parts = list(dict.fromkeys(parts))
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if hint is None or hint is type(None):
        return "null"
    if hint in _NOUNS:
        return _NOUNS[hint][1 if plural else 0]
    if hint in (list, tuple) or origin in (list, tuple):
        args = typing.get_args(hint)
        if not args:
            return "lists" if plural else "a list"
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(set(args)) == 1:
                return f"a list of {len(args)} {_describe(args[0], plural=True)}"
            return "a list of " + ", ".join(_describe(a) for a in args)
        return f"a list of {_describe(args[0], plural=True)}"
    return getattr(hint, "__name__", str(hint))


def _numbers_in(value: Any):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers_in(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _field_problem(key: str, value: Any, hint: Any) -> str | None:
    """What is wrong with ``key: value`` for a field annotated ``hint``, or None."""
    if hint is not None and not _matches(value, hint):
        return f"must be {_describe(hint)}, got {_json_kind(value)}"
    numbers = list(_numbers_in(value))
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        return f"must be finite, got {_json_kind(value)}"
    if key in _NON_EMPTY_FIELDS and isinstance(value, (list, tuple)) and not value:
        return "must not be empty"
    if key in _POSITIVE_FIELDS and any(v < 1 for v in numbers):
        return f"must be positive, got {_json_kind(value)}"
    if key in _NON_NEGATIVE_FIELDS and any(v < 0 for v in numbers):
        return f"must be >= 0, got {_json_kind(value)}"
    if key in _UNIT_INTERVAL_FIELDS and any(not 0 <= v <= 1 for v in numbers):
        return f"must be in [0, 1], got {_json_kind(value)}"
    if key in _NONZERO_FIELDS and any(v <= 0 for v in numbers):
        return f"must be > 0, got {_json_kind(value)}"
    return None


def _with_source(error: BaseException, source: str) -> BaseException:
    """``error`` again (same class where it can be rebuilt from a message), its message prefixed with ``source``."""
    message = f"{source}: {error}"
    if isinstance(error, (ValueError, TypeError)):
        try:
            new = type(error)(message)
            if str(new) == message:
                return new
        except Exception:
            pass
        return (TypeError if isinstance(error, TypeError) else ValueError)(message)
    return ValueError(f"{source}: this config cannot build the model ({type(error).__name__}: {error})")


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
        source = config.source if isinstance(config, LoadedConfig) and config.source else None
        if source is not None:
            cls._check_config_file(config, source, overridden=set(kwargs))
        init, unused, hidden = cls.extract_init_dict(dict(config), **kwargs)
        if source is None:
            obj = cls(**init)
        else:
            try:
                obj = cls(**init)
            except (ValueError, TypeError, RuntimeError, ArithmeticError, IndexError, KeyError, AttributeError) as e:
                if str(e).startswith(f"{source}:"):
                    raise
                raise _with_source(e, source) from e
        # Keep keys such as _class_name / _diffusers_version visible in .config, as diffusers does.
        hidden = {k: v for k, v in hidden.items() if k.startswith("_")}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        obj.register_to_config(**hidden)
        return (obj, unused) if return_unused_kwargs else obj

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def load_config(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs
    ) -> dict:
        """Read ``config_name`` from a file, a local folder (optionally ``subfolder``) or a hub id."""
        path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder, **hub_kwargs)
        config = LoadedConfig(read_json_object(path))
        config.source = os.fspath(path)
        return config

    @classmethod
    def _config_hints(cls) -> dict[str, Any]:
        """The constructor's annotations, evaluated (empty when they cannot be)."""
        cached = cls.__dict__.get("_config_hints_cache")
        if cached is None:
            try:
                cached = typing.get_type_hints(cls.__init__)
            except Exception:  # an annotation this Python cannot evaluate: leave the types to the constructor
                cached = {}
            cls._config_hints_cache = cached
        return cached

    @classmethod
    def _check_config_file(cls, config: dict, source: str, overridden: set[str] = frozenset()) -> None:
        """Refuse a field of a config file the constructor cannot use, naming ``source`` and the field.

        Checked: every field the constructor takes (not those listed in ``_use_default_values``, nor those
        ``overridden`` by keyword arguments): its JSON type against the annotation, finite numbers, and the
        value rules above (positive channel counts and so on). Other keys are ignored, as from_config does.
        """
        defaults = config.get("_use_default_values", [])
        if not isinstance(defaults, list) or not all(isinstance(k, str) for k in defaults):
            raise ValueError(
                f"{source}: field '_use_default_values' must be a list of field names, got {_json_kind(defaults)}"
            )
        hints = cls._config_hints()
        for key in sorted(cls._init_keys()):
            if key not in config or key in defaults or key in overridden:
                continue
            problem = _field_problem(key, config[key], hints.get(key))
            if problem:
                raise ValueError(f"{source}: field {key!r} {problem}")

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
