"""Any LoRA file lorakit reads, as the layers it trains and saves: ``{component: (PEFT state
dict, adapter config)}`` (what the arch's ``save_lora`` hook receives).

What each format says, and what is taken from where when it says less:

* ``lorakit`` -- PEFT keys per component and every adapter config: taken as they are.
* ``kohya`` -- names in kohya's model (read against the base model's layers, see
  :mod:`lorakit.formats.kohya`); lorakit's own header gives the exact configs back, otherwise
  each layer's rank comes from its ``lora_down`` and alpha from its ``.alpha``.
* ``diffusers-example`` -- PEFT keys without a header, or the older ``lora.down`` /
  ``lora_linear_layer`` / attention-processor (``processor.to_q_lora``) keys, renamed to PEFT's
  by diffusers' own converters; no header, so alpha = rank (how diffusers loads them).
* ``peft`` -- ``base_model.model.`` keys of one model: the component is the one of the base
  model whose layers hold them (the denoiser when no model is given); the config comes from
  ``adapter_config.json`` beside the file (or the header), else alpha = rank.

Where the base model is known, a text-encoder path written for transformers 4
(``text_model.encoder...``) is matched to the model's own layer (transformers 5 dropped
``text_model``), and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.formats import METADATA_KEY, PEFT_KEY, PEFT_MODEL_PREFIX, detect_format

_MODULE_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclasses.dataclass
class LoraFile:
    path: Path
    kind: str
    tensors: dict
    header: dict

    @property
    def components(self) -> set:
        return {k.split(".", 1)[0] for k in self.tensors} if self.kind in ("lorakit", "diffusers-example") else set()


def open_lora(path, what: str = "LoRA") -> LoraFile:
    """The file's tensors, header and format; refuses a format lorakit cannot read, in one line."""
    from safetensors import safe_open

    from lorakit.pipelines import resolve_lora_file

    path = resolve_lora_file(path, what=what)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kind = detect_format(tensors, header)
    if kind == "unknown":
        example = next(iter(tensors), "none")
        raise LorakitError(
            f"{what} {path}: no LoRA format lorakit knows (first key: {example}); it reads lorakit/diffusers, "
            "kohya/A1111/ComfyUI, diffusers-example and PEFT files."
        )
    return LoraFile(path, kind, tensors, header)


def lora_config(ranks: dict, alphas: dict | None = None, base: dict | None = None) -> dict:
    """Adapter metadata for layers ``{module: rank}`` with ``{module: alpha}`` (alpha = rank when
    not given): the most common rank/alpha as ``r`` / ``lora_alpha``, the rest as PEFT patterns;
    ``base`` holds other LoraConfig fields the file states (dropout, DoRA, ...)."""
    from peft import LoraConfig

    from lorakit.lora import adapter_metadata

    alphas = {m: float((alphas or {}).get(m, ranks[m])) for m in ranks}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    given = {k: v for k, v in (base or {}).items() if k in fields and k not in ("r", "lora_alpha", "target_modules",
                                                                                   "rank_pattern", "alpha_pattern",
                                                                                   "exclude_modules", "layers_to_transform",
                                                                                   "layers_pattern", "peft_type", "task_type")}
    config = LoraConfig(
        **given, r=r, lora_alpha=alpha, target_modules=sorted(ranks),
        rank_pattern={re.escape(m): v for m, v in ranks.items() if v != r},
        alpha_pattern={re.escape(m): v for m, v in alphas.items() if v != alpha},
    )
    return adapter_metadata(config)


def _ranks(state: dict) -> dict:
    return {m[: -len(".lora_A.weight")]: int(t.shape[0]) for m, t in state.items() if m.endswith(".lora_A.weight")}


def _check_pairs(state: dict, component: str, path) -> None:
    for key in state:
        match = _MODULE_KEY.match(key)
        if not match:
            raise LorakitError(f"{path}: weight {component}.{key} is not a LoRA weight lorakit can read (lora_A/lora_B).")
        other = f"{match['module']}.lora_{'B' if match['which'] == 'A' else 'A'}.weight"
        if other not in state:
            raise LorakitError(f"{path}: layer {component}.{match['module']} lacks {other.rsplit('.', 2)[-2]}; the file is incomplete.")


