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

import io
import json
import logging
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


# Turning images into tensors lives in lorakit.images; these names stay importable from here.
from lorakit.images import Augment, augment_for, caption_dropped, crop_geometry, prepare_image  # noqa: E402,F401
