"""Wuerstchen v2 prior (stage C): LoRA on the text-conditional ``WuerstchenPrior``.

Registered as arch ``wuerstchen`` through the ``lorakit.archs`` entry point
(``lorakit_plugins.wuerstchen:Wuerstchen``). The base model is a prior folder such as
``warp-ai/wuerstchen-prior`` (subfolders ``prior``, ``text_encoder``, ``tokenizer``,
``scheduler``), the model diffusers' research example ``train_text_to_image_lora_prior.py``
trains, plus stage B's EfficientNetV2-S image encoder. The modules:

* :mod:`.arch` -- the plugin class: ArchInfo and the hooks that differ from DiffusersArch;
* :mod:`.objective` -- image embeddings, timesteps and the loss of stage-C training;
* :mod:`.pipeline` -- loading prior and decoder component by component, chaining them;
* :mod:`.effnet` -- the EfficientNetV2-S encoder in plain torch (imports torch);
* :mod:`.encoder_io` -- the encoder's config, finding and loading it (safetensors only);
* :mod:`.convert` -- the published stage-B ``.pt`` -> safetensors, and its command;
* :mod:`.tiny` -- the tiny random model for tests and demos.

Importing this package does not import torch; ``EfficientNetEncoder`` and
``effnet_pixels`` are looked up from :mod:`.effnet` on first use.
"""

from __future__ import annotations

from .arch import Wuerstchen
from .convert import convert_encoder_checkpoint, main
from .encoder_io import (
    ENCODER_SUBFOLDER,
    encoder_config,
    find_image_encoder,
    load_image_encoder,
    save_image_encoder,
)
from .objective import EMBED_SCALE, EMBED_SHIFT, compute_loss, sample_timesteps
from .pipeline import DECODER_SUBFOLDER, DEFAULT_DECODER, find_decoder, load_decoder_pipeline, load_prior_parts
from .tiny import TINY_ENCODER

#: The name the tests and older callers use.
_load_prior_parts = load_prior_parts

_FROM_EFFNET = ("EfficientNetEncoder", "effnet_pixels")

__all__ = [
    "DECODER_SUBFOLDER",
    "DEFAULT_DECODER",
    "EMBED_SCALE",
    "EMBED_SHIFT",
    "ENCODER_SUBFOLDER",
    "TINY_ENCODER",
    "EfficientNetEncoder",
    "Wuerstchen",
    "compute_loss",
    "convert_encoder_checkpoint",
    "effnet_pixels",
    "encoder_config",
    "find_decoder",
    "find_image_encoder",
    "load_decoder_pipeline",
    "load_image_encoder",
    "load_prior_parts",
    "main",
    "sample_timesteps",
    "save_image_encoder",
]


def __getattr__(name):
    # the torch-backed names, imported on demand so that importing the plugin stays torch-free
    if name in _FROM_EFFNET:
        from . import effnet

        return getattr(effnet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
