"""Training data: finding captioned images, checking them, and turning them into tensors.

Accepted ``--data``:

* an image folder with ``metadata.jsonl`` (``file_name`` + caption column, ``text`` by
  default) -- the layout ``datasets``' imagefolder uses;
* an image folder with a ``.txt`` caption beside each image (kohya style);
* anything ``datasets`` loads: a ``save_to_disk`` folder, parquet files, or a hub id.

Every image is decoded once up front (but one whose content the persistent encoding cache
holds: it decoded in an earlier run); unreadable ones are skipped with a warning naming
them, so a run never dies mid-way on a bad file. Captions are stripped; empty ones are
reported once and train as unconditional samples.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.data.folders import _from_metadata, _from_sidecars, _image_files, _read_metadata_rows
from lorakit.data.samples import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    IMAGE_SUFFIXES,
    CaptionedImages,
    Sample,
    check_readable,
    file_digest,
    file_opener,
    log,
    pick_column,
    report_empty_captions,
)
from lorakit.data.tables import _dataset_opener, _from_datasets
from lorakit.errors import LorakitError

# Turning images into tensors lives in lorakit.images; these names stay importable from here.
from lorakit.images import Augment, augment_for, caption_dropped, crop_geometry, decode_image, prepare_image

_pick_column = pick_column

__all__ = [
    "CAPTION_COLUMNS", "IMAGE_COLUMNS", "IMAGE_SUFFIXES", "Augment", "CaptionedImages", "Sample",
    "augment_for", "caption_dropped", "check_readable", "crop_geometry", "decode_image", "file_digest", "file_opener",
    "load_captioned_images", "prepare_image", "report_empty_captions",
]


def load_captioned_images(
    data: str,
    caption_column: str | None = None,
    image_column: str | None = None,
    check_images: bool = True,
    known_readable=None,
) -> CaptionedImages:
    """Read ``--data`` into a checked :class:`CaptionedImages` (``known_readable``: see
    :func:`check_readable`)."""
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
    report_empty_captions(samples, str(data))
    if check_images:
        samples = check_readable(samples, known_readable)
    return CaptionedImages.from_samples(samples, str(data))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~"))
        and all(c.isalnum() or c in "-_." for c in text.replace("/", ""))
    )
