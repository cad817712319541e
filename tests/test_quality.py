"""Classifier-based sample quality: the measure separates real digits from noise, and the shipped model's
samples come close to real digits (bench/sample_quality.py runs the full 1000-step DDPM / 50-step DDIM version)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from ddpm_fast import quality  # noqa: E402


@pytest.fixture(scope="module")
def references():
    return quality.reference_reports(resolution=16)


def test_classifier_is_accurate():
    assert quality.held_out_accuracy() > 0.98  # measured 0.994


def test_real_digits_far_above_noise(references):
    real, noise = references["real_held_out"], references["uniform_noise"]
    # measured: real 0.927 confidence / 1.000 balance; noise 0.164 / 0.512 with 4 digits never predicted
    assert real["mean_confidence"] > 0.9 and noise["mean_confidence"] < 0.3
    assert real["balance"] > 0.99 and real["min_class_fraction"] > 0.08
    assert noise["balance"] < 0.8 and noise["min_class_fraction"] == 0.0


def test_feature_layouts_agree():
    imgs = quality.real_digits_as_samples(16)[:5]  # (n, 16, 16) uint8
    a = quality.to_digit_features(imgs)
    b = quality.to_digit_features(imgs[..., None])
    c = quality.to_digit_features(torch.from_numpy(imgs.astype(np.float32) / 255)[:, None])
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, c, atol=1e-4)
    # the upscale → uint8 → area-downsample round trip stays close to the original 8×8 digits
    x, _ = quality.held_out_digits()
    assert np.abs(a - x[:5].reshape(5, 64)).mean() < 1.5  # measured 1.08 (bilinear blur), on a 0-16 scale
    with pytest.raises(ValueError):
        quality.to_digit_features(np.zeros((2, 10, 10), np.uint8))


def test_shipped_model_close_to_real(references):
    """128 digits from the shipped model with 10 DDIM steps (the fast version of the bench)."""
    from ddpm_fast import DDIMScheduler, DDPMPipeline
    from ddpm_fast.sampling import batch_indices, sample_images
    from ddpm_fast.weights import shipped_model_path

    pipe = DDPMPipeline.from_pretrained(shipped_model_path())
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with torch.inference_mode():
        images = sample_images(pipe, batch_indices(128, 128), seed=0, num_inference_steps=10)
    report = quality.quality_report(np.stack([images[i] for i in range(128)]))
    real = references["real_held_out"]
    # measured (200 images, 10 DDIM steps): confidence 0.912 vs real 0.927, balance 0.984, every digit >= 5.5%
    assert report["mean_confidence"] > real["mean_confidence"] - 0.05
    assert report["balance"] > 0.95
    assert report["min_class_fraction"] > 0.0  # all ten digits appear
