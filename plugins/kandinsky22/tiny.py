"""Tiny random Kandinsky 2.2 models in the real layout (``lorakit tiny``): a decoder
(UNet + MoVQ) and a prior (PriorTransformer + CLIP text and image encoders). Seeded, so the
same seed writes the same weights; torch is imported only when called.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_tiny_prior(path: Path, seed: int) -> None:
    import torch
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    torch.manual_seed(seed)
    embed_dim, image_size = 32, 32
    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        embedding_dim=embed_dim,
        num_embeddings=77,  # one per token: the tokenizer's model_max_length
        additional_embeddings=4,
    )
    with torch.no_grad():
        # A fresh prior has clip_std = 0; a trained one holds the CLIP embedding statistics.
        prior.clip_mean.copy_(0.1 * torch.randn(1, embed_dim))
        prior.clip_std.copy_(0.5 + torch.rand(1, embed_dim))
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            projection_dim=embed_dim,
        )
    )
    text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(hidden_size=embed_dim, projection_dim=embed_dim))
    # unCLIP's prior schedule (squaredcos_cap_v2 betas), predicting the clean embedding.
    scheduler = UnCLIPScheduler(
        num_train_timesteps=1000,
        variance_type="fixed_small_log",
        clip_sample=True,
        clip_sample_range=10.0,
        prediction_type="sample",
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    pipe = KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        scheduler=scheduler,
        image_processor=image_processor,
    )
    pipe.save_pretrained(str(path))
    # Without torchvision the processor is saved as CLIPImageProcessorPil; name the class the
    # Hub's prior names, so loading takes the same path as with real weights.
    index_file = Path(path) / "model_index.json"
    index = json.loads(index_file.read_text())
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_tiny_decoder(path: Path, seed: int) -> None:
    import torch
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=8,  # noise and learned variance, like the real decoder
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=32,  # the CLIP image embedding size (the prior's embedding_dim)
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        addition_embed_type_num_heads=4,
        cross_attention_dim=32,
        attention_head_dim=8,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        norm_num_groups=8,
    )
    movq = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    # A latent-diffusion DDPM schedule (linear betas 0.00085-0.012), predicting the noise.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(str(path))
