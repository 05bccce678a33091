"""Small helpers that arch plugins built on diffusers pipelines share (no arch named here)."""

from __future__ import annotations

from pathlib import Path

from lorakit.archbase import scheduler_from_folder  # noqa: F401  (moved there; kept importable)
from lorakit.checkpoints import WEIGHT_NAME
from lorakit.errors import LorakitError


def resolve_lora_file(path, what: str = "LoRA") -> Path:
    """The ``.safetensors`` file of a LoRA given as a file or a training output folder.

    Refuses (one line) a missing path, a folder without lorakit's weight file, and any
    other format: lorakit never unpickles a file a user hands in.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise LorakitError(f"{what} {path} does not exist; pass a .safetensors file or a training output folder.")
    if file.is_dir():
        folder = file
        # a run's diffusers file; else its kohya file (--save-format kohya); else a PEFT folder's
        candidates = [folder / WEIGHT_NAME, folder / "adapter_model.safetensors"]
        if (folder / "lorakit_config.json").is_file():
            candidates.insert(1, folder / f"{folder.resolve().name}.safetensors")
        file = next((c for c in candidates if c.is_file()), folder / WEIGHT_NAME)
        if not file.is_file():
            raise LorakitError(f"{what} {path} holds no {WEIGHT_NAME}; pass the file itself.")
    if file.suffix != ".safetensors":
        raise LorakitError(f"{what} {path} is not a .safetensors file; lorakit never unpickles weight files.")
    try:  # reads the header only: a damaged or foreign file is refused before any model loads
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            f.metadata()
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorakitError(f"{what} {path} is not a readable safetensors file ({first}); pass an intact LoRA file.") from None
    return file


def lora_file(path) -> tuple[str, str]:
    """``(folder, weight_name)`` for a LoRA given as a file or as a training output folder,
    the two arguments diffusers' loaders want (offline they need ``weight_name``)."""
    file = resolve_lora_file(path)
    return str(file.parent), file.name




def tokenize(tokenizer, captions):
    """Captions padded/truncated to the tokenizer's length, as CLIP text encoders were trained."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
