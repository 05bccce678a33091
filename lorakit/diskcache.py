"""The persistent encoding cache: sealed, memory-mapped safetensors shards in ``--cache-dir``.

Every entry (one image at one size and flip, or one caption through one encoder) is stored
under a key that hashes everything its tensors depend on (see :mod:`lorakit.cachekeys`), so
an entry found under a key is right and a stale one is never found. Nothing else is read.

A shard is written under a temporary name, fsynced and renamed into place: a shard under
its real name is complete. There is no shared index file to tear or to race on: the index is
the union of the sealed shards, each listing its entries (key, tensor names, a checksum of
their bytes) in its safetensors header. Each process writes its own shards (named by host,
pid and rank), so N processes of one run, or several runs, can fill one cache at once.
Tensors are stored in their exact dtype and read through ``safe_open`` (memory-mapped), one
entry at a time: a run's memory does not grow with the size of its dataset.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import uuid
from pathlib import Path

from lorakit import fsutil
from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

#: bumped when the shard layout changes; older layouts live in other subfolders, never read
LAYOUT = "v1"
#: a shard is sealed once it holds this many bytes of tensors (and at the end of a fill)
SHARD_BYTES = 16 * 2**20
_SUFFIX = ".safetensors"
#: the names of the files a cache folder's lorakit writes (nothing else there is lorakit's)
SHARD_NAME = re.compile(r"^shard-.+-\d+-\d+-[0-9a-f]{12}\.safetensors$")
TEMP_NAME = re.compile(r"^\.shard-.+-\d+-\d+-[0-9a-f]{12}\.safetensors" + re.escape(fsutil.TMP_SUFFIX) + "$")
PROBE_NAME = re.compile(r"^\.probe-\d+-[0-9a-f]{8}" + re.escape(fsutil.TMP_SUFFIX) + "$")


def default_cache_dir() -> Path:
    """``encodings`` in lorakit's cache folder: ``$LORAKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit`` (the user's cache, as huggingface_hub
    keeps its own under ``~/.cache``; never beside data that may be read-only or shared)."""
    if os.environ.get("LORAKIT_CACHE_DIR"):
        return Path(os.environ["LORAKIT_CACHE_DIR"]).expanduser() / "encodings"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lorakit" / "encodings"


def check_cache_dir(config) -> None:
    """Refuse, before anything loads (and without creating anything), a cache folder that is
    a file, lies under a file or in a folder this user cannot write."""
    if not (getattr(config, "cache", False) and getattr(config, "disk_cache", False)):
        return
    given = getattr(config, "cache_dir", None)
    root = Path(given).expanduser() if given else default_cache_dir()
    flag = f"--cache-dir {given}" if given else f"the encoding cache {root}"
    fix = "pass a writable folder with --cache-dir or use --no-disk-cache."
    if root.exists() and not root.is_dir():
        raise LorakitError(f"{flag} is a file, not a folder; {fix}")
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LorakitError(f"{flag} lies under {existing}, which is a file; {fix}")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise LorakitError(f"{flag} is not writable ({existing} is read-only for this user); {fix}")


def cache_folder(config) -> Path:
    """The folder of this run's cache (``--cache-dir`` or the default), checked writable."""
    given = getattr(config, "cache_dir", None)
    root = Path(given).expanduser() if given else default_cache_dir()
    flag = f"--cache-dir {given}" if given else f"the encoding cache {root}"
    if root.exists() and not root.is_dir():
        raise LorakitError(f"{flag} is a file, not a folder; pass a folder with --cache-dir or use --no-disk-cache.")
    folder = root / LAYOUT
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}{fsutil.TMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LorakitError(
            f"{flag} is not writable ({reason}); pass a writable folder with --cache-dir or use --no-disk-cache."
        ) from None
    return folder


def entry_checksum(tensors: dict) -> str:
    """xxh3-128 over an entry's tensor names, dtypes, shapes and bytes (checked on every read)."""
    import torch

    from lorakit.cachekeys import _fast_hash

    h = _fast_hash()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


class ShardStore:
    """The sealed shards of one cache folder: ``key in store``, ``store.get(key)``, ``store.put``."""

    def __init__(self, folder: Path, rank: int = 0):
        self.folder, self.rank = Path(folder), rank
        self.index: dict[str, tuple[str, int]] = {}  # key -> (shard file name, entry number)
        self.image_sizes: dict[str, tuple] = {}  # image content hash -> (width, height), noted by writers
        self._entries: dict[str, list] = {}  # shard name -> [(tensor names, checksum bytes)] per entry
        self._names: dict = {}  # one tuple per distinct set of tensor names (memory per entry stays small)
        self._open: dict = {}
        self._pending: list = []  # (key, tensors, info) not yet in a sealed shard
        self._pending_bytes = 0
        self._remove_dead_temporaries()
        self.refresh()

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Add the shards sealed since the last look (by this or any other process); forget
        those deleted since (a user may delete the cache at any time)."""
        from safetensors import safe_open

        listing = sorted(self.folder.glob(f"shard-*{_SUFFIX}"))
        if set(self._entries) - {p.name for p in listing}:  # shards deleted: index the rest anew
            self.index, self.image_sizes, self._entries, self._open = {}, {}, {}, {}
        for path in listing:
            if path.name in self._entries:
                continue
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    entries = json.loads((f.metadata() or {})["lorakit_entries"])
            except Exception as exc:  # damaged after it was sealed (the rename makes a torn one impossible)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("encoding cache: ignoring unreadable shard %s (%s)", path, reason)
                self._entries[path.name] = []
                continue
            self._add(path.name, entries)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> dict | None:
        """The tensors of ``key`` (read from the memory-mapped shard), or None when absent or
        damaged (its checksum no longer matches: the caller encodes afresh)."""
        where = self.index.get(key)
        if where is None:
            return None
        name, number = where
        names, checksum = self._entries[name][number]
        try:
            handle = self._handle(name)
            tensors = {t: handle.get_tensor(f"{number}/{t}") for t in names}
        except Exception:  # the shard was truncated or deleted under us
            tensors = None
        if tensors is None and not (self.folder / name).exists():  # e.g. `lorakit cache prune` removed it
            log.warning("encoding cache: %s was removed while this run used it; encoding its entries afresh", name)
            self.index = {k: v for k, v in self.index.items() if v[0] != name}
            return None
        if tensors is None or entry_checksum(tensors) != checksum.hex():
            log.warning("encoding cache: entry %s in %s is damaged; encoding it afresh", key[:12], name)
            del self.index[key]
            return None
        return tensors

    def _handle(self, name: str):
        """The shard, memory-mapped; opening it marks it used (its mtime: the content of a sealed
        shard never changes, so its mtime says when a run last read it, for ``lorakit cache prune``)."""
        from safetensors import safe_open

        if name not in self._open:
            path = self.folder / name
            self._open[name] = safe_open(str(path), framework="pt", device="cpu")
            try:
                os.utime(path)
            except OSError:  # another user's shared cache: read, not marked
                pass
        return self._open[name]

    def close(self) -> None:
        self._open.clear()

    # ------------------------------------------------------------------ writing
    def put(self, key: str, tensors: dict, info: dict | None = None) -> None:
        """Queue an entry; it is readable (by anyone) once its shard is sealed (:meth:`flush`)."""
        own = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        self._pending.append((key, own, info or {}))
        self._pending_bytes += sum(v.numel() * v.element_size() for v in own.values())
        if self._pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Seal the queued entries into one new shard: temporary name, fsync, atomic rename."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        tensors, entries = {}, []
        for number, (key, own, info) in enumerate(self._pending):
            tensors.update({f"{number}/{k}": v for k, v in own.items()})
            entries.append({"key": key, "tensors": sorted(own), "checksum": entry_checksum(own), "info": info})
        stem = f"shard-{socket.gethostname()}-{os.getpid()}-{self.rank}-{uuid.uuid4().hex[:12]}"
        final = self.folder / f"{stem}{_SUFFIX}"
        tmp = self.folder / f".{stem}{_SUFFIX}{fsutil.TMP_SUFFIX}"
        try:
            save_file(tensors, str(tmp), metadata={"lorakit_entries": json.dumps(entries)})
            fsutil.fsync_file(tmp)
            fsutil.publish(tmp, final)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, Exception) and fsutil.is_disk_full(exc):
                raise LorakitError(
                    f"the disk holding the encoding cache {self.folder.parent} is full; free space, pass another "
                    "--cache-dir or use --no-disk-cache."
                ) from None
            raise
        self._pending, self._pending_bytes = [], 0
        self._add(final.name, entries)

    def _add(self, name: str, entries: list) -> None:
        """Index a sealed shard's entries (as its header lists them), keeping little per entry."""
        compact = []
        for number, entry in enumerate(entries):
            names = tuple(entry["tensors"])
            compact.append((self._names.setdefault(names, names), bytes.fromhex(entry["checksum"])))
            self.index.setdefault(entry["key"], (name, number))
            info = entry.get("info") or {}
            if "content" in info and "image_size" in info:
                self.image_sizes.setdefault(info["content"], tuple(info["image_size"]))
        self._entries[name] = compact

    def _remove_dead_temporaries(self) -> None:
        """Temporary shards left by a killed process of this host (its pid no longer runs)."""
        host = socket.gethostname()
        for tmp in self.folder.glob(f".shard-*{fsutil.TMP_SUFFIX}"):
            stem = tmp.name[len(".shard-") : -len(_SUFFIX + fsutil.TMP_SUFFIX)]
            parts = stem.rsplit("-", 3)  # host (may hold dashes), pid, rank, random
            if len(parts) == 4 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_STORES: dict = {}


def open_store(config, rank: int = 0) -> ShardStore:
    """The run's store: the data loader and the cache of one run (one config) share it."""
    folder = cache_folder(config)
    run, store = _STORES.get(folder, (None, None))
    if store is None or run is not config:
        store = ShardStore(folder, rank)
        _STORES.clear()  # one run at a time keeps its store; an earlier run's is not reused
        _STORES[folder] = (config, store)
    else:
        store.rank = rank
        store.refresh()
    return store


def readable_in_cache(config):
    """``sample -> bool``: whether an image with the sample's content was decoded (and encoded)
    by an earlier run, so checking that it decodes can be skipped; None without a disk cache."""
    if not (getattr(config, "cache", False) and getattr(config, "disk_cache", False)):
        return None
    sizes = open_store(config).image_sizes
    return lambda sample: sample.digest is not None and sample.digest() in sizes


class LazyEntries:
    """A read-only mapping ``{name: tensors}`` over a store: ``name`` (a sample's
    ``(key, flip)``, or a caption) -> its entry key. Entries are read when asked for."""

    def __init__(self, store: ShardStore):
        self.store, self.keys_by_name = store, {}

    def get(self, name, default=None):
        key = self.keys_by_name.get(name)
        found = None if key is None else self.store.get(key)
        return default if found is None else found

    def __getitem__(self, name):
        found = self.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def __contains__(self, name) -> bool:
        key = self.keys_by_name.get(name)
        return key is not None and key in self.store

    def __len__(self) -> int:
        return len(self.keys_by_name)

    def __iter__(self):
        return iter(self.keys_by_name)

    def keys(self):
        return self.keys_by_name.keys()

    def values(self):
        return [self[name] for name in self.keys_by_name]

    def items(self):
        return [(name, self[name]) for name in self.keys_by_name]
