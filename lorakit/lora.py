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


def adapter_metadata(lora_config) -> dict:
    """The LoRA config as a JSON-able dict, stored in the safetensors header for exact reloads."""
    meta = lora_config.to_dict()
    for key, value in list(meta.items()):
        if isinstance(value, (set, frozenset, tuple)):
            meta[key] = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return json.loads(json.dumps(meta, default=str))


def inject_lora(components: dict, targets: dict[str, list[str]], config) -> dict:
    """Add a LoRA adapter to each targeted component; return ``{name: LoraConfig}``.

    Only LoRA parameters are left trainable, and they are kept in fp32 whatever the
    frozen weights' dtype, so mixed precision never updates fp16 weights directly.
    """
    import torch
    from peft import inject_adapter_in_model

    configs = {}
    for name, module_targets in targets.items():
        module = components.get(name)
        if not isinstance(module, torch.nn.Module):
            raise LorakitError(f"LoRA target component '{name}' is not a model of this arch; check --target-modules.")
        lora_config = make_lora_config(config, module_targets)
        try:
            inject_adapter_in_model(lora_config, module, adapter_name=ADAPTER)
        except ValueError as exc:
            if "not found in the base model" in str(exc) or "Target modules" in str(exc):
                sample = _example_names(module)
                raise LorakitError(
                    f"LoRA targets {', '.join(module_targets)} match no layer of '{name}'; "
                    f"pick names such as {sample}."
                ) from None
            raise
        for pname, param in module.named_parameters():
            if "lora_" in pname:
                param.data = param.data.float()
                param.requires_grad_(True)
            else:
                param.requires_grad_(False)
        configs[name] = lora_config
    return configs


def _example_names(module, limit=6) -> str:
    import torch

    names = []
    for n, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            short = ".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
            if short not in names:
                names.append(short)
        if len(names) >= limit:
            break
    return ", ".join(names)


def lora_parameters(module) -> list:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(module) -> dict:
    """The adapter's weights in PEFT naming (what diffusers' loaders accept unconverted)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def lora_layers(components: dict, lora_configs: dict) -> dict:
    """``{component: (state_dict, metadata)}`` as the ``save_lora`` hook receives it."""
    return {
        name: (lora_state_dict(components[name]), adapter_metadata(cfg)) for name, cfg in lora_configs.items()
    }


def count_lora_layers(module) -> int:
    """Number of layers with at least one active LoRA adapter."""
    return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0)
