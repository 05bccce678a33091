"""``lorakit fuse``: a base model with LoRAs baked into its weights.

The LoRAs load into the arch's pipeline at their scales (as ``lorakit generate`` loads them),
diffusers fuses them (``fuse_lora``: ``W += scale * B @ A`` per layer, refusing NaNs) and
drops the LoRA layers (``unload_lora_weights``); the pipeline is then saved in fp32 as a
diffusers folder, or, for ``--output FILE.safetensors`` on an arch with a single-file layout
(``ArchInfo.single_file_layout``), as one original-layout checkpoint A1111 and ComfyUI load
(:mod:`lorakit.ldm`).

Output policy (as for training outputs): a folder is built beside ``--output`` and renamed into
place once complete; an existing non-empty ``--output`` is refused unless ``--overwrite``, and
even then only when every file in it is one lorakit recorded writing there (its manifest),
so a user's file is never removed. A single file is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from lorakit.errors import LorakitError, PluginError

FUSED = "lorakit_fused.json"


def _foreign_file(folder: Path) -> str | None:
    """The first file under ``folder`` lorakit did not record writing there (None: all ours)."""
    from lorakit.outputs import MANIFEST, recorded

    ours = set(recorded(folder) or ()) | {MANIFEST}
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if rel not in ours:
            return rel
    return None


def check_output(output: Path, single_file: bool, overwrite: bool) -> None:
    """Refuse an ``--output`` the fused model may not go to, before anything loads."""
    from lorakit.outputs import check_output_path

    blocked = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise LorakitError(f"--output {output}: {blocked} is a file, so nothing can be written there; pick another path.")
    if single_file:
        if output.is_dir():
            raise LorakitError(f"--output {output} is a folder; pass a path ending in .safetensors for a single file.")
        if output.exists() and not overwrite:
            raise LorakitError(f"--output {output} exists; pass --overwrite or another --output.")
        return
    if output.exists() and not output.is_dir():
        raise LorakitError(f"--output {output} is a file; pass a folder (or a .safetensors path for a single file).")
    check_output_path(output)
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise LorakitError(f"--output {output} is not empty; pass --overwrite to replace a model lorakit fused "
                               "there, or choose another --output.")
        foreign = _foreign_file(output)
        if foreign is not None:
            raise LorakitError(f"--output {output} holds {foreign}, which lorakit did not write; move it away or "
                               "choose another --output.")


def fused_pipeline(arch: str, model: str, loras, device=None, model_config=None):
    """The arch's pipeline with ``loras`` (``[(path, scale)]``) fused into its weights, fp32."""
    import torch

    from lorakit.inference import load_pipeline_with_loras

    pm, pipeline = load_pipeline_with_loras(arch, model, list(loras), device=device or "cpu", dtype=torch.float32,
                                            model_config=model_config)
    if not hasattr(pipeline, "fuse_lora") or not hasattr(pipeline, "unload_lora_weights"):
        raise LorakitError(f"--arch {arch}: its pipeline ({type(pipeline).__name__}) cannot fuse LoRAs; use the "
                           "LoRA file with lorakit generate instead.")
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [f"lora{i}" for i in range(len(loras))]
    # every component holding LoRA layers (a pipeline's default list can be shorter: FLUX's is
    # the transformer only, which left its CLIP LoRA unfused)
    holders = {n: c for n, c in pipeline.components.items() if isinstance(c, torch.nn.Module)
               and any(isinstance(m, BaseTunerLayer) for m in c.modules())}
    try:
        pipeline.fuse_lora(components=list(holders), adapter_names=names, lora_scale=1.0, safe_fusing=True)
    except ValueError as exc:  # safe_fusing: a NaN in a fused weight
        raise LorakitError(f"fusing the LoRAs broke a weight ({str(exc).splitlines()[0][:200]}); nothing was written.") from None
    left = next((f"{n}.{path}" for n, c in holders.items() for path, m in c.named_modules()
                 if isinstance(m, BaseTunerLayer) and m.active_adapters and not m.merged), None)
    if left is not None:  # never write a model that silently lacks part of a LoRA
        raise PluginError(f"--arch {arch}: the pipeline did not fuse the LoRA layer {left}; nothing was written.")
    pipeline.unload_lora_weights()
    return pm, pipeline


def _write_folder(pipeline, output: Path, facts: dict) -> None:
    from lorakit import fsutil
    from lorakit.outputs import MANIFEST

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.lorakit-fuse-"))
    try:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        fsutil.write_bytes(tmp / FUSED, json.dumps(facts, indent=1).encode())
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        fsutil.write_bytes(tmp / MANIFEST, json.dumps({"paths": files + [MANIFEST]}, indent=1).encode())
        for path in tmp.rglob("*"):
            if path.is_file():
                fsutil.fsync_file(path)
        old = None
        if output.exists():  # empty, or only what an earlier fuse wrote (checked again: the load took a while)
            foreign = _foreign_file(output)
            if foreign is not None:
                raise LorakitError(f"--output {output} holds {foreign}, which lorakit did not write; move it away or "
                                   "choose another --output.")
            old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.lorakit-old-"))
            os.replace(output, old / "old")
        try:
            fsutil.publish(tmp, output)
        except BaseException:
            if old is not None:  # put the earlier fused model back
                os.replace(old / "old", output)
                fsutil.remove_tree(old)
            raise
        if old is not None:
            fsutil.remove_tree(old)
    except BaseException as exc:
        fsutil.remove_tree(tmp)
        if isinstance(exc, OSError) and fsutil.is_disk_full(exc):
            raise LorakitError(f"the disk is full: the fused model for --output {output} was not written (nothing "
                               "of it is left); free space there or pick another --output.") from None
        raise


def _write_single_file(pm, pipeline, output: Path) -> None:
    from lorakit.ldm import write_single_file

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.lorakit-fuse-") as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        write_single_file(tmp, pm.hook.arch_info().single_file_layout, output)


def fuse(arch: str, model: str, loras, output, overwrite: bool = False, device=None, model_config=None) -> Path:
    """Write ``model`` (hub id, folder, or single file with ``model_config``) with ``loras``
    (``[(path, scale)]``) fused in, to the folder or ``.safetensors`` file ``output``."""
    from lorakit.plugins import arch_info

    output = Path(output).expanduser()
    loras = list(loras)
    if not loras:
        raise LorakitError("fuse needs at least one --lora.")
    single = output.suffix == ".safetensors"
    if single and not getattr(arch_info(arch), "single_file_layout", None):
        raise LorakitError(f"--arch {arch} has no single-file checkpoint layout; pass a folder as --output.")
    check_output(output, single, overwrite)
    pm, pipeline = fused_pipeline(arch, model, loras, device=device, model_config=model_config)
    if single:
        try:
            _write_single_file(pm, pipeline, output)
        except OSError as exc:
            from lorakit.fsutil import is_disk_full

            if not is_disk_full(exc):
                raise
            raise LorakitError(f"the disk is full: {output} was not written; free space there or pick another "
                               "--output.") from None
    else:
        facts = {"arch": arch, "model": str(model), "loras": [{"path": str(spec[0]), "scales": [float(x) for x in spec[1:]]} for spec in loras]}
        _write_folder(pipeline, output, facts)
    return output
