"""Class images for prior preservation: reuse those present, generate the missing ones with
the base model, one file at a time, so an interrupted generation resumes where it stopped
and never replaces a file it did not write."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from lorakit.data import file_opener
from lorakit.errors import LorakitError, PluginError

from . import IMAGE_SUFFIXES, image_files

#: Prefix of generated class images; the number is the per-image seed index.
GENERATED_PREFIX = "lorakit-class-"
#: Class images generated per pipeline call.
GENERATION_BATCH = 4


def ensure_class_images(config, components, pm, class_dir: Path) -> list[Path]:
    """Class images to train on: reuse those present, generate the missing ones.

    With ``--num-class-images 0`` every image already in the folder is used and none is
    generated. Only the main process generates; the others wait for it, then read.
    """
    try:
        from accelerate import PartialState

        state = PartialState()
        first = state.main_process_first()
    except Exception:  # no accelerate state (called outside a run): behave as one process
        import contextlib

        first = contextlib.nullcontext()
    with first:
        present = _readable(image_files(class_dir))
        wanted = config.num_class_images
        if wanted == 0:
            return present
        missing = wanted - len(present)
        if missing > 0:
            generate_class_images(config, components, pm, class_dir, missing, len(present))
            present = _readable(image_files(class_dir))
        return present[:wanted]


def _readable(paths: list[Path]) -> list[Path]:
    from lorakit.data import Sample, check_readable

    good = check_readable([Sample(str(p), "", file_opener(p)) for p in paths])
    keep = {s.key for s in good}
    return [p for p in paths if str(p) in keep]


def image_seed(seed: int, prompt: str, index: int) -> int:
    """Seed of generated class image ``index``: the same image however often generation resumes."""
    digest = hashlib.blake2b(f"class:{seed}:{prompt}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generated_path(class_dir: Path, index: int) -> Path:
    return class_dir / f"{GENERATED_PREFIX}{index:05d}.png"


def _free_indices(class_dir: Path, count: int) -> list[int]:
    """The ``count`` lowest indices whose image and sidecar names are both unused."""
    out, index = [], 0
    while len(out) < count:
        path = _generated_path(class_dir, index)
        taken = path.with_suffix(".txt").exists() or any(
            path.with_suffix(s).exists() for s in IMAGE_SUFFIXES
        )
        if not taken:
            out.append(index)
        index += 1
    return out


def _resolution(config, components, pm) -> int:
    if config.resolution:
        return int(config.resolution)
    if components.get("default_resolution"):
        return int(components["default_resolution"])
    return int(pm.hook.arch_info().default_resolution)


def _cannot_generate(config, class_dir: Path, have: int, lacking: str) -> LorakitError:
    return LorakitError(
        f"--arch {config.arch} cannot generate DreamBooth class images ({lacking}); "
        f"pass --class-data with at least {config.num_class_images} images ({have} found in {class_dir}), "
        "or lower --num-class-images."
    )


def generate_class_images(config, components, pm, class_dir: Path, count: int, have: int) -> None:
    """Generate ``count`` class images with the base model into ``class_dir``, batch by batch.

    Each image is written as soon as its batch is done (to a hidden temporary file,
    then renamed), with its prompt in a ``.txt`` sidecar and in the PNG's metadata. No
    existing file is ever replaced.
    """
    import torch

    lacking = [h for h in ("build_pipeline", "generate_images") if not getattr(pm.hook, h).get_hookimpls()]
    if lacking:
        raise _cannot_generate(config, class_dir, have, f"it has no {' / '.join(lacking)} hook")
    pipeline = pm.hook.build_pipeline(components=components, config=config)
    if pipeline is None:
        raise _cannot_generate(config, class_dir, have, "its build_pipeline hook returned no pipeline")
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)

    class_dir.mkdir(parents=True, exist_ok=True)
    for stale in class_dir.glob(f".{GENERATED_PREFIX}*.part"):
        stale.unlink()
    resolution = _resolution(config, components, pm)
    steps = int(config.class_generation_steps)
    indices = _free_indices(class_dir, count)
    _say(
        f"dreambooth: {have} class image(s) in {class_dir}, generating {count} more with the base model "
        f"({steps} steps, {resolution}px)"
    )
    progress = _GenerationProgress(count)
    try:
        with torch.no_grad(), _autocast_for(components):
            for start in range(0, len(indices), GENERATION_BATCH):
                chunk = indices[start : start + GENERATION_BATCH]
                seeds = [image_seed(config.seed, config.class_prompt, i) for i in chunk]
                generators = [torch.Generator().manual_seed(s) for s in seeds]
                images = pm.hook.generate_images(
                    pipeline=pipeline,
                    prompts=[config.class_prompt] * len(chunk),
                    generator=generators,
                    num_inference_steps=steps,
                    resolution=resolution,
                    guidance_scale=None,
                )
                if images is None or len(images) != len(chunk):
                    got = "nothing" if images is None else f"{len(images)} images"
                    raise PluginError(
                        f"arch plugin '{config.arch}' generate_images returned {got} for {len(chunk)} prompts."
                    )
                for index, seed, image in zip(chunk, seeds, images):
                    _write_class_image(class_dir, index, image, config.class_prompt, seed, steps)
                    progress.advance()
    finally:
        progress.close()
    del pipeline


def _write_class_image(class_dir: Path, index: int, image, prompt: str, seed: int, steps: int) -> None:
    from PIL.PngImagePlugin import PngInfo

    final = _generated_path(class_dir, index)
    tmp = class_dir / f".{final.name}.part"
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("lorakit", json.dumps({"prompt": prompt, "seed": seed, "steps": steps, "index": index}))
    image.save(tmp, format="PNG", pnginfo=info)
    if final.exists():  # appeared meanwhile: keep the existing file
        tmp.unlink()
        return
    os.replace(tmp, final)
    sidecar = final.with_suffix(".txt")
    if not sidecar.exists():
        sidecar.write_text(prompt + "\n", encoding="utf-8")


def _autocast_for(components):
    """Half-precision components next to fp32 ones (e.g. an fp32 VAE) need autocast to run
    a pipeline; the training loop's autocast is not active while the dataset is built."""
    import contextlib

    import torch

    modules = [m for m in components.values() if isinstance(m, torch.nn.Module)]
    dtypes = {p.dtype for m in modules for p in m.parameters()}
    low = next((d for d in (torch.float16, torch.bfloat16) if d in dtypes), None)
    if low is None:
        return contextlib.nullcontext()
    device = next(modules[0].parameters()).device
    return torch.autocast(device.type, dtype=low)


def _say(text: str) -> None:
    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(text)
    else:
        print(text, flush=True)


class _GenerationProgress:
    """A rich bar on a terminal; one plain line per image otherwise (CI logs, pipes)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]class images"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("class images", total=total)

    def advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        else:
            print(f"class images {self.done}/{self.total}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()
