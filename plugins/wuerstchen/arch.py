"""The ``wuerstchen`` arch: what Wuerstchen's prior is, and the hooks where it differs.

Recognition, LoRA targets and saving come from :class:`lorakit.archbase.DiffusersArch`
(``WuerstchenPriorPipeline`` has ``load_lora_weights``); overridden here: loading
component by component, the image-embedding objective, and generation through the
prior -> decoder chain. Hook bodies import torch; this module does not.
"""

from __future__ import annotations

from pathlib import Path

from lorakit import ArchInfo, DiffusersArch, hookimpl
from lorakit.errors import LorakitError

from .pipeline import PRIOR_SUBFOLDERS

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


class Wuerstchen(DiffusersArch):
    info = ArchInfo(
        description="Wuerstchen v2 prior (stage C): LoRA on the WuerstchenPrior, optionally on its CLIP text encoder",
        denoiser="prior",
        default_targets={"prior": ATTENTION, "text_encoder": CLIP_ATTENTION},
        text_encoders=("text_encoder",),
        default_resolution=512,
        pipeline_class="WuerstchenPriorPipeline",
        subfolders=PRIOR_SUBFOLDERS,
        objective="ddpm",
        prompt_encoders=("text_encoder",),
        input_encoders=("image_encoder",),
        # diffusers' WuerstchenCombinedPipeline default prior_guidance_scale
        guidance_scale=4.0,
    )

    @hookimpl
    def check_config(self, config, info):
        if config.prediction_type not in (None, "epsilon"):
            raise LorakitError(
                f"--prediction-type {config.prediction_type} is not supported by --arch wuerstchen "
                "(the prior predicts noise); drop the flag."
            )

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        import torch

        from .encoder_io import find_image_encoder, load_image_encoder
        from .pipeline import find_decoder, load_prior_parts

        path = Path(model_path)
        prior, text_encoder, tokenizer, scheduler = load_prior_parts(path, weight_dtype)
        encoder_dir = find_image_encoder(path, config.vae)
        image_encoder = load_image_encoder(encoder_dir)
        if image_encoder.c_latent != prior.config.c_in:
            raise LorakitError(
                f"image encoder {encoder_dir} makes {image_encoder.c_latent}-channel embeddings but the prior "
                f"expects {prior.config.c_in}; pass the stage-B encoder that belongs to this prior."
            )
        if config.validation_prompt:
            find_decoder(path)  # fail now, not at the first sample after minutes of training

        # The encoder stays in fp32: it runs once per image (cached) and its BatchNorms are fp32-calibrated.
        image_encoder.to(device, dtype=torch.float32)
        prior.to(device)
        text_encoder.to(device)
        for module in (image_encoder, prior, text_encoder):
            module.eval()
        return {
            "prior": prior,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "image_encoder": image_encoder,
            "noise_scheduler": scheduler,
            "model_path": path,
        }

    @hookimpl
    def encode_images(self, components, pixel_values, batch):
        from .objective import image_embeddings

        return {"image_embeds": image_embeddings(components["image_encoder"], pixel_values)}

    @hookimpl
    def encode_prompt(self, components, captions):
        from lorakit.pipelines import tokenize

        tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
        tokens = tokenize(tokenizer, captions)
        # The prior pipeline passes the attention mask at inference; training conditions the same way.
        out = text_encoder(
            tokens.input_ids.to(text_encoder.device), attention_mask=tokens.attention_mask.to(text_encoder.device)
        )
        return {"prompt_embeds": out.last_hidden_state}

    @hookimpl
    def compute_loss(self, components, batch, config, rows):
        from .objective import compute_loss

        return compute_loss(components, batch, config, rows)

    @hookimpl
    def save_lora(self, components, lora_layers, output_dir, weight_name):
        # The prior pipeline's loader names the prior "unet" in its save API and stores it as "prior.*".
        renamed = {("unet" if name == "prior" else name): layers for name, layers in lora_layers.items()}
        super().save_lora(components, renamed, output_dir, weight_name)

    @hookimpl
    def build_pipeline(self, components, config):
        """Prior (LoRA included) -> decoder, for sample images during training."""
        from diffusers import DDPMWuerstchenScheduler

        from .pipeline import combine, find_decoder, load_decoder_pipeline

        decoder_pipe = components.get("decoder_pipeline")
        if decoder_pipe is None:
            decoder_pipe = load_decoder_pipeline(find_decoder(components["model_path"]))
            decoder_pipe.to(components["prior"].device)
            components["decoder_pipeline"] = decoder_pipe
        return combine(
            components["prior"],
            components["text_encoder"],
            components["tokenizer"],
            DDPMWuerstchenScheduler.from_config(components["noise_scheduler"].config),
            decoder_pipe,
        )

    @hookimpl
    def load_pipeline(self, model_path, device, dtype):
        """A ``WuerstchenCombinedPipeline``: the prior from ``model_path``, the decoder from ``find_decoder``."""
        from .pipeline import combine, find_decoder, load_decoder_pipeline, load_prior_parts

        path = Path(model_path)
        prior, text_encoder, tokenizer, scheduler = load_prior_parts(path, dtype)
        decoder_pipe = load_decoder_pipeline(find_decoder(path), dtype)
        return combine(prior, text_encoder, tokenizer, scheduler, decoder_pipe).to(device)

    @hookimpl
    def load_lora(self, pipeline, path, adapter_name):
        from .pipeline import prior_pipe

        super().load_lora(prior_pipe(pipeline), path, adapter_name)

    @hookimpl
    def set_lora_scales(self, pipeline, adapter_names, scales):
        from .pipeline import prior_pipe

        super().set_lora_scales(prior_pipe(pipeline), adapter_names, scales)

    @hookimpl
    def generate_images(self, pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale):
        # One prompt per call: diffusers' Wuerstchen decoder repeats a list of N prompts N times
        # (N*N text rows for N image embeddings) and fails. The decoder needs far fewer steps
        # than the prior (diffusers' default: 12). A list of generators holds one per prompt.
        images = []
        size = {} if resolution is None else {"height": resolution, "width": resolution}
        for i, prompt in enumerate(prompts):
            images += pipeline(
                prompt,
                **size,
                prior_num_inference_steps=num_inference_steps,
                num_inference_steps=min(12, num_inference_steps),
                prior_guidance_scale=self.info.guidance_scale if guidance_scale is None else guidance_scale,
                generator=generator[i] if isinstance(generator, (list, tuple)) else generator,
            ).images
        return images

    @hookimpl
    def write_tiny_model(self, path, seed):
        from .tiny import write_tiny_model

        write_tiny_model(path, seed)
