"""The persistent encoding cache (lorakit.diskcache): reused across runs, keyed so that a stale
entry is never read, safe against a crash mid-build, and exact."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit import diskcache
from lorakit.errors import LorakitError
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer


@pytest.fixture
def model(lorakit_tiny_model):
    return lorakit_tiny_model("sd15")


@pytest.fixture
def data(tmp_path):
    target = tmp_path / "data"
    shutil.copytree(example_data(), target)
    return target


def run(model, data, out, cache_dir, **overrides):
    config = tiny_config("sd15", model, data, out, max_steps=2, batch_size=2, cache_dir=str(cache_dir), **overrides)
    trainer = Trainer(config).setup()
    result = trainer.run()
    return trainer, load_file(str(result.weights))


def images_in(folder) -> int:
    return len([p for p in os.listdir(folder) if p.endswith(".png")])


def captions_in(folder) -> int:
    return len({json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()})


def test_a_second_run_encodes_nothing_and_trains_bit_identically(model, data, tmp_path):
    first, a = run(model, data, tmp_path / "a", tmp_path / "cache")
    assert first.cache.encoded == {"images": images_in(data), "text": captions_in(data)}
    second, b = run(model, data, tmp_path / "b", tmp_path / "cache")
    assert second.cache.encoded == {}  # everything read from disk
    in_ram, c = run(model, data, tmp_path / "c", tmp_path / "unused", disk_cache=False)
    assert not (tmp_path / "unused").exists()  # --no-disk-cache writes no cache
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    # what a batch reads from disk is exactly what the in-memory cache held
    for name in first.cache.image_cache:
        assert all(torch.equal(v, in_ram.cache.image_cache[name][k]) for k, v in second.cache.image_cache[name].items())


def test_what_changes_is_re_encoded_and_nothing_else(model, data, tmp_path, lorakit_tiny_model):
    cache = tmp_path / "cache"
    n_images, n_captions = images_in(data), captions_in(data)
    run(model, data, tmp_path / "o1", cache)
    assert run(model, data, tmp_path / "o2", cache, resolution=48)[0].cache.encoded == {"images": n_images}
    flipped = run(model, data, tmp_path / "o3", cache, random_flip=True)[0]
    assert flipped.cache.encoded == {"images": n_images}  # the flipped copies only
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "red.png")  # one image changes
    assert run(model, data, tmp_path / "o4", cache)[0].cache.encoded == {"images": 1}
    other = lorakit_tiny_model("sd15", seed=1)
    assert run(model, data, tmp_path / "o5", cache, vae=str(other))[0].cache.encoded == {"images": n_images}
    # the other model's images were encoded by its VAE in o5 already: only its captions are new
    assert run(other, data, tmp_path / "o6", cache)[0].cache.encoded == {"text": n_captions}
    assert run(model, data, tmp_path / "o7", cache)[0].cache.encoded == {}  # the first run's entries still serve
    # --random-crop: images are encoded every step (each crop differs), nothing new is cached
    assert run(model, data, tmp_path / "o8", cache, center_crop=False)[0].cache.encoded == {}


def test_a_crop_change_re_encodes_only_the_images_it_moves(model, tmp_path):
    data = tmp_path / "shapes"
    data.mkdir()
    rows = []
    for name, size in (("square1", (64, 64)), ("square2", (64, 64)), ("wide", (96, 48)), ("tall", (48, 96))):
        Image.new("RGB", size, (len(name) * 20, 90, 30)).save(data / f"{name}.png")
        rows.append(json.dumps({"file_name": f"{name}.png", "text": name}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    run(model, data, tmp_path / "a", cache)
    bucketed = run(model, data, tmp_path / "b", cache, buckets=True)[0]
    assert bucketed.cache.encoded == {"images": 2}  # the squares keep their 32x32 crop; wide and tall move


def test_an_interrupted_build_resumes_and_a_torn_shard_is_never_read(model, data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(diskcache, "SHARD_BYTES", 1)  # every entry sealed in its own shard
    from lorakit import cache as cache_module

    real, calls = cache_module.EncodingCache.encode_images, []

    def dies_on_the_second_chunk(self, prepared):
        calls.append(len(prepared))
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill mid-build
        return real(self, prepared)

    monkeypatch.setattr(cache_module.EncodingCache, "encode_images", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(model, data, tmp_path / "a", cache)
    monkeypatch.setattr(cache_module.EncodingCache, "encode_images", real)
    folder = cache / diskcache.LAYOUT
    sealed = sorted(folder.glob("shard-*.safetensors"))
    assert len(sealed) == calls[0]  # the first chunk's entries, each in a sealed shard
    # a torn shard (a temporary a killed process left) and a shard damaged after sealing
    torn = folder / f".shard-{socket.gethostname()}-999999999-0-deadbeef.safetensors{diskcache.fsutil.TMP_SUFFIX}"
    torn.write_bytes(sealed[0].read_bytes()[:100])
    sealed[1].write_bytes(sealed[1].read_bytes()[:50])
    resumed, weights = run(model, data, tmp_path / "b", cache)
    assert not torn.exists()
    assert resumed.cache.encoded["images"] == images_in(data) - calls[0] + 1  # the damaged shard's entry again
    _, fresh = run(model, data, tmp_path / "c", tmp_path / "other-cache")
    assert all(torch.equal(weights[k], fresh[k]) for k in fresh)


def test_a_damaged_entry_is_encoded_afresh_not_trained_on(model, data, tmp_path, caplog):
    cache = tmp_path / "cache"
    _, a = run(model, data, tmp_path / "a", cache)
    for shard in (cache / diskcache.LAYOUT).glob("shard-*.safetensors"):
        raw = bytearray(shard.read_bytes())
        raw[-4:] = b"\xff\xff\xff\x7f"  # a flipped value inside the last tensor: the header still parses
        shard.write_bytes(bytes(raw))
    _, b = run(model, data, tmp_path / "b", cache)
    assert "damaged; encoding it afresh" in caplog.text
    # the NaN written into the entry never reached a step (fresh encodings batch differently: ~1e-7)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_entries_keep_their_exact_dtype_and_carry_their_keys(tmp_path):
    store = diskcache.ShardStore(tmp_path)
    tensors = {"x": torch.randn(3, 4, dtype=torch.bfloat16), "n": torch.arange(5)}
    store.put("k1", tensors, {"content": "c", "image_size": [7, 5]})
    assert "k1" not in diskcache.ShardStore(tmp_path)  # not readable by anyone before its shard is sealed
    store.flush()
    again = diskcache.ShardStore(tmp_path)
    got = again.get("k1")
    assert {k: (v.dtype, v.tolist()) for k, v in got.items()} == {k: (v.dtype, v.tolist()) for k, v in tensors.items()}
    assert again.image_sizes == {"c": (7, 5)}
    [shard] = tmp_path.glob("shard-*.safetensors")
    with safe_open(str(shard), framework="pt") as f:
        assert [e["key"] for e in json.loads(f.metadata()["lorakit_entries"])] == ["k1"]


def test_the_default_folder_is_the_users_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "mine"))
    assert diskcache.default_cache_dir() == tmp_path / "mine" / "encodings"
    monkeypatch.delenv("LORAKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert diskcache.default_cache_dir() == tmp_path / "xdg" / "lorakit" / "encodings"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert diskcache.default_cache_dir() == tmp_path / "home" / ".cache" / "lorakit" / "encodings"


def test_an_unwritable_cache_dir_is_one_line(model, data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LorakitError, match="is a file, not a folder"):
        run(model, data, tmp_path / "a", blocker)
    with pytest.raises(LorakitError, match="lies under .*which is a file"):
        run(model, data, tmp_path / "b", blocker / "sub")


def test_a_dataset_row_is_read_only_when_asked_for(tmp_path):
    import hashlib
    import io
    import tracemalloc

    import datasets
    import numpy as np

    from lorakit.data import load_captioned_images

    rng, raw = np.random.default_rng(0), []
    for _ in range(200):  # incompressible 128 px images: ~10 MB of PNG bytes in all
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
        raw.append(buf.getvalue())
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [{"bytes": b, "path": None} for b in raw], "text": [f"noise {i}" for i in range(200)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    tracemalloc.start()
    samples = load_captioned_images(str(tmp_path / "ds")).samples()  # every image decoded once to check it
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert held < sum(map(len, raw)) / 5, held  # the samples hold row numbers, not the images' bytes
    assert samples[7].digest() == hashlib.sha256(raw[7]).hexdigest()
    assert np.array_equal(np.asarray(samples[7].open()), np.asarray(Image.open(io.BytesIO(raw[7])).convert("RGB")))


def test_two_processes_each_encode_half_and_read_the_whole(model, data, tmp_path):
    """Under `accelerate launch` with 2 CPU processes, each encodes its share of the missing
    entries into its own shards; both then train from the shared cache."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lorakit.cli", "train",
         "--arch", "sd15", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
         "--resolution", "32", "--num-threads", "1", "--max-steps", "1", "--cache-dir", str(cache)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # in a log (not a terminal) the main process's share is shown in lines, labelled as its share
    shown = [line for line in proc.stdout.splitlines() if line.startswith("caching")]
    assert shown and all(line.startswith("caching (this process's share, 1 of 2): ") for line in shown), proc.stdout
    done, total = shown[-1].split(": ", 1)[1].split(" ", 1)[0].split("/")
    assert done == total
    by_rank: dict = {}
    for shard in (cache / diskcache.LAYOUT).glob("shard-*.safetensors"):
        rank = int(shard.name.rsplit("-", 2)[1])
        with safe_open(str(shard), framework="pt") as f:
            by_rank.setdefault(rank, []).extend(e["key"] for e in json.loads(f.metadata()["lorakit_entries"]))
    keys = [k for ks in by_rank.values() for k in ks]
    assert len(keys) == len(set(keys)) == images_in(data) + captions_in(data)  # every entry once, none twice
    assert int(total) == len(by_rank[0])  # the bar's total: what the main process encoded
    assert sorted(by_rank) == [0, 1] and all(len(ks) >= len(keys) // 3 for ks in by_rank.values())
    # a 1-process run afterwards finds everything both wrote
    assert run(model, data, tmp_path / "again", cache)[0].cache.encoded == {}


def test_a_second_run_decodes_no_image_to_check_it(model, data, tmp_path, monkeypatch):
    """An image whose content is cached decoded before: the up-front check skips it (it is
    decoded only where a batch needs its size or pixels); a new image is still checked."""
    from lorakit.data import samples as samples_module

    run(model, data, tmp_path / "a", tmp_path / "cache")
    decoded = []
    real = samples_module.decode_image
    monkeypatch.setattr(samples_module, "decode_image", lambda path: decoded.append(path) or real(path))
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = (data / "metadata.jsonl").read_text() + json.dumps({"file_name": "broken.png", "text": "x"}) + "\n"
    (data / "metadata.jsonl").write_text(rows)
    second = run(model, data, tmp_path / "b", tmp_path / "cache")[0]
    assert [p.name for p in decoded] == ["broken.png"]  # skipped with a warning, as before; nothing else decoded
    assert second.cache.encoded == {} and len(second.dataset) == images_in(data) - 1


def test_a_dataset_on_disk_is_cached_by_row_content(model, tmp_path):
    """A save_to_disk dataset: rows are keyed by their image bytes, so a copy of the dataset
    reuses every entry and a changed row re-encodes that row only."""
    import io

    import datasets

    def save(folder, colours):
        images = []
        for colour in colours:
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), colour).save(buf, format="PNG")
            images.append({"bytes": buf.getvalue(), "path": None})
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        rows = {"image": images, "text": [f"colour {c}" for c in colours]}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))

    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]
    save(tmp_path / "ds", colours)
    cache = tmp_path / "cache"
    assert run(model, tmp_path / "ds", tmp_path / "a", cache)[0].cache.encoded == {"images": 4, "text": 4}
    save(tmp_path / "copy", colours)  # another folder, another fingerprint: the same contents
    assert run(model, tmp_path / "copy", tmp_path / "b", cache)[0].cache.encoded == {}
    save(tmp_path / "changed", colours[:3] + [(1, 2, 3)])  # one row's image (and so its caption) changes
    changed = run(model, tmp_path / "changed", tmp_path / "c", cache)[0]
    assert changed.cache.encoded == {"images": 1, "text": 1}


def test_image_interpolation_mode_resizes_with_its_filter_and_keys_the_cache(model, data, tmp_path):
    """--image-interpolation-mode: another filter gives other pixels, so other encodings (the
    images re-encoded, the captions reused) and another LoRA; bicubic is the default."""
    from lorakit.images import Augment, prepare_image

    wide = Image.effect_noise((96, 64), 60).convert("RGB")
    bicubic = prepare_image(wide, 32, Augment())[0]
    assert torch.equal(prepare_image(wide, 32, Augment(), interpolation="bicubic")[0], bicubic)
    lanczos = prepare_image(wide, 32, Augment(), interpolation="lanczos")[0]
    assert not torch.equal(lanczos, bicubic) and lanczos.shape == bicubic.shape
    cache = tmp_path / "cache"
    default, a = run(model, data, tmp_path / "a", cache)
    assert default.config.image_interpolation_mode == "bicubic"
    other, b = run(model, data, tmp_path / "b", cache, image_interpolation_mode="lanczos")
    assert other.cache.encoded == {"images": images_in(data)}
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert run(model, data, tmp_path / "c", cache, image_interpolation_mode="lanczos")[0].cache.encoded == {}
