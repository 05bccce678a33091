"""FLUX.1 (dev and schnell): LoRA on the rectified-flow transformer, optionally on CLIP-L.

Registered as arch ``flux`` through the ``lorakit.archs`` entry point. Saving, loading,
generating, recognition and targets come from :class:`lorakit.archbase.DiffusersArch`
(``FluxPipeline`` has ``load_lora_weights``); the loss is the core's flow-matching objective.
What FLUX adds: two prompt encoders (CLIP-L's pooled output, T5's sequence), VAE latents
with a shift, latents packed into 2x2 patches with position ids, a resolution-dependent
noise shift, and dev's guidance embedding (schnell has none: read from the config).

T5 is never trained: ``--train-text-encoder`` adds LoRA to CLIP only, as FluxPipeline's
loader supports, so the core caches T5's outputs once per caption and releases it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorakit import ArchInfo, DiffusersArch, LorakitError, Option, hookimpl

log = logging.getLogger("lorakit")

ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
PANEL = "FLUX"

OPTIONS = (
    Option(
        "training_guidance", float, 1.0,
        "Guidance value fed to FLUX.1-dev's guidance embedding while training (schnell has none).",
        minimum=0, resume=True, panel=PANEL,
    ),
    Option(
        "t5_max_length", int, 512,
        "T5 tokens per caption (at most 512; shorter is faster, longer captions are cut).",
        minimum=1, maximum=512, resume=True, panel=PANEL,
    ),
)


class Flux(DiffusersArch):
    info = ArchInfo(
        description="FLUX.1 dev/schnell: LoRA on the transformer, optionally on the CLIP text encoder (T5 frozen)",
        denoiser="transformer",
        default_targets={"transformer": ATTENTION, "text_encoder": CLIP_ATTENTION},
        text_encoders=("text_encoder",),
        prompt_encoders=("text_encoder", "text_encoder_2"),
        input_encoders=("vae",),
        default_resolution=1024,
        pipeline_class="FluxPipeline",
        pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
        subfolders=("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
        size_multiple=16,  # 8x VAE downsampling x 2x2 latent patches
        objective="flow",
        options=OPTIONS,
        guidance_scale=3.5,  # FluxPipeline's default (dev); schnell ignores it
        inference_dtype="bfloat16",
    )
    inference_scheduler = "FlowMatchEulerDiscreteScheduler"

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from lorakit.archbase import load_text_encoder, load_vae

        path = Path(model_path)
        self.check_layout(path, config=config)
        # Frozen weights straight in the run's precision: a 12B transformer and a 4.7B T5
        # never sit in fp32 in host memory under bf16.
        tokenizer, text_encoder = load_text_encoder(path, CLIPTextModel, "text_encoder", CLIPTokenizer, "tokenizer",
                                                    weight_dtype)
        tokenizer_2, text_encoder_2 = load_text_encoder(path, T5EncoderModel, "text_encoder_2", T5TokenizerFast,
                                                        "tokenizer_2", weight_dtype)
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", dtype=weight_dtype)
        vae = load_vae(config, path, device, weight_dtype)  # fp32 unless --vae: it only encodes, once
        _check_consistent(path, transformer, vae, text_encoder, text_encoder_2)
        if config.given("training_guidance") and not transformer.config.guidance_embeds:
            log.warning("--training-guidance is ignored: this FLUX model (schnell?) has no guidance embedding")
        for module in (vae, transformer, text_encoder, text_encoder_2):
            module.to(device).eval()
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer,
            "tokenizer_2": tokenizer_2,
            "noise_scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            # encode_text gets no config: the T5 length travels with the components
            "t5_max_length": config.t5_max_length,
            "model_path": path,
        }

    @hookimpl
    def save_lora(self, components, lora_layers, output_dir, weight_name):
        # ComfyUI maps CLIP LoRA keys only as `text_encoder.text_model.encoder.*` (transformers 4's
        # layout, which transformers 5 dropped); diffusers reads both, so write the one both map.
        layers = dict(lora_layers)
        if "text_encoder" in layers:
            state, meta = layers["text_encoder"]
            layers["text_encoder"] = ({k if k.startswith("text_model.") else "text_model." + k: v
                                       for k, v in state.items()}, meta)
        super().save_lora(components, layers, output_dir, weight_name)

    @hookimpl
    def encode_text(self, components, captions, encoder):
        """``FluxPipeline.encode_prompt`` one encoder at a time: CLIP's pooled output, T5's
        last hidden states, each tokenized exactly as the pipeline does at inference."""
        module = components[encoder]
        if encoder == "text_encoder":
            tokenizer, length = components["tokenizer"], components["tokenizer"].model_max_length
        else:
            tokenizer, length = components["tokenizer_2"], components["t5_max_length"]
        ids = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids.to(module.device)
        if encoder == "text_encoder":
            return {"pooled_prompt_embeds": module(ids, output_hidden_states=False).pooler_output}
        return {"prompt_embeds": module(ids, output_hidden_states=False)[0]}

    @hookimpl
    def encode_prompt(self, components, captions):
        out = {}
        for encoder in self.info.prompt_encoders:
            out.update(self.encode_text(components, captions, encoder))
        return out

    @hookimpl
    def compute_loss(self, components, batch, config, rows):
        import torch
        from diffusers import FluxPipeline

        from lorakit.objectives.flow import flow_matching_loss

        transformer = components["transformer"]
        dtype = transformer.dtype
        latents = batch["latents"].float()
        b, c, h, w = latents.shape
        prompt = batch["prompt_embeds"].to(dtype)
        pooled = batch["pooled_prompt_embeds"].to(dtype)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, dtype)
        txt_ids = torch.zeros(prompt.shape[1], 3, device=latents.device, dtype=dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), float(config.training_guidance), device=latents.device, dtype=torch.float32)

        def predict(noisy, sigmas):
            packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
            out = transformer(
                hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=prompt, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
            )[0]
            # _unpack_latents takes pixel sizes; any scale factor s with (h*s, w*s, s) gives (h, w) back
            return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)

        # FLUX's scheduler shifts by image size (use_dynamic_shifting): mu from the token count
        scheduler_config = components["noise_scheduler"].config
        return flow_matching_loss(predict, latents, config, rows, scheduler_config, image_seq_len=(h // 2) * (w // 2))

    @hookimpl
    def write_tiny_model(self, path, seed):
        """A few-hundred-KB FLUX.1-dev: 2 double + 2 single blocks, guidance embedding, a VAE
        with 16 latent channels and FLUX's shift/scale, tiny CLIP and T5, FLUX's scheduler."""
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vae
        from lorakit.tiny_t5 import tiny_t5_config, tiny_t5_tokenizer

        torch.manual_seed(seed)
        clip_width, t5_width, latent_channels = 32, 32, 16
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=latent_channels * 4, num_layers=2, num_single_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5_width,
            pooled_projection_dim=clip_width, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
        )
        vae = tiny_vae(AutoencoderKL, latent_channels=latent_channels, scaling_factor=0.3611, shift_factor=0.1159,
                       use_quant_conv=False, use_post_quant_conv=False)  # FLUX's VAE config
        scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
        FluxPipeline(
            scheduler=scheduler, vae=vae, transformer=transformer,
            text_encoder=CLIPTextModel(tiny_clip_text_config(hidden_size=clip_width)), tokenizer=tiny_clip_tokenizer(),
            text_encoder_2=T5EncoderModel(tiny_t5_config(d_model=t5_width)), tokenizer_2=tiny_t5_tokenizer(),
        ).save_pretrained(str(path))


def _check_consistent(path: Path, transformer, vae, text_encoder, text_encoder_2) -> None:
    """Refuse a folder whose parts do not fit together, before a shape error deep in a forward."""
    t = transformer.config
    if t.in_channels != vae.config.latent_channels * 4:
        raise LorakitError(
            f"--model {path}: the transformer takes {t.in_channels} channels but the VAE gives "
            f"{vae.config.latent_channels} per 2x2 patch (a FLUX Fill/Depth/Canny model?); use a text-to-image FLUX.1."
        )
    if t.joint_attention_dim != text_encoder_2.config.d_model or t.pooled_projection_dim != text_encoder.config.hidden_size:
        raise LorakitError(
            f"--model {path}: the text encoders (CLIP {text_encoder.config.hidden_size}, T5 "
            f"{text_encoder_2.config.d_model}) do not fit the transformer; the folder mixes models, re-download it."
        )
