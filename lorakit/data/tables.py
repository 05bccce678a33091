"""Anything ``datasets`` loads: a ``save_to_disk`` folder, parquet files, or a hub id.

Images come as bytes, as paths, or decoded; all go through :func:`lorakit.images.decode_image`.
A relative path is read against the dataset's folder and must resolve inside it.

Rows stay in the dataset's memory-mapped Arrow files: a sample holds its row number and
reads (and decodes) its image only when asked, so a dataset larger than RAM trains.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.data.samples import CAPTION_COLUMNS, IMAGE_COLUMNS, Sample, inside, once, pick_column
from lorakit.errors import LorakitError
from lorakit.images import decode_image


def _load(source, kind: str):
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
    return ds


def _from_datasets(source, caption_column, image_column, kind: str) -> list[Sample]:
    import datasets

    ds = _load(source, kind)
    where = f"dataset {source}"
    columns = list(ds.column_names)
    image_features = [c for c in columns if type(ds.features[c]).__name__ == "Image"]
    img_col = pick_column(
        columns, image_column, tuple(image_features) + IMAGE_COLUMNS, "image", where, "--image-column"
    )
    cap_col = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", where, "--caption-column")
    raw = ds.cast_column(img_col, datasets.Image(decode=False)) if img_col in image_features else ds
    column = raw.select_columns([img_col])
    captions = raw[cap_col]
    fingerprint = getattr(ds, "_fingerprint", str(source))
    folder = None if kind == "hub" else Path(source) if Path(source).is_dir() else Path(source).parent
    samples = []
    for i, (path, caption) in enumerate(zip(_paths_without_bytes(column, img_col), captions)):
        if isinstance(caption, list):
            caption = caption[0] if caption else ""
        caption = "" if caption is None else str(caption).strip()
        checked = _checked_path(path, folder, f"{where} row {i} ({img_col})") if path is not None else None
        if isinstance(checked, Path):  # a relative path, resolved inside the dataset's folder
            opener, digest = _dataset_opener(checked), _file_digest(checked)
        else:
            opener, digest = _row_opener(column, img_col, i), _row_digest(column, img_col, i)
        samples.append(Sample(f"{fingerprint}:{i}", caption, opener, rng_key=str(i), digest=digest))
    return samples


def _paths_without_bytes(column, name: str, rows: int = 4096):
    """Per row, the image's path when the row has no bytes (else None), read from Arrow in
    slices without copying any image bytes out of the memory-mapped files."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arrow = column.with_format("arrow")
    for start in range(0, len(column), rows):
        values = arrow[start : start + rows][name]
        if pa.types.is_struct(values.type):
            names = {values.type.field(k).name for k in range(values.type.num_fields)}
            paths = pc.struct_field(values, "path").to_pylist() if "path" in names else [None] * len(values)
            no_bytes = ([True] * len(values) if "bytes" not in names
                        else pc.is_null(pc.struct_field(values, "bytes")).to_pylist())
            yield from (p if empty else None for p, empty in zip(paths, no_bytes))
        elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            yield from values.to_pylist()
        else:
            yield from [None] * len(values)


def _row_opener(column, name: str, i: int):
    def open_image():
        return _dataset_opener(column[i][name])()

    return open_image


def _row_digest(column, name: str, i: int):
    @once
    def digest():
        from lorakit.cachekeys import file_sha256, pixels_sha256, sha256_bytes

        value = column[i][name]
        if isinstance(value, dict) and value.get("bytes"):
            return sha256_bytes(value["bytes"])
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, (str, Path)):
            return file_sha256(path)
        return pixels_sha256(_dataset_opener(value)())

    return digest


def _file_digest(path: Path):
    from lorakit.cachekeys import file_sha256

    return once(lambda: file_sha256(path))


def _checked_path(value, folder: Path | None, where: str):
    """A relative image path resolved against ``folder`` and refused outside it; other
    values (bytes, decoded images, absolute paths) are returned as they are."""
    path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
    if folder is None or not isinstance(path, str) or Path(path).is_absolute():
        return value
    return inside(folder.resolve(), folder / path, where, path)


def _dataset_opener(value):
    def open_image():
        if isinstance(value, dict):
            if value.get("bytes"):
                return decode_image(value["bytes"])
            if value.get("path"):
                return decode_image(value["path"])
            raise OSError("image has neither bytes nor path")
        if isinstance(value, (str, Path)):
            return decode_image(Path(value))
        if hasattr(value, "convert"):
            return decode_image(value)
        raise OSError(f"unsupported image value of type {type(value).__name__}")

    return open_image
