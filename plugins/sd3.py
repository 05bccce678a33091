"""Stable Diffusion 3 / 3.5: LoRA on the MMDiT transformer and, optionally, both CLIP encoders.

Registered as arch ``sd3`` through the ``lorakit.archs`` entry point. Saving, loading,
generating, recognition and targets come from :class:`lorakit.archbase.DiffusersArch`; the
flow-matching objective (densities, the scheduler's shift, weightings) from
:mod:`lorakit.objectives.flow`. What SD3 adds, and where it lives here:

* three text encoders, each encoded and cached on its own (``encode_text``): CLIP-L and
  CLIP-G give penultimate hidden states and a projected pooled embedding, T5 its last hidden
  states. T5 is never trained, so its outputs are cached once per caption even while the
  CLIPs train; ``compute_loss`` joins them as ``StableDiffusion3Pipeline.encode_prompt`` does;
* latents from a 16-channel VAE with a shift as well as a scale; the transformer patches
  2 x 2 latents, so image sides are multiples of 16.
"""

from __future__ import annotations

from pathlib import Path

from lorakit import ArchInfo, DiffusersArch, Option, hookimpl

# diffusers' train_dreambooth_lora_sd3.py defaults: every projection of the joint attention
# (image and text streams), not the second (image-only) attention of SD3.5's dual blocks.
ATTENTION = [
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
CLIPS = ("text_encoder", "text_encoder_2")
T5 = "text_encoder_3"
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", T5: "tokenizer_3"}

T5_MAX_LENGTH = Option(
    "t5_max_length",
    int,
    # StableDiffusion3Pipeline's default max_sequence_length: what the LoRA is trained on is
    # what the pipeline feeds it at inference (diffusers' script trains with 77, which is faster).
    256,
    "T5 tokens per caption (the pipeline's max_sequence_length); shorter is faster.",
    minimum=1,
    maximum=512,
    resume=True,
)


class SD3(DiffusersArch):
    info = ArchInfo(
        description="Stable Diffusion 3/3.5: LoRA on the MMDiT transformer, optionally on both CLIP text encoders",
        denoiser="transformer",
        default_targets={"transformer": ATTENTION, "text_encoder": CLIP_ATTENTION, "text_encoder_2": CLIP_ATTENTION},
        # StableDiffusion3Pipeline.load_lora_weights loads the transformer and the two CLIPs only.
        text_encoders=CLIPS,
        prompt_encoders=CLIPS + (T5,),
        input_encoders=("vae",),
        default_resolution=1024,
        pipeline_class="StableDiffusion3Pipeline",
        pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
        subfolders=("transformer", "vae", "scheduler") + CLIPS + (T5,) + tuple(TOKENIZERS.values()),
        size_multiple=16,  # 8x VAE x 2x2 patches
        objective="flow",
        options=(T5_MAX_LENGTH,),
        inference_dtype="bfloat16",
    )
    inference_scheduler = "FlowMatchEulerDiscreteScheduler"

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from lorakit.archbase import load_text_encoder, load_vae

        path = Path(model_path)
        self.check_layout(path, config=config)
        parts = {}
        # Frozen weights straight in the run's precision: T5-XXL alone is 19 GB in fp32.
        for name, tokenizer in TOKENIZERS.items():
            classes = (T5EncoderModel, T5TokenizerFast) if name == T5 else (CLIPTextModelWithProjection, CLIPTokenizer)
            parts[tokenizer], parts[name] = load_text_encoder(path, classes[0], name, classes[1], tokenizer, weight_dtype)
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", dtype=weight_dtype)
        vae = load_vae(config, path, device, weight_dtype)  # fp32 unless --vae: it only encodes, once
        for name in CLIPS + (T5,):
            parts[name].to(device).eval()
        transformer.to(device).eval()
        vae.eval()
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return {
            **parts,
            "transformer": transformer,
            "vae": vae,
            "noise_scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            "model_path": path,
            "t5_max_length": getattr(config, "t5_max_length", T5_MAX_LENGTH.default),
            "default_resolution": int(transformer.config.sample_size * vae_scale),
        }

    @hookimpl
    def encode_text(self, components, captions, encoder):
        """One encoder's part of ``StableDiffusion3Pipeline.encode_prompt`` (no clip-skip)."""
        from lorakit.pipelines import tokenize

        model, tokenizer = components[encoder], components[TOKENIZERS[encoder]]
        if encoder == T5:
            ids = tokenizer(list(captions), padding="max_length", max_length=components["t5_max_length"],
                            truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            return {"t5_hidden": model(ids.to(model.device))[0]}
        out = model(tokenize(tokenizer, captions).input_ids.to(model.device), output_hidden_states=True)
        return {f"{encoder}_hidden": out.hidden_states[-2], f"{encoder}_pooled": out.text_embeds}

    @hookimpl
    def encode_prompt(self, components, captions):
        merged = {}
        for encoder in self.info.prompt_encoders:
            merged.update(self.encode_text(components, captions, encoder))
        return merged

    @hookimpl
    def compute_loss(self, components, batch, config, rows):
        from lorakit.objectives.flow import flow_matching_loss

        transformer, scheduler = components["transformer"], components["noise_scheduler"]
        hidden, pooled = prompt_embeds(batch)
        hidden, pooled = hidden.to(transformer.dtype), pooled.to(transformer.dtype)
        scale = scheduler.config.num_train_timesteps  # the pipeline's timesteps are sigmas * 1000

        def predict(noisy, sigmas):
            return transformer(
                hidden_states=noisy.to(transformer.dtype), timestep=sigmas * scale, encoder_hidden_states=hidden,
                pooled_projections=pooled, return_dict=False,
            )[0]

        return flow_matching_loss(predict, batch["latents"].float(), config, rows, scheduler_config=scheduler.config)

    @hookimpl
    def write_tiny_model(self, path, seed):
        """A ~1 MB SD3.5 with its shape: CLIPs of two widths whose joined states are padded to
        the (wider) T5's, a dual-attention first block with RMS qk-norm, a last block that only
        reads the text, and a 16-channel VAE that downsamples by 8 (64 px -> 8 x 8 latents)."""
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from diffusers import StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vae
        from lorakit.tiny_t5 import tiny_t5_config, tiny_t5_tokenizer

        torch.manual_seed(seed)
        clip_l, clip_g, t5_width = 16, 32, 64
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=t5_width, caption_projection_dim=32,
            pooled_projection_dim=clip_l + clip_g, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
        StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=tiny_vae(AutoencoderKL, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                         use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=CLIPTextModelWithProjection(tiny_clip_text_config(hidden_size=clip_l, projection_dim=clip_l)),
            text_encoder_2=CLIPTextModelWithProjection(tiny_clip_text_config(hidden_size=clip_g, projection_dim=clip_g)),
            text_encoder_3=T5EncoderModel(tiny_t5_config(d_model=t5_width)),
            tokenizer=tiny_clip_tokenizer(),
            tokenizer_2=tiny_clip_tokenizer(pad_token="!"),  # CLIP-G's tokenizer pads with "!", as SDXL's
            tokenizer_3=tiny_t5_tokenizer(),
        ).save_pretrained(str(path))


def prompt_embeds(batch):
    """``(prompt_embeds, pooled_prompt_embeds)`` from the encoders' outputs, as
    ``StableDiffusion3Pipeline.encode_prompt`` builds them: both CLIPs' states joined on the
    feature axis and zero-padded to T5's width, then followed by T5's tokens; the two pooled
    embeddings joined."""
    import torch

    clip = torch.cat([batch["text_encoder_hidden"], batch["text_encoder_2_hidden"]], dim=-1)
    t5 = batch["t5_hidden"].to(clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    pooled = torch.cat([batch["text_encoder_pooled"], batch["text_encoder_2_pooled"]], dim=-1)
    return torch.cat([clip, t5], dim=-2), pooled
