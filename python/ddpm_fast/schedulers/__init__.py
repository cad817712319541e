"""DDPM and DDIM schedulers, numerically identical to diffusers 0.42.1 and config-file compatible with it."""

from ..utils.torch_utils import randn_tensor
from .scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from .scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput
from .scheduling_utils import SchedulerMixin, betas_for_alpha_bar, rescale_zero_terminal_snr

__all__ = [
    "DDIMScheduler",
    "DDIMSchedulerOutput",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "SchedulerMixin",
    "betas_for_alpha_bar",
    "randn_tensor",
    "rescale_zero_terminal_snr",
]
