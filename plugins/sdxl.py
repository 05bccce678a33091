"""Stable Diffusion XL: LoRA on the UNet and, optionally, on both CLIP text encoders.

Registered as arch ``sdxl`` through the ``lorakit.archs`` entry point, like any third-party
plugin. Saving, loading, generating, recognition and targets come from
:class:`lorakit.archbase.DiffusersArch`. What SDXL adds over SD1.5, and where it lives here:

* two tokenizers and text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``);
  the UNet's cross-attention reads the *penultimate* hidden states of both, concatenated,
  and its added embedding reads the projected pooled output of the second (``encode_prompt``);
* micro-conditioning on each image's original size, crop and target size
  (:func:`add_time_ids`, built from the batch's per-image metadata);
* a VAE that overflows in fp16, kept in fp32 unless the user passes ``--vae``.
"""

from __future__ import annotations

from pathlib import Path

from lorakit import ArchInfo, DiffusersArch, LorakitError, hookimpl

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
#: Numbers per image in SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w).
TIME_IDS = 6


def add_time_ids(batch, dtype=None):
    """SDXL's micro-conditioning, one row per image: original (h, w), crop (top, left), target (h, w).

    Read from each image's own metadata in the batch (never a constant), in the order
    ``StableDiffusionXLPipeline._get_add_time_ids`` uses at inference.
    """
    import torch

    ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
    return ids.to(dtype or torch.float32)


class SDXL(DiffusersArch):
    info = ArchInfo(
        description="Stable Diffusion XL: LoRA on the UNet, optionally on both CLIP text encoders",
        denoiser="unet",
        default_targets={"unet": ATTENTION, "text_encoder": CLIP_ATTENTION, "text_encoder_2": CLIP_ATTENTION},
        text_encoders=TEXT_ENCODERS,
        default_resolution=1024,
        pipeline_class="StableDiffusionXLPipeline",
        pipeline_classes=(
            "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
        ),
        subfolders=("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "vae"),
        input_encoders=("vae",),
        # kohya's own prefixes (networks/lora.py); the paths after them: kohya_module_names
        kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
        guidance_scale=5.0,
        # SGM checkpoints: CLIP-L as embedders.0, OpenCLIP bigG as embedders.1 (the refiner has only
        # an OpenCLIP embedders.0, so it is not taken for a base model)
        single_file_keys=("model.diffusion_model.", "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
        single_file_layout={
            "unet": ("model.diffusion_model.", "ldm_unet"), "vae": ("first_stage_model.", "ldm_vae"),
            "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
            "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip"),
        },
    )
    inference_scheduler = "EulerDiscreteScheduler"

    @hookimpl
    def kohya_module_names(self, component, modules, model_config):
        """kohya trains SDXL on the original (SGM) UNet: its block names, from the UNet's config;
        CLIP layers as transformers 4 names them (under ``text_model``)."""
        from lorakit.formats.kohya import clip_text_model_path

        if component != "unet":
            return {m: clip_text_model_path(m) for m in modules}
        if model_config is None:
            raise LorakitError(
                "kohya's SDXL UNet names follow the UNet's block layout; pass --model (the base model the LoRA "
                "was trained on, hub id or folder)."
            )
        from .sdxl_kohya import sgm_module_names

        return sgm_module_names(modules, model_config)

    @hookimpl
    def kohya_metadata(self, model_configs):
        # A1111 lists a LoRA under SDXL checkpoints when this starts with "sdxl_" (network.py
        # detect_version); kohya writes this value for SDXL base (sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0).
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}

    def check_layout(self, path, subfolders=None, config=None):
        missing = [s for s in ("text_encoder", "tokenizer", "text_encoder_2") if not (Path(path) / s).is_dir()]
        if missing == ["text_encoder", "tokenizer"]:
            raise LorakitError(
                f"--model {path} has only the second text encoder (the SDXL refiner?); "
                "train on an SDXL base model such as stabilityai/stable-diffusion-xl-base-1.0."
            )
        super().check_layout(path, subfolders, config)

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from lorakit.archbase import load_text_encoder, load_vae
        from lorakit.objectives.ddpm import apply_prediction_type

        path = Path(model_path)
        self.check_layout(path, config=config)
        tokenizer, text_encoder = load_text_encoder(path, CLIPTextModel, "text_encoder", CLIPTokenizer, "tokenizer",
                                                    weight_dtype)
        tokenizer_2, text_encoder_2 = load_text_encoder(path, CLIPTextModelWithProjection, "text_encoder_2",
                                                        CLIPTokenizer, "tokenizer_2", weight_dtype)
        # Loaded straight in the run's dtype: a 2.6B-parameter UNet never sits in fp32 in host memory.
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=weight_dtype)
        vae = load_vae(config, path, device, weight_dtype)
        _check_consistent(path, unet, vae, text_encoder, text_encoder_2, vae_flag=config.vae)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        apply_prediction_type(noise_scheduler, config.prediction_type)
        for module in (vae, unet, text_encoder, text_encoder_2):
            module.to(device).eval()
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return {
            "unet": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer,
            "tokenizer_2": tokenizer_2,
            "noise_scheduler": noise_scheduler,
            "model_path": path,
            "default_resolution": int(unet.config.sample_size * vae_scale),
        }

    @hookimpl
    def encode_prompt(self, components, captions):
        """Penultimate hidden states of both encoders, concatenated; pooled projection of the
        second: ``StableDiffusionXLPipeline.encode_prompt`` without clip-skip, so what is
        trained is what the pipeline feeds the UNet at inference."""
        import torch

        from lorakit.pipelines import tokenize

        hidden = []
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            encoder = components[enc_name]
            ids = tokenize(components[tok_name], captions).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        # the second encoder's pooled output, through its projection
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": out.text_embeds}

    @hookimpl
    def compute_loss(self, components, batch, config, rows):
        from lorakit.objectives.ddpm import denoising_loss

        unet = components["unet"]
        hidden = batch["encoder_hidden_states"].to(unet.dtype)
        added = {
            "text_embeds": batch["pooled_prompt_embeds"].to(unet.dtype),
            "time_ids": add_time_ids(batch, unet.dtype).to(hidden.device),
        }

        def predict(noisy, timesteps):
            return unet(noisy.to(unet.dtype), timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]

        return denoising_loss(predict, batch["latents"].float(), components["noise_scheduler"], config, rows)

    @hookimpl
    def write_tiny_model(self, path, seed):
        """A few-MB SDXL with SDXL's shape: two encoders of different widths, size/crop
        conditioning, attention only in the lower-resolution block, a VAE that downsamples by 8."""
        import torch
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vae

        torch.manual_seed(seed)
        hidden_1, hidden_2, projection, time_dim = 32, 48, 32, 8
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=1,
            cross_attention_dim=hidden_1 + hidden_2, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=time_dim * TIME_IDS + projection, norm_num_groups=32,
        )
        vae = tiny_vae(AutoencoderKL, scaling_factor=0.13025, force_upcast=True)  # SDXL's scaling
        text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=hidden_1))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(hidden_size=hidden_2, projection_dim=projection))
        # SDXL base's scheduler: Euler for inference; training reads the same betas as DDPM.
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            steps_offset=1, timestep_spacing="leading",
        )
        StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tiny_clip_tokenizer(),
            tokenizer_2=tiny_clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!"
            scheduler=scheduler, add_watermarker=False,
        ).save_pretrained(str(path))


