"""Stable Diffusion 1.x / 2.x: LoRA on the UNet and, optionally, the CLIP text encoder.

Registered as arch ``sd15`` through the ``lorakit.archs`` entry point, like any
third-party plugin. Nothing here is imported by lorakit's core.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.arch import ArchInfo
from lorakit.errors import LorakitError
from lorakit.hookspecs import hookimpl
from lorakit.pipelines import scheduler_from_folder

PIPELINE_CLASSES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@hookimpl
def arch_info():
    return ArchInfo(
        description="Stable Diffusion 1.x/2.x: LoRA on the UNet, optionally on the CLIP text encoder",
        denoiser="unet",
        default_targets={"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS},
        text_encoders=("text_encoder",),
        default_resolution=512,
        pipeline_class="StableDiffusionPipeline",
    )


@hookimpl
def recognizes_model(model_index):
    return model_index.get("_class_name") in PIPELINE_CLASSES


def _check_layout(path: Path) -> None:
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise LorakitError(
            f"--model {path} lacks the subfolder(s) {', '.join(missing)} of a diffusers "
            "StableDiffusionPipeline; pass a complete diffusers-format model."
        )


@hookimpl
def load_components(model_path, config, device, weight_dtype):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorakit.diffusion import apply_prediction_type
    from lorakit.tiny import check_tokenizer_matches

    path = Path(model_path)
    _check_layout(path)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    # loaded straight in the run's precision: halves peak host memory under bf16/fp16
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=weight_dtype)
    check_tokenizer_matches(tokenizer, text_encoder, f"--model {path}")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    apply_prediction_type(noise_scheduler, config.prediction_type)

    # The VAE stays in fp32: it only encodes (once, when cached) and fp16 VAEs overflow.
    vae.to(device)
    unet.to(device)
    text_encoder.to(device)
    for module in (vae, unet, text_encoder):
        module.eval()
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "noise_scheduler": noise_scheduler,
        "model_path": path,
        "default_resolution": int(unet.config.sample_size * vae_scale),
    }


@hookimpl
def target_modules(config, components):
    targets = {"unet": list(config.target_modules or UNET_TARGETS)}
    if config.train_text_encoder:
        targets["text_encoder"] = list(TEXT_ENCODER_TARGETS)
    return targets


@hookimpl
def encode_images(components, pixel_values, batch):
    vae = components["vae"]
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return {"latents": (latents - shift) * vae.config.scaling_factor}


@hookimpl
def encode_prompt(components, captions):
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    from lorakit.pipelines import tokenize

    ids = tokenize(tokenizer, captions).input_ids.to(text_encoder.device)
    return {"encoder_hidden_states": text_encoder(ids, return_dict=False)[0]}


@hookimpl
def compute_loss(components, batch, config, generator):
    from lorakit.diffusion import denoising_loss

    unet = components["unet"]
    hidden = batch["encoder_hidden_states"].to(unet.dtype)

    def predict(noisy, timesteps):
        return unet(noisy.to(unet.dtype), timesteps, hidden, return_dict=False)[0]

    return denoising_loss(predict, batch["latents"].float(), components["noise_scheduler"], config, generator)


@hookimpl
def save_lora(components, lora_layers, output_dir, weight_name):
    from diffusers import StableDiffusionPipeline

    kwargs = {}
    for name, (state, meta) in lora_layers.items():
        kwargs[f"{name}_lora_layers"] = state
        kwargs[f"{name}_lora_adapter_metadata"] = meta
    StableDiffusionPipeline.save_lora_weights(str(output_dir), weight_name=weight_name, **kwargs)


@hookimpl
def kohya_prefixes():
    # kohya's names follow transformers 4's CLIPTextModel, which wrapped the encoder in
    # `text_model`; transformers 5 (which lorakit pins) dropped that level, so it goes in the prefix.
    return {"unet": "lora_unet", "text_encoder": "lora_te_text_model"}


@hookimpl
def build_pipeline(components, config):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=scheduler_from_folder(components["model_path"], fallback="DDIMScheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@hookimpl
def load_pipeline(model_path, device, dtype):
    from diffusers import StableDiffusionPipeline

    _check_layout(Path(model_path))
    return StableDiffusionPipeline.from_pretrained(model_path, dtype=dtype).to(device)


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
        guidance_scale=7.5 if guidance_scale is None else guidance_scale,
    ).images


@hookimpl
def write_tiny_model(path, seed):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
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
    )
    text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=32))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))
