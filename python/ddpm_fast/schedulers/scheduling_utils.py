"""Pieces shared by the DDPM and DDIM schedulers: beta schedules, argument checks, loading and saving.

Every number here is computed with the same float32 tensor operations diffusers 0.42.1 uses, so that
``alphas_cumprod`` is bitwise equal to diffusers' and scheduler steps agree to the last bit (reference
backend) or to float rounding (fused backend).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..configuration import ConfigMixin
from ..hub import HUB_KWARGS
from ..utils.torch_utils import randn_tensor

__all__ = [
    "SCHEDULER_CONFIG_NAME",
    "SchedulerMixin",
    "StepCoefficients",
    "StepPlan",
    "UnsupportedOptionError",
    "betas_for_alpha_bar",
    "make_betas",
    "randn_tensor",
    "rescale_zero_terminal_snr",
]

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


class UnsupportedOptionError(ValueError, NotImplementedError):
    """A config value the scheduler does not know.

    A ``ValueError`` (it is bad input) that is also a ``NotImplementedError``, which is what diffusers
    raises for an unknown ``beta_schedule``, so code written against diffusers keeps catching it.
    """


def betas_for_alpha_bar(
    num_diffusion_timesteps: int,
    max_beta: float = 0.999,
    alpha_transform_type: str = "cosine",
) -> torch.Tensor:
    """Betas that discretise a continuous ``alpha_bar(t)``, ``t`` in [0, 1] (float32, like diffusers).

    ``alpha_transform_type``: ``"cosine"`` (the Glide / improved-DDPM ``squaredcos_cap_v2`` schedule),
    ``"exp"`` or ``"laplace"``. Each beta is ``min(1 - alpha_bar(t_{i+1}) / alpha_bar(t_i), max_beta)``.
    """
    if alpha_transform_type == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "exp":

        def alpha_bar(t: float) -> float:
            return math.exp(t * -12.0)

    elif alpha_transform_type == "laplace":

        def alpha_bar(t: float) -> float:
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    else:
        raise UnsupportedOptionError(
            f"alpha_transform_type must be one of 'cosine', 'exp', 'laplace'; got {alpha_transform_type!r}"
        )
    n = _check_positive_int(num_diffusion_timesteps, "num_diffusion_timesteps")
    betas = []
    for i in range(n):
        t1, t2 = i / n, (i + 1) / n
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale ``betas`` so the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1). Float32 ops in diffusers' order."""
    alphas = 1.0 - betas
    alphas_bar_sqrt = torch.cumprod(alphas, dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    # Shift so the last value is 0, then scale so the first is back where it was.
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _check_beta_bound(value: Any, name: str, schedule: str) -> float:
    """``beta_start`` / ``beta_end`` unchanged when it is a finite real number in [0, 1]; else an error naming
    ``name``."""
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise TypeError(
            f"{name} must be a number in [0, 1] (beta_schedule {schedule!r} uses it), "
            f"got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(number) or not 0 <= number <= 1:
        raise ValueError(
            f"{name} must be a finite number in [0, 1] (beta_schedule {schedule!r} uses it), got {value!r}"
        )
    return value


def _as_trained_betas(trained_betas: Any) -> torch.Tensor:
    """``trained_betas`` (sequence, array or tensor) as a float32 CPU tensor; a clear error for anything else."""
    if isinstance(trained_betas, torch.Tensor):
        if trained_betas.is_complex() or trained_betas.dtype == torch.bool:
            raise TypeError(f"trained_betas must hold real numbers, got a tensor of dtype {trained_betas.dtype}")
        betas = trained_betas.detach()
    else:
        if isinstance(trained_betas, (str, bytes, Mapping)):
            raise TypeError(f"trained_betas must be a sequence of numbers, got {type(trained_betas).__name__}")
        try:
            betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"trained_betas must be a sequence of numbers ({e})") from None
    return betas.to(device="cpu", dtype=torch.float32).clone()


def _check_betas_in_range(betas: torch.Tensor, source: str) -> None:
    """Every beta finite and in [0, 1]; otherwise a ValueError saying where they came from and what is wrong."""
    finite = torch.isfinite(betas)
    if not finite.all():
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"{source} gives non-finite betas (beta[{first}] = {betas[first].item()}); "
            "betas must be finite values in [0, 1]"
        )
    outside = (betas < 0) | (betas > 1)
    if outside.any():
        first = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"{source} gives betas outside [0, 1] (beta[{first}] = {betas[first].item()}, "
            f"range {betas.min().item()} to {betas.max().item()}); betas must be finite values in [0, 1]"
        )


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any,
    rescale_betas_zero_snr: bool,
    allowed_schedules: Sequence[str],
    owner: str,
) -> torch.Tensor:
    """The float32 beta table for a scheduler config, exactly as diffusers builds it.

    Unlike diffusers, betas that leave [0, 1] or are not finite are refused with a ValueError naming the
    argument they came from: ``beta_start`` / ``beta_end`` (checked before the schedules that use them),
    ``trained_betas``, or the schedule's own result (including after ``rescale_betas_zero_snr``). Such betas
    make ``alphas_cumprod`` overflow or turn NaN, and every sample NaN.
    """
    if trained_betas is not None:
        betas = _as_trained_betas(trained_betas)
        if betas.ndim != 1:
            raise ValueError(f"trained_betas must be one-dimensional, got shape {tuple(betas.shape)}")
        if betas.numel() != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {betas.numel()} values but num_train_timesteps is {num_train_timesteps}; "
                "they must match"
            )
        _check_betas_in_range(betas, "trained_betas")
        source = "trained_betas"
    elif beta_schedule not in allowed_schedules:
        raise UnsupportedOptionError(
            f"beta_schedule {beta_schedule!r} is not supported by {owner}; choose one of {tuple(allowed_schedules)}"
        )
    else:
        if beta_schedule in ("linear", "scaled_linear", "sigmoid"):
            beta_start = _check_beta_bound(beta_start, "beta_start", beta_schedule)
            beta_end = _check_beta_bound(beta_end, "beta_end", beta_schedule)
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            # Latent-diffusion schedule: linear in sqrt(beta).
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(num_train_timesteps)
        elif beta_schedule == "laplace":
            betas = betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
        elif beta_schedule == "sigmoid":
            # GeoDiff schedule; diffusers builds the linspace in the default dtype (float32).
            betas = (
                torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float32)) * (beta_end - beta_start)
                + beta_start
            )
        else:  # pragma: no cover - allowed_schedules lists only the names handled above
            raise UnsupportedOptionError(f"beta_schedule {beta_schedule!r} is not implemented")
        source = f"beta_schedule {beta_schedule!r} with num_train_timesteps={num_train_timesteps}"
        if beta_schedule in ("linear", "scaled_linear", "sigmoid"):
            source += f", beta_start={beta_start!r}, beta_end={beta_end!r}"
        _check_betas_in_range(betas, source)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
        _check_betas_in_range(betas, f"rescale_betas_zero_snr=True applied to the betas of {source}")
    return betas


