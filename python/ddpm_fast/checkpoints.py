"""Reading and writing model weights in diffusers' file layout.

* ``diffusion_pytorch_model.safetensors`` (optionally ``diffusion_pytorch_model.<variant>.safetensors``, or a
  sharded ``*.safetensors.index.json``) through the safetensors library;
* ``diffusion_pytorch_model.bin`` only through ``torch.load(..., weights_only=True)``: a pickle that would
  construct anything but tensors and plain containers is refused before any of its code runs;
* old attention parameter names (``query/key/value/proj_attn``) are renamed to ``to_q/to_k/to_v/to_out.0``
  like diffusers' ``_fix_state_dict_keys_on_load``;
* missing, unexpected and mis-shaped keys are reported together in one error.

This module knows nothing of kernels or model classes beyond ``nn.Module``.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Mapping

import torch

from .configuration import _json_kind
from .hub import resolve_file

WEIGHTS_NAME = "diffusion_pytorch_model.bin"
SAFETENSORS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class CheckpointError(OSError, ValueError):
    """A weights file that cannot be used: unreadable, truncated, refused, or not matching the model.

    Subclasses both OSError (what diffusers raises for unreadable files) and ValueError (bad input).
    """


def add_variant(weights_name: str, variant: str | None = None) -> str:
    """``diffusion_pytorch_model.safetensors`` + ``"fp16"`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    if variant is None:
        return weights_name
    if not isinstance(variant, str) or not variant or "/" in variant or os.sep in variant:
        raise ValueError(f"variant must be a short name such as 'fp16', got {variant!r}")
    parts = weights_name.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


# -- reading ---------------------------------------------------------------------------------------------


def _check_tensor_dict(obj, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} does not hold a state dict (a mapping of names to tensors) but {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a flat state dict: entries {bad[:5]} are not tensors "
            "(a training checkpoint? save model.state_dict() instead)"
        )
    return dict(obj)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file to CPU tensors; corrupt or truncated files raise CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"could not read safetensors weights file {path!r} (truncated or corrupt?): {e}"
        ) from None


def load_bin(path: str) -> dict[str, torch.Tensor]:
    """Read a PyTorch ``.bin`` state dict with ``weights_only=True``.

    A pickle that references anything beyond tensors and plain containers (e.g. a ``__reduce__`` that calls
    ``os.system``) is refused by torch's restricted unpickler before anything runs; we report that clearly.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path!r}: it is a pickle that would construct objects other than tensors, and "
            f".bin weights are only loaded with torch.load(weights_only=True). ({str(e).splitlines()[0]})"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, AttributeError, ImportError, KeyError, IndexError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(
            f"could not read PyTorch weights file {path!r} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None
    return _check_tensor_dict(obj, path)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file (``.safetensors`` or a torch pickle such as ``.bin``) into a dict of CPU tensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    return load_bin(path)


def read_shard_index(index_path: str) -> dict[str, str]:
    """The ``weight_map`` of a ``*.safetensors.index.json`` (tensor name -> shard file name), checked.

    Every problem is a CheckpointError naming the index file and the field: invalid JSON, not an object, no
    ``weight_map`` or one that is not an object of strings, and shard names that would leave the model folder
    (absolute paths, ``..``; see :func:`check_shard_name`).
    """
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"{index_path}: not a valid sharded-checkpoint index: not valid JSON (truncated or not a JSON file?): {e}"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read the sharded-checkpoint index: {e}") from None
    if not isinstance(index, dict):
        raise CheckpointError(
            f"{index_path}: not a valid sharded-checkpoint index: it holds {_json_kind(index)}, not a JSON object"
        )
    if "weight_map" not in index:
        raise CheckpointError(f"{index_path}: not a valid sharded-checkpoint index: field 'weight_map' is missing")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index_path}: field 'weight_map' must be an object mapping tensor names to shard "
            f"files, got {_json_kind(weight_map)}"
        )
    if not weight_map:
        raise CheckpointError(f"{index_path}: field 'weight_map' is empty: it names no shard")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{index_path}: field 'weight_map' entry {name!r} must be a shard file name, got {_json_kind(shard)}"
            )
        check_shard_name(index_path, shard)
    return weight_map


def check_shard_name(index_path: str, shard: str) -> None:
    """Refuse a shard name that is empty, absolute or climbs out of the index's folder with ``..``."""
    parts = shard.replace("\\", "/").split("/")
    if (
        not shard
        or "\0" in shard
        or os.path.isabs(shard)
        or shard.startswith(("/", "\\"))
        or os.path.splitdrive(shard)[0]
        or ".." in parts
        or not parts[-1]
    ):
        raise CheckpointError(
            f"{index_path}: field 'weight_map' names shard {shard!r}, which is not a file name inside the model "
            "folder (absolute paths and '..' are refused: a model folder must not read files outside itself)"
        )


def _snapshot_root(folder: str) -> str | None:
    """For a folder inside huggingface_hub's cache (``.../models--org--name/snapshots/<rev>/...``), the
    ``models--org--name`` folder: the cache links snapshot files to ``../../blobs/<hash>`` inside it."""
    parts = os.path.abspath(folder).split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--", "spaces--")):
            return os.sep.join(parts[:i]) or os.sep
    return None


def check_shard_inside(index_path: str, shard: str, path: str) -> None:
    """Refuse a shard whose file, symlinks resolved, lies outside the folder of the index (its model folder).

    In huggingface_hub's cache, where every file is a symlink to a blob of the same repository, the shard's
    resolved file must lie inside that repository's cache folder instead.
    """
    folder = os.path.dirname(os.path.abspath(index_path))
    root = _snapshot_root(folder)
    allowed = os.path.realpath(root if root is not None else folder)
    lexical_ok = _inside(os.path.abspath(path), folder)
    real = os.path.realpath(path)
    if not (lexical_ok and _inside(real, allowed)):
        raise CheckpointError(
            f"{index_path}: field 'weight_map' names shard {shard!r}, which resolves to {real}, outside the model "
            f"folder {allowed} (a symlink out of it?); shard files must be inside the model folder"
        )


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def load_sharded_safetensors(index_path: str, resolve_shard) -> dict[str, torch.Tensor]:
    """Read every shard named in a ``*.safetensors.index.json`` (``resolve_shard(name) -> local path``).

    The index is checked by :func:`read_shard_index`, and every shard file must lie inside the model folder
    (:func:`check_shard_inside`); a missing, unreadable or truncated shard is a CheckpointError naming the index
    and the shard.
    """
    index_path = os.fspath(index_path)
    weight_map = read_shard_index(index_path)
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        try:
            path = os.fspath(resolve_shard(shard))
        except OSError as e:  # FileNotFoundError, hub errors
            raise CheckpointError(
                f"{index_path}: shard {shard!r} named in field 'weight_map' cannot be found: {e}"
            ) from None
        check_shard_inside(index_path, shard, path)
        if not os.path.isfile(path):
            raise CheckpointError(f"{index_path}: shard {shard!r} named in field 'weight_map' is not a file ({path})")
        try:
            state_dict.update(load_safetensors(path))
        except CheckpointError as e:
            raise CheckpointError(f"{index_path}: shard {shard!r}: {e}") from None
    return state_dict


def find_weights_file(
    pretrained_model_name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    **hub_kwargs,
) -> tuple[str, bool]:
    """Locate the weights: returns ``(path, is_sharded_index)``.

    ``use_safetensors`` None: safetensors first, then ``.bin``; True: safetensors required; False: ``.bin`` only.
    """
    if use_safetensors not in (None, True, False):
        raise TypeError(f"use_safetensors must be None, True or False, got {use_safetensors!r}")
    if os.path.isfile(os.fspath(pretrained_model_name_or_path)):
        raise NotADirectoryError(
            f"{os.fspath(pretrained_model_name_or_path)} is a file; pass the model's folder (the one holding "
            "config.json and the weights)"
        )
    tried: list[str] = []
    errors: list[str] = []
    if use_safetensors is not False:
        for name, sharded in (
            (add_variant(SAFETENSORS_WEIGHTS_NAME, variant), False),
            (add_variant(SAFE_WEIGHTS_INDEX_NAME, variant), True),
        ):
            tried.append(name)
            try:
                return resolve_file(pretrained_model_name_or_path, name, subfolder=subfolder, **hub_kwargs), sharded
            except OSError as e:  # FileNotFoundError included
                errors.append(str(e))
    if use_safetensors is not True:
        name = add_variant(WEIGHTS_NAME, variant)
        tried.append(name)
        try:
            return resolve_file(pretrained_model_name_or_path, name, subfolder=subfolder, **hub_kwargs), False
        except OSError as e:
            errors.append(str(e))
    where = os.fspath(pretrained_model_name_or_path) + (f" (subfolder {subfolder!r})" if subfolder else "")
    hint = ""
    if use_safetensors is True:
        hint = "; use_safetensors=True requires a .safetensors file (pass use_safetensors=None to allow .bin)"
    elif variant is not None:
        hint = f"; variant={variant!r} requires the variant file (pass variant=None for the default weights)"
    raise FileNotFoundError(f"no weights file for {where}: looked for {', '.join(tried)}{hint}. Details: {errors[-1]}")


# -- legacy names and matching -------------------------------------------------------------------------


def fix_legacy_attention_keys(state_dict: dict[str, torch.Tensor], attention_paths: Iterable[str]) -> dict:
    """Rename ``<path>.query/key/value/proj_attn.{weight,bias}`` to the current names, in place."""
    for path in attention_paths:
        prefix = f"{path}." if path else ""
        for old, new in _LEGACY_ATTENTION_NAMES.items():
            for suffix in ("weight", "bias"):
                old_key = f"{prefix}{old}.{suffix}"
                if old_key in state_dict:
                    state_dict[f"{prefix}{new}.{suffix}"] = state_dict.pop(old_key)
    return state_dict


def _summary(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint"
) -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped keys (nothing if they match)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mis_shaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_summary(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_summary(unexpected)}")
    if mis_shaped:
        parts.append(f"{len(mis_shaped)} mis-shaped key(s): {_summary(mis_shaped, 6)}")
    raise CheckpointError(
        f"the weights in {source} do not match {type(module).__name__} built from its config "
        f"(does config.json belong to these weights?): " + "; ".join(parts)
    )


# -- writing -------------------------------------------------------------------------------------------


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, safe_serialization: bool = True
) -> str:
    """Write a state dict as safetensors (``{"format": "pt"}`` metadata, like diffusers) or a torch pickle."""
    path = os.fspath(path)
    # Contiguous CPU copies: safetensors needs contiguous, unshared storage.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={"format": "pt"})
    else:
        torch.save(tensors, path)
    return path
