"""--buckets: aspect-ratio buckets. The bucket list and batch order are pure functions,
every batch holds one bucket, sizes reach the arch, and resume and caching stay exact."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorakit.buckets import bucket_multiple, bucketed_batches, make_buckets, nearest_bucket
from lorakit.config import TrainConfig
from lorakit.data import Augment, prepare_image
from lorakit.errors import LorakitError
from lorakit.testing import tiny_config
from lorakit.training import Trainer

# (width, height) of the images; at resolution 64 they go to buckets 80x48, 48x80 and 64x64
SHAPES = {"wide": ((96, 64), 3), "tall": ((64, 96), 2), "square": ((64, 64), 3)}
BUCKET = {"wide": (80, 48), "tall": (48, 80), "square": (64, 64)}


@pytest.fixture
def mixed_data(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rows = []
    for name, ((w, h), count) in SHAPES.items():
        for i in range(count):
            img = Image.new("RGB", (w, h), (40 * i, 90, 200 - 50 * i))
            img.paste((250, 250, 250), (0, 0, w // 3, h // 2))  # not uniform, so crops differ
            img.save(folder / f"{name}{i}.png")
            rows.append({"file_name": f"{name}{i}.png", "text": f"a {name} picture {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def bucket_config(model, data, out, **overrides):
    return tiny_config("sd15", model, data, out, **{"resolution": 64, "buckets": True, "batch_size": 2, **overrides})


def weights(result):
    return load_file(str(result.weights))


def test_bucket_list_rules():
    for resolution in (64, 128, 512, 1024):
        m = bucket_multiple(resolution)
        found = make_buckets(resolution)
        assert (resolution, resolution) in found
        assert found == sorted({(h, w) for w, h in found})  # symmetric, sorted, no duplicates
        for w, h in found:
            assert w % m == 0 and h % m == 0
            assert w * h <= resolution * resolution
            assert 1 / 4 <= w / h <= 4
    assert bucket_multiple(1024) == 64 and bucket_multiple(128) == 8
    assert (1152, 896) in make_buckets(1024) and (896, 1152) in make_buckets(1024)
    assert make_buckets(1024) == make_buckets(1024)  # no state


def test_bucket_sides_keep_the_arch_size_multiple():
    for resolution in (64, 128, 512, 1024):
        assert make_buckets(resolution, 8) == make_buckets(resolution)  # the default: unchanged
        for multiple in (16, 32):
            found = make_buckets(resolution, multiple)
            assert (resolution, resolution) in found and len(found) > 1
            assert all(w % multiple == 0 and h % multiple == 0 for w, h in found)
    assert any(w % 16 for w, _ in make_buckets(64)) and not any(w % 16 for w, _ in make_buckets(64, 16))


def test_nearest_bucket_follows_the_aspect_ratio():
    found = make_buckets(64)
    assert nearest_bucket(96, 64, found) == (80, 48)
    assert nearest_bucket(64, 96, found) == (48, 80)
    assert nearest_bucket(500, 500, found) == (64, 64)
    assert nearest_bucket(10_000, 10, found) == (128, 32)  # beyond 4:1 goes to the widest
    assert nearest_bucket(1920, 1080, make_buckets(1024)) == (1344, 768)


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    sizes = [(64, 64)] * 5 + [(80, 48)] * 3 + [(48, 80)]
    a = bucketed_batches(sizes, 2, seed=0, epoch=3)
    assert a == bucketed_batches(sizes, 2, seed=0, epoch=3)
    assert len({str(bucketed_batches(sizes, 2, seed=0, epoch=e)) for e in range(5)}) > 1  # reshuffled
    assert all(len(b) == 2 and len({sizes[i] for i in b}) == 1 for b in a)  # one bucket, padded
    assert sorted({i for b in a for i in b}) == list(range(len(sizes)))  # every image each epoch
    # batches per epoch do not change from epoch to epoch (resume counts micro-batches)
    assert {len(bucketed_batches(sizes, 2, 0, e)) for e in range(10)} == {ceil_sum(sizes, 2)}


def ceil_sum(sizes, batch):
    return sum(math.ceil(sizes.count(s) / batch) for s in set(sizes))


def test_prepare_image_to_a_bucket():
    img = Image.new("RGB", (96, 64), (10, 20, 30))
    pixels, original, crop = prepare_image(img, 64, Augment(), size=(80, 48))
    assert pixels.shape == (3, 48, 80) and original == (64, 96)
    assert crop == (2, 0)  # covered at 80x53 (scale 5/6), centre crop of 48 rows starts at round(2.5) = 2
    _, _, top_crop = prepare_image(img, 64, Augment(crop_jitter=0.0), size=(80, 48))
    assert top_crop == (0, 0)


def test_default_is_square_crops(lorakit_tiny_model, mixed_data, tmp_path):
    assert TrainConfig().buckets is False
    trainer = Trainer(bucket_config(lorakit_tiny_model("sd15"), mixed_data, tmp_path / "o", buckets=False)).setup()
    for indices in trainer.epoch_batches(0):
        batch = trainer.make_batch(0, indices)
        assert batch["target_size"].tolist() == [[64, 64]] * len(indices)


def test_batches_hold_one_bucket_with_real_sizes(lorakit_tiny_model, mixed_data, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lorakit"):
        trainer = Trainer(bucket_config(lorakit_tiny_model("sd15"), mixed_data, tmp_path / "o", max_steps=4)).setup()
    assert "buckets: 64x64 (3), 80x48 (3), 48x80 (2)" in caplog.text
    seen = set()
    for epoch in (0, 1):
        batches = trainer.epoch_batches(epoch)
        assert len(batches) == 2 + 2 + 1  # 3 wide and 3 square each padded to 4, 2 tall
        for indices in batches:
            names = {re.match(r"[a-z]+", Path(trainer.dataset.examples[i][0].key).name).group() for i in indices}
            assert len(names) == 1
            name = names.pop()
            seen.add(name)
            batch = trainer.make_batch(epoch, indices)
            w, h = BUCKET[name]
            (orig_w, orig_h), _ = SHAPES[name]
            assert batch["target_size"].tolist() == [[h, w]] * 2
            assert batch["original_size"].tolist() == [[orig_h, orig_w]] * 2
            assert batch["latents"].shape[-2:] == (h // 8, w // 8)
            expected_crop = {"wide": [2, 0], "tall": [0, 2], "square": [0, 0]}[name]
            assert batch["crop_top_left"].tolist() == [expected_crop] * 2
    assert seen == set(SHAPES)
    result = trainer.run()
    assert all(math.isfinite(l) for l in result.losses)


def test_resume_is_exact_with_buckets(lorakit_tiny_model, mixed_data, tmp_path):
    model = lorakit_tiny_model("sd15")
    common = dict(max_steps=6, checkpoint_every=3, random_flip=True)
    straight = Trainer(bucket_config(model, mixed_data, tmp_path / "a", **common)).setup().run()
    Trainer(bucket_config(model, mixed_data, tmp_path / "b", **{**common, "max_steps": 3})).setup().run()
    trainer = Trainer(bucket_config(model, mixed_data, tmp_path / "b", **common, resume="latest")).setup()
    assert trainer.global_step == 3
    resumed = trainer.run()
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[3:] == resumed.losses


def test_resume_refuses_a_change_of_buckets(lorakit_tiny_model, mixed_data, tmp_path):
    model, out = lorakit_tiny_model("sd15"), tmp_path / "out"
    Trainer(bucket_config(model, mixed_data, out, max_steps=1, checkpoint_every=1, buckets=False)).setup().run()
    with pytest.raises(LorakitError, match="buckets: checkpoint False vs now True"):
        Trainer(bucket_config(model, mixed_data, out, max_steps=2, resume="latest")).setup()


def test_cached_and_fresh_encodings_train_the_same_with_buckets(lorakit_tiny_model, mixed_data, tmp_path):
    model = lorakit_tiny_model("sd15")
    cached = Trainer(bucket_config(model, mixed_data, tmp_path / "a", max_steps=3, random_flip=True)).setup()
    assert {tuple(v["latents"].shape[-2:]) for v in cached.image_cache.values()} == {(8, 8), (6, 10), (10, 6)}
    a = weights(cached.run())
    b = weights(Trainer(bucket_config(model, mixed_data, tmp_path / "b", max_steps=3, random_flip=True,
                                      cache=False)).setup().run())
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_random_crop_with_buckets_trains(lorakit_tiny_model, mixed_data, tmp_path):
    result = Trainer(bucket_config(lorakit_tiny_model("sd15"), mixed_data, tmp_path / "o", max_steps=3,
                                   center_crop=False)).setup().run()
    assert all(math.isfinite(l) for l in result.losses)


def test_sdxl_time_ids_carry_the_bucket(lorakit_tiny_model, mixed_data, tmp_path):
    from lorakit_plugins.sdxl import add_time_ids

    config = tiny_config("sdxl", lorakit_tiny_model("sdxl"), mixed_data, tmp_path / "o", resolution=64,
                         buckets=True, batch_size=2, max_steps=3)
    trainer = Trainer(config).setup()
    rows = set()
    for indices in trainer.epoch_batches(0):
        rows |= {tuple(r) for r in add_time_ids(trainer.make_batch(0, indices)).long().tolist()}
    assert rows == {(64, 96, 2, 0, 48, 80), (96, 64, 0, 2, 80, 48), (64, 64, 0, 0, 64, 64)}
    assert all(math.isfinite(l) for l in trainer.run().losses)


def test_cli_flag_turns_buckets_on(lorakit_tiny_model, mixed_data, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    out = tmp_path / "out"
    args = ["train", "--arch", "sd15", "--model", str(lorakit_tiny_model("sd15")), "--data", str(mixed_data),
            "--output", str(out), "--max-steps", "1", "--resolution", "64", "--num-threads", "1", "--buckets"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "lorakit_config.json").read_text())["buckets"] is True
