"""LoRA layers ``{component: (PEFT state dict, adapter config)}`` written in any format lorakit
reads (:data:`lorakit.formats.FORMATS`), each published by an atomic rename once complete.

* ``lorakit`` -- the arch's ``save_lora`` hook: exact, reloads bit for bit.
* ``kohya`` -- kohya's names and ``ss_*`` header (:mod:`lorakit.formats.kohya`), lorakit's
  configs kept in the header so the way back is bit-exact.
* ``diffusers-example`` -- no header, so each layer's scale (alpha / rank, or alpha / sqrt(rank)
  with rslora) is folded into ``lora_up``: loaders that take alpha = rank then compute the
  trained model (to float rounding). UNet layers as ``lora.down`` / ``lora.up`` and text-encoder
  layers as ``lora_linear_layer`` under transformers 4's ``text_model`` paths, every layer
  renamed (a file mixing renamed and PEFT keys loses layers in diffusers).
* ``peft`` -- one model's adapter: ``base_model.model.`` keys, ``adapter_config.json`` beside
  the file (and the same config in the header).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lorakit.errors import LorakitError


def flat(layers: dict) -> tuple[dict, str]:
    """The layers as one lorakit state dict and its ``lora_adapter_metadata`` JSON."""
    tensors = {f"{c}.{k}": t for c, (state, _) in layers.items() for k, t in state.items()}
    meta = {f"{c}.{k}": v for c, (_, m) in layers.items() for k, v in m.items()}
    return tensors, json.dumps(meta, sort_keys=True)


def checkpoint_layout(layers: dict, model_dir: Path | None) -> dict:
    """Module paths as the model's checkpoints name them (what training writes; see
    :func:`lorakit.lora.checkpoint_layout`), for layers read in the model's own layout."""
    from lorakit import lora
    from lorakit.formats.layout import component_module

    relayout = getattr(lora, "checkpoint_layout", None)
    if model_dir is None or relayout is None:
        return layers
    out = {}
    for component, (state, meta) in layers.items():
        try:
            module = component_module(model_dir, component)
        except LorakitError:
            out[component] = (state, meta)
            continue
        out[component] = (relayout(module, state), meta)
    return out


def write_lorakit(pm, layers: dict, target: Path, model_dir: Path | None = None) -> Path:
    from lorakit import fsutil

    layers = checkpoint_layout(layers, model_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".lorakit-convert-") as tmp:
        pm.hook.save_lora(components={}, lora_layers=layers, output_dir=Path(tmp), weight_name=target.name)
        fsutil.publish(Path(tmp) / target.name, target)
    return target


def write_kohya(pm, layers: dict, target: Path, model_dir: Path | None, facts: dict | None = None) -> Path:
    """kohya's keys for the layers (names from the base model's config where the arch needs it),
    kohya's ``ss_*`` header with ``facts`` (training facts known for certain) and lorakit's configs."""
    from safetensors.torch import save

    from lorakit import fsutil
    from lorakit.formats.kohya import kohya_metadata, kohya_state_dict
    from lorakit.formats.layout import component_config, component_layers
    from lorakit.formats.read import kohya_names

    from lorakit.formats.read import fit_to_model

    prefixes = pm.hook.kohya_prefixes() or {}
    if not prefixes:
        raise LorakitError("this --arch has no kohya naming convention; its LoRA cannot be written for kohya.")
    if model_dir is not None:
        layers = fit_to_model(layers, model_dir)
    tensors, raw = flat(layers)
    configs = {} if model_dir is None else {
        c: cfg for c in prefixes if (cfg := component_config(model_dir, c)) is not None
    }
    names = {}
    for component, (state, _) in sorted(layers.items()):
        modules = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_A.weight")})
        if model_dir is not None and component in configs:  # a layer the base model lacks: another arch or model
            known = set(component_layers(model_dir, component))
            stray = [m for m in modules if m not in known]
            if stray:
                raise LorakitError(
                    f"LoRA layer {component}.{stray[0]} is not in --model {model_dir} ({len(stray)} such layers); "
                    "pass the base model it was trained on, and the --arch it was trained with."
                )
        if component in prefixes:
            for module, name in kohya_names(pm, component, modules, configs.get(component)).items():
                names[(component, module)] = name
    state = kohya_state_dict(tensors, json.loads(raw), prefixes, names)
    from lorakit.convert import kohya_base_fields

    extra = {**kohya_base_fields(pm, configs), **(facts or {})}
    header = kohya_metadata(json.loads(raw), pm.hook.arch_info().denoiser, raw, extra)
    target.parent.mkdir(parents=True, exist_ok=True)
    fsutil.replace_file(target, save(state, metadata=header))
    return target


