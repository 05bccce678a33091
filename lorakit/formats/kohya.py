"""kohya-ss LoRA files (what A1111, Forge, ComfyUI and kohya's own scripts read), both ways.

A kohya file holds, per layer, ``<name>.lora_down.weight`` (PEFT's ``lora_A``),
``<name>.lora_up.weight`` (``lora_B``) and a 0-d ``<name>.alpha`` (scale = alpha / rank), where
``<name>`` is ``<prefix>_<module path in kohya's model, '.' -> '_'>`` (kohya's
``networks/lora.py``: ``lora_name = (prefix + "." + name + "." + child_name).replace(".", "_")``).
The arch says the prefix of each component (``kohya_prefixes``) and, where kohya's model names
a layer differently from diffusers (an original-layout UNet, transformers 5's CLIP), the path
(``kohya_module_names``). The header carries kohya's ``ss_*`` fields and lorakit's own
adapter configs under :data:`KOHYA_METADATA_KEY`.

Reading a kohya file needs the base model's layer names: ``_`` is ambiguous (``to_q``,
``transformer_blocks``), so each of the model's layers is named the kohya way and the
mapping inverted -- exactly how ComfyUI and A1111 match keys against their loaded model.
"""

from __future__ import annotations

import json
import math
import re

from lorakit.errors import LorakitError
from lorakit.formats import PEFT_KEY

