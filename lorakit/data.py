"""Training data: finding captioned images, checking them, and turning them into tensors.

Accepted ``--data``:

* an image folder with ``metadata.jsonl`` (``file_name`` + caption column, ``text`` by
  default) -- the layout ``datasets``' imagefolder uses;
* an image folder with a ``.txt`` caption beside each image (kohya style);
* anything ``datasets`` loads: a ``save_to_disk`` folder, parquet files, or a hub id.

Every image is decoded once up front; unreadable ones are skipped with a warning naming
them, so a run never dies mid-way on a bad file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")
IMAGE_COLUMNS = ("image", "img", "images", "file_name")


@dataclass
class Sample:
    """One image with its caption. ``key`` identifies the image for caching."""

    key: str
    caption: str
    open: Callable  # () -> PIL.Image
    extras: dict = field(default_factory=dict)


class CaptionedImages:
    """A list of training examples; each example is a group of one or more samples.

    Plain training has one sample per example. A mode may group several (prior preservation
    pairs an instance image with a class image); a batch of ``B`` examples then holds
    ``B * group_size`` samples, ordered by position in the group.
    """

    def __init__(self, examples: list[list[Sample]], source: str):
        if not examples:
            raise LorakitError(f"{source}: no usable images found; add images or check the path.")
        self.examples = examples
        self.source = source
        sizes = {len(e) for e in examples}
        if len(sizes) != 1:
            raise ValueError("every example must have the same number of samples")
        self.group_size = sizes.pop()

    @classmethod
    def from_samples(cls, samples: list[Sample], source: str) -> "CaptionedImages":
        return cls([[s] for s in samples], source)

    def __len__(self) -> int:
        return len(self.examples)

    def samples(self) -> list[Sample]:
        """Every distinct sample (by key), in first-seen order."""
        seen, out = set(), []
        for example in self.examples:
            for s in example:
                if s.key not in seen:
                    seen.add(s.key)
                    out.append(s)
        return out


# --- finding data -----------------------------------------------------------------


def load_captioned_images(
    data: str,
    caption_column: str | None = None,
    image_column: str | None = None,
    check_images: bool = True,
) -> CaptionedImages:
    """Read ``--data`` into a checked :class:`CaptionedImages`."""
    path = Path(data).expanduser()
    if path.is_dir():
        if (path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file():
            samples = _from_metadata(path, caption_column)
        elif (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            samples = _from_datasets(path, caption_column, image_column, kind="disk")
        elif list(path.glob("*.parquet")) or list(path.glob("*/*.parquet")):
            samples = _from_datasets(path, caption_column, image_column, kind="parquet")
        else:
            samples = _from_sidecars(path)
    elif path.is_file() and path.suffix == ".parquet":
        samples = _from_datasets(path, caption_column, image_column, kind="parquet")
    elif path.exists():
        raise LorakitError(f"--data {data} is a file, not a folder of images or a dataset.")
    elif _looks_like_hub_id(data):
        samples = _from_datasets(data, caption_column, image_column, kind="hub")
    else:
        raise LorakitError(f"--data {data} does not exist; pass an image folder or a dataset.")
    if check_images:
        samples = check_readable(samples)
    return CaptionedImages.from_samples(samples, str(data))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~"))
        and all(c.isalnum() or c in "-_." for c in text.replace("/", ""))
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def file_opener(path: Path):
    """A loader that decodes the image file when called (kept lazy: datasets can be large)."""

    def open_image():
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            return img.copy()

    return open_image


def _from_sidecars(folder: Path) -> list[Sample]:
    images = _image_files(folder)
    if not images:
        raise LorakitError(
            f"--data {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "add images or point --data at the right folder."
        )
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise LorakitError(
            f"{len(missing)} image(s) in {folder} have no caption, e.g. {missing[0].name}: "
            f"add {missing[0].with_suffix('.txt').name} beside each image, or a metadata.jsonl."
        )
    return [
        Sample(str(p.resolve()), p.with_suffix(".txt").read_text(encoding="utf-8").strip(), file_opener(p))
        for p in images
    ]


def _read_metadata_rows(folder: Path) -> list[dict]:
    jsonl = folder / "metadata.jsonl"
    if jsonl.is_file():
        rows = []
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LorakitError(f"{jsonl} line {n} is not valid JSON ({exc.msg}); fix that line.") from None
            if not isinstance(row, dict):
                raise LorakitError(f"{jsonl} line {n} must be a JSON object with file_name and a caption.")
            rows.append(row)
        return rows
    import csv

    with open(folder / "metadata.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _pick_column(columns, wanted: str | None, defaults, what: str, where: str, flag: str) -> str:
    columns = list(columns)
    if wanted:
        if wanted not in columns:
            raise LorakitError(
                f"{where} has no {what} column '{wanted}' (columns: {', '.join(columns)}); "
                f"pass one of those with {flag}."
            )
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise LorakitError(
        f"{where} has no {what} column (looked for {', '.join(defaults)}; columns: {', '.join(columns)}); "
        f"name it with {flag}."
    )


def _from_metadata(folder: Path, caption_column: str | None) -> list[Sample]:
    rows = _read_metadata_rows(folder)
    if not rows:
        raise LorakitError(f"{folder}/metadata.jsonl lists no images; add one line per image.")
    columns = {k for row in rows for k in row}
    where = f"{folder}/metadata"
    if "file_name" not in columns:
        raise LorakitError(f"{where} has no 'file_name' column; each line needs the image's file_name.")
    column = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", where, "--caption-column")
    samples = []
    for n, row in enumerate(rows, start=1):
        if "file_name" not in row or column not in row:
            raise LorakitError(f"{where} line {n} lacks 'file_name' or '{column}'; every line needs both.")
        path = folder / str(row["file_name"])
        if not path.is_file():
            raise LorakitError(f"{where} line {n} names {row['file_name']}, which is not in {folder}.")
        caption = row[column]
        if isinstance(caption, list):  # several captions per image: the first one
            caption = caption[0] if caption else ""
        samples.append(Sample(str(path.resolve()), str(caption or ""), file_opener(path)))
    return samples


def _from_datasets(source, caption_column, image_column, kind: str) -> list[Sample]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise LorakitError("reading this --data needs the 'datasets' package; pip install datasets.") from None
    try:
        if kind == "disk":
            ds = datasets.load_from_disk(str(source))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        elif kind == "parquet":
            files = [str(source)] if Path(source).is_file() else sorted(
                str(p) for p in Path(source).rglob("*.parquet")
            )
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            ds = datasets.load_dataset(str(source), split="train")
    except LorakitError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorakitError(f"--data {source} could not be loaded as a dataset: {first}") from None
    where = f"dataset {source}"
    columns = list(ds.column_names)
    image_features = [c for c in columns if type(ds.features[c]).__name__ == "Image"]
    img_col = _pick_column(
        columns, image_column, tuple(image_features) + IMAGE_COLUMNS, "image", where, "--image-column"
    )
    cap_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", where, "--caption-column")
    raw = ds.cast_column(img_col, datasets.Image(decode=False)) if img_col in image_features else ds
    captions = raw[cap_col]
    images = raw[img_col]
    fingerprint = getattr(ds, "_fingerprint", str(source))
    samples = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        if isinstance(caption, list):
            caption = caption[0] if caption else ""
        samples.append(Sample(f"{fingerprint}:{i}", str(caption or ""), _dataset_opener(image, source)))
    return samples


def _dataset_opener(value, source):
    def open_image():
        from PIL import Image

        if isinstance(value, dict):
            if value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                img = Image.open(value["path"])
            else:
                raise OSError("image has neither bytes nor path")
        elif isinstance(value, str):
            path = Path(value)
            if not path.is_absolute() and Path(source).is_dir():
                path = Path(source) / path
            img = Image.open(path)
        elif hasattr(value, "convert"):
            img = value
        else:
            raise OSError(f"unsupported image value of type {type(value).__name__}")
        img.load()
        return img

    return open_image


def check_readable(samples: list[Sample]) -> list[Sample]:
    """Decode every image once; drop (and name) those that cannot be read."""
    good, bad = [], []
    for s in samples:
        try:
            img = s.open()
            if img.width < 1 or img.height < 1:
                raise OSError("empty image")
            good.append(s)
        except Exception as exc:
            bad.append((s.key, exc))
    for key, exc in bad:
        log.warning("skipping unreadable image %s (%s)", key, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if bad and not good:
        raise LorakitError(f"none of the {len(bad)} images could be read (first: {bad[0][0]}); check the files.")
    return good


# --- turning images into tensors ------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """The augmentation drawn for one sample in one epoch (deterministic, see :func:`augment_for`)."""

    flip: bool = False
    crop_jitter: float = 0.5  # 0..1 position of the crop window; 0.5 = centre


def augment_for(seed: int, epoch: int, key: str, random_flip: bool, random_crop: bool) -> Augment:
    """Augmentation for a sample, a pure function of (seed, epoch, key): resumable, cacheable."""
    if not (random_flip or random_crop):
        return Augment()
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    flip = random_flip and rng.random() < 0.5
    jitter = rng.random() if random_crop else 0.5
    return Augment(flip=flip, crop_jitter=jitter)


def caption_dropped(seed: int, epoch: int, key: str, probability: float) -> bool:
    if probability <= 0:
        return False
    digest = hashlib.blake2b(f"caption:{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little")).random() < probability


def crop_geometry(width: int, height: int, size: tuple[int, int], augment: Augment):
    """Where an image of ``width x height`` is cut to ``size = (w, h)``: resized to cover it,
    then cropped at the augment's position. Returns ``((new_w, new_h), (top, left))``, the
    crop's ``left`` as seen after the augment's flip."""
    target_w, target_h = size
    scale = max(target_w / width, target_h / height)
    new_w = max(target_w, round(width * scale))
    new_h = max(target_h, round(height * scale))
    top = int(round((new_h - target_h) * augment.crop_jitter))
    left = int(round((new_w - target_w) * augment.crop_jitter))
    if augment.flip:
        left = new_w - target_w - left  # where the crop sits in the flipped image
    return (new_w, new_h), (top, left)


def prepare_image(image, resolution: int, augment: Augment, size: tuple[int, int] | None = None):
    """Resize to cover ``size = (width, height)`` (default: ``resolution`` square, i.e. the
    short side becomes ``resolution``), crop, maybe flip.

    Returns ``(pixel_values, original_size, crop_top_left)``: a ``(3, H, W)`` float tensor
    in ``[-1, 1]``, the image's ``(height, width)`` before resizing, and the crop's
    ``(top, left)`` in resized pixels (some archs condition on both).
    """
    import numpy as np
    import torch
    from PIL import Image

    image = image.convert("RGB")
    size = size or (resolution, resolution)
    original_size = (image.height, image.width)
    (new_w, new_h), (top, left) = crop_geometry(image.width, image.height, size, Augment(crop_jitter=augment.crop_jitter))
    if (new_w, new_h) != (image.width, image.height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + size[0], top + size[1]))
    if augment.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - size[0] - left  # where the crop sits in the flipped image
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, original_size, (top, left)
