"""``--variant fp16``: a model folder's ``*.fp16.safetensors`` weights seen under their plain names.

diffusers and transformers name a variant's weights ``NAME.VARIANT.safetensors`` (shards
``NAME.VARIANT-0000i-of-0000n.safetensors`` with the index ``NAME.safetensors.index.VARIANT.json``)
and pick them with ``from_pretrained(..., variant=...)``. Rather than threading ``variant=``
through every arch's loaders, lorakit builds a view of the folder in its cache: symbolic links
to the variant's files under the names ``from_pretrained`` reads by default (a component
without variant files keeps its plain ones, as diffusers' pipelines fall back). Every loader
of every arch then reads the variant's own bytes; nothing is copied or converted.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from lorakit import fsutil
from lorakit.errors import LorakitError

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _is_weight(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or ".index." in name or name.endswith(".index.json")


def _variant_name(name: str, variant: str) -> str | None:
    """The name ``from_pretrained`` reads without a variant, for a variant file (None: not one)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2] == variant:
        return ".".join(parts[:-2] + parts[-1:])
    if re.fullmatch(rf"{re.escape(variant)}-\d+-of-\d+", parts[-2] if len(parts) >= 3 else ""):
        return name  # a shard: its index (renamed) names it as it is
    return None


def _plan(folder: Path, variant: str) -> dict:
    """``{relative link path: source file}`` of the view."""
    plan, found = {}, False
    for directory in [folder] + sorted(p for p in folder.rglob("*") if p.is_dir()):
        files = sorted(p for p in directory.iterdir() if p.is_file())
        chosen = {f.name: _variant_name(f.name, variant) for f in files}
        has_variant = any(v is not None for v in chosen.values())
        found = found or has_variant
        for f in files:
            rel = f.parent.relative_to(folder)
            if chosen[f.name] is not None:
                plan[str(rel / chosen[f.name])] = f
            elif not (has_variant and _is_weight(f.name)):
                plan.setdefault(str(rel / f.name), f)
    if not found:
        raise LorakitError(f"--variant {variant}: {folder} holds no *.{variant}.safetensors weights; drop --variant "
                           "or pass the variant the model has (e.g. fp16).")
    return plan


def variant_folder(folder: Path, variant: str, flag: str = "--model") -> Path:
    """A folder (in lorakit's cache) where ``folder``'s ``variant`` weights carry the plain names."""
    from lorakit.singlefile import cache_base

    folder = Path(folder).resolve()
    plan = _plan(folder, variant)
    ident = hashlib.sha256(f"{folder}|{variant}".encode())
    for rel, src in sorted(plan.items()):
        stat = src.stat()
        ident.update(f"|{rel}|{src}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = cache_base() / "variants" / f"{folder.name}-{variant}-{ident.hexdigest()[:16]}"
    if target.is_dir():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}{fsutil.TMP_SUFFIX}")
    fsutil.remove_tree(tmp)
    try:
        for rel, src in plan.items():
            link = tmp / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, link)
        try:
            fsutil.publish(tmp, target)
        except OSError:
            if not target.is_dir():  # another process publishing the same view is fine
                raise
    finally:
        fsutil.remove_tree(tmp)
    return target
