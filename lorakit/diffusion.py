"""Moved: the DDPM training math now lives in :mod:`lorakit.objectives.ddpm`.

This module stays so that plugins written against ``lorakit.diffusion`` keep working;
it re-exports the same functions (the very same objects, so results are identical).
New code should import from ``lorakit.objectives.ddpm``.
"""

from __future__ import annotations

from lorakit.objectives.ddpm import (
    apply_prediction_type,
    compute_snr,
    denoising_loss,
    min_snr_weights,
    per_sample_mse,
    sample_noise,
    sample_timesteps,
    target_for,
)

__all__ = [
    "apply_prediction_type",
    "compute_snr",
    "denoising_loss",
    "min_snr_weights",
    "per_sample_mse",
    "sample_noise",
    "sample_timesteps",
    "target_for",
]
