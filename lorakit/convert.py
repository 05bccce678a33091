"""Converting a lorakit LoRA file to the kohya naming that A1111, ComfyUI and kohya's tools read.

A lorakit file holds PEFT keys (``<component>.<module path>.lora_A.weight``) and the
adapter configs as JSON under ``lora_adapter_metadata``. The kohya file holds, per layer,
``<prefix>_<module path with '_' for '.'>.lora_down.weight`` / ``.lora_up.weight`` and a
0-d ``.alpha``; the arch says which prefix each component gets (``kohya_prefixes`` hook).
Read and written with safetensors only: no pickle.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.pipelines import resolve_lora_file

METADATA_KEY = "lora_adapter_metadata"
# Kept under another name in the kohya file: diffusers reads `lora_adapter_metadata` as the
# config of PEFT-named keys and then refuses the kohya file's alphas.
KOHYA_METADATA_KEY = "lorakit_adapter_metadata"
_LORA_KEY = re.compile(r"^(?P<component>[^.]+)\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: a key matches a module path suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _layer_alpha(config: dict, module: str, rank: int) -> float:
    """The kohya alpha (scale = alpha / rank) giving this layer the scale it was trained with."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # PEFT scaled by alpha / sqrt(rank)
    return alpha


def _component_configs(metadata: dict, components) -> dict:
    """``{component: {option: value}}`` from lorakit's flat ``"<component>.<option>"`` JSON."""
    configs = {c: {} for c in components}
    for key, value in metadata.items():
        component, _, option = key.partition(".")
        if component in configs:
            configs[component][option] = value
    return configs


def kohya_state_dict(tensors: dict, metadata: dict, prefixes: dict) -> dict:
    """Rename a lorakit (PEFT) state dict to kohya keys and add each layer's ``.alpha``."""
    import torch

    layers: dict[tuple[str, str], dict] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if not match:
            raise LorakitError(
                f"cannot convert weight '{key}': only plain LoRA layers (lora_A/lora_B) have a kohya form "
                "(DoRA, LoRA biases and saved modules do not)."
            )
        layers.setdefault((match["component"], match["module"]), {})[match["which"]] = tensor
    components = sorted({c for c, _ in layers})
    missing = [c for c in components if c not in prefixes]
    if missing:
        raise LorakitError(
            f"the file has LoRA for {', '.join(missing)}, which this arch has no kohya prefix for "
            f"(it has: {', '.join(prefixes) or 'none'})."
        )
    configs = _component_configs(metadata, components)
    for component, config in configs.items():
        if config.get("use_dora"):
            raise LorakitError(f"{component} LoRA uses DoRA, which the kohya format written here cannot hold.")
    out = {}
    for (component, module), pair in sorted(layers.items()):
        if set(pair) != {"A", "B"}:
            raise LorakitError(f"layer {component}.{module} lacks lora_A or lora_B; the file is incomplete.")
        name = f"{prefixes[component]}_{module.replace('.', '_')}"
        if f"{name}.lora_down.weight" in out:
            raise LorakitError(f"two layers map to the kohya name {name}; this file cannot be converted.")
        rank = pair["A"].shape[0]
        out[f"{name}.lora_down.weight"] = pair["A"]
        out[f"{name}.lora_up.weight"] = pair["B"]
        out[f"{name}.alpha"] = torch.tensor(_layer_alpha(configs[component], module, rank), dtype=torch.float32)
    return out


def kohya_metadata(metadata: dict, denoiser: str, raw_metadata: str) -> dict:
    """kohya's header fields (strings, as kohya writes them) plus lorakit's own JSON."""
    configs = _component_configs(metadata, {c.partition(".")[0] for c in metadata})
    main = configs.get(denoiser) or next(iter(configs.values()), {})
    header = {"ss_network_module": "networks.lora", KOHYA_METADATA_KEY: raw_metadata}
    if "r" in main:
        header["ss_network_dim"] = str(main["r"])
        header["ss_network_alpha"] = str(main.get("lora_alpha", main["r"]))
    header["ss_network_train_unet_only"] = str(set(configs) <= {denoiser})
    return header


def convert_to_kohya(arch: str, source, target, overwrite: bool = False) -> Path:
    """Write the lorakit LoRA ``source`` (file or output folder) as a kohya-style ``target``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lorakit.plugins import get_plugin_manager

    source = resolve_lora_file(source)
    target = Path(target).expanduser()
    if target.suffix != ".safetensors":
        raise LorakitError(f"{target} must end in .safetensors; kohya-style tools read safetensors files.")
    if target.exists() and not overwrite:
        raise LorakitError(f"{target} exists; pass --overwrite or another output path.")
    pm = get_plugin_manager(arch)
    prefixes = pm.hook.kohya_prefixes()
    if not prefixes:
        raise LorakitError(f"arch '{arch}' has no kohya naming convention; its LoRA cannot be converted to kohya.")
    with safe_open(str(source), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if raw is None:
        raise LorakitError(f"{source} has no {METADATA_KEY} in its header; pass a LoRA file written by lorakit.")
    metadata = json.loads(raw)
    state = kohya_state_dict(tensors, metadata, prefixes)
    header = kohya_metadata(metadata, pm.hook.arch_info().denoiser, raw)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata=header)
    return target
