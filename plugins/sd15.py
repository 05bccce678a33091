"""Stable Diffusion 1.x / 2.x: LoRA on the UNet and, optionally, the CLIP text encoder.

Registered as arch ``sd15`` through the ``lorakit.archs`` entry point, like any third-party
plugin. Saving, loading, generating, model recognition and targets come from
:class:`lorakit.archbase.DiffusersArch`; this file says what SD1.x is and how it encodes,
conditions and builds a tiny model.
"""

from __future__ import annotations

from pathlib import Path

from lorakit import ArchInfo, DiffusersArch, hookimpl

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


class SD15(DiffusersArch):
    info = ArchInfo(
        description="Stable Diffusion 1.x/2.x: LoRA on the UNet, optionally on the CLIP text encoder",
        denoiser="unet",
        default_targets={"unet": ATTENTION, "text_encoder": CLIP_ATTENTION},
        text_encoders=("text_encoder",),
        default_resolution=512,
        pipeline_class="StableDiffusionPipeline",
        pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
        subfolders=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
        input_encoders=("vae",),
        # kohya's own prefixes (networks/lora.py); SD1.x UNet names stay diffusers' (kohya trains
        # SD1.x on diffusers' UNet), CLIP's get transformers 4's `text_model` (kohya_module_names)
        kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"},
        guidance_scale=7.5,
        # original SD1.x (CLIP: cond_stage_model.transformer) and SD2.x (OpenCLIP: cond_stage_model.model)
        # checkpoints; SDXL's text encoders live under conditioner.embedders instead
        single_file_keys=("model.diffusion_model.", "cond_stage_model."),
        single_file_layout={
            "unet": ("model.diffusion_model.", "ldm_unet"), "vae": ("first_stage_model.", "ldm_vae"),
            "text_encoder": ("cond_stage_model.transformer.", "clip"),
        },
    )
    pipeline_kwargs = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    @hookimpl
    def kohya_module_names(self, component, modules, model_config):
        from lorakit.formats.kohya import clip_text_model_path

        return {m: m if component == "unet" else clip_text_model_path(m) for m in modules}

    @hookimpl
    def kohya_metadata(self, model_configs):
        # kohya's model_util.get_model_version_str_for_sd1_sd2: "sd_v1" / "sd_v2"; A1111 reads
        # ss_v2 == "True" as SD2. SD2's UNet cross-attends to 1024-wide OpenCLIP states, SD1's to 768.
        unet = model_configs.get("unet")
        if not unet:
            return {}  # base model unknown: say nothing rather than guess
        v2 = unet.get("cross_attention_dim") == 1024
        return {"ss_base_model_version": "sd_v2" if v2 else "sd_v1", "ss_v2": str(v2)}

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from lorakit.archbase import load_text_encoder, load_vae
        from lorakit.objectives.ddpm import apply_prediction_type

        path = Path(model_path)
        self.check_layout(path, config=config)
        tokenizer, text_encoder = load_text_encoder(path, CLIPTextModel, "text_encoder", CLIPTokenizer, "tokenizer",
                                                    weight_dtype)
        # The model's VAE stays in fp32 (it only encodes, once when cached, and SD VAEs overflow
        # in fp16); a --vae the user passes (e.g. an ft-MSE VAE) runs in the run's precision.
        vae = load_vae(config, path, device, weight_dtype)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=weight_dtype)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        apply_prediction_type(noise_scheduler, config.prediction_type)
        for module in (vae, unet, text_encoder):
            module.to(device).eval()
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
    def encode_prompt(self, components, captions):
        from lorakit.pipelines import tokenize

        text_encoder = components["text_encoder"]
        ids = tokenize(components["tokenizer"], captions).input_ids.to(text_encoder.device)
        return {"encoder_hidden_states": text_encoder(ids, return_dict=False)[0]}

    @hookimpl
    def compute_loss(self, components, batch, config, rows):
        from lorakit.objectives.ddpm import denoising_loss

        unet = components["unet"]
        hidden = batch["encoder_hidden_states"].to(unet.dtype)

        def predict(noisy, timesteps):
            return unet(noisy.to(unet.dtype), timesteps, hidden, return_dict=False)[0]

        return denoising_loss(predict, batch["latents"].float(), components["noise_scheduler"], config, rows)

    @hookimpl
    def write_tiny_model(self, path, seed):
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vae

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        )
        vae = tiny_vae(AutoencoderKL)
        text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=32))
        scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            clip_sample=False, steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), scheduler=scheduler,
            **self.pipeline_kwargs,
        )
        pipe.save_pretrained(str(path))
