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

The instance half draws exactly the random numbers a plain run would draw (the rows of
the instance samples are keyed as a plain run's, the same global RNG stream), so
``--prior-loss-weight 0`` trains the same weights as a plain run on the instance images.
The class half draws from its own rows (the second sample of each example, keyed apart
from the first); an arch of the older contract gets a generator *derived* from the shared
one's state without advancing it. Either is a function of the step, so resuming stays exact.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from lorakit.data import file_opener
from lorakit.errors import LorakitError, PluginError
from lorakit.hookspecs import hookimpl
from lorakit.options import Option

log = logging.getLogger("lorakit")

MODE = "dreambooth"
#: Name of the class-image folder inside ``--output`` when ``--class-data`` is not given.
DEFAULT_CLASS_FOLDER = "class_images"
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
    def card_facts(self, config):
        # the Hub's DreamBooth widget and readers need the prompt that names the subject
        return {"front_matter": {"instance_prompt": config.instance_prompt, "tags": ["dreambooth"]},
                "lines": [f"- DreamBooth: instance prompt `{config.instance_prompt}`, class prompt "
                          f"`{config.class_prompt}`, prior-loss weight {config.prior_loss_weight:g}"]}

    @hookimpl
    def check_config(self, config, info):
        # before the (slow) model load
        check_options(config)

    @hookimpl
    def build_dataset(self, config, components, pm):
        self.pm = pm
        return build_pairs(config, components, pm)

    @hookimpl
    def compute_loss(self, components, batch, config, generator, rows):
        if self.pm is None:
            raise RuntimeError("dreambooth: compute_loss called before build_dataset")
        arch_loss = self.pm.subset_hook_caller("compute_loss", remove_plugins=[self])
        if PRIOR_KEY not in batch:  # not a paired batch (e.g. a held-out plain set): the arch's loss as is
            return _required(
                arch_loss(components=components, batch=batch, config=config, generator=generator, rows=rows), config
            )
        instance_batch, class_batch = split_batch(batch)
        half = int(batch[PRIOR_KEY].shape[0]) // 2
        instance = _required(
            arch_loss(components=components, batch=instance_batch, config=config, generator=generator,
                      rows=rows[:half]), config
        )
        import torch

        seed = derived_seed(generator)
        class_generator = torch.Generator().manual_seed(seed)
        with _forked_global_rng(seed):
            prior = arch_loss(components=components, batch=class_batch, config=config, generator=class_generator,
                              rows=rows[half:])
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
    from .class_images import ensure_class_images

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
