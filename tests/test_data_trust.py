"""Data a user can trust: images train as a viewer shows them, captions are what was written
(or reported), only files inside the dataset folder are read, and per-sample randomness does
not depend on where the folder lives. Every refusal is one line naming the file and line."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from lorakit.data import Augment, decode_image, load_captioned_images, prepare_image
from lorakit.errors import LorakitError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def one_line_error(call, *needles) -> str:
    with pytest.raises(LorakitError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def write_jsonl(folder, rows):
    (folder / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))


def png(folder, name, colour=RED, size=(16, 16), mode="RGB"):
    Image.new(mode, size, colour).save(folder / name)
    return folder / name


# --- images: one decoder for every opener ---------------------------------------------


def rotated_jpeg_bytes() -> bytes:
    """A 40x20 JPEG, left half red, right half blue, tagged 'rotate 90 degrees clockwise'
    (EXIF orientation 6): a viewer shows it 20 wide, 40 tall, red on top."""
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def assert_upright(img):
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_exif_rotated_jpeg_trains_at_its_rotated_size_and_pixels(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(rotated_jpeg_bytes())
    (tmp_path / "photo.txt").write_text("a photo")
    sample = load_captioned_images(str(tmp_path)).samples()[0]
    assert_upright(sample.open())
    pixels, original_size, _ = prepare_image(sample.open(), 20, Augment(), size=(20, 40))
    assert original_size == (40, 20)  # (height, width) as shown
    assert float(pixels[0, 2, 10]) > 0.5 and float(pixels[2, 2, 10]) < -0.5  # red on top


def test_exif_rotation_is_applied_to_dataset_bytes_too(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": rotated_jpeg_bytes(), "path": None}], "text": ["a photo"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    assert_upright(load_captioned_images(str(tmp_path / "ds")).samples()[0].open())


def gradient16() -> np.ndarray:
    return (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)[None, :].repeat(8, axis=0)


def test_16_bit_grayscale_png_keeps_its_gradient(tmp_path):
    Image.fromarray(gradient16()).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    (tmp_path / "ramp.txt").write_text("a ramp")
    img = load_captioned_images(str(tmp_path)).samples()[0].open()
    assert img.mode == "RGB"
    row = np.asarray(img)[0, :, 0]
    assert row.tolist() == list(range(256))  # not 0 then 255 everywhere


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_wide_integer_modes_scale_by_bit_depth(mode):
    values = gradient16()
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (256, 8), values.astype(">u2").tobytes())
    elif mode == "I":
        img = Image.fromarray(values.astype(np.int32))
    else:
        img = Image.fromarray(values)
    assert img.mode == mode
    assert np.asarray(decode_image(img))[3, :, 1].tolist() == list(range(256))


def test_32_bit_values_scale_from_the_full_range():
    img = Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32))
    assert np.asarray(decode_image(img))[0, :, 0].tolist() == [0, 128, 255]


def test_transparent_pixels_become_the_white_background_not_their_hidden_colour(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere, ...
    rgba[0, 0, 3] = 0  # ... hidden under full transparency here,
    rgba[0, 1, 3] = 128  # half visible here,
    rgba[0, 2, 3] = 255  # and opaque here
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut-out.png")
    (tmp_path / "cut-out.txt").write_text("a cut-out")
    img = load_captioned_images(str(tmp_path)).samples()[0].open()
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == (255, 127, 127)
    assert img.getpixel((2, 0)) == RED


def test_la_and_palette_transparency_composite_too():
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    assert [decode_image(la).getpixel((x, 0)) for x in (0, 1)] == [WHITE, (0, 0, 0)]

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 (red) is transparent
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert [decode_image(buf.getvalue()).getpixel((x, 0)) for x in (0, 1)] == [WHITE, (0, 255, 0)]
    assert decode_image(la, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


def test_plain_rgb_images_decode_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    assert np.array_equal(np.asarray(decode_image(tmp_path / "x.png")), pixels)


# --- captions -----------------------------------------------------------------------


def test_captions_are_stripped_in_every_layout(tmp_path):
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    png(jsonl, "a.png")
    png(jsonl, "b.png")
    write_jsonl(jsonl, [{"file_name": "a.png", "text": "  a cat \n"}, {"file_name": "b.png", "text": ["\tfirst ", "x"]}])
    assert [s.caption for s in load_captioned_images(str(jsonl)).samples()] == ["a cat", "first"]

    table = tmp_path / "csv"
    table.mkdir()
    png(table, "a.png")
    (table / "metadata.csv").write_text('file_name,text\na.png,"  a dog  "\n')
    assert load_captioned_images(str(table)).samples()[0].caption == "a dog"

    sidecar = tmp_path / "sidecar"
    sidecar.mkdir()
    png(sidecar, "a.png")
    (sidecar / "a.txt").write_bytes(b"\xef\xbb\xbf  a bird\r\n")  # BOM and CRLF, as some editors write
    assert load_captioned_images(str(sidecar)).samples()[0].caption == "a bird"


def test_dataset_captions_are_stripped_and_none_is_empty(tmp_path):
    import datasets

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(buf, format="PNG")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": buf.getvalue(), "path": None}] * 2, "text": ["  red  ", None]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    samples = load_captioned_images(str(tmp_path / "ds")).samples()
    assert [s.caption for s in samples] == ["red", ""]


def test_empty_captions_are_reported_once_and_still_train(tmp_path, caplog):
    names = [f"img{i}.png" for i in range(6)]
    for name in names:
        png(tmp_path, name)
    captions = ["", "   ", "\n", "ok", [], "fine"]
    write_jsonl(tmp_path, [{"file_name": n, "text": c} for n, c in zip(names, captions)])
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        data = load_captioned_images(str(tmp_path))
    assert len(data) == 6
    assert [s.caption for s in data.samples()] == ["", "", "", "ok", "", "fine"]
    reports = [r.getMessage() for r in caplog.records if "empty" in r.getMessage()]
    assert len(reports) == 1, reports
    assert "4 of 6 captions" in reports[0]
    assert "img0.png, img1.png, img2.png, ..." in reports[0]


@pytest.mark.parametrize("caption", [3, 1.5, {"en": "a cat"}, None, True, [7]])
def test_a_caption_that_is_not_text_is_refused_naming_file_and_line(tmp_path, caption):
    png(tmp_path, "a.png")
    png(tmp_path, "b.png")
    write_jsonl(tmp_path, [{"file_name": "a.png", "text": "ok"}, "", {"file_name": "b.png", "text": caption}])
    one_line_error(
        lambda: load_captioned_images(str(tmp_path)),
        f"{tmp_path / 'metadata.jsonl'} line 3", "caption 'text'", "not text", "JSON string",
    )


def test_non_utf8_metadata_is_refused_naming_file_and_line(tmp_path):
    png(tmp_path, "a.png")
    png(tmp_path, "b.png")
    (tmp_path / "metadata.jsonl").write_bytes(
        b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "caf\xe9"}\n'
    )
    one_line_error(
        lambda: load_captioned_images(str(tmp_path)), f"{tmp_path / 'metadata.jsonl'} line 2", "not UTF-8", "UTF-8"
    )
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\na.png,ok\nb.png,caf\xe9\n")
    one_line_error(lambda: load_captioned_images(str(tmp_path)), f"{tmp_path / 'metadata.csv'} line 3", "not UTF-8")


def test_non_utf8_sidecar_caption_is_refused_naming_file_and_line(tmp_path):
    png(tmp_path, "a.png")
    (tmp_path / "a.txt").write_bytes(b"first line\n\xff\xfe second\n")
    one_line_error(lambda: load_captioned_images(str(tmp_path)), f"{tmp_path / 'a.txt'} line 2", "not UTF-8")


# --- only files inside the dataset folder ------------------------------------------------


@pytest.fixture
def nested(tmp_path):
    """``tmp_path/outside/x.png`` beside the dataset ``tmp_path/sets/mine``."""
    (tmp_path / "outside").mkdir()
    png(tmp_path / "outside", "x.png", BLUE)
    folder = tmp_path / "sets" / "mine"
    folder.mkdir(parents=True)
    png(folder, "ok.png")
    return folder


@pytest.mark.parametrize("entry", ["../../../../../../etc/passwd", "../../outside/x.png", "sub/../../../outside/x.png"])
def test_metadata_entries_leaving_the_folder_are_refused(nested, entry):
    write_jsonl(nested, [{"file_name": "ok.png", "text": "ok"}, {"file_name": entry, "text": "sneaky"}])
    one_line_error(
        lambda: load_captioned_images(str(nested)),
        f"{nested / 'metadata.jsonl'} line 2", f"'{entry}'", "outside the dataset folder", "copy the file into",
    )


def test_absolute_metadata_entries_are_refused(nested):
    target = str(nested.parent.parent / "outside" / "x.png")
    write_jsonl(nested, [{"file_name": target, "text": "sneaky"}])
    one_line_error(
        lambda: load_captioned_images(str(nested)), f"{nested / 'metadata.jsonl'} line 1", target, "absolute path"
    )
    write_jsonl(nested, [{"file_name": str(nested / "ok.png"), "text": "mine, but absolute"}])
    one_line_error(lambda: load_captioned_images(str(nested)), "absolute path", "relative to")


def test_metadata_symlink_pointing_outside_is_refused(nested):
    os.symlink(nested.parent.parent / "outside" / "x.png", nested / "link.png")
    write_jsonl(nested, [{"file_name": "link.png", "text": "sneaky"}])
    one_line_error(
        lambda: load_captioned_images(str(nested)), "line 1", "'link.png'", str(nested.parent.parent / "outside")
    )


def test_sidecar_symlinks_pointing_outside_are_refused(nested):
    (nested / "ok.txt").write_text("ok")
    os.symlink(nested.parent.parent / "outside" / "x.png", nested / "link.png")
    (nested / "link.txt").write_text("sneaky")
    one_line_error(lambda: load_captioned_images(str(nested)), "'link.png'", "outside the dataset folder")

    (nested / "link.png").unlink()
    png(nested, "link.png")
    (nested / "link.txt").unlink()
    (nested.parent.parent / "outside" / "secret.txt").write_text("a secret")
    os.symlink(nested.parent.parent / "outside" / "secret.txt", nested / "link.txt")
    one_line_error(lambda: load_captioned_images(str(nested)), "'link.txt'", "outside the dataset folder")


def test_links_inside_the_folder_and_a_linked_folder_are_fine(nested, tmp_path):
    os.symlink(nested / "ok.png", nested / "alias.png")
    write_jsonl(nested, [{"file_name": "alias.png", "text": "fine"}, {"file_name": "./sub/../ok.png", "text": "fine"}])
    (nested / "sub").mkdir()
    os.symlink(nested, tmp_path / "linked")
    assert [s.rng_key for s in load_captioned_images(str(tmp_path / "linked")).samples()] == ["ok.png"]


@pytest.mark.parametrize("kind", ["disk", "parquet"])
def test_dataset_path_columns_must_stay_inside_the_folder(nested, kind):
    import datasets

    ds = datasets.Dataset.from_dict({"file_name": ["ok.png", "../../outside/x.png"], "text": ["ok", "sneaky"]})
    if kind == "disk":
        ds.save_to_disk(str(nested / "ds"))
        (nested / "ds" / "ok.png").write_bytes((nested / "ok.png").read_bytes())
        where = nested / "ds"
    else:
        ds.to_parquet(str(nested / "train.parquet"))
        where = nested
    one_line_error(lambda: load_captioned_images(str(where)), "row 1", "'../../outside/x.png'", "outside")

    ds.select([0]).save_to_disk(str(nested / "good")) if kind == "disk" else ds.select([0]).to_parquet(
        str(nested / "train.parquet")
    )
    where = nested / "good" if kind == "disk" else nested
    if kind == "disk":
        (where / "ok.png").write_bytes((nested / "ok.png").read_bytes())
    assert load_captioned_images(str(where)).samples()[0].open().getpixel((0, 0)) == RED


# --- randomness does not depend on where the folder lives ----------------------------------


@pytest.mark.parametrize("layout", ["jsonl", "sidecar"])
def test_two_copies_of_a_dataset_give_equal_rng_keys(tmp_path, layout):
    first = tmp_path / "checkout-a" / "data"
    (first / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        png(first, name)
        (first / name).with_suffix(".txt").write_text(f"caption of {name}")
    if layout == "jsonl":
        write_jsonl(first, [{"file_name": "a.png", "text": "a"}, {"file_name": "sub/b.png", "text": "b"}])
    second = tmp_path / "elsewhere" / "ci" / "clone"
    shutil.copytree(first, second)
    one, two = (load_captioned_images(str(f)).samples() for f in (first, second))
    assert [s.rng_key for s in one] == [s.rng_key for s in two] == ["a.png", "sub/b.png"]
    assert [s.key for s in one] != [s.key for s in two]  # the cache identity stays the path
    assert [s.random_key for s in one] == ["a.png", "sub/b.png"]


def test_dataset_rows_are_keyed_by_index(tmp_path):
    import datasets

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(buf, format="PNG")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": buf.getvalue(), "path": None}] * 3, "text": ["a", "b", "c"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    for place in ("one", "two"):
        ds.save_to_disk(str(tmp_path / place))
    keys = [[s.rng_key for s in load_captioned_images(str(tmp_path / p)).samples()] for p in ("one", "two")]
    assert keys == [["0", "1", "2"]] * 2


def test_samples_without_rng_key_fall_back_to_key():
    from lorakit.data import Sample

    assert Sample("/abs/a.png", "", lambda: None).random_key == "/abs/a.png"


# --- through the command line: one line, exit 1 ---------------------------------------------


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("trust") / "model")


def test_cli_refuses_bad_data_in_one_line(sd15, nested, tmp_path):
    from test_cli import assert_one_line_error, run, train_args

    write_jsonl(nested, [{"file_name": "../../outside/x.png", "text": "sneaky"}])
    r = run(*train_args(sd15, nested, tmp_path / "out"))
    assert_one_line_error(r, "metadata.jsonl line 1", "../../outside/x.png", "outside the dataset folder")

    (nested / "metadata.jsonl").write_bytes(b'{"file_name": "ok.png", "text": "caf\xe9"}\n')
    r = run(*train_args(sd15, nested, tmp_path / "out"))
    assert_one_line_error(r, "metadata.jsonl line 1", "not UTF-8")

    write_jsonl(nested, [{"file_name": "ok.png", "text": 42}])
    r = run(*train_args(sd15, nested, tmp_path / "out"))
    assert_one_line_error(r, "metadata.jsonl line 1", "caption 'text' is 42")
