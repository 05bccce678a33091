"""``lorakit convert``: a LoRA file from one format to another.

Formats (:data:`lorakit.formats.FORMATS`): ``lorakit`` (alias ``diffusers``; what ``lorakit
train`` writes and diffusers' ``load_lora_weights`` reads), ``kohya`` (A1111, Forge, ComfyUI,
kohya's sd-scripts), ``diffusers-example`` (diffusers' example scripts, no header) and ``peft``
(PEFT's ``save_pretrained``). The source's format is read from its keys
(:mod:`lorakit.formats.read`), the target written by :mod:`lorakit.formats.write`; this
module finds the base model the names depend on, checks the arch, and gathers the training
facts kohya's header holds. Read and written with safetensors only: no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.formats import ALIASES, FORMATS, METADATA_KEY, detect_format  # noqa: F401
from lorakit.formats.kohya import (  # noqa: F401  (kept importable from here)
    KOHYA_METADATA_KEY,
    kohya_metadata,
    kohya_state_dict,
    lorakit_layers,
    peft_layers,
)
from lorakit.formats.read import every_layer_name as _every_layer_name  # noqa: F401
from lorakit.pipelines import resolve_lora_file

RUN_CONFIG = "lorakit_config.json"
#: lorakit run options -> kohya's header fields for the same fact
TRAINING_FACTS = {
    "learning_rate": "ss_learning_rate", "max_steps": "ss_max_train_steps", "seed": "ss_seed",
    "batch_size": "ss_batch_size_per_device", "gradient_accumulation": "ss_gradient_accumulation_steps",
    "mixed_precision": "ss_mixed_precision", "lr_scheduler": "ss_lr_scheduler",
}


def _run_config(source: Path) -> dict:
    """The training run's settings when ``source`` is the weight file of a lorakit output folder."""
    file = source.parent / RUN_CONFIG
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _base_model(given, run: dict) -> Path | None:
    """``--model`` (hub id or folder), else the run's own model if it is a local folder."""
    from lorakit.models import resolve_model

    if given:
        return resolve_model(str(given), flag="--model")
    model = Path(str(run.get("model") or "")).expanduser()
    return model if run.get("model") and (model / "model_index.json").is_file() else None


def _training_facts(run: dict) -> dict:
    facts = {kohya: run[ours] for ours, kohya in TRAINING_FACTS.items() if run.get(ours) not in (None, "", "no")}
    if run.get("resolution"):
        facts["ss_resolution"] = f"({run['resolution']}, {run['resolution']})"
    return facts


def kohya_names(pm, component: str, modules, model_config) -> dict:
    """``{module path: kohya layer name}`` for layers of ``component`` (one-to-one, checked): the arch's
    ``kohya_module_names`` hook, prefixed with its ``kohya_prefixes``."""
    from collections import Counter

    prefixes = pm.hook.kohya_prefixes() or {}
    modules = list(modules)
    paths = pm.hook.kohya_module_names(component=component, modules=modules, model_config=model_config)
    if paths is None:
        paths = {m: m for m in modules}
    names = {m: f"{prefixes[component]}_{paths[m].replace('.', '_')}" for m in modules}
    if len(set(names.values())) != len(names):
        twice = [n for n, c in Counter(names.values()).items() if c > 1][0]
        raise LorakitError(f"two layers map to the kohya name {twice}; this file cannot be converted.")
    return names


def kohya_base_fields(pm, model_configs: dict) -> dict:
    """The arch's ``ss_*`` fields for the base model (its ``kohya_metadata`` hook)."""
    return pm.hook.kohya_metadata(model_configs=model_configs) or {}


def convert(arch: str, source, target, to: str, model=None, overwrite: bool = False) -> Path:
    """Write the LoRA ``source`` (file or lorakit output folder, any format lorakit reads) as
    ``target`` in format ``to`` (see :data:`lorakit.formats.FORMATS`; ``diffusers`` is
    ``lorakit``). ``model`` is the base model (hub id or folder) the layer names depend on:
    needed to read kohya files, and where the arch's kohya names follow the model's config."""
    from lorakit.formats.read import open_lora, read_layers
    from lorakit.formats.write import write_layers
    from lorakit.plugins import get_plugin_manager

    wanted = ALIASES.get(to, to)
    if wanted not in FORMATS:
        raise LorakitError(f"--to {to} is not a known format; pick one of: {', '.join(FORMATS)} (diffusers = lorakit).")
    source = resolve_lora_file(source)
    target = Path(target).expanduser()
    if target.suffix != ".safetensors":
        raise LorakitError(f"{target} must end in .safetensors; lorakit writes LoRA files as safetensors only.")
    if target.exists() and not overwrite:
        raise LorakitError(f"{target} exists; pass --overwrite or another output path.")
    pm = get_plugin_manager(arch)
    if wanted == "kohya" and not pm.hook.kohya_prefixes():
        raise LorakitError(f"arch '{arch}' has no kohya naming convention; its LoRA cannot be converted to kohya.")
    run = _run_config(source)
    if run.get("arch") and run["arch"] != arch:
        raise LorakitError(
            f"LoRA {source} was trained with --arch {run['arch']} (its {RUN_CONFIG} says so); convert it with --arch {run['arch']}."
        )
    lora = open_lora(source)
    if lora.kind == wanted:
        other = "diffusers" if wanted == "kohya" else "kohya"
        raise LorakitError(f"{source} is already in {wanted} format; pass --to {other} (or another format).")
    base = _base_model(model, run)
    layers = read_layers(lora, pm, base)
    facts = _training_facts(run)
    if base is not None and wanted == "kohya":
        facts.setdefault("ss_sd_model_name", Path(str(run.get("model") or base)).name)  # as kohya: the basename
    return write_layers(pm, layers, target, wanted, model_dir=base, facts=facts, overwrite=overwrite)


def convert_to_kohya(arch: str, source, target, overwrite: bool = False, model=None) -> Path:
    """Write the LoRA ``source`` (file or output folder) as a kohya-style ``target``."""
    return convert(arch, source, target, "kohya", model=model, overwrite=overwrite)
