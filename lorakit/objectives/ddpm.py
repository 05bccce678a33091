"""DDPM noise-prediction objective: epsilon / v-prediction targets, min-SNR weighting, noise offset.

Plain functions over tensors and a diffusers noise scheduler; they know no architecture.
All randomness comes from ``rows``, the :class:`lorakit.rng.Rows` the core hands to
``compute_loss`` (one stream per sample, keyed on its place in the global batch), so the
draws (and therefore a run) are the same on any device or process count. Where a function
takes ``generator`` it accepts either a ``Rows`` or, as plugins written against the older
contract pass, a ``torch.Generator``, drawn from as one batch as before.
"""

from __future__ import annotations

from lorakit.options import Option

PANEL = "Objective (DDPM)"

# Every objective option changes the trained trajectory, so a resume must keep its value.
DDPM_OPTIONS = (
    Option(
        "snr_gamma",
        float,
        None,
        "Min-SNR loss weighting gamma (5.0 is common); off when not set.",
        minimum=0,
        exclusive_minimum=True,
        resume=True,
        panel=PANEL,
    ),
    Option(
        "noise_offset",
        float,
        0.0,
        "Noise offset (0.05-0.1 helps very dark or bright images).",
        minimum=0,
        resume=True,
        panel=PANEL,
    ),
    Option(
        "prediction_type",
        str,
        None,
        "Train for this prediction type instead of the scheduler's.",
        choices=("epsilon", "v_prediction"),
        resume=True,
        panel=PANEL,
        default_text="the model's",
    ),
)

__all__ = [
    "DDPM_OPTIONS",
    "apply_prediction_type",
    "compute_snr",
    "denoising_loss",
    "min_snr_weights",
    "per_sample_mse",
    "sample_noise",
    "sample_timesteps",
    "target_for",
]


def apply_prediction_type(scheduler, prediction_type: str | None) -> None:
    """Train for ``prediction_type`` (epsilon / v_prediction) instead of the scheduler's default."""
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)


def sample_noise(latents, generator, noise_offset: float = 0.0):
    """Gaussian noise like ``latents``; with ``noise_offset`` a per-channel offset is added
    (lets the model learn very dark or bright images)."""
    import torch

    from lorakit import rng

    noise = rng.randn(generator, latents.shape, torch.float32).to(latents.device, latents.dtype)
    if noise_offset:
        offset = rng.randn(generator, (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2))
        noise = noise + noise_offset * offset.to(latents.device, latents.dtype)
    return noise


def sample_timesteps(scheduler, batch_size: int, generator, device):
    """``batch_size`` integer timesteps, uniform over the scheduler's training steps."""
    from lorakit import rng

    steps = scheduler.config.num_train_timesteps
    return rng.randint(generator, 0, steps, (batch_size,)).to(device).long()


def compute_snr(scheduler, timesteps):
    """Signal-to-noise ratio of each timestep (Hang et al., 2023, min-SNR weighting)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device).float()
    alpha = alphas_cumprod[timesteps] ** 0.5
    sigma = (1.0 - alphas_cumprod[timesteps]) ** 0.5
    return (alpha / sigma) ** 2


def target_for(scheduler, latents, noise, timesteps):
    pred_type = scheduler.config.prediction_type
    if pred_type == "epsilon":
        return noise
    if pred_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if pred_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction type {pred_type}")


def per_sample_mse(prediction, target):
    import torch.nn.functional as F

    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    return loss.reshape(loss.shape[0], -1).mean(dim=1)


def min_snr_weights(scheduler, timesteps, snr_gamma: float):
    """Per-sample loss weights min(SNR, gamma)/SNR (or /(SNR+1) for v-prediction)."""
    import torch

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def denoising_loss(model_fn, latents, scheduler, config, generator):
    """The standard epsilon / v-prediction objective, per sample.

    ``model_fn(noisy_latents, timesteps) -> prediction``. Applies noise offset and
    min-SNR weighting from ``config``. ``generator``: the ``rows`` of ``compute_loss`` (or a
    ``torch.Generator``); each row draws its noise, then its timestep.
    """
    noise = sample_noise(latents, generator, config.noise_offset)
    timesteps = sample_timesteps(scheduler, latents.shape[0], generator, latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model_fn(noisy, timesteps)
    target = target_for(scheduler, latents, noise, timesteps)
    loss = per_sample_mse(prediction, target)
    if config.snr_gamma:
        loss = loss * min_snr_weights(scheduler, timesteps, config.snr_gamma)
    return loss
