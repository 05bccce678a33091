"""Loading the prior and its decoder, and chaining them into one image pipeline.

A saved Wuerstchen pipeline does not load back through ``DiffusionPipeline.from_pretrained``
on current diffusers ("diffusers has no class WuerstchenPrior"), so every component is
loaded on its own with ``<Model>.from_pretrained(dir, subfolder=...)``. Images chain the
prior with a Wuerstchen decoder (stage B + Paella VQGAN): ``MODEL/decoder/`` if present,
else the hub's ``warp-ai/wuerstchen``. Importing this module stays free of torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.archbase import missing_subfolders
from lorakit.errors import LorakitError

#: What a prior folder (e.g. warp-ai/wuerstchen-prior) must hold; ``scheduler/`` is optional.
PRIOR_SUBFOLDERS = ("prior", "text_encoder", "tokenizer")
DECODER_SUBFOLDER = "decoder"
DECODER_PARTS = ("decoder", "vqgan", "text_encoder", "tokenizer")
DEFAULT_DECODER = "warp-ai/wuerstchen"


def wuerstchen_classes():
    from diffusers.pipelines.deprecated import wuerstchen

    return wuerstchen


def _scheduler(path: Path):
    from diffusers import DDPMWuerstchenScheduler

    if (path / "scheduler").is_dir():
        return DDPMWuerstchenScheduler.from_pretrained(path, subfolder="scheduler")
    # the research example builds the default scheduler; so does a folder without one
    return DDPMWuerstchenScheduler()


def _clip(path: Path, dtype, where: str):
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorakit.tiny import check_tokenizer_matches

    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    check_tokenizer_matches(tokenizer, text_encoder, where)
    return text_encoder, tokenizer


def load_prior_parts(path: Path, dtype=None):
    """Prior, text encoder, tokenizer and scheduler of a prior folder, each loaded on its own."""
    import torch

    path = Path(path)
    missing = missing_subfolders(path, PRIOR_SUBFOLDERS)
    if missing:
        raise LorakitError(
            f"--model {path} lacks the subfolder(s) {', '.join(missing)} of a Wuerstchen prior; "
            "pass a prior folder such as warp-ai/wuerstchen-prior."
        )
    dtype = dtype or torch.float32
    # dtype at load time: diffusers warns about casting a loaded WuerstchenPrior with .to(dtype)
    prior = wuerstchen_classes().WuerstchenPrior.from_pretrained(path, subfolder="prior", torch_dtype=dtype)
    text_encoder, tokenizer = _clip(path, dtype, f"--model {path}")
    scheduler = _scheduler(path)
    if prior.config.c_cond != text_encoder.config.hidden_size:
        raise LorakitError(
            f"--model {path}: the prior expects {prior.config.c_cond}-wide text embeddings but the text encoder "
            f"gives {text_encoder.config.hidden_size}; the folder mixes models, re-download it."
        )
    return prior, text_encoder, tokenizer, scheduler


def find_decoder(model_path) -> Path:
    """The decoder (stage B + VQGAN) to chain after the prior: ``MODEL/decoder/``, else the hub's."""
    from lorakit.models import resolve_model

    local = Path(model_path) / DECODER_SUBFOLDER
    if (local / "model_index.json").is_file():
        return local
    try:
        return resolve_model(DEFAULT_DECODER)
    except LorakitError:
        raise LorakitError(
            f"images need a Wuerstchen decoder: {model_path} has no {DECODER_SUBFOLDER}/ folder and the hub's "
            f"{DEFAULT_DECODER} could not be loaded (offline or not downloaded); put a WuerstchenDecoderPipeline "
            f"folder (e.g. a download of {DEFAULT_DECODER}) at {local}."
        ) from None


def load_decoder_pipeline(decoder_path: Path, dtype=None):
    """A ``WuerstchenDecoderPipeline`` from a decoder folder, component by component."""
    import torch

    dtype = dtype or torch.float32
    classes = wuerstchen_classes()
    missing = missing_subfolders(decoder_path, DECODER_PARTS)
    if missing:
        raise LorakitError(
            f"Wuerstchen decoder {decoder_path} lacks the subfolder(s) {', '.join(missing)}; "
            "pass a WuerstchenDecoderPipeline folder such as warp-ai/wuerstchen."
        )
    index = json.loads((decoder_path / "model_index.json").read_text())
    text_encoder, tokenizer = _clip(decoder_path, dtype, f"decoder {decoder_path}")
    return classes.WuerstchenDecoderPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        decoder=classes.WuerstchenDiffNeXt.from_pretrained(decoder_path, subfolder="decoder", torch_dtype=dtype),
        scheduler=_scheduler(decoder_path),
        vqgan=classes.PaellaVQModel.from_pretrained(decoder_path, subfolder="vqgan", torch_dtype=dtype),
        latent_dim_scale=float(index.get("latent_dim_scale", 10.67)),
    )


def combine(prior, text_encoder, tokenizer, scheduler, decoder_pipe):
    """Prior parts + a decoder pipeline -> one ``WuerstchenCombinedPipeline``."""
    combined = wuerstchen_classes().WuerstchenCombinedPipeline(
        tokenizer=decoder_pipe.tokenizer,
        text_encoder=decoder_pipe.text_encoder,
        decoder=decoder_pipe.decoder,
        scheduler=decoder_pipe.scheduler,
        vqgan=decoder_pipe.vqgan,
        prior_tokenizer=tokenizer,
        prior_text_encoder=text_encoder,
        prior_prior=prior,
        prior_scheduler=scheduler,
    )
    # The combined pipeline rebuilds its decoder pipeline with default settings; keep the folder's.
    combined.decoder_pipe.register_to_config(latent_dim_scale=decoder_pipe.config.latent_dim_scale)
    combined.set_progress_bar_config(disable=True)
    return combined


def prior_pipe(pipeline):
    """The part of a combined pipeline that carries the LoRA (a prior pipeline is its own)."""
    return getattr(pipeline, "prior_pipe", pipeline)
