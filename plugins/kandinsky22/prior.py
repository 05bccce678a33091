"""``--arch kandinsky22-prior``: LoRA on the PriorTransformer, which learns to predict the
normalised CLIP image embedding of a training image from its caption (CLIP text model),
with the prior's own ``UnCLIPScheduler`` (prediction of the sample).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorakit import ArchInfo, hookimpl
from lorakit.errors import LorakitError
from lorakit.pipelines import tokenize

from .base import Kandinsky22
from .clip import crop_height, image_embeds, load_image_encoder
from .layout import DOCS, PRIOR_DIR, PRIOR_PIPELINES, PRIOR_SUBFOLDERS, PRIOR_TARGETS, decoder_folder_above
from .pipeline import combine, inference_pipeline
from .tiny import write_tiny_prior

log = logging.getLogger("lorakit")

#: What a prior pipeline is assembled from when the run's own modules are reused.
PRIOR_PARTS = ("prior", "text_encoder", "tokenizer", "image_encoder", "image_processor")


class Prior(Kandinsky22):
    """``--arch kandinsky22-prior``: LoRA on the PriorTransformer (caption -> CLIP image embedding)."""

    info = ArchInfo(
        description="Kandinsky 2.2 prior: LoRA on the PriorTransformer (caption -> CLIP image embedding)",
        denoiser="prior",
        default_targets={"prior": PRIOR_TARGETS},
        text_encoders=(),
        default_resolution=224,
        pipeline_class="KandinskyV22PriorPipeline",
        pipeline_loads_lora=False,
        pipeline_classes=PRIOR_PIPELINES,
        subfolders=PRIOR_SUBFOLDERS,
        objective="ddpm",
        prompt_encoders=("text_encoder",),
        input_encoders=("image_encoder",),
        # The scheduler fixes the target (the sample); the prior denoises an embedding, not latents.
        refuses={
            "prediction_type": "--arch kandinsky22-prior predicts what its scheduler says (the sample); drop --prediction-type.",
            "noise_offset": "--noise-offset is for image latents; the prior denoises an embedding, drop it.",
            "gradient_checkpointing": "the Kandinsky 2.2 prior does not support --gradient-checkpointing; drop the flag.",
            "vae": "--arch kandinsky22-prior encodes images with its CLIP image encoder, not a VAE; drop --vae.",
        },
        guidance_scale=4.0,
    )
    cannot_generate = (
        f"--arch kandinsky22-prior makes image embeddings, not images, and its --model is not the {PRIOR_DIR}/ of a "
        f"decoder folder; generate with --arch kandinsky22 --model <decoder folder with this prior in {PRIOR_DIR}/> "
        f"--lora <this LoRA> (see {DOCS})."
    )

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        from diffusers import PriorTransformer, UnCLIPScheduler
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        from lorakit.tiny import check_tokenizer_matches

        path = Path(model_path)
        self.check_layout(path)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", dtype=weight_dtype)
        check_tokenizer_matches(tokenizer, text_encoder, f"--model {path}")
        prior = PriorTransformer.from_pretrained(path, subfolder="prior", dtype=weight_dtype)
        noise_scheduler = UnCLIPScheduler.from_pretrained(path, subfolder="scheduler")
        if prior.config.num_embeddings != tokenizer.model_max_length:
            raise LorakitError(
                f"--model {path}: the prior takes {prior.config.num_embeddings} tokens but the tokenizer makes "
                f"{tokenizer.model_max_length}; the folder mixes models, re-download it."
            )
        if not bool((prior.clip_std != 0).all()):
            raise LorakitError(
                f"--model {path}: the prior's clip_std holds zeros (an untrained prior); pass a trained Kandinsky 2.2 prior."
            )
        image_encoder, image_processor = load_image_encoder(path, device, weight_dtype)
        text_encoder.to(device).eval()
        prior.to(device).eval()
        components = {
            "prior": prior,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "image_encoder": image_encoder,
            "image_processor": image_processor,
            "noise_scheduler": noise_scheduler,
            "model_path": path,
        }
        crop = crop_height(image_processor)
        if isinstance(crop, int) and crop >= 8 and crop % 8 == 0:
            components["default_resolution"] = crop  # what CLIP sees: no point in larger images
        return components

    @hookimpl
    def encode_images(self, components, pixel_values, batch):
        return {"image_embeds": image_embeds(components, pixel_values)}

    @hookimpl
    def encode_prompt(self, components, captions):
        tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
        tokens = tokenize(tokenizer, captions)
        out = text_encoder(tokens.input_ids.to(text_encoder.device))
        return {
            "prompt_embeds": out.text_embeds,
            "text_hidden_states": out.last_hidden_state,
            "text_mask": tokens.attention_mask.bool().to(text_encoder.device),
        }

    @hookimpl
    def compute_loss(self, components, batch, config, rows):
        import torch

        from lorakit.diffusion import compute_snr, per_sample_mse, sample_noise, sample_timesteps, target_for

        prior, scheduler = components["prior"], components["noise_scheduler"]
        embeds = batch["image_embeds"].float()
        clean = (embeds - prior.clip_mean.float()) / prior.clip_std.float()
        noise = sample_noise(clean, rows)
        timesteps = sample_timesteps(scheduler, clean.shape[0], rows, clean.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = prior(
            noisy.to(prior.dtype),
            timestep=timesteps,
            proj_embedding=batch["prompt_embeds"].to(prior.dtype),
            encoder_hidden_states=batch["text_hidden_states"].to(prior.dtype),
            attention_mask=batch["text_mask"],
            return_dict=False,
        )[0]
        loss = per_sample_mse(prediction, target_for(scheduler, clean, noise, timesteps))
        if config.snr_gamma:
            snr = compute_snr(scheduler, timesteps)
            weight = torch.clamp(snr, max=config.snr_gamma)  # min-SNR-gamma for a sample (x0) target
            if scheduler.config.prediction_type == "epsilon":
                weight = weight / snr
            loss = loss * weight
        return loss

    @hookimpl
    def build_pipeline(self, components, config):
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

        path, prior = components["model_path"], components["prior"]
        decoder_folder = decoder_folder_above(path)
        if decoder_folder is None:
            log.warning("no sample images: %s is not the prior/ of a Kandinsky 2.2 decoder folder (see %s)", path, DOCS)
            return None
        prior_pipe = KandinskyV22PriorPipeline.from_pretrained(path, **{k: components[k] for k in PRIOR_PARTS})
        decoder_pipe = KandinskyV22Pipeline.from_pretrained(decoder_folder, dtype=prior.dtype)
        return combine(decoder_pipe, prior_pipe).to(prior.device)

    @hookimpl
    def load_pipeline(self, model_path, device, dtype):
        path = Path(model_path)
        self.check_layout(path)
        return inference_pipeline(decoder_folder_above(path), path, device, dtype)

    @hookimpl
    def write_tiny_model(self, path, seed):
        write_tiny_prior(Path(path), seed)
