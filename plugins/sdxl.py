"""Stable Diffusion XL: LoRA on the UNet and, optionally, on both CLIP text encoders.

Registered as arch ``sdxl`` through the ``lorakit.archs`` entry point, like any
third-party plugin. Nothing here is imported by lorakit's core.

What SDXL adds over SD1.5, and where it lives here:

* two tokenizers and two text encoders (``CLIPTextModel`` and
  ``CLIPTextModelWithProjection``); the UNet's cross-attention reads the *penultimate*
  hidden states of both, concatenated, and its added embedding reads the projected
  pooled output of the second (:func:`encode_prompt`);
* micro-conditioning on each image's original size, crop and target size
  (:func:`add_time_ids`, built from the batch's per-image metadata);
* a VAE that overflows in fp16, kept in fp32 unless the user passes ``--vae``
  (:func:`_load_vae`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.arch import ArchInfo
from lorakit.errors import LorakitError
from lorakit.hookspecs import hookimpl
from lorakit.pipelines import scheduler_from_folder, tokenize

PIPELINE_CLASSES = {
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SUBFOLDERS = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
#: Numbers per image in SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w).
TIME_IDS = 6


@hookimpl
def arch_info():
    return ArchInfo(
        description="Stable Diffusion XL: LoRA on the UNet, optionally on both CLIP text encoders",
        denoiser="unet",
        default_targets={
            "unet": UNET_TARGETS,
            "text_encoder": TEXT_ENCODER_TARGETS,
            "text_encoder_2": TEXT_ENCODER_TARGETS,
        },
        text_encoders=TEXT_ENCODERS,
        default_resolution=1024,
        pipeline_class="StableDiffusionXLPipeline",
    )


@hookimpl
def recognizes_model(model_index):
    return model_index.get("_class_name") in PIPELINE_CLASSES


def _check_layout(path: Path, need_vae: bool = True) -> None:
    wanted = SUBFOLDERS + (("vae",) if need_vae else ())
    missing = [s for s in wanted if not (path / s).is_dir()]
    if missing == ["text_encoder", "tokenizer"]:
        raise LorakitError(
            f"--model {path} has only the second text encoder (the SDXL refiner?); "
            "train on an SDXL base model such as stabilityai/stable-diffusion-xl-base-1.0."
        )
    if missing:
        raise LorakitError(
            f"--model {path} lacks the subfolder(s) {', '.join(missing)} of a diffusers "
            "StableDiffusionXLPipeline; pass a complete diffusers-format model."
        )


def _load_vae(config, model_path: Path, device, weight_dtype):
    """The model's own VAE in fp32 (SDXL's overflows in fp16), or ``--vae`` in ``weight_dtype``.

    A user who passes ``--vae`` (e.g. madebyollin/sdxl-vae-fp16-fix) vouches that it is
    safe in the run's precision, so it is not upcast.
    """
    import torch
    from diffusers import AutoencoderKL

    from lorakit.models import resolve_model

    if not config.vae:
        return AutoencoderKL.from_pretrained(model_path, subfolder="vae", dtype=torch.float32).to(device)
    source = resolve_model(config.vae)
    if (source / "vae" / "config.json").is_file():  # a whole pipeline folder: take its VAE
        subfolder = "vae"
    elif (source / "config.json").is_file():
        subfolder = None
    else:
        raise LorakitError(
            f"--vae {config.vae} holds no config.json (nor vae/config.json); pass an AutoencoderKL folder or hub id."
        )
    cfg = json.loads(((source / subfolder) if subfolder else source).joinpath("config.json").read_text())
    if cfg.get("_class_name") != "AutoencoderKL":
        raise LorakitError(
            f"--vae {config.vae} is a {cfg.get('_class_name') or 'non-diffusers'} model, not an AutoencoderKL; "
            "pass an SDXL VAE such as madebyollin/sdxl-vae-fp16-fix."
        )
    return AutoencoderKL.from_pretrained(source, subfolder=subfolder, dtype=weight_dtype).to(device)


def _check_consistent(path: Path, unet, vae, text_encoder, text_encoder_2, vae_flag=None) -> None:
    """Refuse a folder whose parts do not fit together, before a shape error deep in a forward."""
    where = f"--model {path}"
    if unet.config.in_channels != vae.config.latent_channels:
        if vae_flag:
            raise LorakitError(
                f"--vae {vae_flag}: the UNet of {path} takes {unet.config.in_channels} input channels but "
                f"this VAE gives {vae.config.latent_channels}; pass an SDXL VAE such as madebyollin/sdxl-vae-fp16-fix."
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


@hookimpl
def load_components(model_path, config, device, weight_dtype):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lorakit.diffusion import apply_prediction_type
    from lorakit.tiny import check_tokenizer_matches

    path = Path(model_path)
    _check_layout(path, need_vae=not config.vae)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    # Loaded straight in the run's dtype: a 2.6B-parameter UNet never sits in fp32 in host memory.
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=weight_dtype)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=weight_dtype)
    check_tokenizer_matches(tokenizer, text_encoder, f"--model {path} (tokenizer)")
    check_tokenizer_matches(tokenizer_2, text_encoder_2, f"--model {path} (tokenizer_2)")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=weight_dtype)
    vae = _load_vae(config, path, device, weight_dtype)
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
def target_modules(config, components):
    targets = {"unet": list(config.target_modules or UNET_TARGETS)}
    if config.train_text_encoder:
        for name in TEXT_ENCODERS:
            targets[name] = list(TEXT_ENCODER_TARGETS)
    return targets


@hookimpl
def encode_images(components, pixel_values, batch):
    vae = components["vae"]
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return {"latents": (latents - shift) * vae.config.scaling_factor}


@hookimpl
def encode_prompt(components, captions):
    """Penultimate hidden states of both encoders, concatenated; pooled projection of the second.

    The same as ``StableDiffusionXLPipeline.encode_prompt`` without clip-skip, so what is
    trained is what the pipeline feeds the UNet at inference.
    """
    import torch

    hidden = []
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = components[tok_name], components[enc_name]
        ids = tokenize(tokenizer, captions).input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    pooled = out.text_embeds  # the second encoder's pooled output, through its projection
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}


def add_time_ids(batch, dtype=None):
    """SDXL's micro-conditioning, one row per image: original (h, w), crop (top, left), target (h, w).

    Read from each image's own metadata in the batch (never a constant), in the order
    ``StableDiffusionXLPipeline._get_add_time_ids`` uses at inference.
    """
    import torch

    ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
    return ids.to(dtype or torch.float32)


@hookimpl
def compute_loss(components, batch, config, generator):
    from lorakit.diffusion import denoising_loss

    unet = components["unet"]
    hidden = batch["encoder_hidden_states"].to(unet.dtype)
    added = {
        "text_embeds": batch["pooled_prompt_embeds"].to(unet.dtype),
        "time_ids": add_time_ids(batch, unet.dtype).to(hidden.device),
    }

    def predict(noisy, timesteps):
        return unet(noisy.to(unet.dtype), timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]

    return denoising_loss(predict, batch["latents"].float(), components["noise_scheduler"], config, generator)


@hookimpl
def save_lora(components, lora_layers, output_dir, weight_name):
    # PEFT keys are saved unconverted, with each component's LoRA config as metadata:
    # diffusers' key conversion silently drops non-attention targets, and without the
    # metadata a reload resets alpha to the rank.
    from diffusers import StableDiffusionXLPipeline

    kwargs = {}
    for name, (state, meta) in lora_layers.items():
        kwargs[f"{name}_lora_layers"] = state
        kwargs[f"{name}_lora_adapter_metadata"] = meta
    StableDiffusionXLPipeline.save_lora_weights(str(output_dir), weight_name=weight_name, **kwargs)


@hookimpl
def kohya_prefixes():
    # kohya's names follow transformers 4, where both CLIP encoders had a `text_model` level;
    # transformers 5 dropped it from CLIPTextModel only (CLIPTextModelWithProjection keeps it).
    return {"unet": "lora_unet", "text_encoder": "lora_te1_text_model", "text_encoder_2": "lora_te2"}


@hookimpl
def build_pipeline(components, config):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer=components["tokenizer"],
        tokenizer_2=components["tokenizer_2"],
        unet=components["unet"],
        scheduler=scheduler_from_folder(components["model_path"], fallback="EulerDiscreteScheduler"),
    )


@hookimpl
def load_pipeline(model_path, device, dtype):
    from diffusers import StableDiffusionXLPipeline

    _check_layout(Path(model_path))
    return StableDiffusionXLPipeline.from_pretrained(model_path, dtype=dtype).to(device)


@hookimpl
def load_lora(pipeline, path, adapter_name):
    from lorakit.pipelines import lora_file

    folder, weight_name = lora_file(path)
    pipeline.load_lora_weights(folder, weight_name=weight_name, adapter_name=adapter_name)


@hookimpl
def set_lora_scales(pipeline, adapter_names, scales):
    pipeline.set_adapters(list(adapter_names), adapter_weights=list(scales))


@hookimpl
def generate_images(pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale):
    return pipeline(
        list(prompts),
        num_inference_steps=num_inference_steps,
        height=resolution,
        width=resolution,
        generator=generator,
        guidance_scale=5.0 if guidance_scale is None else guidance_scale,
    ).images


@hookimpl
def write_tiny_model(path, seed):
    """A few-MB SDXL with SDXL's shape: two encoders of different widths, size/crop conditioning,
    attention only in the lower-resolution block, a VAE that downsamples by 8."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    torch.manual_seed(seed)
    hidden_1, hidden_2, projection, time_dim = 32, 48, 32, 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=1,
        cross_attention_dim=hidden_1 + hidden_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * TIME_IDS + projection,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=True,
    )
    text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=hidden_1))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(hidden_size=hidden_2, projection_dim=projection))
    # SDXL base's scheduler: Euler for inference; training reads the same betas as DDPM.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!"
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(path))
