"""What a single-file checkpoint is, read from its header alone: safetensors or not, and of
which arch (``ArchInfo.single_file_keys``). A pickle (``.ckpt``) is refused unread."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError

#: Suffixes of pickled checkpoints: never loaded (unpickling a file can run code).
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def checked_keys(path: Path, flag: str = "--model") -> list[str]:
    """The tensor names of a safetensors file (its header only); anything else refused in one line."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LorakitError(
            f"{flag} {path} is a pickle checkpoint ({path.suffix}), which lorakit never loads (unpickling can run "
            "code); convert it to .safetensors (e.g. a safetensors export of the same model) and pass that."
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:
        raise LorakitError(
            f"{flag} {path} is not a safetensors file; pass a .safetensors checkpoint, a diffusers folder or a hub id."
        ) from None


def single_file_archs() -> dict:
    """``{arch id: ArchInfo}`` of the installed archs that take single-file checkpoints."""
    from lorakit.plugins import arch_entries, arch_info

    found = {}
    for arch in arch_entries():
        try:  # a broken plugin must not hide the answer for the others
            info = arch_info(arch)
        except Exception:
            continue
        if getattr(info, "single_file_keys", ()):
            found[arch] = info
    return found


def file_arch(keys, archs: dict) -> str | None:
    """The arch whose ``single_file_keys`` a checkpoint with ``keys`` holds (all of them)."""
    for arch, info in archs.items():
        if all(any(k.startswith(prefix) for k in keys) for prefix in info.single_file_keys):
            return arch
    return None


def check_arch(path: Path, keys, arch: str, flag: str = "--model") -> None:
    """Refuse a file that is not of ``--arch``, naming the arch it is of (or those that take single files)."""
    archs = single_file_archs()
    found = file_arch(keys, archs)
    if found == arch:
        return
    if found is not None:
        raise LorakitError(f"{flag} {path} is a single-file {found} checkpoint, which --arch {arch} cannot train; "
                           f"use --arch {found}.")
    takers = ", ".join(archs) or "none installed"
    if any(marker in k for k in keys for marker in (".lora_down.", ".lora_A.", "lora_unet_", ".lora.down.")):
        raise LorakitError(f"{flag} {path} is a LoRA, not a base model; pass the base model as {flag} (a LoRA goes "
                           "to --lora of lorakit generate).")
    if arch not in archs:
        raise LorakitError(f"--arch {arch} does not load single-file checkpoints (archs that do: {takers}); pass a "
                           "diffusers model folder or hub id.")
    raise LorakitError(f"{flag} {path} holds no checkpoint lorakit recognises (its keys match none of the archs that "
                       f"take single files: {takers}); pass a diffusers model folder or hub id.")
