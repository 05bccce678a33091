"""Validation samples: images of ``--validation-prompt`` that show a run's progress.

A check writes, under ``OUTPUT/samples/``, one image per prompt and seed,
``step-NNNNNN-K.png`` (K = prompt index x ``--num-validation-images`` + image index), and
``step-NNNNNN-grid.png`` (a row per prompt, a column per seed). Image j of every prompt uses
the seed ``--seed + j`` at every check, so images of one prompt and seed are comparable across
steps. Checks happen before the first step (step 0: the base model's images, for comparison;
not again when a resumed run finds them there), every ``--validation-every`` steps, at the end
of every ``--validation-epochs``-th epoch, and after the last step. Only the main process
generates; each image is claimed in the run's manifest before it is written and published by
an atomic rename (a file of the user's with a sample's name is left alone, and not logged).
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

FOLDER = "samples"
IMAGE = re.compile(r"^step-(\d{6})-(\d+)\.png$")


def check_options(config) -> None:
    """The validation flags make sense together (called by validate, before anything loads)."""
    if config.validation_prompt:
        return
    for flag, value in (("--validation-every", config.validation_every),
                        ("--validation-epochs", config.validation_epochs)):
        if value:
            raise LorakitError(f"{flag} writes sample images of --validation-prompt, but none is given; "
                               f"add --validation-prompt \"...\" or drop {flag}.")


def seeds(config) -> list[int]:
    """The seed of each image of a prompt: the same at every check."""
    return [(config.seed + j) % 2**32 for j in range(config.num_validation_images)]


def image_names(config, step: int) -> list[str]:
    """``samples/step-NNNNNN-K.png`` of one check, prompt-major."""
    count = len(config.validation_prompt or ()) * config.num_validation_images
    return [f"{FOLDER}/step-{step:06d}-{k}.png" for k in range(count)]


def grid_name(step: int) -> str:
    return f"{FOLDER}/step-{step:06d}-grid.png"


def due(config, batches, step: int) -> bool:
    """Whether a check follows optimizer step ``step`` (from 1)."""
    if not config.validation_prompt:
        return False
    if step >= config.max_steps or (config.validation_every and step % config.validation_every == 0):
        return True
    epochs = config.validation_epochs
    if epochs:
        epoch = batches.epoch_of(step)
        return batches.epoch_of(step + 1) > epoch and epoch % epochs == 0
    return False


def first_check_due(config, output_dir: Path, step: int) -> bool:
    """Before the first step: unless a resumed run already has (or is past) step 0's images."""
    if not config.validation_prompt or step > 0:
        return False
    from lorakit import outputs

    ours = set(outputs.recorded(Path(output_dir)) or ())
    names = image_names(config, 0) + [grid_name(0)]
    return not all(n in ours and (Path(output_dir) / n).is_file() for n in names)


def before_training(trainer) -> None:
    """Step 0's check (the main process), unless already there (see :func:`first_check_due`)."""
    if trainer.accelerator.is_main_process and first_check_due(trainer.config, trainer.output_dir, trainer.global_step):
        trainer.save_samples()


def after_step(trainer) -> None:
    """The check after an optimizer step, when one is due (the main process)."""
    if trainer.accelerator.is_main_process and due(trainer.config, trainer.batches, trainer.global_step):
        trainer.save_samples()


def check(trainer) -> list[Path]:
    """One check of a run, at its current step: the LoRA in eval mode, the released encoders
    back on the device meanwhile, the images written, then logged by the run's trackers."""
    t = trainer
    for name in t.lora_configs:
        t.components[name].eval()
    try:
        with t.cache.encoders_on_device():
            written = write_samples(t.pm, t.components, t.config, t.accelerator.autocast, t.resolution,
                                    t.output_dir, t.global_step)
    finally:
        for name in t.lora_configs:
            t.components[name].train()
    if getattr(t, "tracker", None) is not None:
        t.tracker.log_samples(t.global_step, t.output_dir / FOLDER)
    return written


def write_samples(pm, components, config, autocast, resolution: int, output_dir: Path, step: int) -> list[Path]:
    """One check: the images of every prompt and seed, and their grid (when the arch can
    generate); the paths written."""
    import torch

    pipeline = pm.hook.build_pipeline(components=components, config=config)
    if pipeline is None or not pm.hook.generate_images.get_hookimpls():
        return []
    images = []
    # autocast: frozen weights may be bf16/fp16 next to an fp32 VAE
    with torch.no_grad(), autocast():
        for prompt in config.validation_prompt:
            for seed in seeds(config):
                images += pm.hook.generate_images(
                    pipeline=pipeline, prompts=[prompt], generator=torch.Generator().manual_seed(seed),
                    num_inference_steps=config.validation_steps, resolution=resolution,
                    guidance_scale=config.validation_guidance,
                )
    names = image_names(config, step)
    if len(images) != len(names):
        raise RuntimeError(f"arch plugin '{config.arch}' generate_images returned {len(images)} images "
                           f"for {len(names)} prompts")
    output_dir = Path(output_dir)
    written = [p for p in (_write(output_dir, n, i) for n, i in zip(names, images)) if p is not None]
    grid = _write(output_dir, grid_name(step), make_grid(images, rows=len(config.validation_prompt)))
    return written + ([grid] if grid is not None else [])


def make_grid(images: list, rows: int):
    """The images in ``rows`` rows (a prompt each), left to right by seed."""
    from PIL import Image

    cols = max(1, len(images) // max(1, rows))
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % cols) * width, (k // cols) * height))
    return grid


def _write(output_dir: Path, name: str, image) -> Path | None:
    from lorakit import outputs

    folder = output_dir / FOLDER
    if not folder.is_dir():
        outputs.record(output_dir, FOLDER)
        folder.mkdir(parents=True, exist_ok=True)
    try:
        path = outputs._claim(output_dir, name)
    except LorakitError:
        log.warning("%s/%s is not lorakit's; sample image not written", output_dir, name)
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _publish(output_dir, path, buffer.getvalue())
    return path


def _publish(output_dir: Path, path: Path, data: bytes) -> None:
    from lorakit import fsutil, outputs

    try:
        fsutil.replace_file(path, data)
    except OSError as exc:
        if not fsutil.is_disk_full(exc):
            raise
        raise outputs.disk_full(output_dir, None, "sample images") from None


def final_images(config, output_dir: Path, step: int) -> list[tuple[str, str]]:
    """``[(prompt, samples/...png)]`` of the check after step ``step`` that lorakit wrote (for
    the model card's widget)."""
    from lorakit import outputs

    ours = set(outputs.recorded(Path(output_dir)) or ())
    prompts = [p for p in (config.validation_prompt or ()) for _ in range(config.num_validation_images)]
    return [(prompt, name) for prompt, name in zip(prompts, image_names(config, step))
            if name in ours and (Path(output_dir) / name).is_file()]
