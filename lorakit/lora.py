"""Putting LoRA layers into components and taking them out again (arch-agnostic)."""

from __future__ import annotations

import importlib.metadata
import json

from lorakit.errors import LorakitError

ADAPTER = "default"


def check_text_encoder_lora_support() -> None:
    """Fail early (not at save/load time) if transformers and peft cannot do text-encoder LoRA."""
    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # older transformers: no requirement published
        return
    peft_version = importlib.metadata.version("peft")
    if Version(peft_version) < Version(MIN_PEFT_VERSION):
        tf_version = importlib.metadata.version("transformers")
        raise LorakitError(
            f"text-encoder LoRA needs peft >= {MIN_PEFT_VERSION} with transformers {tf_version}, "
            f"but peft {peft_version} is installed; reinstall lorakit's pins "
            "(pip install 'transformers>=5.20,<=5.23') or drop --train-text-encoder."
        )


def make_lora_config(config, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        init_lora_weights=config.init_lora_weights if config.init_lora_weights != "default" else True,
        target_modules=list(targets),
    )


#: Always written: what shapes the reloaded adapter, known to every peft that diffusers loads
#: with (diffusers 0.39 reads ``rank_pattern`` unconditionally: a KeyError without it).
ALWAYS_WRITTEN = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
#: Never written: bookkeeping that changes nothing at load time and that older peft refuses
#: (``LoraConfig(peft_version=...)`` is a TypeError in peft 0.17).
NEVER_WRITTEN = ("peft_version",)


def _jsonable(meta: dict) -> dict:
    for key, value in list(meta.items()):
        if isinstance(value, (set, frozenset, tuple)):
            meta[key] = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return json.loads(json.dumps(meta, default=str))


def adapter_metadata(lora_config) -> dict:
    """The LoRA config as a JSON-able dict, stored in the safetensors header for exact reloads.

    Only the fields that differ from a default ``LoraConfig`` (plus :data:`ALWAYS_WRITTEN`) are
    written: diffusers builds ``LoraConfig(**metadata)``, and every field the newest peft adds
    (9 between peft 0.17 and 0.21, all at their defaults here) is a ``TypeError`` in an older
    one. A field left out takes the same default on reload, so the reload stays exact; a
    non-default field an old peft does not know still fails loudly rather than loading wrong.
    """
    from peft import LoraConfig

    meta, default = _jsonable(lora_config.to_dict()), _jsonable(LoraConfig().to_dict())
    return {
        key: value
        for key, value in meta.items()
        if key not in NEVER_WRITTEN and (key in ALWAYS_WRITTEN or key not in default or value != default[key])
    }


