"""The model card a run writes: the YAML front matter the Hub reads (``library_name``,
``base_model`` when the model is a Hub id, ``license``, tags, a ``widget`` of the final sample
images, and whatever the run's modes and arch add through the ``card_facts`` hook, e.g.
the prompt naming a mode's subject), the training facts, the loss curve and the sample grid, and
how to load the LoRA in lorakit, diffusers, A1111 and ComfyUI. Round-1 folders' cards are
recognised by :mod:`lorakit.outputs`; this module only renders."""

from __future__ import annotations

from pathlib import Path

from lorakit.outputs import WEIGHT_NAME


def model_card(config, info, steps: int, pm=None, output_dir: Path | None = None) -> str:
    """The model card: YAML front matter the Hub reads, the training facts, and how to load it.
    With ``output_dir``, the files the run wrote there (samples, loss curve, kohya file) are shown."""
    import yaml

    front = {"library_name": "diffusers"}
    if _is_hub_id(config.model):
        front["base_model"] = config.model
    license_id = getattr(config, "license", None) or _base_model_license(config.model)
    if license_id:
        front["license"] = license_id
    front["tags"] = ["text-to-image", "diffusers", "lora", "diffusers-training", "lorakit", config.arch]
    extra_lines = []
    for facts in (pm.hook.card_facts(config=config) if pm is not None else []):
        for key, value in ((facts or {}).get("front_matter") or {}).items():
            if isinstance(value, list) and isinstance(front.get(key), list):
                front[key] += [v for v in value if v not in front[key]]
            else:
                front[key] = value
        extra_lines += list((facts or {}).get("lines") or [])
    samples = _final_samples(config, output_dir, steps)
    if samples:
        front["widget"] = [{"text": prompt, "output": {"url": url}} for prompt, url in samples]
    targets = ", ".join(config.target_modules) if config.target_modules else "the arch's defaults"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "# LoRA trained with lorakit", "",
        f"- arch: `{config.arch}` ({info.description})",
        f"- base model: `{config.model}`",
        f"- rank {config.rank}, alpha {config.lora_alpha:g}, targets: {targets}",
        f"- text-encoder LoRA: {'yes' if config.train_text_encoder else 'no'}",
        f"- steps: {steps}, batch size {config.batch_size} x accumulation {config.gradient_accumulation}, "
        f"lr {config.learning_rate:g}, seed {config.seed}, precision {config.mixed_precision}",
        *extra_lines,
    ]
    lines += _pictures(config, output_dir, steps)
    lines += _loading(config, info, output_dir)
    return "\n".join(lines) + "\n"


def _pictures(config, output_dir, steps: int) -> list[str]:
    from lorakit import losscurve, validation

    if output_dir is None:
        return []
    ours = _ours(output_dir)
    out = []
    if losscurve.PICTURE in ours and (Path(output_dir) / losscurve.PICTURE).is_file():
        out += ["", "## Training loss", "", f"![training loss per step]({losscurve.PICTURE})"]
    grid = validation.grid_name(steps)
    if grid in ours and (Path(output_dir) / grid).is_file():
        prompts = "; ".join(f"`{p}`" for p in config.validation_prompt)
        out += ["", "## Samples", "", f"After step {steps}, a row per prompt ({prompts}), a column per seed "
                f"(from {config.seed}); `samples/` holds every check from step 0 (the base model).", "",
                f"![samples after step {steps}]({grid})"]
    return out


def _loading(config, info, output_dir) -> list[str]:
    pipeline = info.pipeline_class or "DiffusionPipeline"
    # a single-file base model (lorakit.singlefile) loads with from_single_file and its config
    single, model_config = Path(str(config.model)).expanduser().is_file(), getattr(config, "model_config", None)
    with_config = f" --model-config {model_config}" if single and model_config else ""
    load = (f'from_single_file("{config.model}"' + (f', config="{model_config}")' if model_config else ")")
            if single else f'from_pretrained("{config.model}")')
    kohya = _kohya_file(config, output_dir)
    if getattr(config, "save_format", None) == "kohya":  # no diffusers file: the kohya one is the LoRA
        name = kohya or "the kohya-format .safetensors file"
        lines = ["", "## Use it", "", f"Weights: `{name}` (kohya format, `--save-format kohya`). Generate with",
                 f'`lorakit generate --arch {config.arch} --model {config.model}{with_config} --lora {name} --prompt "..."`;',
                 f"`lorakit convert {name} {WEIGHT_NAME} --arch {config.arch} --to diffusers` writes the diffusers-format",
                 "file with its adapter configs."]
    else:
        lines = ["", "## Use it", "", f"Weights: `{WEIGHT_NAME}` (diffusers format with adapter metadata). Generate with",
                 f'`lorakit generate --arch {config.arch} --model {config.model}{with_config} --lora {WEIGHT_NAME} --prompt "..."`.']
    if info.pipeline_loads_lora and getattr(config, "save_format", None) != "kohya":
        lines += ["", "In diffusers:", "", "```python", f"from diffusers import {pipeline}", "",
                  f"pipe = {pipeline}.{load}",
                  f"pipe.load_lora_weights(\"path/to/this/folder\", weight_name=\"{WEIGHT_NAME}\")", "```"]
    if kohya:
        stem = Path(kohya).stem
        lines += ["", f"In A1111 / Forge: copy `{kohya}` into `models/Lora` and add `<lora:{stem}:0.8>` to the prompt.",
                  f"In ComfyUI: copy `{kohya}` into `models/loras` and pick it in a LoraLoader node."]
    else:
        lines += ["", "For A1111, ComfyUI or kohya's scripts: `lorakit convert --to kohya` writes a kohya-style file",
                  "(where the arch has a kohya convention; see docs/usage.md)."]
    return lines


def _kohya_file(config, output_dir) -> str | None:
    """The kohya-layout file the run wrote (``--save-format kohya|both``), if any."""
    if output_dir is None:
        return None
    try:
        from lorakit.saveformat import final_files
    except ImportError:
        return None
    ours = _ours(output_dir)
    names = [n for n in final_files(config, output_dir) if n != WEIGHT_NAME]
    return next((n for n in names if n in ours and (Path(output_dir) / n).is_file()), None)


def _final_samples(config, output_dir, steps: int) -> list:
    if output_dir is None or not getattr(config, "validation_prompt", None):
        return []
    from lorakit.validation import final_images

    return final_images(config, output_dir, steps)


def _ours(output_dir) -> set:
    from lorakit import outputs

    return set(outputs.recorded(Path(output_dir)) or ())


def _base_model_license(model: str) -> str | None:
    """``license`` of a local base model's own card (README.md front matter), if it has one."""
    import yaml

    card = Path(model).expanduser() / "README.md"
    try:
        text = card.read_text(errors="replace") if card.is_file() else ""
        if not text.startswith("---"):
            return None
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (OSError, yaml.YAMLError, IndexError):
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return value if isinstance(value, str) and value else None


def _is_hub_id(model: str) -> bool:
    """``owner/name`` that is not a local path: what the Hub's ``base_model`` field takes."""
    parts = str(model).split("/")
    return len(parts) == 2 and all(parts) and not Path(model).expanduser().exists() and not model.startswith((".", "~"))
