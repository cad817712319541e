"""``DDPMScheduler``: ancestral sampling of Ho et al. 2020, numerically identical to diffusers 0.42.1.

Two implementations of ``step`` share one set of scalars:

* the fused path (backend ``"fused"``, the default) computes the per-timestep coefficients once, as Python
  floats taken from the same float32 scalars diffusers computes, caches them by ``(t, prev_t)`` and runs the
  whole update as one elementwise op (:func:`ddpm_fast.ops.scheduler_step`);
* the reference path (backend ``"reference"``, and configurations the fused op cannot express:
  thresholding, learned variances, mixed dtypes/devices) repeats diffusers' float32 tensor arithmetic
  operation for operation.

Both draw the step noise with :func:`randn_tensor` in the same shape, dtype, device and order as diffusers.
"""

from __future__ import annotations

import math
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
    check_choice,
    check_common_config,
    check_num_inference_steps,
    check_step_tensors,
    make_betas,
    spaced_timesteps,
    threshold_sample,
    velocity_like_diffusers,
)

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
_LEARNED = ("learned", "learned_range")


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """Result of :meth:`DDPMScheduler.step`.

    Attributes:
        prev_sample: ``x_{t-1}``, the next input of the denoising loop.
        pred_original_sample: the model's estimate of ``x_0`` (after clipping / thresholding).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _fixed_variance(
    alphas_cumprod: torch.Tensor,
    one: torch.Tensor,
    t: int,
    prev_t: int,
    variance_type: str,
    predicted_variance: torch.Tensor | None = None,
):
    """The value diffusers' ``_get_variance`` returns (float32 0-d tensors, diffusers' op order).

    Deviation: ``fixed_large_log`` returns ``log(clamp(beta_t, 1e-20))`` (a log-variance, used as
    ``exp(0.5 * v) * noise`` by ``step``) where diffusers returns ``log(beta_t)`` and then takes its
    square root, which is NaN.
    """
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else one
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    # Posterior variance (formulas 6-7 of Ho et al.), clamped because some types take its log.
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    if variance_type == "fixed_small":
        return variance
    if variance_type == "fixed_small_log":  # rl-diffuser: a standard deviation, not a variance
        return torch.exp(0.5 * torch.log(variance))
    if variance_type == "fixed_large":
        return current_beta_t
    if variance_type == "fixed_large_log":  # Glide "max_log"
        return torch.log(torch.clamp(current_beta_t, min=1e-20))
    if variance_type == "learned":
        return predicted_variance
    if variance_type == "learned_range":
        min_log = torch.log(variance)
        max_log = torch.log(current_beta_t)
        frac = (predicted_variance + 1) / 2
        return frac * max_log + (1 - frac) * min_log
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")


def _noise_from_variance(variance, variance_type: str):
    """Turn ``_fixed_variance``'s value into the factor that multiplies the unit noise."""
    if variance_type == "fixed_small_log":
        return variance
    if variance_type in ("learned_range", "fixed_large_log"):
        return torch.exp(0.5 * variance)
    return variance**0.5