def checkpoint_layout(module, state: dict) -> dict:
    """``state``'s keys in the module-path layout of the model's checkpoints, which loaders
    under transformers 4 and 5 both read: transformers 5 dropped a level of some models'
    paths (``CLIPTextModel``'s ``text_model``) and records that in its checkpoint conversion
    mapping; older stacks (diffusers 0.32-0.39 with transformers 4) need the level, and
    diffusers under transformers 5 strips it again."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # transformers 4: module paths are the checkpoint's already
        return state
    prefixes = [
        c.prefix_to_remove
        for c in get_checkpoint_conversion_mapping(type(module).__name__) or ()
        if isinstance(c, PrefixChange) and c.prefix_to_remove and not c.model_prefix and not hasattr(module, c.prefix_to_remove)
    ]
    for prefix in prefixes:
        state = {k if k.startswith(prefix + ".") else f"{prefix}.{k}": v for k, v in state.items()}
    return state


def inject_lora(components: dict, targets: dict[str, list[str]], config, lora_configs: dict | None = None) -> dict:
    """Add a LoRA adapter to each targeted component; return ``{name: LoraConfig}``.

    Every target name must match at least one layer of its component (as PEFT matches: the
    layer's full name or its dotted suffix), or the run is refused before training, naming
    the ones that match nothing: a user's ``--target-modules``, or the arch's own defaults
    (a plugin bug). Only LoRA parameters are left trainable, and they are kept in fp32
    whatever the frozen weights' dtype, so mixed precision never updates fp16 weights directly.
    """
    import torch
    from peft import inject_adapter_in_model

    configs = {}
    for name, module_targets in targets.items():
        module = components.get(name)
        if not isinstance(module, torch.nn.Module):
            raise LorakitError(f"LoRA target component '{name}' is not a model of this arch; check --target-modules.")
        check_targets_match(module, name, module_targets, config)
        # lora_configs: given per component by --init-lora (the file's rank/alpha patterns)
        lora_config = (lora_configs or {}).get(name) or make_lora_config(config, module_targets)
        try:
            inject_adapter_in_model(lora_config, module, adapter_name=ADAPTER)
        except ValueError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LorakitError(
                f"LoRA targets {', '.join(module_targets)} of '{name}' cannot take a LoRA ({first[:200]}); "
                f"pick Linear or Conv layers such as {_example_names(module)}."
            ) from None
        for pname, param in module.named_parameters():
            if "lora_" in pname:
                param.data = param.data.float()
                param.requires_grad_(True)
            else:
                param.requires_grad_(False)
        configs[name] = lora_config
    return configs


def _matches(layer: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the full name, or a dotted suffix of it."""
    return layer == target or layer.endswith("." + target)


def check_targets_match(module, component: str, module_targets, config) -> None:
    """Refuse target names that match no layer of ``component``, in one line: the user's
    (``--target-modules``) or, for names the user did not give, the arch's (a plugin bug)."""
    from lorakit.errors import PluginError

    modules = [(n, m) for n, m in module.named_modules() if n]
    matched = {t: [(n, m) for n, m in modules if _matches(n, t)] for t in module_targets}
    missing = [t for t, found in matched.items() if not found]
    # a name that matches only blocks (modules with children, e.g. a whole Attention) is not a layer
    blocks = [t for t, found in matched.items() if found and all(any(True for _ in m.children()) for _, m in found)]
    if not missing and not blocks:
        return
    given = set(getattr(config, "target_modules", None) or ())
    users_missing, users_blocks = [t for t in missing if t in given], [t for t in blocks if t in given]
    if users_missing:
        examples = _example_names(module, near=users_missing)
        raise LorakitError(
            f"--target-modules {', '.join(users_missing)} match no layer of '{component}'; pick names such as {examples}."
        )
    if users_blocks:
        t = users_blocks[0]
        kind = type(matched[t][0][1]).__name__
        inside = _example_names(matched[t][0][1])
        raise LorakitError(
            f"--target-modules {t} names {kind} blocks of '{component}', not layers; LoRA goes on the Linear or "
            f"Conv layers inside, such as {inside}."
        )
    bad = missing + blocks
    raise PluginError(
        f"arch plugin '{config.arch}': its LoRA targets for '{component}' (ArchInfo.default_targets or the "
        f"target_modules hook) name {', '.join(bad)}, which match no layer; layers are named like "
        f"{_example_names(module, near=bad)}."
    )


def _example_names(module, limit=6, near=()) -> str:
    """Short target names that do match layers of ``module``; the ones closest to ``near`` first."""
    import difflib

    import torch

    names = []
    for n, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            short = ".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
            if short not in names:
                names.append(short)
    close = []
    for wrong in near:
        close += [c for c in difflib.get_close_matches(wrong, names, n=2, cutoff=0.6) if c not in close]
    ordered = close + [n for n in names if n not in close]
    return ", ".join(ordered[:limit])


def lora_parameters(module) -> list:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(module) -> dict:
    """The adapter's weights in PEFT naming (what diffusers' loaders accept unconverted)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def lora_layers(components: dict, lora_configs: dict) -> dict:
    """``{component: (state_dict, metadata)}`` as the ``save_lora`` hook receives it; refuses
    (one line) a non-finite weight, so none can reach a checkpoint or the final file."""
    out = {}
    for name, cfg in lora_configs.items():
        state = lora_state_dict(components[name])
        check_finite(state, name)
        out[name] = (checkpoint_layout(components[name], state), adapter_metadata(cfg))
    return out


def check_finite(state: dict, component: str) -> None:
    """Refuse a state dict holding NaN or inf, naming the first such tensor."""
    import torch

    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LorakitError(
                f"LoRA weight {component}.{key} is not finite (NaN or inf), so it was not saved; "
                "lower --learning-rate and train again from the last checkpoint."
            )


def count_lora_layers(module) -> int:
    """Number of layers with at least one active LoRA adapter."""
    return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0)
