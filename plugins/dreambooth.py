"""DreamBooth with prior preservation, as a mode that wraps whichever arch is chosen.

Registered as mode ``dreambooth`` (``lorakit.modes`` entry point, ``--dreambooth``). It
never re-implements an architecture; it only uses hooks the arch already has:

* ``build_dataset``: pairs every instance (subject) image with a class image. Class
  images already in ``--class-data`` are reused; missing ones are generated with the
  base model through the arch's ``build_pipeline`` + ``generate_images`` (this hook runs
  before LoRA is injected) and written one by one, so an interrupted generation resumes.
* ``compute_loss``: calls the arch's own ``compute_loss`` on the instance half of the
  batch, then on the class half, and concatenates the per-sample losses.
* ``reduce_loss``: instance loss + ``--prior-loss-weight`` x prior loss, reporting both.

The instance half draws exactly the random numbers a plain run would draw (same
generator, same order, same global RNG stream), so ``--prior-loss-weight 0`` trains the
same weights as a plain run on the instance images. The class half draws from a
generator *derived* from the shared one's state without advancing it: a plain function
of the checkpointed state, so resuming stays exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from lorakit.data import file_opener
from lorakit.errors import LorakitError, PluginError
from lorakit.hookspecs import hookimpl
from lorakit.options import Option

log = logging.getLogger("lorakit")

MODE = "dreambooth"
#: Name of the class-image folder inside ``--output`` when ``--class-data`` is not given.
DEFAULT_CLASS_FOLDER = "class_images"
#: Prefix of generated class images; the number is the per-image seed index.
GENERATED_PREFIX = "lorakit-class-"
#: Class images generated per pipeline call.
GENERATION_BATCH = 4
#: Batch entry telling instance (0) and class (1) samples apart.
PRIOR_KEY = "prior"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_PANEL = "DreamBooth (--dreambooth)"
OPTIONS = (
    Option("instance_data", str, None, "Folder of subject images.", panel=_PANEL, default_text="required"),
    Option("instance_prompt", str, None, "Prompt naming the subject.", panel=_PANEL, resume=True, default_text="required"),
    Option("class_data", str, None, "Folder of class images (generated if short).", panel=_PANEL,
           default_text="OUTPUT/class_images"),
    Option("class_prompt", str, None, "Prompt of the class.", panel=_PANEL, resume=True, default_text="required"),
    Option("num_class_images", int, 100, "Class images wanted.", minimum=0, panel=_PANEL),
    Option("prior_loss_weight", float, 1.0, "Weight of the prior loss.", minimum=0, panel=_PANEL),
    Option("repeats", int, 1, "Repeats of each instance image.", minimum=1, panel=_PANEL, resume=True),
    Option("class_generation_steps", int, 25, "Inference steps per generated class image.", minimum=1, panel=_PANEL),
)


class DreamBooth:
    """One instance per run's plugin manager; remembers that manager to call the arch."""

    def __init__(self):
        self.pm = None

    description = "DreamBooth with prior preservation: learn a subject, keep its class."

    # ------------------------------------------------------------------ hooks
    @hookimpl
    def declare_options(self):
        return list(OPTIONS)

    @hookimpl
    def check_config(self, config, info):
        # before the (slow) model load
        check_options(config)

    @hookimpl
    def build_dataset(self, config, components, pm):
        self.pm = pm
        return build_pairs(config, components, pm)

    @hookimpl
    def compute_loss(self, components, batch, config, generator):
        if self.pm is None:
            raise RuntimeError("dreambooth: compute_loss called before build_dataset")
        arch_loss = self.pm.subset_hook_caller("compute_loss", remove_plugins=[self])
        if PRIOR_KEY not in batch:  # not a paired batch (e.g. a held-out plain set): the arch's loss as is
            return _required(arch_loss(components=components, batch=batch, config=config, generator=generator), config)
        instance_batch, class_batch = split_batch(batch)
        instance = _required(
            arch_loss(components=components, batch=instance_batch, config=config, generator=generator), config
        )
        import torch

        seed = derived_seed(generator)
        class_generator = torch.Generator().manual_seed(seed)
        with _forked_global_rng(seed):
            prior = arch_loss(components=components, batch=class_batch, config=config, generator=class_generator)
        return torch.cat([instance, prior.to(instance.dtype)])

    @hookimpl
    def reduce_loss(self, per_sample_loss, batch, config):
        if PRIOR_KEY not in batch:
            return None  # not a paired batch: lorakit's default reduction answers
        is_prior = batch[PRIOR_KEY].to(per_sample_loss.device).bool()
        instance_loss = per_sample_loss[~is_prior].mean()
        prior_loss = per_sample_loss[is_prior].mean()
        loss = instance_loss + config.prior_loss_weight * prior_loss
        return loss, {"instance_loss": float(instance_loss.detach()), "prior_loss": float(prior_loss.detach())}


def _required(loss, config):
    if loss is None:
        raise PluginError(
            f"arch plugin '{config.arch}' does not implement required hook compute_loss. See docs/plugins.md."
        )
    return loss


# ---------------------------------------------------------------------- options