def _split(tensors: dict, components, default: str) -> dict:
    """``{component: {key without the component: tensor}}``; keys with no known component
    prefix (old attention-processor files of a UNet) belong to ``default``."""
    out: dict[str, dict] = {}
    for key, tensor in tensors.items():
        head, _, rest = key.partition(".")
        component, key = (head, rest) if head in components else (default, key)
        out.setdefault(component, {})[key] = tensor
    return out


def _diffusers_to_peft(state: dict, text_encoder: bool) -> dict:
    """diffusers' own renames to PEFT keys: a UNet's (``lora.down``, ``to_q_lora``, ``processor.``)
    or a text encoder's (``lora_linear_layer``, and the old ``to_q_lora`` on CLIP's ``q_proj``)."""
    from diffusers.utils.state_dict_utils import convert_state_dict, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if text_encoder and any("lora_linear_layer" in k or "to_out_lora" in k for k in state):
        return convert_state_dict_to_peft(state)
    state = convert_unet_state_dict_to_peft(state)
    return convert_state_dict(state, {".lora_linear_layer.up": ".lora_B", ".lora_linear_layer.down": ".lora_A"})


def model_components(pm) -> list[str]:
    info = pm.hook.arch_info()
    return [info.denoiser, *[t for t in info.text_encoders if t != info.denoiser]]


def read_layers(lora: LoraFile, pm, model_dir: Path | None = None) -> dict:
    """``{component: (state dict, adapter metadata)}`` of ``lora`` for the arch of ``pm``."""
    components = model_components(pm)
    kind = lora.kind
    if kind == "kohya":
        layers = _read_kohya(lora, pm, model_dir)
    elif kind == "lorakit":
        from lorakit.formats.kohya import component_configs

        split = _split(lora.tensors, set(lora.components), components[0])
        configs = component_configs(json.loads(lora.header[METADATA_KEY]), split)
        layers = {c: (state, configs.get(c) or lora_config(_ranks(state))) for c, state in split.items()}
    elif kind == "diffusers-example":
        split = _split(lora.tensors, set(components) | _peft_components(lora.tensors), components[0])
        layers = {}
        for component, state in split.items():
            if any(not _MODULE_KEY.match(k) for k in state):
                state = _diffusers_to_peft(state, text_encoder=component != components[0])
            _check_pairs(state, component, lora.path)
            layers[component] = (state, lora_config(_ranks(state)))
    elif kind == "peft":
        state = {k[len(PEFT_MODEL_PREFIX):]: t for k, t in lora.tensors.items()}
        _check_pairs(state, "model", lora.path)
        component = _peft_component(state, components, model_dir)
        layers = {component: (state, _peft_meta(lora, state))}
    else:  # pragma: no cover - open_lora refuses it
        raise LorakitError(f"{lora.path}: unknown LoRA format.")
    return fit_to_model(layers, model_dir) if model_dir is not None else layers


def _peft_components(tensors) -> set:
    return {m["component"] for k in tensors if (m := PEFT_KEY.match(k))}


def _peft_config(lora: LoraFile) -> dict:
    file = lora.path.parent / "adapter_config.json"
    try:
        if file.is_file():
            return json.loads(file.read_text())
        return json.loads(lora.header[METADATA_KEY]) if METADATA_KEY in lora.header else {}
    except (OSError, ValueError) as exc:
        raise LorakitError(f"{file} is not readable JSON ({exc}); fix or remove it.") from None


def _peft_meta(lora: LoraFile, state: dict) -> dict:
    """The file's own LoRA config where it has one (checked against the weights' ranks), else
    one from the weights with alpha = rank."""
    from peft import LoraConfig

    from lorakit.lora import adapter_metadata

    config = _peft_config(lora)
    if "r" not in config:
        return lora_config(_ranks(state))
    _peft_alphas(lora, state)  # refuses a config of other ranks
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        return adapter_metadata(LoraConfig(**{k: v for k, v in config.items() if k in fields and k != "peft_type"}))
    except (TypeError, ValueError) as exc:
        raise LorakitError(f"{lora.path}: its LoRA config is not one PEFT accepts ({exc}).") from None


