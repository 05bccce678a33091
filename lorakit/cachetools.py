"""``lorakit cache info`` and ``lorakit cache prune``: what the encoding cache holds, and
removing whole shards from it, least recently used first.

"Last used" is a shard's mtime: a sealed shard's content never changes after its rename, and
a run that reads from a shard touches it (:meth:`lorakit.diskcache.ShardStore._handle`), so
the mtime is when a run last wrote or read it. (atime is not used: mounts with noatime or
relatime do not keep it; a marker file per shard would double the files and could outlive
its shard.)

Only lorakit's own names are ever removed: sealed shards and the temporaries of processes
that no longer run. Anything else in the folder stays and is reported. A run using the cache
while a prune removes a shard keeps reading the shards it has open (memory-mapped) and
encodes afresh the entries of one it had not opened yet.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorakit import diskcache, fsutil
from lorakit.errors import LorakitError

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TIME_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: a probe (a zero-byte writability check) older than this was left by a killed process
_STALE_PROBE_S = 3600


def parse_size(text: str, flag: str = "--max-size") -> int:
    """``"20GB"`` -> bytes: KB, MB, GB, TB (or K, M, G, T) are powers of 1000, KiB ... TiB of 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise LorakitError(f"{flag} {text}: expected a size such as 500MB, 20GB or 1.5TiB.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_age(text: str, flag: str = "--older-than") -> float:
    """``"30d"`` -> seconds (units s, m, h, d, w)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-z]+)\s*", str(text).lower())
    if not match or match.group(2) not in _TIME_UNITS:
        raise LorakitError(f"{flag} {text}: expected a number and a unit s, m, h, d or w, such as 30d or 12h.")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


@dataclass
class Shard:
    path: Path
    size: int
    used: float  # mtime: sealed, or last read by a run
    entries: int | None  # None: its header is unreadable (damaged; runs ignore it)


@dataclass
class Listing:
    root: Path
    shards: list = field(default_factory=list)  # oldest use first
    dead: list = field(default_factory=list)  # temporaries of processes that no longer run
    busy: list = field(default_factory=list)  # temporaries of running processes (or other hosts)
    foreign: list = field(default_factory=list)  # not lorakit's: never touched

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def entries(self) -> int:
        return sum(s.entries or 0 for s in self.shards)


def cache_root(given: str | None) -> Path:
    """The cache folder (``--cache-dir`` or the default), checked to be a lorakit encoding cache."""
    root = Path(given).expanduser() if given else diskcache.default_cache_dir()
    flag = f"--cache-dir {given}" if given else f"the encoding cache {root}"
    if not root.exists():
        if given:
            raise LorakitError(f"{flag} does not exist; pass the folder given to lorakit train --cache-dir.")
        return root
    if not root.is_dir():
        raise LorakitError(f"{flag} is a file, not a folder; pass the folder given to lorakit train --cache-dir.")
    if not (root / diskcache.LAYOUT).is_dir():
        if root.name == diskcache.LAYOUT and any(diskcache.SHARD_NAME.match(p.name) for p in root.iterdir()):
            raise LorakitError(f"{flag} is the {diskcache.LAYOUT} folder inside a cache; pass its parent {root.parent}.")
        raise LorakitError(f"{flag} is not a lorakit encoding cache (it has no {diskcache.LAYOUT}/ folder of shards); "
                           "pass the folder given to lorakit train --cache-dir.")
    return root


def scan(root: Path) -> Listing:
    """What the cache folder holds, sorted into lorakit's shards, temporaries and the rest."""
    listing = Listing(root)
    folder = root / diskcache.LAYOUT
    if not folder.is_dir():
        return listing
    host, now = socket.gethostname(), time.time()
    for path in sorted(folder.iterdir()):
        try:
            st = path.lstat()
        except FileNotFoundError:  # removed meanwhile (a run's rename, another prune)
            continue
        regular = path.is_file() and not path.is_symlink()
        if regular and diskcache.SHARD_NAME.match(path.name):
            listing.shards.append(Shard(path, st.st_size, st.st_mtime, _entries(path)))
        elif regular and diskcache.TEMP_NAME.match(path.name):
            stem = path.name[len(".shard-"):-len(".safetensors" + fsutil.TMP_SUFFIX)]
            owner, pid = stem.rsplit("-", 3)[:2]
            dead = owner == host and not diskcache._alive(int(pid))
            (listing.dead if dead else listing.busy).append(path)
        elif regular and diskcache.PROBE_NAME.match(path.name):
            (listing.dead if now - st.st_mtime > _STALE_PROBE_S else listing.busy).append(path)
        else:
            listing.foreign.append(path)
    listing.foreign += [p for p in sorted(root.iterdir()) if p.name != diskcache.LAYOUT]
    listing.shards.sort(key=lambda s: s.used)
    return listing


def _entries(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # the header only; no torch needed
            return len(json.loads((f.metadata() or {})["lorakit_entries"]))
    except Exception:
        return None


def info(given: str | None = None) -> str:
    """``lorakit cache info``: the folder, its shards and entries, size on disk, oldest/newest use."""
    root = cache_root(given)
    listing = scan(root)
    lines = [f"encoding cache {root}" + ("" if root.exists() else " (empty: no run has written it yet)")]
    damaged = sum(s.entries is None for s in listing.shards)
    lines.append(f"  {_count(len(listing.shards), 'shard')}, {_count(listing.entries, 'entry', 'entries')}, "
                 f"{fsutil.human_size(listing.size)} on disk" + (f" ({damaged} unreadable, ignored by runs)" if damaged else ""))
    if listing.shards:
        oldest, newest = listing.shards[0].used, listing.shards[-1].used
        lines.append(f"  last used: oldest {_when(oldest)}, newest {_when(newest)}")
    lines += _others(listing)
    return "\n".join(lines)


def prune(given: str | None = None, older_than: str | None = None, max_size: str | None = None,
          dry_run: bool = False) -> str:
    """``lorakit cache prune``: remove whole shards, least recently used first: those unused for
    ``older_than``, then more until the cache is at most ``max_size``; and the temporaries of
    processes that no longer run. Returns what it removed (or would, with ``dry_run``)."""
    if older_than is None and max_size is None:
        raise LorakitError("lorakit cache prune: say what to remove with --older-than (e.g. 30d) and/or "
                           "--max-size (e.g. 20GB).")
    age = parse_age(older_than) if older_than is not None else None
    limit = parse_size(max_size) if max_size is not None else None
    root = cache_root(given)
    listing = scan(root)
    started = time.time()
    chosen, left = [], listing.size
    for shard in listing.shards:  # oldest use first
        if (age is not None and shard.used < started - age) or (limit is not None and left > limit):
            chosen.append(shard)
            left -= shard.size
    removed = chosen if dry_run else [s for s in chosen if _remove(s.path, started)]
    sizes = {p: _size(p) for p in listing.dead}
    temporaries = listing.dead if dry_run else [p for p in listing.dead if _remove(p, started)]
    freed = sum(s.size for s in removed) + sum(sizes[p] for p in temporaries)
    kept = [s for s in listing.shards if s not in removed]
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {len(removed)} of {_count(len(listing.shards), 'shard')} "
             f"({_count(sum(s.entries or 0 for s in removed), 'entry', 'entries')})"
             + (f" and {_count(len(temporaries), 'temporary file')} of stopped processes" if temporaries else "")
             + f", {'freeing' if dry_run else 'freed'} {fsutil.human_size(freed)}; "
             f"{_count(len(kept), 'shard')} ({fsutil.human_size(sum(s.size for s in kept))}) remain in {root}"]
    if dry_run:
        lines += [f"  {s.path.name}  {fsutil.human_size(s.size)}, last used {_when(s.used)}" for s in removed]
    skipped = len(chosen) - len(removed)
    if skipped:
        lines.append(f"  {_count(skipped, 'shard')} kept: a run used them during the prune")
    lines += _others(listing)
    return "\n".join(lines)


def _remove(path: Path, started: float) -> bool:
    """Unlink one of lorakit's files unless a run touched it since the prune began."""
    try:
        if path.stat().st_mtime > started:
            return False
        path.unlink()
        return True
    except FileNotFoundError:  # gone meanwhile (another prune): nothing freed here
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _others(listing: Listing) -> list[str]:
    lines = []
    if listing.busy:
        lines.append(f"  {_count(len(listing.busy), 'file')} being written by a running process (left alone)")
    if listing.foreign:
        names = ", ".join(str(p.relative_to(listing.root)) for p in listing.foreign[:5])
        more = f" and {len(listing.foreign) - 5} more" if len(listing.foreign) > 5 else ""
        lines.append(f"  left alone (not lorakit's shards): {names}{more}")
    return lines


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _when(t: float) -> str:
    ago = max(0.0, time.time() - t)
    span = (f"{ago / 86400:.0f} days ago" if ago >= 2 * 86400 else f"{ago / 3600:.0f} hours ago" if ago >= 7200
            else f"{ago / 60:.0f} minutes ago" if ago >= 120 else "just now")
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(t))} ({span})"
