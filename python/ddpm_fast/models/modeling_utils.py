"""``ModelMixin``: diffusers-compatible ``from_pretrained`` / ``save_pretrained`` and the ``dtype`` / ``device``
properties, for ``nn.Module`` subclasses that are also :class:`~ddpm_fast.configuration.ConfigMixin`."""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import checkpoints
from ..hub import HUB_KWARGS, resolve_file

# diffusers from_pretrained keywords that only tune memory use or logging: accepted and ignored here.
_IGNORED_LOAD_KWARGS = ("low_cpu_mem_usage", "output_loading_info", "mirror", "user_agent", "disable_mmap")


def _as_dtype(torch_dtype) -> torch.dtype | None:
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if isinstance(torch_dtype, str) and isinstance(
        getattr(torch, torch_dtype.removeprefix("torch."), None), torch.dtype
    ):
        return getattr(torch, torch_dtype.removeprefix("torch."))
    raise ValueError(f"torch_dtype must be a torch.dtype such as torch.float16, got {torch_dtype!r}")


class ModelMixin(nn.Module):
    """Loading and saving in diffusers' layout (``config.json`` + ``diffusion_pytorch_model.*``)."""

    config_name = "config.json"

    # -- properties --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the first floating-point parameter (then buffer), like diffusers' get_parameter_dtype."""
        last = None
        for t in self.parameters():
            last = t.dtype
            if t.is_floating_point():
                return t.dtype
        for t in self.buffers():
            last = t.dtype
            if t.is_floating_point():
                return t.dtype
        return last if last is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """Device of the first parameter (or buffer); CPU for a module without any."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def _apply(self, fn, recurse: bool = True):
        # Tensors made under torch.inference_mode have no version counter, so the prepared weights of the fast
        # path could not see later in-place changes (models/prepared.py). Parameters made here (.to(),
        # from_pretrained's to_empty) stay normal tensors even inside inference mode; they work there all the same.
        with torch.inference_mode(False):
            return super()._apply(fn, recurse)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters, optionally only those that require grad and/or without nn.Embedding weights."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel() for p in self.parameters() if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    # -- checkpoint hooks --------------------------------------------------------------------------
    def _deprecated_attention_paths(self) -> list[str]:
        """Module paths whose parameters may use the old attention names."""
        return [name for name, m in self.named_modules() if getattr(m, "_from_deprecated_attn_block", False)]

    def _fix_state_dict_keys_on_load(self, state_dict: dict) -> dict:
        return checkpoints.fix_legacy_attention_keys(state_dict, self._deprecated_attention_paths())

    # -- saving -------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        variant: str | None = None,
        **kwargs,
    ) -> None:
        """Write ``config.json`` and ``diffusion_pytorch_model[.variant].{safetensors,bin}`` into ``save_directory``.

        The weights are written in the model's current dtype (call ``.half()`` first for an fp16 variant).
        """
        unknown = set(kwargs) - {"max_shard_size", "push_to_hub"}
        if unknown:
            raise TypeError(f"save_pretrained() got unexpected keyword argument(s): {sorted(unknown)}")
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("push_to_hub is not supported; upload the folder with huggingface_hub")
        if kwargs.get("max_shard_size") is not None:
            raise NotImplementedError("max_shard_size: writing sharded checkpoints is not supported (loading them is)")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file; pass a folder")
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.save_config(save_directory)
        name = checkpoints.SAFETENSORS_WEIGHTS_NAME if safe_serialization else checkpoints.WEIGHTS_NAME
        checkpoints.save_state_dict(
            self.state_dict(), os.path.join(save_directory, checkpoints.add_variant(name, variant)), safe_serialization
        )

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        **kwargs,
    ):
        """Load a model saved by diffusers or by :meth:`save_pretrained`: a local folder or a hub id.

        ``use_safetensors`` None tries safetensors first, then ``.bin``; True requires safetensors; False
        reads ``.bin`` only (always with ``weights_only=True``).  ``torch_dtype`` casts the loaded weights.
        Remaining keyword arguments are hub options (``revision``, ``cache_dir``, ``local_files_only``,
        ``token``, ...) or config overrides (``sample_size=64``).  The model is returned in eval mode.
        """
        if pretrained_model_name_or_path is None or not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise TypeError(
                "pretrained_model_name_or_path must be a folder path or a hub id, "
                f"got {pretrained_model_name_or_path!r}"
            )
        torch_dtype = _as_dtype(torch_dtype)
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        for k in _IGNORED_LOAD_KWARGS:
            kwargs.pop(k, None)
        device_map = kwargs.pop("device_map", None)
        if device_map is not None and not isinstance(device_map, (str, torch.device)):
            raise ValueError("device_map: only a single device (e.g. 'cpu' or 'cuda') is supported")

        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        init_keys = cls._init_keys()
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in init_keys}
        if kwargs:
            raise TypeError(f"from_pretrained() got unexpected keyword argument(s): {sorted(kwargs)}")

        weights_path, sharded = checkpoints.find_weights_file(
            pretrained_model_name_or_path,
            subfolder=subfolder,
            variant=variant,
            use_safetensors=use_safetensors,
            **hub_kwargs,
        )
        if sharded:
            folder = os.path.dirname(weights_path)
            state_dict = checkpoints.load_sharded_safetensors(
                weights_path,
                lambda shard: (
                    os.path.join(folder, shard)
                    if os.path.isfile(os.path.join(folder, shard))
                    else resolve_file(pretrained_model_name_or_path, shard, subfolder=subfolder, **hub_kwargs)
                ),
            )
        else:
            state_dict = checkpoints.load_state_dict(weights_path)

        # Build without random initialisation (weights come from the file), then fill in place.
        with torch.device("meta"):
            model = cls.from_config(config, **overrides)
        model = model.to_empty(device="cpu")
        model._fix_state_dict_keys_on_load(state_dict)
        checkpoints.check_state_dict(model, state_dict, source=weights_path)
        with torch.no_grad():
            model.load_state_dict(state_dict, strict=True)
        model.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if device_map is not None:
            model = model.to(device_map)
        model.eval()
        return model