class DDPMScheduler(SchedulerMixin):
    """Denoising diffusion probabilistic model sampler, a drop-in for ``diffusers.DDPMScheduler``.

    Args:
        num_train_timesteps: number of diffusion steps the model was trained with.
        beta_start, beta_end: end points of the ``linear``, ``scaled_linear`` and ``sigmoid`` schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"``, ``"squaredcos_cap_v2"``, ``"sigmoid"`` or ``"laplace"``.
        trained_betas: explicit betas (length ``num_train_timesteps``); overrides ``beta_schedule``.
        variance_type: ``"fixed_small"``, ``"fixed_small_log"``, ``"fixed_large"``, ``"fixed_large_log"``,
            ``"learned"`` or ``"learned_range"`` (the learned ones need a model output with twice the channels).
        clip_sample, clip_sample_range: clamp the predicted ``x_0`` to ``±clip_sample_range``.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen dynamic thresholding of ``x_0``
            (takes precedence over clipping).
        timestep_spacing: ``"leading"``, ``"linspace"`` or ``"trailing"``.
        steps_offset: added to every timestep with ``"leading"`` spacing.
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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_common_config(type(self).__name__, self.config)
        check_choice(variance_type, "variance_type", VARIANCE_TYPES, type(self).__name__)
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
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0

        self.custom_timesteps = False
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self.variance_type = variance_type

        # add_noise() moves self.alphas_cumprod to the data's device (as diffusers does); the fused step's
        # coefficients always come from this CPU copy, so computing them never syncs a GPU.
        self._alphas_cumprod_cpu = self.alphas_cumprod
        self._coef_cache: dict[tuple[int, int, str], StepCoefficients | None] = {}
        self._prev_table: tuple[torch.Tensor, dict[int, int]] | None = None

    # -- timesteps -----------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity (DDPM does not scale the model input); present for scheduler interchangeability."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps of the sampling loop.

        Args:
            num_inference_steps: how many steps, spaced by ``config.timestep_spacing``; 1..num_train_timesteps.
            device: where to put ``self.timesteps`` (default: CPU).
            timesteps: custom, strictly descending timesteps in [0, num_train_timesteps); excludes
                ``num_inference_steps``.
        """
        n_train = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is None and timesteps is None:
            raise ValueError("set_timesteps needs num_inference_steps or timesteps")

        if timesteps is not None:
            if isinstance(timesteps, torch.Tensor):
                timesteps = timesteps.detach().cpu().tolist()
            values = np.asarray(timesteps)
            if values.ndim != 1 or values.size == 0:
                raise ValueError(f"timesteps must be a non-empty 1-d sequence of integers, got {timesteps!r}")
            if not (
                np.issubdtype(values.dtype, np.integer)
                or (np.issubdtype(values.dtype, np.floating) and np.all(np.mod(values, 1) == 0))
            ):
                raise ValueError(f"timesteps must be integers, got {timesteps!r}")
            values = values.astype(np.int64)
            if np.any(values[1:] >= values[:-1]):
                raise ValueError("`custom_timesteps` must be in descending order.")
            if values[0] >= n_train:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {n_train}.")
            if values[-1] < 0:
                raise ValueError(f"timesteps must be >= 0, got {int(values[-1])}")
            schedule = values
            self.custom_timesteps = True
        else:
            self.num_inference_steps = check_num_inference_steps(num_inference_steps, n_train)
            self.custom_timesteps = False
            schedule = spaced_timesteps(
                self.num_inference_steps, n_train, self.config.timestep_spacing, self.config.steps_offset
            )
        self.timesteps = torch.from_numpy(schedule).to(device)
        self._prev_table = None

    def _uses_table(self) -> bool:
        return bool(self.custom_timesteps or self.num_inference_steps)

    def _previous_int(self, t: int) -> int:
        """Previous timestep as an int, from a dict built once per ``self.timesteps`` (no tensor ops per step)."""
        if not self._uses_table():
            return t - 1
        table = self._prev_table
        if table is None or table[0] is not self.timesteps:
            values = [int(v) for v in self.timesteps.tolist()]
            mapping: dict[int, int] = {}
            for i, v in enumerate(values):
                # First occurrence wins, like diffusers' nonzero()[0][0] lookup.
                mapping.setdefault(v, values[i + 1] if i + 1 < len(values) else -1)
            table = self._prev_table = (self.timesteps, mapping)
        try:
            return table[1][t]
        except KeyError:
            raise ValueError(
                f"timestep {t} is not one of scheduler.timesteps set by set_timesteps(); "
                "step through scheduler.timesteps"
            ) from None

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep that follows ``timestep`` in the sampling loop (-1 after the last one).

        Same return types as diffusers: a tensor when a timestep table is in use, else ``timestep - 1``.
        """
        if self._uses_table():
            t = as_timestep(timestep, self.config.num_train_timesteps)
            prev = self._previous_int(t)
            if prev < 0:
                return torch.tensor(-1)
            return torch.tensor(prev, dtype=self.timesteps.dtype, device=self.timesteps.device)
        return timestep - 1

    # -- variance ------------------------------------------------------------------------------------

    def _get_variance(
        self, t: int, predicted_variance: torch.Tensor | None = None, variance_type: str | None = None
    ) -> torch.Tensor:
        """Variance (or log-variance / std, depending on ``variance_type``) of step ``t``, like diffusers."""
        t = as_timestep(t, self.config.num_train_timesteps)
        prev_t = self._previous_int(t)
        vtype = self.config.variance_type if variance_type is None else variance_type
        return _fixed_variance(self.alphas_cumprod, self.one, t, prev_t, vtype, predicted_variance)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        return threshold_sample(sample, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)

    # -- step ----------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reverse-diffusion step: ``x_t`` → ``x_{t-1}``.

        Args:
            model_output: the model's prediction (twice the channels of ``sample`` for learned variances).
            timestep: current timestep (int, integral float or one-element tensor).
            sample: ``x_t``.
            generator: RNG(s) for the step noise (drawn only when ``timestep > 0``).
            return_dict: return a :class:`DDPMSchedulerOutput` (default) or a tuple.
        """
        t = as_timestep(timestep, self.config.num_train_timesteps)
        vtype = self.variance_type
        learned = vtype in _LEARNED
        check_step_tensors(model_output, sample, 2 * sample.shape[1] if learned and sample.ndim >= 2 else None)
        if learned and model_output.shape == sample.shape:
            raise ValueError(
                f"variance_type {vtype!r} needs model_output with twice the channels of sample "
                f"(prediction and variance), got shape {tuple(model_output.shape)}"
            )
        prev_t = self._previous_int(t)

        coefs = self.step_coefficients(t) if fast_path.fused_step(model_output, sample) else None
        if coefs is not None:
            noise = None
            if t > 0:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            clip = float(self.config.clip_sample_range) if self.config.clip_sample else None
            prev_sample, pred_original_sample = ops.scheduler_step(
                model_output,
                sample,
                noise,
                coefs.x0,
                coefs.prev,
                coefs.noise_scale if noise is not None else 0.0,
                clip,
            )
        else:
            prev_sample, pred_original_sample = self._step_reference(model_output, t, prev_t, sample, generator)

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _step_reference(self, model_output, t: int, prev_t: int, sample, generator):
        """diffusers' DDPMScheduler.step, operation for operation (float32 0-d scalars, same order)."""
        vtype = self.variance_type
        if vtype in _LEARNED:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            predicted_variance = None

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        pred_original_sample = self._predict_x0(model_output, sample, alpha_prod_t, beta_prod_t)
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-r, r)

        # Posterior mean, formula (7) of Ho et al.
        x0_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
        xt_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = x0_coeff * pred_original_sample + xt_coeff * sample

        variance = 0
        if t > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            var = _fixed_variance(self.alphas_cumprod, self.one, t, prev_t, vtype, predicted_variance)
            variance = _noise_from_variance(var, vtype) * noise
        return pred_prev_sample + variance, pred_original_sample

    def _predict_x0(self, model_output, sample, alpha_prod_t, beta_prod_t):
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        if prediction_type == "sample":
            return model_output
        if prediction_type == "v_prediction":
            return (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        raise ValueError(f"prediction_type must be one of epsilon, sample, v_prediction; got {prediction_type!r}")

    def _draws_noise(self, timestep: int) -> bool:
        return timestep > 0

    def step_coefficients(self, timestep: int) -> StepCoefficients | None:
        """The fused-step scalars of ``step(model_output, timestep, sample)``, cached; None for thresholding and
        learned variances, and where a scalar is not finite (the reference path then reproduces diffusers'
        inf/NaN)."""
        if self.variance_type in _LEARNED or self.config.thresholding:
            return None
        t = timestep
        prev_t = self._previous_int(t)
        # variance_type is in the key because diffusers reads the (mutable) attribute, not the config.
        key = (t, prev_t, self.variance_type)
        try:
            return self._coef_cache[key]
        except KeyError:
            pass
        ac, one = self._alphas_cumprod_cpu, self.one
        # The very float32 scalars diffusers computes ...
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = ac[prev_t] if prev_t >= 0 else one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        sqrt_a = float(alpha_prod_t**0.5)
        sqrt_b = float(beta_prod_t**0.5)
        c0 = float((alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t)
        c1 = float(current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t)
        noise_scale = 0.0
        if t > 0:
            vtype = self.variance_type
            noise_scale = float(_noise_from_variance(_fixed_variance(ac, one, t, prev_t, vtype), vtype))
        # ... combined in float64.
        prediction_type = self.config.prediction_type
        coefs: StepCoefficients | None
        if prediction_type == "epsilon":
            x0 = (1.0 / sqrt_a, -sqrt_b / sqrt_a) if sqrt_a != 0.0 else None
        elif prediction_type == "sample":
            x0 = (0.0, 1.0)
        else:
            x0 = (sqrt_a, -sqrt_b)
        values = (c0, c1, noise_scale) + (x0 if x0 is not None else ())
        if x0 is None or not all(math.isfinite(v) for v in values):
            coefs = None
        else:
            coefs = StepCoefficients(x0=x0, prev=(c0, c1, 0.0), noise_scale=noise_scale)
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