def _peft_alphas(lora: LoraFile, state: dict) -> dict:
    """Each layer's alpha as PEFT gave it: ``lora_alpha`` and ``alpha_pattern`` of its config
    (rslora folded in later by the kohya writer, which reads ``use_rslora``)."""
    from lorakit.formats.kohya import _pattern_value

    config = _peft_config(lora)
    ranks = _ranks(state)
    if "lora_alpha" not in config:
        return {}
    rank_of = {m: int(_pattern_value(config.get("rank_pattern") or {}, m, config.get("r", r))) for m, r in ranks.items()}
    if rank_of != ranks:
        raise LorakitError(f"{lora.path}: its adapter_config.json gives other ranks than its weights; it belongs to another file.")
    return {m: float(_pattern_value(config.get("alpha_pattern") or {}, m, config["lora_alpha"])) for m in ranks}


def _peft_component(state: dict, components, model_dir) -> str:
    """The component whose layers hold every module of a PEFT file (the denoiser without a model)."""
    if model_dir is None:
        return components[0]
    from lorakit.formats.layout import component_layers

    modules = {k.rsplit(".", 2)[0] for k in state}
    for component in components:
        try:
            layers = set(component_layers(model_dir, component))
        except LorakitError:
            continue
        if all(_fit(m, layers) for m in modules):
            return component
    return components[0]  # refused later, naming the layer that does not fit


def _fit(module: str, layers: set) -> str | None:
    if module in layers:
        return module
    other = module[len("text_model."):] if module.startswith("text_model.") else f"text_model.{module}"
    return other if other in layers else None


def fit_to_model(layers: dict, model_dir: Path) -> dict:
    """Text-encoder paths of the other transformers layout renamed to the model's own."""
    from lorakit.formats.layout import component_layers

    out = {}
    for component, (state, meta) in layers.items():
        try:
            known = set(component_layers(model_dir, component))
        except LorakitError:
            out[component] = (state, meta)
            continue
        modules = {k.rsplit(".", 2)[0] for k in state if _MODULE_KEY.match(k)}
        rename = {m: f for m in modules if (f := _fit(m, known)) and f != m}
        if rename:
            state = {_rename(k, rename): t for k, t in state.items()}
            meta = dict(meta)
            if isinstance(meta.get("target_modules"), list):
                meta["target_modules"] = sorted(rename.get(m, m) for m in meta["target_modules"])
        out[component] = (state, meta)
    return out


def _rename(key: str, rename: dict) -> str:
    module, _, rest = key.rpartition(".lora_")
    return f"{rename.get(module, module)}.lora_{rest}" if module else key


# ----------------------------------------------------------------------------- kohya


def kohya_names(pm, component: str, modules, model_config) -> dict:
    """``{module path: kohya layer name}`` (see :func:`lorakit.convert.kohya_names`)."""
    from lorakit.convert import kohya_names as names

    return names(pm, component, modules, model_config)


def every_layer_name(pm, component: str, layers, config) -> dict:
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


def _read_kohya(lora: LoraFile, pm, model_dir) -> dict:
    from lorakit.formats.kohya import lorakit_layers
    from lorakit.formats.layout import component_config, component_layers

    if not pm.hook.kohya_prefixes():
        raise LorakitError(f"{lora.path} is a kohya file, and this --arch has no kohya naming convention.")
    if model_dir is None:
        raise LorakitError(
            f"{lora.path} is a kohya file; reading its layer names needs the base model: pass --model (hub id or folder)."
        )

    def names_of(component):
        return every_layer_name(pm, component, component_layers(model_dir, component), component_config(model_dir, component))

    return lorakit_layers(lora.tensors, lora.header, pm.hook.kohya_prefixes() or {}, names_of)
