"""``DDIMScheduler``: denoising diffusion implicit models (Song et al. 2020), identical to diffusers 0.42.1.

Every DDIM update is affine in ``(x0, sample, model_output, noise)``: with ``eps = b_x*x + b_e*e + b_0*x0``
for the prediction type in use, ``prev = (sqrt(a_prev) + d*b_0)*x0 + d*b_x*x + d*b_e*e + std*noise`` where
``d = sqrt(1 - a_prev - std**2)``. The fused path therefore runs every configuration except dynamic
thresholding as one elementwise op, with per-timestep coefficients cached as Python floats taken from the
same float32 scalars diffusers computes. The reference path repeats diffusers' tensor arithmetic.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .. import fast_path, ops
from ..configuration import register_to_config
from ..utils.outputs import BaseOutput
from ..utils.torch_utils import randn_tensor
from .scheduling_utils import (
    SchedulerMixin,
    StepCoefficients,
    add_noise_like_diffusers,
    as_timestep,
    check_common_config,
    check_num_inference_steps,
    check_step_tensors,
    make_betas,
    spaced_timesteps,
    threshold_sample,
    velocity_like_diffusers,
)

__all__ = ["DDIMScheduler", "DDIMSchedulerOutput"]

# diffusers' DDIMScheduler accepts only these three; a config it would reject is rejected here too.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class DDIMSchedulerOutput(BaseOutput):
    """Result of :meth:`DDIMScheduler.step`.

    Attributes:
        prev_sample: ``x_{t-1}``, the next input of the denoising loop.
        pred_original_sample: the model's estimate of ``x_0`` (after clipping / thresholding).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class DDIMScheduler(SchedulerMixin):
    """DDIM sampler, a drop-in for ``diffusers.DDIMScheduler``.

    Args:
        num_train_timesteps: number of diffusion steps the model was trained with.
        beta_start, beta_end: end points of the ``linear`` and ``scaled_linear`` schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"``.
        trained_betas: explicit betas (length ``num_train_timesteps``); overrides ``beta_schedule``.
        clip_sample, clip_sample_range: clamp the predicted ``x_0`` to ``±clip_sample_range``.
        set_alpha_to_one: the "previous" alpha product of the last step is 1 (else ``alphas_cumprod[0]``).
        steps_offset: added to every timestep with ``"leading"`` spacing.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen dynamic thresholding of ``x_0``.
        timestep_spacing: ``"leading"``, ``"linspace"`` or ``"trailing"``.
        rescale_betas_zero_snr: rescale the betas so the last timestep has zero SNR.
    """

    _compatibles = ["DDIMScheduler", "DDPMScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        check_common_config(type(self).__name__, self.config)
        self.betas = make_betas(
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr,
            BETA_SCHEDULES,
            type(self).__name__,
        )
        if isinstance(trained_betas, torch.Tensor):  # keep the config JSON-serialisable
            self.register_to_config(trained_betas=trained_betas.detach().cpu().tolist())
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # The last step has no previous alpha product: 1, or the first one.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0

        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

        self._alphas_cumprod_cpu = self.alphas_cumprod  # see DDPMScheduler: never moved by add_noise
        self._coef_cache: dict[tuple, StepCoefficients | None] = {}

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity (DDIM does not scale the model input); present for scheduler interchangeability."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` (1..num_train_timesteps) timesteps, spaced by ``config.timestep_spacing``."""
        n_train = self.config.num_train_timesteps
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, n_train)
        schedule = spaced_timesteps(
            self.num_inference_steps, n_train, self.config.timestep_spacing, self.config.steps_offset
        )
        self.timesteps = torch.from_numpy(schedule).to(device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep ``step`` pairs with ``timestep``: ``timestep - num_train_timesteps // num_inference_steps``.

        This is diffusers' formula for every spacing; with ``"linspace"`` / ``"trailing"`` it is not always the
        next entry of ``self.timesteps`` (kept for identical numbers).
        """
        self._require_timesteps()
        return timestep - self.config.num_train_timesteps // self.num_inference_steps

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """``(1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)``, float32, like diffusers."""
        return self._variance_from(self.alphas_cumprod, int(timestep), int(prev_timestep))

    def _variance_from(self, alphas_cumprod: torch.Tensor, t: int, prev_t: int) -> torch.Tensor:
        alpha_prod_t = alphas_cumprod[t]
        alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        return threshold_sample(sample, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)

    # -- step ----------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step: ``x_t`` → ``x_{t - num_train_timesteps // num_inference_steps}``.

        Args:
            model_output: the model's prediction, same shape as ``sample``.
            timestep: current timestep (int, integral float or one-element tensor).
            sample: ``x_t``.
            eta: noise weight, >= 0 (0: deterministic DDIM; 1: DDPM-like). Noise is drawn only when > 0.
            use_clipped_model_output: recompute the noise estimate from the clipped ``x_0``.
            generator: RNG(s) for the noise; excludes ``variance_noise``.
            variance_noise: the unit noise to use instead of drawing it (same shape as ``model_output``).
            return_dict: return a :class:`DDIMSchedulerOutput` (default) or a tuple.
        """
        self._require_timesteps()
        t = as_timestep(timestep, self.config.num_train_timesteps)
        if isinstance(eta, bool) or not isinstance(eta, (numbers.Real, torch.Tensor)):
            raise TypeError(f"eta must be a float >= 0, got {type(eta).__name__}")
        eta = float(eta)
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite float >= 0, got {eta}")
        check_step_tensors(model_output, sample)
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            if variance_noise is not None:
                if not isinstance(variance_noise, torch.Tensor):
                    raise TypeError(f"variance_noise must be a torch.Tensor, got {type(variance_noise).__name__}")
                if variance_noise.shape != model_output.shape:
                    raise ValueError(
                        f"variance_noise has shape {tuple(variance_noise.shape)}, expected {tuple(model_output.shape)}"
                    )
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        use_clipped = bool(use_clipped_model_output)

        coefs = None
        given_noise = variance_noise if eta > 0 else None
        if fast_path.fused_step(model_output, sample, given_noise):
            coefs = self.step_coefficients(t, eta, use_clipped)
        if coefs is not None:
            noise = None
            if eta > 0:
                noise = variance_noise
                if noise is None:
                    noise = randn_tensor(
                        model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                    )
            clip = float(self.config.clip_sample_range) if self.config.clip_sample else None
            prev_sample, pred_original_sample = ops.scheduler_step(
                model_output, sample, noise, coefs.x0, coefs.prev, coefs.noise_scale if noise is not None else 0.0, clip
            )
        else:
            prev_sample, pred_original_sample = self._step_reference(
                model_output, t, prev_t, sample, eta, use_clipped, generator, variance_noise
            )
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _step_reference(self, model_output, t, prev_t, sample, eta, use_clipped, generator, variance_noise):
        """diffusers' DDIMScheduler.step, operation for operation (eq. 12 of Song et al.)."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            pred_epsilon = model_output
        elif prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        elif prediction_type == "v_prediction":
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        else:
            raise ValueError(f"prediction_type must be one of epsilon, sample, v_prediction; got {prediction_type!r}")

        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-r, r)

        # sigma_t of eq. 16
        variance = self._variance_from(self.alphas_cumprod, t, prev_t)
        std_dev_t = eta * variance ** (0.5)
        if use_clipped:
            # Noise estimate consistent with the clipped x0 (Glide does the same).
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction

        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std_dev_t * variance_noise
        return prev_sample, pred_original_sample

    def _draws_noise(self, timestep: int) -> bool:
        return False  # the pipeline calls step without eta (0): DDIM then draws nothing

    def step_coefficients(
        self, timestep: int, eta: float = 0.0, use_clipped_model_output: bool = False
    ) -> StepCoefficients | None:
        """The fused-step scalars of ``step(model_output, timestep, sample, eta, use_clipped_model_output)``,
        cached; None with thresholding, and where a scalar is not finite (the reference path then reproduces
        diffusers' inf/NaN)."""
        self._require_timesteps()
        if self.config.thresholding:
            return None
        t, use_clipped = timestep, bool(use_clipped_model_output)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        key = (t, prev_t, eta, use_clipped)
        try:
            return self._coef_cache[key]
        except KeyError:
            pass
        ac = self._alphas_cumprod_cpu
        # The float32 scalars diffusers computes ...
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = ac[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        std_dev_t = eta * self._variance_from(ac, t, prev_t) ** 0.5
        sqrt_a = float(alpha_prod_t**0.5)
        sqrt_b = float(beta_prod_t**0.5)
        sqrt_a_prev = float(alpha_prod_t_prev**0.5)
        direction = float((1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5)
        std = float(std_dev_t)
        # ... combined in float64.
        coefs = None
        try:
            prediction_type = self.config.prediction_type
            if prediction_type == "epsilon":
                x0 = (1.0 / sqrt_a, -sqrt_b / sqrt_a)
                eps = (0.0, 1.0, 0.0)
            elif prediction_type == "sample":
                x0 = (0.0, 1.0)
                eps = (1.0 / sqrt_b, -sqrt_a / sqrt_b, 0.0)
            else:
                x0 = (sqrt_a, -sqrt_b)
                eps = (sqrt_b, sqrt_a, 0.0)
            if use_clipped:
                eps = (1.0 / sqrt_b, 0.0, -sqrt_a / sqrt_b)
            b_x, b_e, b_0 = eps
            prev = (sqrt_a_prev + direction * b_0, direction * b_x, direction * b_e)
            if all(math.isfinite(v) for v in (*x0, *prev, std)):
                coefs = StepCoefficients(x0=x0, prev=prev, noise_scale=std)
        except ZeroDivisionError:
            pass
        self._coef_cache[key] = coefs
        return coefs

    # -- training helpers ----------------------------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process: ``sqrt(a_t) * original_samples + sqrt(1 - a_t) * noise``, one ``t`` per sample."""
        return add_noise_like_diffusers(self, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Velocity target ``sqrt(a_t) * noise - sqrt(1 - a_t) * sample`` (v-prediction training)."""
        return velocity_like_diffusers(self, sample, noise, timesteps)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
