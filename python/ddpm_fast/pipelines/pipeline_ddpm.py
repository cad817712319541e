"""DDPMPipeline: unconditional image generation, a drop-in for diffusers' ``DDPMPipeline``."""

from __future__ import annotations

import os

import torch

from ..cuda_graphs import GraphCache, sample_with_graph
from ..models import UNet2DModel
from ..models.plans import steady_model
from ..schedulers import DDIMScheduler, DDPMScheduler
from ..utils.torch_utils import randn_tensor
from .pipeline_utils import (
    MODEL_INDEX,
    DiffusionPipeline,
    ImagePipelineOutput,
    component_subfolder,
    index_component_class,
    read_model_index,
    resolve_pipeline_dir,
)

SCHEDULERS = {cls.__name__: cls for cls in (DDPMScheduler, DDIMScheduler)}
OUTPUT_TYPES = ("pil", "np", "pt")


class DDPMPipeline(DiffusionPipeline):
    """Denoise Gaussian noise into images with ``unet`` and ``scheduler`` (a DDPMScheduler or DDIMScheduler).

    Same arguments, same random-number draws and same outputs as ``diffusers.DDPMPipeline``.
    """

    _component_names = ("unet", "scheduler")

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler | DDIMScheduler):
        if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "config"):
            raise TypeError(f"unet must be a UNet2DModel, got {type(unet).__name__}")
        if not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
            raise TypeError(f"scheduler must be a DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self._cuda_graphs = GraphCache()

    def enable_cuda_graphs(self, enabled: bool = True) -> "DDPMPipeline":
        """Replay each denoising step (UNet + scheduler step) from a CUDA graph on CUDA devices (on by default).

        Same images either way; ``DDPM_FAST_CUDA_GRAPHS=0`` turns graphs off for the whole process.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self._cuda_graphs.enabled = enabled
        if not enabled:
            self._cuda_graphs.clear()
        return self

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        unet: UNet2DModel | None = None,
        scheduler: DDPMScheduler | DDIMScheduler | None = None,
        **hub_kwargs,
    ) -> "DDPMPipeline":
        """Load a pipeline folder (diffusers' nested layout or the original flat google layout) or a hub id.

        ``unet=`` / ``scheduler=`` replace a component, e.g. ``scheduler=DDIMScheduler.from_pretrained(...)``.
        """
        folder = resolve_pipeline_dir(pretrained_model_name_or_path, **hub_kwargs)
        index = read_model_index(folder)
        index_path = os.path.join(folder, MODEL_INDEX)
        if unet is None:
            unet_class = index_component_class(index, "unet", index_path, "UNet2DModel")
            if unet_class is None:
                raise ValueError(
                    f"{index_path}: field 'unet' says the pipeline has no unet; DDPMPipeline needs one "
                    "(pass unet=UNet2DModel.from_pretrained(...))"
                )
            if unet_class != "UNet2DModel":
                raise ValueError(
                    f"{index_path}: field 'unet' names class {unet_class!r}; only UNet2DModel is supported"
                )
            unet_subfolder = component_subfolder(folder, "unet")
            unet = UNet2DModel.from_pretrained(
                folder,
                subfolder=unet_subfolder,
                torch_dtype=torch_dtype,
                variant=variant,
                use_safetensors=use_safetensors,
            )
            if unet.config.sample_size is None:  # a UNet can do without it; this pipeline cannot size its noise
                config_path = os.path.join(
                    folder, *([unet_subfolder] if unet_subfolder else []), UNet2DModel.config_name
                )
                raise ValueError(
                    f"{config_path}: field 'sample_size' is null; DDPMPipeline needs the image size "
                    "(an integer or [height, width])"
                )
        elif torch_dtype is not None:
            unet = unet.to(torch_dtype)
        if scheduler is None:
            scheduler_class = index_component_class(index, "scheduler", index_path, "DDPMScheduler")
            if scheduler_class not in SCHEDULERS:
                raise ValueError(
                    f"{index_path}: field 'scheduler' names class {scheduler_class!r}; supported: "
                    f"{sorted(SCHEDULERS)}. Pass scheduler=DDPMScheduler.from_pretrained(...) to override."
                )
            scheduler = SCHEDULERS[scheduler_class].from_pretrained(
                folder, subfolder=component_subfolder(folder, "scheduler")
            )
        return cls(unet=unet, scheduler=scheduler)

    # -- sampling ------------------------------------------------------------------------------
    def _check_call_args(self, batch_size, generator, num_inference_steps, output_type) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        num_train = self.scheduler.config.num_train_timesteps
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or not 1 <= num_inference_steps <= num_train
        ):
            raise ValueError(
                f"num_inference_steps must be an integer in [1, {num_train}] (the scheduler's num_train_timesteps), "
                f"got {num_inference_steps!r}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(
                    f"generator is a list of length {len(generator)}; "
                    f"it must have one per image (batch_size={batch_size})"
                )
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("generator must be a torch.Generator or a list of them")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")

    def image_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        channels = self.unet.config.in_channels
        if isinstance(size, int):
            return (batch_size, channels, size, size)
        return (batch_size, channels, *size)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``batch_size`` images.

        ``output_type``: ``"pil"`` (list of PIL images), ``"np"`` (``(N, H, W, C)`` float32 in [0, 1]) or
        ``"pt"`` (``(N, C, H, W)`` tensor on the pipeline's device). Returns an :class:`ImagePipelineOutput`
        or, with ``return_dict=False``, the tuple ``(images,)``.
        """
        self._check_call_args(batch_size, generator, num_inference_steps, output_type)
        device = self._execution_device
        image = randn_tensor(self.image_shape(batch_size), generator=generator, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        graphed = None
        if device.type == "cuda":
            # Same noise draws (shape, dtype, device, order) as scheduler.step makes in the loop below.
            def draw_noise():
                return randn_tensor(image.shape, generator=generator, device=device, dtype=image.dtype)

            graphed = sample_with_graph(
                self._cuda_graphs, self.unet, self.scheduler, image, draw_noise, self.progress_bar
            )
        if graphed is not None:
            image = graphed
        else:
            with steady_model():  # nothing between two steps can change the UNet: its plan checks it once
                for t in self.progress_bar(self.scheduler.timesteps):
                    model_output = self.unet(image, t).sample
                    image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            if image.dtype == torch.bfloat16:  # numpy has no bfloat16 (diffusers raises here)
                image = image.float()
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