# Kept under another name in the kohya file: diffusers reads `lora_adapter_metadata` as the
# config of PEFT-named keys and then refuses the kohya file's alphas.
KOHYA_METADATA_KEY = "lorakit_adapter_metadata"
_KOHYA_KEY = re.compile(r"^(?P<name>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def clip_text_model_path(module: str) -> str:
    """A CLIP text encoder's layer as transformers 4 (and so kohya, A1111, ComfyUI) names it:
    under ``text_model`` (transformers 5's ``CLIPTextModel`` dropped that level;
    ``CLIPTextModelWithProjection`` keeps it, and its ``text_projection`` sits beside it)."""
    return module if module.startswith(("text_model.", "text_projection")) else f"text_model.{module}"


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


def component_configs(metadata: dict, components) -> dict:
    """``{component: {option: value}}`` from lorakit's flat ``"<component>.<option>"`` JSON."""
    configs = {c: {} for c in components}
    for key, value in metadata.items():
        component, _, option = key.partition(".")
        if component in configs:
            configs[component][option] = value
    return configs


def peft_layers(tensors: dict) -> dict:
    """``{(component, module): {"A": tensor, "B": tensor}}`` of a lorakit (PEFT-named) state dict."""
    layers: dict[tuple[str, str], dict] = {}
    for key, tensor in tensors.items():
        match = PEFT_KEY.match(key)
        if not match:
            raise LorakitError(
                f"cannot convert weight '{key}': only plain LoRA layers (lora_A/lora_B) have a kohya form "
                "(DoRA, LoRA biases and saved modules do not)."
            )
        layers.setdefault((match["component"], match["module"]), {})[match["which"]] = tensor
    for (component, module), pair in layers.items():
        if set(pair) != {"A", "B"}:
            raise LorakitError(f"layer {component}.{module} lacks lora_A or lora_B; the file is incomplete.")
    return layers


def kohya_state_dict(tensors: dict, metadata: dict, prefixes: dict, names: dict | None = None) -> dict:
    """Rename a lorakit (PEFT) state dict to kohya keys and add each layer's ``.alpha``.

    ``names`` is ``{(component, module): kohya layer name}``; without it a layer is named
    ``<prefix>_<module with '_' for '.'>``.
    """
    import torch

    layers = peft_layers(tensors)
    components = sorted({c for c, _ in layers})
    missing = [c for c in components if c not in prefixes]
    if missing:
        raise LorakitError(
            f"the file has LoRA for {', '.join(missing)}, which this arch has no kohya prefix for "
            f"(it has: {', '.join(prefixes) or 'none'})."
        )
    configs = component_configs(metadata, components)
    for component, config in configs.items():
        if config.get("use_dora"):
            raise LorakitError(f"{component} LoRA uses DoRA, which the kohya format written here cannot hold.")
    out = {}
    for (component, module), pair in sorted(layers.items()):
        name = (names or {}).get((component, module)) or f"{prefixes[component]}_{module.replace('.', '_')}"
        if f"{name}.lora_down.weight" in out:
            raise LorakitError(f"two layers map to the kohya name {name}; this file cannot be converted.")
        rank = pair["A"].shape[0]
        out[f"{name}.lora_down.weight"] = pair["A"]
        out[f"{name}.lora_up.weight"] = pair["B"]
        out[f"{name}.alpha"] = torch.tensor(_layer_alpha(configs[component], module, rank), dtype=torch.float32)
    return out


def kohya_metadata(metadata: dict, denoiser: str, raw_metadata: str, base: dict | None = None) -> dict:
    """kohya's header fields (strings, as kohya writes them) plus lorakit's own JSON.

    ``base`` holds the arch's ``ss_*`` fields for the base model (``kohya_metadata`` hook) and
    any training facts known for certain."""
    configs = component_configs(metadata, {c.partition(".")[0] for c in metadata})
    main = configs.get(denoiser) or next(iter(configs.values()), {})
    header = {"ss_network_module": "networks.lora", **(base or {}), KOHYA_METADATA_KEY: raw_metadata}
    if "r" in main:
        header["ss_network_dim"] = str(main["r"])
        header["ss_network_alpha"] = str(main.get("lora_alpha", main["r"]))
    header["ss_network_train_unet_only"] = str(set(configs) <= {denoiser})
    return {k: str(v) for k, v in header.items()}


# ----------------------------------------------------------------------------- reading


def kohya_layers(tensors: dict) -> dict:
    """``{kohya layer name: {"lora_down.weight": t, "lora_up.weight": t, "alpha": t}}``; refuses
    anything that is not a plain LoRA (LyCORIS LoHa/LoKr, DoRA, ...) in one line."""
    layers: dict[str, dict] = {}
    for key, tensor in tensors.items():
        match = _KOHYA_KEY.match(key)
        if not match:
            raise LorakitError(
                f"kohya weight '{key}' is not part of a plain LoRA (lora_down/lora_up/alpha); LyCORIS (LoHa, LoKr), "
                "DoRA and other kinds cannot be read."
            )
        layers.setdefault(match["name"], {})[match["part"]] = tensor
    for name, parts in layers.items():
        if not {"lora_down.weight", "lora_up.weight"} <= set(parts):
            raise LorakitError(f"kohya layer {name} lacks lora_down or lora_up; the file is incomplete.")
    return layers


def _config_from_tensors(modules: dict) -> dict:
    """A LoRA config for layers read without lorakit's header: each layer's rank from its
    ``lora_down`` and alpha from its ``.alpha`` (kohya: no alpha = the rank)."""
    from lorakit.formats.read import lora_config

    ranks = {m: int(parts["lora_down.weight"].shape[0]) for m, parts in modules.items()}
    alphas = {m: float(parts["alpha"].item()) for m, parts in modules.items() if "alpha" in parts}
    return lora_config(ranks, alphas)


def lorakit_layers(tensors: dict, header: dict, prefixes: dict, names_of) -> dict:
    """A kohya file as ``{component: (PEFT state dict, adapter metadata)}``, what the arch's
    ``save_lora`` hook writes. ``names_of(component)`` gives ``{layer path: kohya name}`` for
    every layer of the base model's component. lorakit's own header (a file lorakit converted)
    gives back the exact adapter configs; otherwise rank and alpha come from the tensors."""
    by_prefix = sorted(((p, c) for c, p in prefixes.items()), key=lambda pc: -len(pc[0]))
    grouped: dict[str, dict] = {}
    for name, parts in kohya_layers(tensors).items():
        component = next((c for p, c in by_prefix if name.startswith(p + "_")), None)
        if component is None:
            raise LorakitError(
                f"kohya layer {name} has none of this arch's prefixes ({', '.join(p + '_' for p, _ in by_prefix)}); "
                "is the LoRA for another --arch?"
            )
        grouped.setdefault(component, {})[name] = parts
    raw = header.get(KOHYA_METADATA_KEY)
    saved = component_configs(json.loads(raw), grouped) if raw else {}
    out = {}
    for component, named in grouped.items():
        inverse = {v: k for k, v in names_of(component).items()}
        unknown = [n for n in named if n not in inverse]
        if unknown:
            raise LorakitError(
                f"{len(unknown)} of {len(named)} kohya layers for {component} match no layer of --model's {component} "
                f"(e.g. {unknown[0]}); is the LoRA for another --arch or model?"
            )
        modules = {inverse[n]: parts for n, parts in named.items()}
        state = {}
        for module, parts in sorted(modules.items()):
            state[f"{module}.lora_A.weight"] = parts["lora_down.weight"]
            state[f"{module}.lora_B.weight"] = parts["lora_up.weight"]
        meta = saved.get(component) or _config_from_tensors(modules)
        out[component] = (state, meta)
    return out

