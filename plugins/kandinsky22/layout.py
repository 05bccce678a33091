"""Kandinsky 2.2 model folders: what each stage's folder holds and where the other stage is.

A ``kandinsky22`` folder is the decoder with the prior (and with it the CLIP image encoder)
in ``prior/``; a ``kandinsky22-prior`` folder is any prior folder, possibly that ``prior/``.
The class names and subfolders here are the two arches' ``ArchInfo`` data. No torch.
"""

from __future__ import annotations

import os
from pathlib import Path

DECODER_PIPELINES = ("KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline")
PRIOR_PIPELINES = ("KandinskyV22PriorPipeline", "KandinskyV22PriorEmb2EmbPipeline")
DECODER_SUBFOLDERS = ("unet", "movq", "scheduler")
PRIOR_SUBFOLDERS = ("prior", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler")
#: Where a decoder folder keeps its prior (and with it the CLIP image encoder).
PRIOR_DIR = "prior"
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: The decoder's attention also projects the image tokens (added key/value projections).
DECODER_TARGETS = ATTENTION_TARGETS + ["add_k_proj", "add_v_proj"]
PRIOR_TARGETS = list(ATTENTION_TARGETS)
DOCS = "docs/archs/kandinsky22.md"


def read_class_name(path: Path) -> str:
    from lorakit.models import read_model_index

    return read_model_index(path).get("_class_name", "") if path.is_dir() else ""


def has_prior_pipeline(folder: Path) -> bool:
    return read_class_name(folder) in PRIOR_PIPELINES and all((folder / s).is_dir() for s in PRIOR_SUBFOLDERS)


def decoder_folder_above(path: Path):
    """A prior kept as ``prior/`` inside a decoder folder (the kandinsky22 layout) has its decoder above it."""
    folder = Path(os.path.abspath(path))  # not resolve(): k22/prior may be a symbolic link
    if folder.name == PRIOR_DIR and read_class_name(folder.parent) in DECODER_PIPELINES:
        return folder.parent
    return None