# -- argument checks -----------------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_choice(value: Any, name: str, choices: Sequence[str], owner: str) -> None:
    if value not in choices:
        raise UnsupportedOptionError(f"{name} {value!r} is not supported by {owner}; choose one of {tuple(choices)}")


def check_common_config(owner: str, config) -> None:
    """Checks shared by DDPMScheduler and DDIMScheduler, run at construction so mistakes surface early."""
    _check_positive_int(config.num_train_timesteps, "num_train_timesteps")
    check_choice(config.prediction_type, "prediction_type", PREDICTION_TYPES, owner)
    check_choice(config.timestep_spacing, "timestep_spacing", TIMESTEP_SPACINGS, owner)
    if isinstance(config.steps_offset, bool) or not isinstance(config.steps_offset, numbers.Integral):
        raise TypeError(f"steps_offset must be an integer, got {config.steps_offset!r}")
    if config.steps_offset < 0:
        raise ValueError(f"steps_offset must be >= 0, got {config.steps_offset}")
    if config.clip_sample and not config.clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be > 0 when clip_sample is set, got {config.clip_sample_range!r}")
    if config.thresholding:
        if not 0 < config.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {config.dynamic_thresholding_ratio!r}")
        if not config.sample_max_value >= 1:
            raise ValueError(f"sample_max_value must be >= 1, got {config.sample_max_value!r}")


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    if n > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`: "
            f"{num_train_timesteps} as the unet model trained with this scheduler can only handle "
            f"maximal {num_train_timesteps} timesteps."
        )
    return n


def spaced_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Descending int64 timesteps for ``timestep_spacing`` (Table 2 of Lin et al. 2023), as diffusers computes them."""
    n, big_n = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        timesteps = np.linspace(0, big_n - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = big_n // n
        timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        timesteps += steps_offset
        if timesteps[0] >= big_n:
            raise ValueError(
                f"steps_offset={steps_offset} pushes the first timestep to {int(timesteps[0])}, past the last "
                f"training timestep {big_n - 1}; lower steps_offset or num_inference_steps"
            )
    elif spacing == "trailing":
        ratio = big_n / n
        timesteps = np.round(np.arange(big_n, 0, -ratio)).astype(np.int64)
        timesteps -= 1
    else:
        raise UnsupportedOptionError(
            f"timestep_spacing {spacing!r} is not supported; choose one of {TIMESTEP_SPACINGS}"
        )
    return timesteps


def as_timestep(timestep: Any, num_train_timesteps: int) -> int:
    """A Python int from an int, an integral float or a one-element tensor; checked against the table."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
        if timestep.is_floating_point() or timestep.is_complex():
            value = float(timestep.item())
        else:
            value = int(timestep.item())
    elif isinstance(timestep, np.ndarray) and timestep.size == 1:
        value = timestep.item()
    elif isinstance(timestep, (numbers.Integral, float)) and not isinstance(timestep, bool):
        value = timestep
    else:
        raise TypeError(f"timestep must be an int, a float or a 0-d tensor, got {type(timestep).__name__}")
    if isinstance(value, float) or isinstance(value, np.floating):
        if not float(value).is_integer():
            raise ValueError(f"timestep must be a whole number for this discrete scheduler, got {value!r}")
    value = int(value)
    if not 0 <= value < num_train_timesteps:
        raise ValueError(f"timestep must be in [0, {num_train_timesteps - 1}], got {value}")
    return value


def check_step_tensors(model_output: Any, sample: Any, expected_output_channels: int | None = None) -> None:
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if not model_output.is_floating_point():
        raise TypeError(f"model_output must be a floating-point tensor, got {model_output.dtype}")
    if not sample.is_floating_point():
        raise TypeError(f"sample must be a floating-point tensor, got {sample.dtype}")
    if model_output.shape != sample.shape:
        if expected_output_channels is not None and sample.ndim >= 2:
            want = (sample.shape[0], expected_output_channels, *sample.shape[2:])
            if tuple(model_output.shape) == want:
                return
        raise ValueError(
            f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}; "
            "they must match"
        )


def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022), in diffusers' op order.

    Per sample, ``s`` is the ``ratio`` quantile of ``|x0|`` clamped to ``[1, max_value]``; ``x0`` is clamped
    to ``[-s, s]`` and divided by ``s``.
    """
    dtype = sample.dtype
    batch, channels, *rest = sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()  # quantile needs float32/64; CPU clamp lacks half
    sample = sample.reshape(batch, channels * int(np.prod(rest)))
    s = torch.quantile(sample.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    sample = torch.clamp(sample, -s, s) / s
    return sample.reshape(batch, channels, *rest).to(dtype)


def add_noise_like_diffusers(
    scheduler, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any
) -> torch.Tensor:
    """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` per sample, with diffusers' dtype and device handling."""
    if not isinstance(original_samples, torch.Tensor) or not isinstance(noise, torch.Tensor):
        raise TypeError("original_samples and noise must be torch.Tensors")
    if noise.shape != original_samples.shape:
        raise ValueError(
            f"noise has shape {tuple(noise.shape)} but original_samples has shape {tuple(original_samples.shape)}"
        )
    sqrt_a, sqrt_1ma = _sqrt_alpha_terms(scheduler, original_samples, timesteps, "timesteps")
    return sqrt_a * original_samples + sqrt_1ma * noise


