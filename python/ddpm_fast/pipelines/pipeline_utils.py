"""What every pipeline shares: loading and saving the diffusers folder layout, device/dtype moves,
the progress bar, and the image output type."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from ..configuration import DIFFUSERS_COMPAT_VERSION, read_json_object
from ..hub import is_hub_id
from ..utils.outputs import BaseOutput

MODEL_INDEX = "model_index.json"


@dataclass
class ImagePipelineOutput(BaseOutput):
    """``images``: a list of PIL images, or an ``(N, H, W, C)`` numpy array, or an ``(N, C, H, W)`` tensor."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """``(N, H, W, C)`` floats in [0, 1] to PIL images (mode "L" for one channel), rounding like diffusers."""
    if images.ndim == 3:
        images = images[None, ...]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [PIL.Image.fromarray(image.squeeze(-1), mode="L") for image in images]
    return [PIL.Image.fromarray(image) for image in images]


def _snapshot(repo_id: str, **hub_kwargs) -> str:
    """Local folder for a hub id (works offline from huggingface_hub's cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OSError(
            f"{repo_id!r} is not a local folder, and loading hub ids needs huggingface_hub: "
            "`pip install huggingface_hub`, or pass the path of a local folder"
        ) from None
    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision")
    kwargs = {k: v for k, v in hub_kwargs.items() if k in keys and v is not None}
    try:
        return snapshot_download(repo_id, **kwargs)
    except Exception as e:  # many huggingface_hub error types; one clear message for users
        raise OSError(
            f"could not get {repo_id!r} from the Hugging Face hub or its cache ({type(e).__name__}: {e}). "
            "Pass a local folder instead, or check the id and your network."
        ) from None


def resolve_pipeline_dir(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> str:
    """The local pipeline folder: ``pretrained_model_name_or_path`` itself, or a hub id's snapshot."""
    if isinstance(pretrained_model_name_or_path, bytes) or not isinstance(
        pretrained_model_name_or_path, (str, os.PathLike)
    ):
        raise TypeError(
            "pretrained_model_name_or_path must be a pipeline folder or a hub id, got "
            f"{type(pretrained_model_name_or_path).__name__} {pretrained_model_name_or_path!r}"
        )
    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"pretrained_model_name_or_path {path!r} is a file; pass the pipeline's folder")
    if is_hub_id(path):
        return _snapshot(path, **hub_kwargs)
    raise FileNotFoundError(f"pretrained_model_name_or_path {path!r} does not exist")


def read_model_index(folder: str) -> dict[str, Any]:
    """``folder/model_index.json`` as a dict (``{}`` when there is none: the original flat layout)."""
    path = os.path.join(folder, MODEL_INDEX)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; it must be the pipeline's JSON index file")
    return read_json_object(path) if os.path.isfile(path) else {}


def index_component_class(index: dict[str, Any], name: str, index_path: str, default: str) -> str | None:
    """The class name ``model_index.json`` gives component ``name`` (``default`` when the field is absent).

    diffusers writes each component as ``[library, class name]``; ``[null, null]`` means "no such component"
    and gives None. Any other shape is refused with an error naming the file and the field.
    """
    if name not in index:
        return default
    entry = index[name]
    if (
        not isinstance(entry, (list, tuple))
        or len(entry) != 2
        or not all(part is None or isinstance(part, str) for part in entry)
    ):
        from ..configuration import _json_kind

        raise ValueError(
            f"{index_path}: field {name!r} must be a [library, class name] pair such as "
            f'["diffusers", "{default}"], got {_json_kind(entry)}'
        )
    return entry[1]


def component_subfolder(folder: str, name: str) -> str | None:
    """diffusers' rule: ``folder/name/`` when it exists, else the folder itself (original flat layout)."""
    return name if os.path.isdir(os.path.join(folder, name)) else None


class DiffusionPipeline:
    """Base for pipelines made of named components (``torch.nn.Module`` models and schedulers)."""

    _component_names: tuple[str, ...] = ()

    def register_modules(self, **modules) -> None:
        for name, module in modules.items():
            setattr(self, name, module)

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._component_names}

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in self.components.values() if isinstance(m, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        for module in self._modules():
            return module.device
        return torch.device("cpu")

    @property
    def _execution_device(self) -> torch.device:
        return self.device

    @property
    def dtype(self) -> torch.dtype:
        for module in self._modules():
            return module.dtype
        return torch.float32

    def to(self, *args, **kwargs) -> "DiffusionPipeline":
        """Move every model: ``pipe.to("cuda")``, ``pipe.to(torch.float16)``, ``pipe.to("cuda", torch.float16)``."""
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"to() got unexpected keyword arguments {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = torch.device(arg)
            else:
                raise TypeError(f"to() takes a device and/or a torch.dtype, got {arg!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype}")
        for module in self._modules():
            module.to(device=device, dtype=dtype)
        return self

    # -- progress bar (diffusers' API) ---------------------------------------------------------
    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total=None):
        config = dict(getattr(self, "_progress_bar_config", {}))
        if "disable" not in config:
            rank = os.environ.get("RANK")
            config["disable"] = rank not in (None, "0")
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is not None:
            return tqdm(total=total, **config)
        raise ValueError("progress_bar() needs an iterable or a total")

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
        return numpy_to_pil(images)

    # -- saving --------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, variant: str | None = None
    ) -> None:
        """Write the diffusers layout: ``model_index.json`` and one subfolder per component."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a folder")
        os.makedirs(save_directory, exist_ok=True)
        index: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_COMPAT_VERSION}
        for name, component in self.components.items():
            index[name] = ["diffusers", type(component).__name__]
            target = os.path.join(save_directory, name)
            if isinstance(component, torch.nn.Module):
                component.save_pretrained(target, safe_serialization=safe_serialization, variant=variant)
            else:
                component.save_pretrained(target)
        with open(os.path.join(save_directory, MODEL_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
