"""`lorakit cache info` and `lorakit cache prune`: what a user sees of the encoding cache, and
removing whole shards from it, least recently used first, without ever touching a file that
lorakit did not write, and safely while a run uses the cache."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorakit import cachefill, cachetools, diskcache
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

DAY = 86400


def make_cache(root, monkeypatch, ages_days=(40, 20, 10, 1)) -> list:
    """A cache with one real shard per entry (``ShardStore`` as a run writes them), each last
    used ``ages_days`` ago; returns the shard paths, oldest use first."""
    monkeypatch.setattr(diskcache, "SHARD_BYTES", 1)  # every entry sealed in its own shard
    folder = root / diskcache.LAYOUT
    folder.mkdir(parents=True)
    store = diskcache.ShardStore(folder)
    for i in range(len(ages_days)):
        store.put(f"key{i}", {"latents": torch.full((4, 64), float(i))})
    shards = [folder / store.index[f"key{i}"][0] for i in range(len(ages_days))]
    now = time.time()
    for shard, age in zip(shards, ages_days):
        os.utime(shard, (now - age * DAY, now - age * DAY))
    return shards


def foreign_files(root) -> list:
    """Files in the cache folder that lorakit did not write (a user's notes, a link, another folder)."""
    folder = root / diskcache.LAYOUT
    (folder / "notes.txt").write_text("mine")
    (folder / "shard-mine.safetensors").write_bytes(b"not lorakit's name pattern")
    (root / "README").write_text("mine too")
    (folder / "link.safetensors").symlink_to(root / "README")
    return [folder / "notes.txt", folder / "shard-mine.safetensors", root / "README", folder / "link.safetensors"]


def cli(*argv):
    result = CliRunner().invoke(app, [str(a) for a in argv])
    return result.exit_code, result.output


def test_info_shows_shards_entries_size_and_use(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    shards = make_cache(root, monkeypatch)
    code, out = cli("cache", "info", "--cache-dir", root)
    assert code == 0, out
    size = sum(p.stat().st_size for p in shards)
    assert out.splitlines()[0] == f"encoding cache {root}"
    assert f"4 shards, 4 entries, {diskcache.fsutil.human_size(size)} on disk" in out
    assert "oldest" in out and "(40 days ago)" in out and "(24 hours ago)" in out


def test_prune_older_than_removes_only_unused_shards_and_never_a_users_file(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    shards = make_cache(root, monkeypatch)
    theirs = foreign_files(root)
    folder = root / diskcache.LAYOUT
    dead = folder / f".shard-{socket.gethostname()}-999999999-0-0123456789ab.safetensors{diskcache.fsutil.TMP_SUFFIX}"
    live = folder / f".shard-{socket.gethostname()}-{os.getpid()}-0-0123456789ab.safetensors{diskcache.fsutil.TMP_SUFFIX}"
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"x" * 100)

    code, out = cli("cache", "prune", "--cache-dir", root, "--older-than", "15d", "--dry-run")
    assert code == 0 and out.startswith("would remove 2 of 4 shards (2 entries) and 1 temporary file"), out
    assert all(p.exists() for p in shards) and dead.exists()  # a dry run removes nothing
    assert shards[0].name in out and shards[1].name in out and shards[2].name not in out

    freed = diskcache.fsutil.human_size(sum(s.stat().st_size for s in shards[:2]) + dead.stat().st_size)
    code, out = cli("cache", "prune", "--cache-dir", root, "--older-than", "15d")
    left = diskcache.fsutil.human_size(sum(s.stat().st_size for s in shards[2:]))
    assert code == 0 and out.startswith("removed 2 of 4 shards (2 entries) and 1 temporary file"), out
    assert f"freed {freed}; 2 shards ({left}) remain in {root}" in out.splitlines()[0]
    assert [p.exists() for p in shards] == [False, False, True, True] and not dead.exists()
    assert live.exists() and "1 file being written by a running process (left alone)" in out
    assert all(p.exists() or p.is_symlink() for p in theirs) and (root / "README").read_text() == "mine too"
    assert "left alone (not lorakit's shards): v1/link.safetensors, v1/notes.txt, v1/shard-mine.safetensors, README" in out
    # what is left still reads: the store indexes the remaining shards
    store = diskcache.ShardStore(folder)
    assert sorted(store.index) == ["key2", "key3"] and torch.equal(store.get("key3")["latents"], torch.full((4, 64), 3.0))


def test_prune_max_size_removes_the_least_recently_used_first(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    shards = make_cache(root, monkeypatch, ages_days=(5, 30, 1, 10))
    one = shards[0].stat().st_size  # the shards are of one size
    assert cachetools.prune(str(root), max_size=str(2 * one)).startswith("removed 2 of 4 shards")
    assert [p.exists() for p in shards] == [True, False, True, False]  # 30 and 10 days unused went first
    assert cachetools.prune(str(root), max_size="0").startswith("removed 2 of 2 shards")
    assert not list((root / diskcache.LAYOUT).glob("shard-*"))


def test_a_shard_used_during_the_prune_is_kept(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    shards = make_cache(root, monkeypatch)
    real = cachetools.scan

    def a_run_reads_one_meanwhile(folder):
        listing = real(folder)
        os.utime(shards[0], (time.time() + 5, time.time() + 5))  # read by a run after the listing
        return listing

    monkeypatch.setattr(cachetools, "scan", a_run_reads_one_meanwhile)
    out = cachetools.prune(str(root), older_than="15d")
    assert out.startswith("removed 1 of 4 shards") and "1 shard kept: a run used them during the prune" in out
    assert shards[0].exists() and not shards[1].exists()


def test_sizes_and_ages_parse_and_bad_ones_are_one_line():
    assert cachetools.parse_size("20GB") == 20 * 10**9 and cachetools.parse_size("1.5TiB") == int(1.5 * 2**40)
    assert cachetools.parse_size("500mb") == 500 * 10**6 and cachetools.parse_size("0") == 0
    assert cachetools.parse_age("30d") == 30 * DAY and cachetools.parse_age("12h") == 12 * 3600
    assert cachetools.parse_age("2w") == 14 * DAY and cachetools.parse_age("90m") == 90 * 60
    for bad in ("3x", "d", "-1d", "30"):
        with pytest.raises(LorakitError, match=r"^--older-than .*: expected a number and a unit"):
            cachetools.parse_age(bad)
    with pytest.raises(LorakitError, match=r"^--max-size 20XB: expected a size"):
        cachetools.parse_size("20XB")


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    with pytest.raises(LorakitError, match=r"is not a lorakit encoding cache"):
        cachetools.info(str(tmp_path / "photos"))
    root = tmp_path / "cache"
    make_cache(root, monkeypatch)
    with pytest.raises(LorakitError, match=rf"is the v1 folder inside a cache; pass its parent {root}\.$"):
        cachetools.prune(str(root / "v1"), older_than="1d")
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "nothing-yet"))
    assert "(empty: no run has written it yet)" in cachetools.info()  # the default folder before any run


# ---------------------------------------------------------------------------- with runs
@pytest.fixture
def model(lorakit_tiny_model):
    return lorakit_tiny_model("sd15")


def run(model, out, cache_dir):
    config = tiny_config("sd15", model, example_data(), out, max_steps=2, batch_size=2, cache_dir=str(cache_dir))
    trainer = Trainer(config).setup()
    return trainer, load_file(str(trainer.run().weights))


def test_a_run_reading_a_shard_marks_it_used(model, tmp_path):
    cache = tmp_path / "cache"
    run(model, tmp_path / "a", cache)
    shards = list((cache / diskcache.LAYOUT).glob("shard-*.safetensors"))
    old = time.time() - 40 * DAY
    for shard in shards:
        os.utime(shard, (old, old))
    second, _ = run(model, tmp_path / "b", cache)
    assert second.cache.encoded == {}  # everything read from the shards
    assert cachetools.prune(str(cache), older_than="30d", dry_run=True).startswith("would remove 0 of")


def test_a_run_whose_shards_are_pruned_under_it_encodes_afresh(model, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    _, before = run(model, tmp_path / "a", cache)
    real = cachefill.fill_disk

    def pruned_right_after_the_fill(*args):
        real(*args)
        assert cachetools.prune(str(cache), max_size="0").startswith("removed ")  # every shard
        assert not list((cache / diskcache.LAYOUT).glob("shard-*"))

    monkeypatch.setattr(cachefill, "fill_disk", pruned_right_after_the_fill)
    trainer, after = run(model, tmp_path / "b", cache)
    assert trainer.cache.encoded == {}  # the fill found every entry, then they went
    assert "was removed while this run used it; encoding its entries afresh" in caplog.text
    # trained on fresh encodings of the same inputs (another batch shape: ~1e-7)
    assert after.keys() == before.keys() and all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)


def test_a_vanished_shard_reads_as_missing(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    shards = make_cache(root, monkeypatch, ages_days=(2, 1))
    store = diskcache.ShardStore(root / diskcache.LAYOUT)
    entries = diskcache.LazyEntries(store)
    entries.keys_by_name.update({"a": "key0", "b": "key1"})
    shards[0].unlink()
    assert entries.get("a") is None and "a" not in entries and entries.get("b") is not None
    store.refresh()
    assert sorted(store.index) == ["key1"] and torch.equal(entries["b"]["latents"], torch.full((4, 64), 1.0))
    shutil.rmtree(root / diskcache.LAYOUT)  # the whole cache deleted under a run
    store.refresh()
    assert len(store) == 0 and entries.get("b") is None