def _scales(state: dict, meta: dict) -> dict:
    """``{module: scale}`` each layer was trained with (PEFT: alpha / r, or alpha / sqrt(r))."""
    from lorakit.formats.kohya import _layer_alpha

    out = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight"):
            module, rank = key[: -len(".lora_A.weight")], int(tensor.shape[0])
            out[module] = _layer_alpha(meta, module, rank) / rank  # kohya's alpha: rslora's sqrt folded in
    return out


def _plain(layers: dict, to: str) -> None:
    for component, (state, meta) in layers.items():
        odd = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if odd or meta.get("use_dora"):
            raise LorakitError(
                f"{component} LoRA holds {'DoRA' if meta.get('use_dora') else odd[0]}, which the {to} format cannot hold; "
                "keep it in lorakit's format."
            )


def write_diffusers_example(pm, layers: dict, target: Path) -> Path:
    from safetensors.torch import save

    from lorakit import fsutil
    from lorakit.formats.kohya import clip_text_model_path

    _plain(layers, "diffusers-example")
    text_encoders = set(pm.hook.arch_info().text_encoders)
    out = {}
    for component, (state, meta) in sorted(layers.items()):
        scales = _scales(state, meta)
        for module, scale in sorted(scales.items()):
            down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            up = (up.float() * scale).to(up.dtype) if scale != 1.0 else up
            if component in text_encoders:
                name = f"{component}.{clip_text_model_path(module)}.lora_linear_layer"
                out[f"{name}.down.weight"], out[f"{name}.up.weight"] = down.contiguous(), up.contiguous()
            else:
                out[f"{component}.{module}.lora.down.weight"] = down.contiguous()
                out[f"{component}.{module}.lora.up.weight"] = up.contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    fsutil.replace_file(target, save(out, metadata={"format": "pt"}))
    return target


def write_peft(pm, layers: dict, target: Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save

    from lorakit import fsutil
    from lorakit.formats import METADATA_KEY, PEFT_MODEL_PREFIX

    if len(layers) != 1:
        raise LorakitError(
            f"a PEFT file holds one model's LoRA, and this one has LoRA for {', '.join(sorted(layers))}; "
            "write it as lorakit, kohya or diffusers-example instead."
        )
    ((component, (state, meta)),) = layers.items()
    config_file = target.parent / "adapter_config.json"
    if config_file.exists() and not overwrite:
        raise LorakitError(f"{config_file} exists (a PEFT file's config goes there); pass --overwrite or write to another folder.")
    config = {**meta, "peft_type": "LORA"}
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{PEFT_MODEL_PREFIX}{k}": t.contiguous() for k, t in state.items()}
    fsutil.replace_file(target, save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}))
    fsutil.replace_file(config_file, json.dumps(config, indent=2, sort_keys=True).encode())
    return target


def write_layers(pm, layers: dict, target: Path, to: str, model_dir: Path | None = None, facts: dict | None = None,
                 overwrite: bool = False) -> Path:
    if to == "lorakit":
        return write_lorakit(pm, layers, target, model_dir)
    if to == "kohya":
        return write_kohya(pm, layers, target, model_dir, facts)
    if to == "diffusers-example":
        return write_diffusers_example(pm, layers, target)
    if to == "peft":
        return write_peft(pm, layers, target, overwrite=overwrite)
    raise LorakitError(f"--to {to} is not a known format.")
