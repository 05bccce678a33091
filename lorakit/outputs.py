"""The output folder: what a run may do with ``--output``, and what it writes there (final
LoRA, run config, model card, sample images). Files lorakit did not write are never touched.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.state import CHECKPOINT_RE, STATE_FILE, list_checkpoints, step_of

log = logging.getLogger("lorakit")

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RUN_CONFIG = "lorakit_config.json"
#: Where the model card goes when --output already has a README.md that lorakit did not write.
CARD_FALLBACK = "lorakit_model_card.md"


def _earlier_run_artifacts(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    names = [output_dir / WEIGHT_NAME, output_dir / RUN_CONFIG, output_dir / "samples", output_dir / CARD_FALLBACK]
    card = output_dir / "README.md"
    if _is_lorakit_card(card):
        names.append(card)
    return [p for p in names if p.exists()] + list_checkpoints(output_dir)


def _is_lorakit_card(path: Path) -> bool:
    return path.is_file() and "trained with lorakit" in path.read_text(errors="replace")


def _newer_checkpoints(output_dir: Path, checkpoint: Path) -> list[Path]:
    """Checkpoints in ``output_dir`` later than ``checkpoint`` when that one belongs to it."""
    if checkpoint.expanduser().resolve().parent != output_dir.resolve():
        return []
    match = CHECKPOINT_RE.match(checkpoint.name)
    if not match:
        return []
    return [c for c in list_checkpoints(output_dir) if step_of(c) > int(match.group(1))]


def _resumes_from_elsewhere(output_dir: Path, resume: str) -> bool:
    """``--resume`` names a checkpoint outside ``--output`` (a run to continue into a new folder)."""
    return resume != "latest" and Path(resume).expanduser().resolve().parent != output_dir.resolve()


def check_output_dir(output_dir: Path, config) -> Path | None:
    """Decide what a run may do with ``--output``, touching nothing; return the checkpoint to
    resume from, if any.

    An output folder holding an earlier run is refused unless ``--resume`` (continue it)
    or ``--overwrite`` (replace lorakit's own files in it, see :func:`clear_earlier_run`).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise LorakitError(f"--output {output_dir} is a file; pass a folder.")
    resume = config.resume
    if not resume:
        earlier = _earlier_run_artifacts(output_dir)
        if earlier and not config.overwrite:
            raise LorakitError(
                f"--output {output_dir} holds an earlier run ({earlier[0].name}); pass --resume latest to "
                "continue it, --overwrite to replace it, or choose another --output."
            )
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if found:
            return found[-1]
        if _earlier_run_artifacts(output_dir):
            raise LorakitError(
                f"--resume latest: {output_dir} holds a finished or checkpoint-less run; "
                "raise --max-steps with --resume pointing at a checkpoint, or use --overwrite."
            )
        log.info("--resume latest: no checkpoint in %s yet, starting from step 0", output_dir)
        return None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise LorakitError(
            f"--resume {resume} is not a lorakit checkpoint folder (no {STATE_FILE}); pass checkpoint-N or 'latest'."
        )
    newer = _newer_checkpoints(output_dir, path)
    if newer and not config.overwrite:
        # later checkpoints of this run would be pruned or picked as "latest" by mistake
        raise LorakitError(
            f"--output {output_dir} holds {newer[-1].name}, newer than --resume {path.name}; pass "
            "--overwrite to remove the newer checkpoints, or resume into another --output."
        )
    earlier = _earlier_run_artifacts(output_dir)
    if _resumes_from_elsewhere(output_dir, resume) and earlier and not config.overwrite:
        # continuing a run from elsewhere would write over the other run held in --output
        raise LorakitError(
            f"--output {output_dir} holds another run ({earlier[0].name}) than --resume {resume}; "
            "choose an empty --output, or pass --overwrite to replace that run's files."
        )
    return path


def clear_earlier_run(output_dir: Path, config) -> None:
    """With ``--overwrite`` (and no resume of this folder's own run), remove lorakit's own files
    of an earlier run.

    Called only once the new run has loaded its model and data, so a run that fails on a
    bad input never costs the user the earlier one. Files lorakit did not write stay.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.overwrite and config.resume and config.resume != "latest":
        for newer in _newer_checkpoints(output_dir, Path(config.resume).expanduser()):
            shutil.rmtree(newer)
            log.info("--overwrite: removed %s (newer than the resumed checkpoint)", newer.name)
    if not config.overwrite or (config.resume and not _resumes_from_elsewhere(output_dir, config.resume)):
        return
    earlier = _earlier_run_artifacts(output_dir)
    for p in earlier:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if earlier:
        log.info("--overwrite: removed the earlier run's files from %s", output_dir)


def write_run_config(output_dir: Path, config) -> None:
    (output_dir / RUN_CONFIG).write_text(config.to_json())


def write_lora(pm, components, lora_layers: dict, folder: Path, arch: str) -> Path:
    """The adapter file, written by the arch's ``save_lora`` hook."""
    folder.mkdir(parents=True, exist_ok=True)
    pm.hook.save_lora(components=components, lora_layers=lora_layers, output_dir=folder, weight_name=WEIGHT_NAME)
    path = folder / WEIGHT_NAME
    if not path.is_file():
        raise RuntimeError(f"arch plugin '{arch}' save_lora did not write {path}")
    return path


def write_samples(pm, components, config, autocast, resolution: int, folder: Path, step: int) -> None:
    """Sample images of ``config.validation_prompt`` (when the arch can generate)."""
    import torch

    pipeline = pm.hook.build_pipeline(components=components, config=config)
    if pipeline is None or not pm.hook.generate_images.get_hookimpls():
        return
    generator = torch.Generator().manual_seed(config.seed)
    # autocast: frozen weights may be bf16/fp16 next to an fp32 VAE
    with torch.no_grad(), autocast():
        images = pm.hook.generate_images(
            pipeline=pipeline, prompts=[config.validation_prompt], generator=generator,
            num_inference_steps=25, resolution=resolution, guidance_scale=None,
        )
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"step-{step:06d}-{i}.png")


def write_model_card(output_dir: Path, config, info, steps: int) -> None:
    targets = ", ".join(config.target_modules) if config.target_modules else "arch defaults"
    text = f"""---
library_name: diffusers
tags: [lora, text-to-image, lorakit]
---
# LoRA trained with lorakit

- arch: `{config.arch}` ({info.description})
- base model: `{config.model}`
- rank {config.rank}, alpha {config.lora_alpha:g}, targets: {targets}
- text-encoder LoRA: {"yes" if config.train_text_encoder else "no"}
- steps: {steps}, batch size {config.batch_size} x accumulation {config.gradient_accumulation}, lr {config.learning_rate:g}

Weights: `{WEIGHT_NAME}` (diffusers format with adapter metadata). Load it with
`lorakit generate --arch {config.arch} --model {config.model} --lora {WEIGHT_NAME} --prompt "..."`
or, where the pipeline supports it, `pipeline.load_lora_weights(folder, weight_name="{WEIGHT_NAME}")`.
"""
    card = output_dir / "README.md"
    if card.exists() and not _is_lorakit_card(card):  # the user's own README stays as it is
        card = output_dir / CARD_FALLBACK
        log.info("%s/README.md is not a lorakit model card; wrote the card to %s", output_dir, card.name)
    card.write_text(text)
