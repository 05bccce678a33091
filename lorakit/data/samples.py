"""What the training data is once found: samples, examples, and the checks every layout shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorakit.errors import LorakitError
from lorakit.images import decode_image

log = logging.getLogger("lorakit")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")
IMAGE_COLUMNS = ("image", "img", "images", "file_name")


@dataclass
class Sample:
    """One image with its caption.

    ``key`` identifies the image for caching (a resolved path, or a dataset's fingerprint and
    row). ``rng_key`` names it within its dataset (the path relative to the dataset folder, or
    the row index), so per-sample random draws do not depend on where the data lives; ``None``
    (e.g. samples built by a mode) falls back to ``key``: see :attr:`random_key`.
    ``digest`` (``() -> str``) hashes the image's content (its file's bytes) for the
    persistent encoding cache; ``None``: the decoded pixels are hashed instead.
    """

    key: str
    caption: str
    open: Callable  # () -> PIL.Image, upright 8-bit RGB (see lorakit.images.decode_image)
    extras: dict = field(default_factory=dict)
    rng_key: str | None = None
    digest: Callable | None = None

    @property
    def random_key(self) -> str:
        """What per-sample random draws are keyed on: ``rng_key``, else ``key``."""
        return self.key if self.rng_key is None else self.rng_key


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

    def first(self, count: int | None) -> "CaptionedImages":
        """The first ``count`` examples in the data's order (``--max-train-samples``); all when
        ``count`` is None or not smaller."""
        if count is None or count >= len(self.examples):
            return self
        return type(self)(self.examples[:count], self.source)

    def samples(self) -> list[Sample]:
        """Every distinct sample (by key), in first-seen order."""
        seen, out = set(), []
        for example in self.examples:
            for s in example:
                if s.key not in seen:
                    seen.add(s.key)
                    out.append(s)
        return out


def first_examples(dataset, count: int | None):
    """``dataset`` cut to its first ``count`` examples (``--max-train-samples``; None: all)."""
    return dataset if count is None else dataset.first(count)


def file_opener(path: Path):
    """A loader that decodes the image file when called (kept lazy: datasets can be large)."""

    def open_image():
        return decode_image(path)

    return open_image


def file_digest(path: Path):
    """A content hash of the image file (sha256 of its bytes), computed when first called."""
    from lorakit.cachekeys import file_sha256

    return once(lambda: file_sha256(path))


def once(compute):
    """``compute`` as a function that runs it on the first call and returns that result after."""
    memo = []

    def first():
        if not memo:
            memo.append(compute())
        return memo[0]

    return first


def check_readable(samples: list[Sample], known=None) -> list[Sample]:
    """Decode every image once; drop (and name) those that cannot be read. ``known(sample)``
    true: an image of that content decoded before (the encoding cache holds it), not again."""
    good, bad = [], []
    for s in samples:
        try:
            if known is not None and known(s):
                good.append(s)
                continue
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


def report_empty_captions(samples: list[Sample], source: str, shown: int = 3) -> int:
    """Warn once about samples whose caption is empty; they still train (unconditionally)."""
    empty = [s.random_key for s in samples if not s.caption]
    if empty:
        names = ", ".join(empty[:shown]) + (", ..." if len(empty) > shown else "")
        log.warning(
            "%d of %d captions in %s are empty or missing (%s); they train as unconditional "
            "samples: write a caption for each if that is not what you want",
            len(empty), len(samples), source, names,
        )
    return len(empty)


def pick_column(columns, wanted: str | None, defaults, what: str, where: str, flag: str) -> str:
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


def inside(root: Path, path: Path, where: str, entry: str) -> Path:
    """``path`` resolved (symlinks followed); refused unless it lies inside ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise LorakitError(
            f"{where}: '{entry}' resolves to {resolved}, outside the dataset folder {root}; "
            "training images must be inside it: copy the file into the folder and name it relative to it."
        )
    return resolved


def read_utf8(path: Path) -> str:
    """The text of ``path``; bytes that are not UTF-8 are refused naming the file and line."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM some editors write
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LorakitError(
            f"{path} line {line} is not UTF-8 (byte {raw[exc.start]:#04x}); save the file as UTF-8."
        ) from None
