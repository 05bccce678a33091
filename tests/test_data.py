"""Data: every accepted --data layout, image preparation, and clear errors."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from lorakit.data import Augment, augment_for, load_captioned_images, prepare_image
from lorakit.errors import LorakitError
from lorakit.testing import example_data


def _png_bytes(colour, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_metadata_jsonl_folder():
    data = load_captioned_images(str(example_data()))
    assert len(data) == 12
    captions = {s.caption for s in data.samples()}
    assert "a plain red image" in captions
    assert data.samples()[0].open().size == (64, 64)


def test_caption_column_choice(lorakit_image_folder):
    rows = [json.loads(l) for l in (lorakit_image_folder / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        r["long_caption"] = "long: " + r.pop("text")
    (lorakit_image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(LorakitError, match="no caption column .*long_caption.*--caption-column"):
        load_captioned_images(str(lorakit_image_folder))
    data = load_captioned_images(str(lorakit_image_folder), caption_column="long_caption")
    assert all(s.caption.startswith("long: ") for s in data.samples())


def test_sidecar_txt_folder(tmp_path):
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (32, 48), colour).save(tmp_path / f"img{i}.jpg")
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    data = load_captioned_images(str(tmp_path))
    assert [s.caption for s in data.samples()] == ["caption 0", "caption 1"]


def test_save_to_disk_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png_bytes((255, 0, 0)), "path": None}, {"bytes": _png_bytes((0, 255, 0)), "path": None}],
         "text": ["red", "green"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_captioned_images(str(tmp_path / "ds"))
    assert [s.caption for s in data.samples()] == ["red", "green"]
    assert data.samples()[1].open().getpixel((0, 0)) == (0, 255, 0)


def test_parquet_files_like_naruto_blip_captions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": _png_bytes((i * 40, 0, 0)), "path": f"{i}.png"} for i in range(3)]
    table = pa.table({"image": images, "text": [f"a drawing {i}" for i in range(3)]})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    data = load_captioned_images(str(tmp_path))
    assert len(data) == 3 and data.samples()[2].caption == "a drawing 2"
    with pytest.raises(LorakitError, match="no caption column 'prompt'"):
        load_captioned_images(str(tmp_path), caption_column="prompt")


def test_unreachable_hub_dataset_fails_fast_and_clearly():
    start = time.perf_counter()
    with pytest.raises(LorakitError, match="could not be loaded as a dataset"):
        load_captioned_images("someone/not-cached-dataset")
    assert time.perf_counter() - start < 30


def test_unreachable_hub_model_fails_fast_and_clearly():
    from lorakit.models import resolve_model

    start = time.perf_counter()
    with pytest.raises(LorakitError, match="not in the local Hugging Face cache"):
        resolve_model("someone/not-cached-model")
    assert time.perf_counter() - start < 30


def test_metadata_naming_a_missing_file(lorakit_image_folder):
    with open(lorakit_image_folder / "metadata.jsonl", "a") as fh:
        fh.write("\n" + json.dumps({"file_name": "ghost.png", "text": "boo"}))
    with pytest.raises(LorakitError, match="ghost.png, which is not in"):
        load_captioned_images(str(lorakit_image_folder))


def test_broken_metadata_line_is_named(lorakit_image_folder):
    with open(lorakit_image_folder / "metadata.jsonl", "a") as fh:
        fh.write("\n{not json")
    with pytest.raises(LorakitError, match="line 14 is not valid JSON"):
        load_captioned_images(str(lorakit_image_folder))


def test_only_unreadable_images(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(LorakitError, match="none of the 1 images could be read"):
        load_captioned_images(str(tmp_path))


def test_prepare_image_records_original_size_and_crop():
    img = Image.new("RGB", (200, 100), (10, 20, 30))
    pixels, original, crop = prepare_image(img, 64, Augment())
    assert pixels.shape == (3, 64, 64) and original == (100, 200)
    assert crop == (0, 32)  # resized to 128x64, centre crop starts 32 px in
    assert abs(float(pixels[0, 0, 0]) - (10 / 127.5 - 1)) < 1e-6

    _, _, left_crop = prepare_image(img, 64, Augment(crop_jitter=0.0))
    _, _, flipped = prepare_image(img, 64, Augment(flip=True, crop_jitter=0.0))
    assert left_crop == (0, 0) and flipped == (0, 64)


def test_flip_mirrors_the_image():
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 32, 64))  # left half white
    plain, _, _ = prepare_image(img, 64, Augment())
    flipped, _, _ = prepare_image(img, 64, Augment(flip=True))
    assert float(plain[0, 0, 0]) == 1.0 and float(flipped[0, 0, 0]) == -1.0


def test_augmentation_is_a_pure_function_of_seed_epoch_and_image():
    draws = [augment_for(0, e, "k", True, True) for e in range(20)]
    assert draws == [augment_for(0, e, "k", True, True) for e in range(20)]
    assert len({d.flip for d in draws}) == 2 and len({d.crop_jitter for d in draws}) > 10
    assert augment_for(0, 3, "k", False, False) == Augment()
