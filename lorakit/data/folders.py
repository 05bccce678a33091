"""Image folders: ``metadata.jsonl`` / ``metadata.csv`` beside the images, or a ``.txt``
caption beside each image (kohya style).

Every image (and caption file) must resolve, symlinks followed, inside the dataset folder:
an entry naming ``../../etc/passwd`` or a link pointing elsewhere is refused, not trained.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path, PurePath

from lorakit.data.samples import (
    CAPTION_COLUMNS,
    IMAGE_SUFFIXES,
    Sample,
    file_digest,
    file_opener,
    inside,
    pick_column,
    read_utf8,
)
from lorakit.errors import LorakitError


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _sample(root: Path, resolved: Path, caption: str, opened: Path) -> Sample:
    return Sample(str(resolved), caption, file_opener(opened), rng_key=resolved.relative_to(root).as_posix(),
                  digest=file_digest(resolved))


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
    root = folder.resolve()
    samples = []
    for p in images:
        name = p.relative_to(folder).as_posix()
        resolved = inside(root, p, f"--data {folder}", name)
        text = inside(root, p.with_suffix(".txt"), f"--data {folder}", p.with_suffix(".txt").name)
        samples.append(_sample(root, resolved, read_utf8(text).strip(), p))
    return samples


def _read_metadata_rows(folder: Path) -> tuple[Path, list[tuple[int, dict]]]:
    """The metadata file and its rows, each with its line number in that file."""
    jsonl = folder / "metadata.jsonl"
    if jsonl.is_file():
        rows = []
        for n, line in enumerate(read_utf8(jsonl).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LorakitError(f"{jsonl} line {n} is not valid JSON ({exc.msg}); fix that line.") from None
            if not isinstance(row, dict):
                raise LorakitError(f"{jsonl} line {n} must be a JSON object with file_name and a caption.")
            rows.append((n, row))
        return jsonl, rows
    table = folder / "metadata.csv"
    reader = csv.DictReader(io.StringIO(read_utf8(table), newline=""))
    return table, [(reader.line_num, row) for row in reader]


def _caption_text(value, where: str, column: str, csv_row: bool) -> str:
    """A metadata caption as stripped text: a string, or the first of a list of strings.
    Missing (a short CSV row) is empty; anything else is refused naming the line."""
    if isinstance(value, list):  # several captions per image: the first one
        value = value[0] if value else ""
    if value is None and csv_row:
        value = ""
    if not isinstance(value, str):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise LorakitError(
            f"{where}: caption '{column}' is {shown}, not text; write it as a JSON string "
            "(\"\" for no caption) or a list of strings."
        )
    return value.strip()


def _from_metadata(folder: Path, caption_column: str | None) -> list[Sample]:
    table, rows = _read_metadata_rows(folder)
    if not rows:
        raise LorakitError(f"{table} lists no images; add one line per image.")
    columns = list(dict.fromkeys(k for _, row in rows for k in row if k is not None))  # first-seen order
    if "file_name" not in columns:
        raise LorakitError(f"{table} has no 'file_name' column; each line needs the image's file_name.")
    column = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", str(table), "--caption-column")
    root = folder.resolve()
    samples = []
    for n, row in rows:
        where = f"{table} line {n}"
        if "file_name" not in row or column not in row:
            raise LorakitError(f"{where} lacks 'file_name' or '{column}'; every line needs both.")
        entry = row["file_name"]
        if not isinstance(entry, str) or not entry.strip():
            raise LorakitError(f"{where}: file_name {json.dumps(entry)} is not a file name; write the image's path.")
        if PurePath(entry).is_absolute():
            raise LorakitError(
                f"{where}: file_name '{entry}' is an absolute path; name the image relative to {folder}."
            )
        resolved = inside(root, folder / entry, where, entry)
        if not resolved.is_file():
            raise LorakitError(f"{where} names {entry}, which is not in {folder}.")
        caption = _caption_text(row[column], where, column, table.suffix == ".csv")
        samples.append(_sample(root, resolved, caption, folder / entry))
    return samples