def _check_consistent(path: Path, unet, vae, text_encoder, text_encoder_2, vae_flag=None) -> None:
    """Refuse a folder whose parts do not fit together, before a shape error deep in a forward."""
    where = f"--model {path}"
    if unet.config.in_channels != vae.config.latent_channels:
        if vae_flag:
            raise LorakitError(
                f"--vae {vae_flag}: the UNet of {path} takes {unet.config.in_channels} input channels but this VAE "
                f"gives {vae.config.latent_channels}; pass an SDXL VAE such as madebyollin/sdxl-vae-fp16-fix."
            )
        raise LorakitError(
            f"{where}: its UNet takes {unet.config.in_channels} input channels but its VAE gives "
            f"{vae.config.latent_channels} (an inpainting model?); use a text-to-image SDXL base model."
        )
    if unet.config.addition_embed_type != "text_time":
        raise LorakitError(
            f"{where}: its UNet has no SDXL size/crop conditioning (addition_embed_type "
            f"{unet.config.addition_embed_type!r}); it is not an SDXL model, pick the matching --arch."
        )
    context = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    added = unet.config.addition_time_embed_dim * TIME_IDS + text_encoder_2.config.projection_dim
    if unet.config.cross_attention_dim != context or unet.config.projection_class_embeddings_input_dim != added:
        raise LorakitError(
            f"{where}: the text encoders (hidden {text_encoder.config.hidden_size}+"
            f"{text_encoder_2.config.hidden_size}, projection {text_encoder_2.config.projection_dim}) do not fit "
            "the UNet; the folder mixes models, re-download it."
        )