def check_options(config) -> None:
    """Refuse incomplete or contradictory DreamBooth options with one line naming the fix."""
    if not config.instance_data:
        raise LorakitError("--dreambooth needs --instance-data: a folder of images of the subject.")
    if not config.instance_prompt:
        raise LorakitError('--dreambooth needs --instance-prompt naming the subject, e.g. "a photo of sks dog".')
    if not config.class_prompt:
        raise LorakitError('--dreambooth needs --class-prompt naming its class, e.g. "a photo of a dog".')
    if config.data:
        raise LorakitError(
            "--data is not used with --dreambooth; pass the subject images as --instance-data "
            "(and class images, if you have them, as --class-data)."
        )
    instance_dir = Path(config.instance_data).expanduser()
    if not instance_dir.exists():
        raise LorakitError(f"--instance-data {config.instance_data} does not exist; pass a folder of subject images.")
    if not instance_dir.is_dir():
        raise LorakitError(f"--instance-data {config.instance_data} is a file; pass a folder of subject images.")
    if not image_files(instance_dir):
        raise LorakitError(
            f"--instance-data {config.instance_data} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "add images of the subject."
        )
    class_dir = class_folder(config)
    if class_dir.exists() and not class_dir.is_dir():
        raise LorakitError(f"--class-data {class_dir} is a file; pass a folder for class images.")
    if _inside(class_dir, instance_dir):
        raise LorakitError(
            f"the class image folder {class_dir} is inside --instance-data {instance_dir}; class images must "
            "not mix with the subject's. Pass another --class-data (or --output)."
        )
    if _inside(instance_dir, class_dir):
        raise LorakitError(
            f"--instance-data {instance_dir} is inside the class image folder {class_dir}; pass separate folders."
        )
    if config.instance_prompt.strip() == config.class_prompt.strip():
        log.warning("--instance-prompt and --class-prompt are the same; the subject will not get its own token.")


def class_folder(config) -> Path:
    """``--class-data``, or ``OUTPUT/class_images`` (never the user's instance folder)."""
    if config.class_data:
        return Path(config.class_data).expanduser()
    return Path(config.output).expanduser() / DEFAULT_CLASS_FOLDER


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path; hidden files skipped."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


# ---------------------------------------------------------------------- dataset


def _samples(paths: list[Path], caption: str, prior: int, folder: Path):
    from lorakit.data import Sample, check_readable

    # As for plain --data folders: the key (cache identity) is the resolved path and random
    # draws are keyed on the path within the folder, so the same image gets the same
    # augmentation and caption dropout in both kinds of run, wherever the folder lives.
    root = folder.resolve()
    samples = [
        Sample(str(p.resolve()), caption, file_opener(p), {PRIOR_KEY: prior},
               rng_key=("class/" if prior else "") + p.resolve().relative_to(root).as_posix())
        for p in paths
    ]
    return check_readable(samples) if samples else samples


def build_pairs(config, components, pm):
    """The DreamBooth dataset: examples ``[instance sample, class sample]``.

    Instance images (each ``--repeats`` times) are captioned with the instance prompt and
    class images with the class prompt; caption files beside them are ignored. There are
    ``max(instances x repeats, class images)`` examples; example ``i`` pairs instance
    ``i mod instances`` with class image ``i mod class images``, so every image of either
    kind is seen each epoch.
    """
    from lorakit.data import CaptionedImages

    check_options(config)
    instance_dir = Path(config.instance_data).expanduser()
    instances = _samples(image_files(instance_dir), config.instance_prompt, 0, instance_dir)
    if not instances:
        raise LorakitError(f"--instance-data {instance_dir}: none of its images could be read; check the files.")
    instances = instances * config.repeats

    class_dir = class_folder(config)
    class_paths = ensure_class_images(config, components, pm, class_dir)
    classes = _samples(class_paths, config.class_prompt, 1, class_dir)
    if not classes:
        raise LorakitError(
            f"no usable class images in {class_dir}; add some, or raise --num-class-images to generate them."
        )
    count = max(len(instances), len(classes))
    examples = [[instances[i % len(instances)], classes[i % len(classes)]] for i in range(count)]
    log.info(
        "dreambooth: %d instance image(s) x %d repeat(s), %d class image(s) -> %d paired examples",
        len(instances) // config.repeats,
        config.repeats,
        len(classes),
        count,
    )
    return CaptionedImages(examples, f"--instance-data {instance_dir}")


# ---------------------------------------------------------------------- class images


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


# ---------------------------------------------------------------------- loss


def split_batch(batch: dict) -> tuple[dict, dict]:
    """Split a paired batch into its instance half and its class half.

    The core orders samples by position in the example (all instances, then all class
    samples), so every batch-first entry of length ``2B`` is cut in the middle; entries
    of other lengths (not per-sample) are passed to both halves unchanged.
    """
    import torch

    prior = batch[PRIOR_KEY]
    total = int(prior.shape[0])
    half = total // 2
    flags = prior.tolist()
    if total % 2 or any(flags[:half]) or not all(flags[half:]):
        raise RuntimeError(f"dreambooth: batch is not [instances..., class images...] (prior flags {flags})")
    first, second = {}, {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == total:
            first[key], second[key] = value[:half], value[half:]
        elif isinstance(value, (list, tuple)) and len(value) == total:
            first[key], second[key] = value[:half], value[half:]
        else:
            first[key] = second[key] = value
    return first, second


def derived_seed(generator) -> int:
    """A seed that is a pure function of ``generator``'s state; the generator is not advanced."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _forked_global_rng:
    """Run the class half on a reseeded copy of the global RNG (LoRA dropout draws from it),
    then restore it, so the instance half's global stream matches a plain run's."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import torch

        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        torch.default_generator.manual_seed(self.seed)
        if self.cuda is not None:
            torch.cuda.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        return False
