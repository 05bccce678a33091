"""The model card a run writes: the YAML front matter the Hub reads (``library_name``,
``base_model`` when the model is a Hub id, tags), the training facts, and how to load the LoRA
in lorakit, diffusers and the kohya-style tools. Round-1 folders' cards are recognised by
:mod:`lorakit.outputs`; this module only renders."""

from __future__ import annotations

from pathlib import Path

from lorakit.outputs import WEIGHT_NAME
from lorakit.saveformat import final_files


def model_card(config, info, steps: int) -> str:
    """The model card: YAML front matter the Hub reads, the training facts, and how to load it."""
    import yaml

    front = {"library_name": "diffusers"}
    if _is_hub_id(config.model):
        front["base_model"] = config.model
    front["tags"] = ["text-to-image", "diffusers", "lora", "diffusers-training", "lorakit", config.arch]
    targets = ", ".join(config.target_modules) if config.target_modules else "the arch's defaults"
    pipeline = info.pipeline_class or "DiffusionPipeline"
    loading = (
        f"from diffusers import {pipeline}\n\npipe = {pipeline}.from_pretrained(\"{config.model}\")\n"
        f"pipe.load_lora_weights(\"path/to/this/folder\", weight_name=\"{WEIGHT_NAME}\")\n"
    ) if info.pipeline_loads_lora else None
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "# LoRA trained with lorakit", "",
        f"- arch: `{config.arch}` ({info.description})",
        f"- base model: `{config.model}`",
        f"- rank {config.rank}, alpha {config.lora_alpha:g}, targets: {targets}",
        f"- text-encoder LoRA: {'yes' if config.train_text_encoder else 'no'}",
        f"- steps: {steps}, batch size {config.batch_size} x accumulation {config.gradient_accumulation}, "
        f"lr {config.learning_rate:g}, seed {config.seed}, precision {config.mixed_precision}",
        "", f"Weights: `{WEIGHT_NAME}` (diffusers format with adapter metadata). Generate with",
        f'`lorakit generate --arch {config.arch} --model {config.model} --lora {WEIGHT_NAME} --prompt "..."`.',
    ]
    if loading:
        lines += ["", "In diffusers:", "", "```python", loading.rstrip("\n"), "```"]
    kohya = [f for f in final_files(config, Path(config.output)) if f != WEIGHT_NAME]  # --save-format
    if kohya:
        lines += ["", f"For A1111, Forge, ComfyUI or kohya's scripts: `{kohya[0]}` (kohya's format, with the `ss_*` header",
                  f"those tools read); copy it into their Lora folder and prompt with `<lora:{Path(kohya[0]).stem}:0.8>`."]
    else:
        lines += ["", "For A1111, ComfyUI or kohya's scripts: `lorakit convert --to kohya` writes a kohya-style file",
                  "(where the arch has a kohya convention; see docs/usage.md)."]
    return "\n".join(lines) + "\n"


def _is_hub_id(model: str) -> bool:
    """``owner/name`` that is not a local path: what the Hub's ``base_model`` field takes."""
    parts = str(model).split("/")
    return len(parts) == 2 and all(parts) and not Path(model).expanduser().exists() and not model.startswith((".", "~"))