def velocity_like_diffusers(scheduler, sample: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
    """``v = sqrt(a_t) * noise - sqrt(1 - a_t) * sample`` per sample, as diffusers computes it."""
    if not isinstance(sample, torch.Tensor) or not isinstance(noise, torch.Tensor):
        raise TypeError("sample and noise must be torch.Tensors")
    if noise.shape != sample.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but sample has shape {tuple(sample.shape)}")
    sqrt_a, sqrt_1ma = _sqrt_alpha_terms(scheduler, sample, timesteps, "timesteps")
    return sqrt_a * noise - sqrt_1ma * sample


def _sqrt_alpha_terms(scheduler, like: torch.Tensor, timesteps: Any, name: str):
    n = scheduler.config.num_train_timesteps
    if not isinstance(timesteps, torch.Tensor):
        timesteps = torch.as_tensor(timesteps)
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {timesteps.dtype}")
    # Range check only where it costs no device sync (CPU indices); CUDA indexing asserts on its own.
    if timesteps.device.type == "cpu" and timesteps.numel():
        lo, hi = int(timesteps.min()), int(timesteps.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} must be in [0, {n - 1}], got values from {lo} to {hi}")
    # Like diffusers: keep the table on the samples' device so later calls don't copy it again.
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device=like.device)
    alphas_cumprod = scheduler.alphas_cumprod.to(dtype=like.dtype)
    timesteps = timesteps.to(like.device)
    sqrt_a = (alphas_cumprod[timesteps] ** 0.5).flatten()
    sqrt_1ma = ((1 - alphas_cumprod[timesteps]) ** 0.5).flatten()
    if like.ndim > 1:  # one factor per sample, broadcast over the other dims
        shape = (-1,) + (1,) * (like.ndim - 1)
        sqrt_a, sqrt_1ma = sqrt_a.reshape(shape), sqrt_1ma.reshape(shape)
    return sqrt_a, sqrt_1ma


