"""Files that are either complete or absent: write under a temporary name, fsync the file,
rename it into place, fsync the folder. A kill, a crash or a full disk at any moment leaves
the earlier version (or nothing), never half a file under the real name.

A folder can be *sealed*: a checksums file, written last, records the size and sha256 of
every file in it, so that damage done later (truncation, zeroed or flipped bytes, a deleted
file) is found before the folder is trusted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

#: suffix of lorakit's temporary files; one left by a kill is removed at the next start
TMP_SUFFIX = ".lorakit-tmp"
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# safetensors (Rust) and torch's zip writer report a full disk in their own exception types
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path`` and fsync it (the one writer lorakit's own
    checkpoint and output files go through)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Atomically make ``path`` hold ``data``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    try:
        write_bytes(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish(src: Path, dst: Path) -> None:
    """Rename the complete ``src`` to ``dst`` (same filesystem) and make the rename durable."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_space(path: Path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the disk or the quota is full."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(exc).lower() for text in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def seal(folder: Path, name: str) -> None:
    """fsync every file in ``folder``, then write ``name`` (last) recording each one's size
    and sha256, then fsync the folder."""
    folder = Path(folder)
    entries = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != name:
            fsync_file(p)
            entries[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
    write_bytes(folder / name, json.dumps({"files": entries}, indent=1, sort_keys=True).encode())
    fsync_dir(folder)


def seal_problems(folder: Path, name: str) -> list[str] | None:
    """What no longer matches the seal ``name`` of ``folder``: ``[]`` when intact, None when
    the folder has no seal (written before seals existed)."""
    seal_path = Path(folder) / name
    if not seal_path.is_file():
        return None
    try:
        entries = json.loads(seal_path.read_text())["files"]
        sizes = {f: int(e["bytes"]) for f, e in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return [f"{name} is unreadable"]
    problems = []
    for f, expected in sizes.items():
        p = Path(folder) / f
        if not p.is_file():
            problems.append(f"{f} is missing")
            continue
        size = p.stat().st_size
        if size != expected:
            how = "empty" if size == 0 else "truncated" if size < expected else "longer than written"
            problems.append(f"{f} is {how} ({size} of {expected} bytes)")
        elif sha256_of(p) != entries[f].get("sha256"):
            problems.append(f"{f} does not match its checksum (corrupted bytes)")
    return problems
