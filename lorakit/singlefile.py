"""Single-file base models (``--model model.safetensors``): recognised, converted once, cached.

A checkpoint in the original (ldm/SGM) layout goes through diffusers' own reader, the arch
pipeline's ``from_single_file(file, config=...)``; the pipeline it returns is saved once as a
diffusers folder in lorakit's cache, keyed by the file's sha256 and the config used. Every
later load (training, samples, class images, ``generate``) is then the ordinary folder path,
so a single file trains exactly as the same model saved as a folder does.

Which archs take single files, and which keys mark their checkpoints, is arch data
(``ArchInfo.single_file_keys``, read by :mod:`lorakit.filearch`); which components lorakit needs is
``ArchInfo.subfolders``.
Only safetensors are read: a ``.ckpt`` (a pickle, which can run code when loaded) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from lorakit import fsutil
from lorakit.errors import LorakitError
from lorakit.filearch import check_arch, checked_keys

log = logging.getLogger("lorakit")

#: Written last into a converted folder: where it came from and the size of every file.
MARKER = "lorakit_single_file.json"


def cache_base() -> Path:
    """``$LORAKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE_DIR"):
        return Path(os.environ["LORAKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lorakit"


def cache_root() -> Path:
    """Where converted single files live: ``single-file/`` of :func:`cache_base`."""
    return cache_base() / "single-file"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered per (path, size, mtime) so a multi-GB file is read once."""
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = cache_root() / "sha256" / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json")
    try:
        return json.loads(memo.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = fsutil.sha256_of(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fsutil.replace_file(memo, json.dumps({"file": ident, "sha256": digest}).encode())
    except OSError:
        pass  # an unwritable cache costs a re-hash next time, nothing else
    return digest


def _config_digest(folder: Path | None) -> str:
    """What a converted model depends on in the config folder: every file but the weights."""
    if folder is None:
        return "hub-default"
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".msgpack", ".onnx", ".h5")):
            digest.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()


def _sizes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def _intact(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
        return marker.get("files") == _sizes(folder)
    except (OSError, ValueError, AttributeError):
        return False


def _config_folder(path: Path, arch: str, model_config: str | None, flag: str) -> Path | None:
    """The local diffusers folder that supplies configs and tokenizers (None: diffusers fetches its default)."""
    from lorakit.models import resolve_config_source

    if model_config:
        folder = resolve_config_source(model_config)
        if not (folder / "model_index.json").is_file():
            raise LorakitError(f"--model-config {model_config} holds no model_index.json; pass the diffusers folder "
                               f"or hub id of the model {path.name} was made from.")
        from lorakit.models import read_model_index
        from lorakit.plugins import get_plugin_manager

        index = read_model_index(folder)
        if not get_plugin_manager(arch).hook.recognizes_model(model_index=index):
            raise LorakitError(f"--model-config {model_config} is a {index.get('_class_name') or 'unnamed'} model, not one "
                               f"--arch {arch} trains; pass the config of the {arch} model {path.name} was made from.")
        return folder
    if _offline():
        raise LorakitError(f"{flag} {path} is a single file and HF_HUB_OFFLINE is set: its configs and tokenizers "
                           f"cannot be fetched; pass --model-config with a local diffusers folder (or cached hub id) "
                           f"of an --arch {arch} model.")
    from lorakit.models import _hub_reachable

    if not _hub_reachable():
        raise LorakitError(f"cannot reach the Hugging Face Hub for the configs of {flag} {path}; check the network "
                           "or pass --model-config with a local diffusers folder.")
    return None


def file_dtype(path: Path):
    """The precision the converted folder is saved in, losing nothing: the file's floating dtype
    when all its tensors share one (an fp16 checkpoint stays fp16), else float32 (e.g. an fp16
    UNet beside an fp32 VAE: both exact in fp32)."""
    import torch
    from safetensors import safe_open

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    with safe_open(str(path), framework="pt") as f:
        found = {f.get_slice(key).get_dtype() for key in f.keys()} & set(names)
    return names[found.pop()] if len(found) == 1 else torch.float32


def model_folder(path, arch: str, model_config: str | None = None, flag: str = "--model") -> tuple[Path, str]:
    """``(diffusers folder, sha256)`` for the single-file checkpoint ``path`` of ``arch``:
    converted once by the pipeline's ``from_single_file`` into the cache, reused afterwards."""
    path = Path(path).expanduser()
    keys = checked_keys(path, flag)
    check_arch(path, keys, arch, flag)
    config_dir = _config_folder(path, arch, model_config, flag)
    sha = file_sha256(path)
    target = cache_root() / f"{sha[:20]}-{_config_digest(config_dir)[:12]}"
    if _intact(target):
        return target, sha
    from lorakit.plugins import arch_info

    info = arch_info(arch)
    with _conversion_lock(target):  # one process converts (N launched ranks, or two runs); the rest reuse it
        if not _intact(target):
            log.info("converting %s %s once into a diffusers folder: %s", flag, path, target)
            _convert(path, info, config_dir, target, {"source": str(path.resolve()), "sha256": sha, "arch": arch,
                                                      "model_config": str(config_dir) if config_dir else None})
    return target, sha


@contextlib.contextmanager
def _conversion_lock(target: Path):
    """An exclusive ``flock`` beside ``target`` while it is converted (none where unsupported)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows): the atomic publish alone keeps it right
        yield
        return
    with open(target.with_name(f".{target.name}.lock"), "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: the atomic publish alone keeps it right
            pass
        try:
            yield
        finally:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            except OSError:
                pass


def _convert(path: Path, info, config_dir: Path | None, target: Path, record: dict) -> None:
    import diffusers

    cls = getattr(diffusers, info.pipeline_class)
    # only what lorakit loads: no safety checker or image encoder fetched (or kept) with it
    unused = {name: None for name in getattr(cls, "_optional_components", ()) if name not in info.subfolders}
    kwargs = {"config": str(config_dir), "local_files_only": True} if config_dir else {}
    where = f"--model-config {config_dir}" if config_dir else "diffusers' default config"
    bars = diffusers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.disable_progress_bar()  # a run prints its own progress
    try:
        pipe = cls.from_single_file(str(path), torch_dtype=file_dtype(path), **kwargs, **unused)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LorakitError(f"--model {path} could not be read with {where} ({first}); pass the --model-config of the "
                           "model this checkpoint was made from.") from None
    finally:
        if bars:
            diffusers.utils.logging.enable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}{fsutil.TMP_SUFFIX}")
    fsutil.remove_tree(tmp)
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        for p in tmp.rglob("*"):
            if p.is_file():
                fsutil.fsync_file(p)
        record["files"] = _sizes(tmp)
        fsutil.write_bytes(tmp / MARKER, json.dumps(record, indent=2, sort_keys=True).encode())
        if target.exists():  # damaged, or another process finished first
            if _intact(target):
                return
            fsutil.remove_tree(target)
        fsutil.publish(tmp, target)
    except OSError as exc:
        if target.is_dir() and _intact(target):
            return  # another process published the same conversion
        if fsutil.is_disk_full(exc):
            raise LorakitError(f"the disk of {target.parent} is full while converting --model {path}; free space "
                               "or set LORAKIT_CACHE_DIR to a larger disk.") from None
        raise
    finally:
        fsutil.remove_tree(tmp)


def vae_from_file(path, config_folder: Path, dtype, flag: str = "--vae"):
    """An ``AutoencoderKL`` from a single-file VAE (original layout), with the config of the
    model's own ``vae/`` (``config_folder``)."""
    from diffusers import AutoencoderKL

    path = Path(path).expanduser()
    checked_keys(path, flag)
    if not (Path(config_folder) / "vae" / "config.json").is_file():
        raise LorakitError(f"{flag} {path} is a single file and --model has no vae/config.json to read it with; "
                           "pass the VAE as a diffusers folder or hub id.")
    try:
        return AutoencoderKL.from_single_file(str(path), config=str(config_folder), subfolder="vae",
                                              local_files_only=True, torch_dtype=dtype)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LorakitError(f"{flag} {path} is not a VAE that fits --model ({first}); pass the VAE made for it.") from None