# -- loading and saving --------------------------------------------------------------------------------


class SchedulerMixin(ConfigMixin):
    """Loading and saving for schedulers; files are ``scheduler_config.json``, interchangeable with diffusers."""

    config_name = SCHEDULER_CONFIG_NAME
    _compatibles: list[str] = []
    has_compatibles = True
    order = 1

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ):
        """Build a scheduler from ``scheduler_config.json`` in a folder (optionally ``subfolder``), a file, or a hub id.

        Hub keyword arguments (``cache_dir``, ``revision``, ``local_files_only``, ...) go to the download;
        other keyword arguments override config values.
        """
        if pretrained_model_name_or_path is None:
            raise ValueError("pretrained_model_name_or_path is required: a folder, a scheduler_config.json or a hub id")
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``scheduler_config.json`` into ``save_directory`` (created if needed)."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported by ddpm_fast; save locally and upload with huggingface_hub")
        self.save_config(save_directory)

    def step_coefficients(self, timestep: int) -> StepCoefficients | None:
        """The fused-step scalars of ``step(model_output, timestep, sample)`` as the pipeline calls it, or None
        where the fused step cannot express it (thresholding, learned variances, a non-finite scalar)."""
        raise NotImplementedError

    def _draws_noise(self, timestep: int) -> bool:
        """Whether the pipeline's ``step`` call at ``timestep`` draws noise from its generator."""
        raise NotImplementedError

    def step_plan(self) -> StepPlan | None:
        """Every step of the pipeline's loop over ``self.timesteps`` in fused terms, for loops that run the steps
        themselves (the CUDA-graph loop), or None when some step is not expressible, or when ``step`` was replaced
        on the instance (a wrapper whose arguments the plan cannot know)."""
        if "step" in self.__dict__:
            return None
        timesteps = tuple(int(t) for t in self.timesteps.tolist())
        coefficients = tuple(self.step_coefficients(t) for t in timesteps)
        if any(c is None for c in coefficients):
            return None
        clip = float(self.config.clip_sample_range) if self.config.clip_sample else None
        return StepPlan(timesteps, coefficients, tuple(self._draws_noise(t) for t in timesteps), clip)  # type: ignore[arg-type]

    @property
    def compatibles(self) -> list[type]:
        """Scheduler classes of this package whose ``from_config`` accepts this scheduler's config."""
        return self._get_compatibles()

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        import ddpm_fast.schedulers as package

        names = sorted(set([cls.__name__, *cls._compatibles]))
        return [getattr(package, n) for n in names if hasattr(package, n)]


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars of one step in the terms of the fused step (:func:`ddpm_fast.ops.scheduler_step`):
    ``x0 = a_x * sample + a_e * model_output`` (clipped), ``prev = c0 * x0 + c1 * sample + c2 * model_output +
    noise_scale * noise``."""

    x0: tuple[float, float]
    prev: tuple[float, float, float]
    noise_scale: float

    def row(self, draws_noise: bool) -> tuple[float, float, float, float, float, float]:
        """``(a_x, a_e, c0, c1, c2, noise_scale)``, the noise scale 0 when the step draws no noise."""
        return (*self.x0, *self.prev, self.noise_scale if draws_noise else 0.0)


@dataclass(frozen=True)
class StepPlan:
    """A whole sampling loop over ``scheduler.timesteps`` in fused terms (see :meth:`SchedulerMixin.step_plan`)."""

    timesteps: tuple[int, ...]
    coefficients: tuple[StepCoefficients, ...]
    draws_noise: tuple[bool, ...]
    clip: float | None  # clip_sample_range when clip_sample, else None

    def table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``(len(timesteps), 6)`` float32 rows :func:`ddpm_fast.ops.scheduler_step_table` reads."""
        rows = [c.row(d) for c, d in zip(self.coefficients, self.draws_noise)]
        return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)
