"""``lorakit convert``: a LoRA file from one format to another.

Formats: ``lorakit`` (alias ``diffusers``; what ``lorakit train`` writes and diffusers'
``load_lora_weights`` reads) and ``kohya`` (A1111, Forge, ComfyUI, kohya's sd-scripts). The
source's format is read from its keys. The naming rules are in :mod:`lorakit.formats.kohya`;
this module finds the base model the names depend on, checks the arch, and publishes the
result atomically. Read and written with safetensors only: no pickle.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.formats import METADATA_KEY, detect_format
from lorakit.formats.kohya import (  # noqa: F401  (kept importable from here)
    KOHYA_METADATA_KEY,
    kohya_metadata,
    kohya_state_dict,
    lorakit_layers,
    peft_layers,
)
from lorakit.pipelines import resolve_lora_file

FORMATS = {"kohya": "kohya", "lorakit": "lorakit", "diffusers": "lorakit"}
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
    """``{module path: kohya layer name}`` for layers of ``component`` (one-to-one, checked)."""
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


def _every_layer_name(pm, component: str, layers, config) -> dict:
    """kohya names of every layer of the base model that has one (one kohya's model lacks is skipped)."""
    try:
        return kohya_names(pm, component, layers, config)
    except LorakitError:
        named = {}
        for layer in layers:
            try:
                named.update(kohya_names(pm, component, [layer], config))
            except LorakitError:
                continue
        return named


def convert(arch: str, source, target, to: str, model=None, overwrite: bool = False) -> Path:
    """Write the LoRA ``source`` (file or lorakit output folder) as ``target`` in format ``to``
    (``kohya``, ``lorakit`` or ``diffusers``). ``model`` is the base model (hub id or folder)
    the layer names depend on; needed to read kohya files, and where the arch's kohya names
    follow the model's config."""
    from safetensors import safe_open

    from lorakit.plugins import get_plugin_manager

    if to not in FORMATS:
        raise LorakitError(f"--to {to} is not a known format; pick one of: kohya, diffusers (same as lorakit).")
    source = resolve_lora_file(source)
    target = Path(target).expanduser()
    if target.suffix != ".safetensors":
        raise LorakitError(f"{target} must end in .safetensors; kohya-style tools read safetensors files.")
    if target.exists() and not overwrite:
        raise LorakitError(f"{target} exists; pass --overwrite or another output path.")
    pm = get_plugin_manager(arch)
    if not pm.hook.kohya_prefixes():
        raise LorakitError(f"arch '{arch}' has no kohya naming convention; its LoRA cannot be converted to kohya.")
    run = _run_config(source)
    if run.get("arch") and run["arch"] != arch:
        raise LorakitError(
            f"LoRA {source} was trained with --arch {run['arch']} (its {RUN_CONFIG} says so); convert it with --arch {run['arch']}."
        )
    with safe_open(str(source), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kind = detect_format(tensors)
    wanted = FORMATS[to]
    if kind == wanted:
        raise LorakitError(f"{source} is already in {to} format; pass --to {'diffusers' if to == 'kohya' else 'kohya'}.")
    base = _base_model(model, run)
    if kind == "kohya":
        return _kohya_to_lorakit(pm, tensors, header, base, target, source)
    if kind != "lorakit" or METADATA_KEY not in header:
        raise LorakitError(f"{source} has no {METADATA_KEY} in its header; pass a LoRA file written by lorakit.")
    return _lorakit_to_kohya(pm, tensors, header[METADATA_KEY], base, target, run)


def convert_to_kohya(arch: str, source, target, overwrite: bool = False, model=None) -> Path:
    """Write the lorakit LoRA ``source`` (file or output folder) as a kohya-style ``target``."""
    return convert(arch, source, target, "kohya", model=model, overwrite=overwrite)


def _configs(pm, base: Path | None) -> dict:
    from lorakit.formats.layout import component_config

    if base is None:
        return {}
    return {c: cfg for c in pm.hook.kohya_prefixes() if (cfg := component_config(base, c)) is not None}


def _lorakit_to_kohya(pm, tensors: dict, raw: str, base: Path | None, target: Path, run: dict) -> Path:
    from safetensors.torch import save

    from lorakit import fsutil
    from lorakit.formats.layout import component_layers

    metadata = json.loads(raw)
    layers = peft_layers(tensors)
    configs = _configs(pm, base)
    names = {}
    for component in sorted({c for c, _ in layers}):
        modules = [m for c, m in layers if c == component]
        if base is not None and component in configs:  # a layer the base model lacks: another arch or model
            known = set(component_layers(base, component))
            stray = [m for m in modules if m not in known]
            if stray:
                raise LorakitError(
                    f"LoRA layer {component}.{stray[0]} is not in --model {base} ({len(stray)} such layers); "
                    "pass the base model it was trained on, and the --arch it was trained with."
                )
        if component in (pm.hook.kohya_prefixes() or {}):
            for module, name in kohya_names(pm, component, modules, configs.get(component)).items():
                names[(component, module)] = name
    state = kohya_state_dict(tensors, metadata, pm.hook.kohya_prefixes(), names)
    extra = {**(pm.hook.kohya_metadata(model_configs=configs) or {}), **_training_facts(run)}
    if base is not None:
        extra.setdefault("ss_sd_model_name", Path(str(run.get("model") or base)).name)  # as kohya: the basename
    header = kohya_metadata(metadata, pm.hook.arch_info().denoiser, raw, extra)
    target.parent.mkdir(parents=True, exist_ok=True)
    fsutil.replace_file(target, save(state, metadata=header))
    return target


def _kohya_to_lorakit(pm, tensors: dict, header: dict, base: Path | None, target: Path, source: Path) -> Path:
    from lorakit import fsutil
    from lorakit.formats.layout import component_config, component_layers

    if base is None:
        raise LorakitError(
            f"{source} is a kohya file; reading its layer names needs the base model: pass --model (hub id or folder)."
        )
    def names_of(component):
        return _every_layer_name(pm, component, component_layers(base, component), component_config(base, component))

    layers = lorakit_layers(tensors, header, pm.hook.kohya_prefixes() or {}, names_of)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".lorakit-convert-") as tmp:
        pm.hook.save_lora(components={}, lora_layers=layers, output_dir=Path(tmp), weight_name=target.name)
        fsutil.publish(Path(tmp) / target.name, target)
    return target
