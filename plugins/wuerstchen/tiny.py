"""A tiny random Wuerstchen prior folder, with its image encoder and a decoder, for tests and demos.

The folder has the real layout (``prior/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``image_encoder/`` and a ``decoder/`` pipeline folder), so it loads through
the same code as a download of warp-ai/wuerstchen-prior. Importing this module stays
free of torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from .encoder_io import ENCODER_SUBFOLDER, encoder_config, new_encoder, save_image_encoder
from .pipeline import DECODER_SUBFOLDER, wuerstchen_classes

#: A reduced EfficientNetV2 (same block types and naming, narrow and shallow).
TINY_ENCODER = encoder_config(
    c_cond=64,
    stages=[
        ["fused", 1, 3, 1, 8, 8, 1],
        ["fused", 4, 3, 2, 8, 16, 1],
        ["fused", 4, 3, 2, 16, 16, 1],
        ["mbconv", 4, 3, 2, 16, 24, 1],
        ["mbconv", 6, 3, 1, 24, 32, 2],
        ["mbconv", 6, 3, 2, 32, 48, 1],
    ],
)


def calibrate_batchnorm(encoder, pixels) -> None:
    """Give a random encoder's BatchNorms the statistics of some images, as training would.

    With torchvision's initialisation and untouched running statistics the features shrink
    ~100x per depthwise conv, so a random encoder maps every image to nearly the same
    embedding; calibrated, its embeddings vary from image to image like a trained one's.
    """
    import torch

    from .effnet import effnet_pixels

    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    encoder.train()
    with torch.no_grad():
        encoder(effnet_pixels(pixels))
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    encoder.eval()


def write_index(path: Path, class_name: str, components: dict, **extra) -> None:
    import diffusers

    index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **components, **extra}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def write_tiny_model(path, seed) -> None:
    import torch
    from diffusers import DDPMWuerstchenScheduler
    from transformers import CLIPTextModel

    from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    classes = wuerstchen_classes()
    path = Path(path)
    torch.manual_seed(seed)
    # Same block structure as the published prior, narrow and shallow; dropout kept as published
    # (a fresh WuerstchenPrior is in train mode: eval() so its outputs repeat).
    prior = classes.WuerstchenPrior(c_in=16, c=32, c_cond=32, c_r=8, depth=2, nhead=4, dropout=0.1).eval()
    text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=32)).eval()
    prior.save_pretrained(path / "prior")
    text_encoder.save_pretrained(path / "text_encoder")
    tiny_clip_tokenizer().save_pretrained(path / "tokenizer")
    DDPMWuerstchenScheduler().save_pretrained(path / "scheduler")
    encoder = new_encoder(TINY_ENCODER)
    calibrate_batchnorm(encoder, torch.rand(16, 3, 64, 64) * 2 - 1)
    save_image_encoder(encoder, path / ENCODER_SUBFOLDER)
    # diffusers writes an empty model_index.json for Wuerstchen pipelines; write the real one.
    write_index(
        path,
        "WuerstchenPriorPipeline",
        {
            "prior": ["diffusers", "WuerstchenPrior"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        },
        latent_mean=42.0,
        latent_std=1.0,
        resolution_multiple=42.67,
    )
    _write_tiny_decoder(path / DECODER_SUBFOLDER)


def _write_tiny_decoder(decoder_dir: Path) -> None:
    """Stage B + VQGAN, continuing the RNG stream of :func:`write_tiny_model`."""
    import torch
    from diffusers import DDPMWuerstchenScheduler
    from transformers import CLIPTextModel

    from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    classes = wuerstchen_classes()
    # One level with patch size 1 takes any latent size (int(h * 10.67) is rarely even).
    decoder = classes.WuerstchenDiffNeXt(
        c_in=4, c_out=4, c_r=8, patch_size=1, c_cond=32, c_hidden=[32], nhead=[4], blocks=[1],
        level_config=["CTA"], inject_effnet=[True], effnet_embd=16, clip_embd=32, dropout=0.0,
    ).eval()
    # diffusers zero-initialises the output conv, which would make images ignore the prior.
    torch.nn.init.normal_(decoder.clf[1].weight, std=0.02)
    vqgan = classes.PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=32)
    decoder.save_pretrained(decoder_dir / "decoder")
    vqgan.save_pretrained(decoder_dir / "vqgan")
    CLIPTextModel(tiny_clip_text_config(hidden_size=32)).save_pretrained(decoder_dir / "text_encoder")
    tiny_clip_tokenizer().save_pretrained(decoder_dir / "tokenizer")
    DDPMWuerstchenScheduler().save_pretrained(decoder_dir / "scheduler")
    write_index(
        decoder_dir,
        "WuerstchenDecoderPipeline",
        {
            "decoder": ["diffusers", "WuerstchenDiffNeXt"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "vqgan": ["diffusers", "PaellaVQModel"],
        },
        latent_dim_scale=10.67,
    )
