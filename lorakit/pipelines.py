"""Small helpers that arch plugins built on diffusers pipelines share (no arch named here)."""

from __future__ import annotations

from pathlib import Path

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_file(path) -> tuple[str, str]:
    """``(folder, weight_name)`` for a LoRA given as a file or as a training output folder,
    the two arguments diffusers' loaders want (offline they need ``weight_name``)."""
    path = Path(path)
    if path.is_dir():
        return str(path), WEIGHT_NAME
    return str(path.parent), path.name


def tokenize(tokenizer, captions):
    """Captions padded/truncated to the tokenizer's length, as CLIP text encoders were trained."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
