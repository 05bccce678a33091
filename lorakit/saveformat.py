"""``--save-format``: which files a run's final LoRA is written as.

* ``diffusers`` -- ``pytorch_lora_weights.safetensors``: what diffusers' ``load_lora_weights``,
  ``lorakit generate`` and ``lorakit convert`` read, with the adapter configs an exact reload needs.
* ``kohya`` -- ``<output folder name>.safetensors`` in kohya's layout (kohya's key names, ``ss_*``
  header): what A1111, Forge, ComfyUI and kohya's scripts read. Named after the output folder
  because A1111 and ComfyUI show a LoRA by its file name (``<lora:NAME:0.8>``), and kohya's own
  trainer names its file ``<output_name>.safetensors`` the same way; a folder of many runs'
  ``pytorch_lora_weights.safetensors`` would all show as one name.
* ``both`` -- the default where the arch has a kohya layout: most people who load LoRAs of
  such archs do so in A1111/ComfyUI, while the diffusers file is what diffusers and lorakit's own
  commands need; a second file of a few MB costs nothing next to the run. Archs without a kohya
  layout write ``diffusers`` (and ``kohya`` is refused for them in one line).

The kohya file is written with the diffusers one into the same temporary folder and published
with it (see :func:`lorakit.outputs.write_final_lora`): recorded in the manifest, fsynced,
renamed into place, or neither is. Checkpoints keep only the diffusers file (a resume reads it).
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError

CHOICES = ("diffusers", "kohya", "both")


def check_save_format(config, info) -> None:
    """Resolve ``--save-format`` for the arch (recorded in the run config) or refuse it in one line."""
    chosen = getattr(config, "save_format", None)
    has_kohya = bool(info.kohya_prefixes)
    if chosen is None:
        config.save_format = "both" if has_kohya else "diffusers"
    elif chosen != "diffusers" and not has_kohya:
        raise LorakitError(
            f"--save-format {chosen}: --arch {config.arch} has no kohya layout (A1111/ComfyUI do not load it); "
            "use --save-format diffusers."
        )


def kohya_file_name(output_dir: Path) -> str:
    """``<folder name>.safetensors`` (``<name>_kohya`` if that is the diffusers file's name)."""
    from lorakit.outputs import WEIGHT_NAME

    name = Path(output_dir).expanduser().resolve().name or "lora"
    file = f"{name}.safetensors"
    return f"{name}_kohya.safetensors" if file == WEIGHT_NAME else file


def final_files(config, output_dir: Path) -> list[str]:
    """The final LoRA files a run writes, main one first."""
    from lorakit.outputs import WEIGHT_NAME

    fmt = getattr(config, "save_format", None) or "diffusers"
    files = [WEIGHT_NAME] if fmt != "kohya" else []
    return files + ([kohya_file_name(output_dir)] if fmt != "diffusers" else [])


def check_names_free(output_dir: Path, config) -> None:
    """Refuse, before anything loads, a final file name that holds a file lorakit did not write."""
    from lorakit.outputs import _ours

    for name in final_files(config, output_dir):
        path = output_dir / name
        if (path.exists() or path.is_symlink()) and name not in _ours(output_dir):
            raise LorakitError(
                f"--output {output_dir} holds {name}, which lorakit did not write (the final LoRA goes there); "
                "move it away or choose another --output."
            )


def write_final(trainer, folder: Path) -> Path:
    """Fill ``folder`` with the final LoRA file(s) of ``--save-format``; return the main one."""
    from lorakit import outputs
    from lorakit.convert import _training_facts
    from lorakit.formats.write import write_kohya

    config = trainer.config
    layers = trainer.lora_layers()
    diffusers = outputs.write_lora(trainer.pm, trainer.components, layers, folder, config.arch)
    names = final_files(config, trainer.output_dir)
    if config.save_format == "diffusers":
        return diffusers
    facts = _training_facts(config.to_dict())
    facts["ss_sd_model_name"] = Path(str(config.model)).name
    facts["ss_output_name"] = Path(names[-1]).stem
    facts["ss_steps"] = str(trainer.global_step)
    kohya = write_kohya(trainer.pm, layers, folder / names[-1], trainer.model_path, facts)
    if config.save_format == "kohya":
        diffusers.unlink()
    return kohya
