"""Stage C's training objective, as diffusers' ``train_text_to_image_lora_prior.py`` has it.

* images -> EfficientNetV2-S image embeddings, scaled ``(x + 1) / 42``;
* continuous timesteps ``t ~ U[0, 1)``, noise added by ``DDPMWuerstchenScheduler``;
* the prior predicts the noise from the noisy embedding, ``t`` and the CLIP text model's
  last hidden state; the loss is the MSE against the noise (optionally min-SNR weighted).

Importing this module stays free of torch.
"""

from __future__ import annotations

#: Stage C is trained on ``(effnet(x) + 1) / 42``; the prior pipeline undoes it (``* 42 - 1``).
EMBED_SHIFT = 1.0
EMBED_SCALE = 42.0


def image_embeddings(encoder, pixel_values):
    """``[-1, 1]`` pixels -> the scaled embeddings the prior is trained on."""
    from .effnet import effnet_pixels

    return (encoder(effnet_pixels(pixel_values)) + EMBED_SHIFT) / EMBED_SCALE


def base_dropout_off(module) -> None:
    """Keep the frozen prior's own dropout inactive while its LoRA trains.

    The core puts LoRA-carrying components in train mode, which would switch on the
    prior's built-in dropout (0.1 in the published config) and draw from torch's global
    RNG instead of the run's generator. LoRA's own dropout (``lora_dropout``) stays as
    configured.
    """
    import torch

    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Dropout) and "lora_dropout" not in name and sub.training:
            sub.eval()


def sample_timesteps(batch_size: int, rows, device):
    """Continuous timesteps ``t ~ U[0, 1)`` as the original stage-C training draws them
    (``rows``: a :class:`lorakit.rng.Rows`, or a ``torch.Generator``)."""
    from lorakit import rng

    return rng.rand(rows, (batch_size,)).to(device)


def compute_loss(components, batch, config, rows):
    """Per-sample noise-prediction loss of the prior; every draw comes from ``rows``, each
    row its noise, then its timestep."""
    import torch

    from lorakit.objectives.ddpm import per_sample_mse, sample_noise

    prior, scheduler = components["prior"], components["noise_scheduler"]
    base_dropout_off(prior)
    embeds = batch["image_embeds"].float()
    noise = sample_noise(embeds, rows, config.noise_offset)
    timesteps = sample_timesteps(embeds.shape[0], rows, embeds.device)
    noisy = scheduler.add_noise(embeds, noise, timesteps)
    prediction = prior(
        noisy.to(prior.dtype), timesteps.to(prior.dtype), batch["prompt_embeds"].to(prior.dtype)
    )
    loss = per_sample_mse(prediction, noise)
    if config.snr_gamma:
        alpha_cumprod = scheduler._alpha_cumprod(timesteps, embeds.device).float()
        snr = alpha_cumprod / (1.0 - alpha_cumprod)
        loss = loss * torch.clamp(snr, max=config.snr_gamma) / snr
    return loss
