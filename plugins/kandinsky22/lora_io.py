"""Kandinsky 2.2 LoRA files, written and read at model level.

Kandinsky pipelines have no ``load_lora_weights``, so LoRA goes through diffusers'
model-level ``save_lora_adapter`` format: ``pytorch_lora_weights.safetensors`` holding PEFT
keys prefixed with ``unet.`` or ``prior.`` and the adapter config as
``lora_adapter_metadata``, i.e. what ``model.load_lora_adapter(folder, weight_name=...,
prefix="unet" | "prior")`` reads exactly. Several adapters and their scales live on the
model (``set_adapters``). Torch is imported only when called.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.pipelines import resolve_lora_file


def load_lora_into(pipeline, path, adapter_name: str = "default") -> list[str]:
    """Load a lorakit Kandinsky 2.2 LoRA into a diffusers Kandinsky 2.2 pipeline.

    ``pipeline``: a ``KandinskyV22Pipeline`` (decoder LoRA), ``KandinskyV22PriorPipeline``
    (prior LoRA) or ``KandinskyV22CombinedPipeline`` (either). ``path``: a training output
    folder or its ``pytorch_lora_weights.safetensors``. The file says which model it adapts
    (its keys start with ``unet.`` or ``prior.``); the adapter is loaded with diffusers'
    model-level ``load_lora_adapter`` under ``adapter_name`` and is active afterwards. To mix
    several adapters, load each under its own name, then
    ``pipeline.unet.set_adapters([...], weights=[...])`` (or ``pipeline.prior``).

    Returns which models received the adapter: ``["unet"]`` or ``["prior"]``.
    """
    file = resolve_lora_file(path)
    loaded = []
    for prefix in _lora_prefixes(file):
        model = lora_model(pipeline, prefix)
        if model is None:
            wanted = "KandinskyV22Pipeline" if prefix == "unet" else "KandinskyV22PriorPipeline"
            raise LorakitError(
                f"{file} is a Kandinsky 2.2 {'decoder' if prefix == 'unet' else 'prior'} LoRA but "
                f"{type(pipeline).__name__} has no {prefix}; load it into a {wanted} or KandinskyV22CombinedPipeline."
            )
        if adapter_name in (getattr(model, "peft_config", None) or {}):
            raise LorakitError(
                f"the {prefix} of this pipeline already has an adapter named '{adapter_name}'; "
                "pass another adapter_name."
            )
        model.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=prefix, adapter_name=adapter_name)
        loaded.append(prefix)
    return loaded


def _lora_prefixes(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            prefixes = sorted({key.split(".", 1)[0] for key in handle.keys()})
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise LorakitError(f"{file} is not a readable safetensors file ({exc}); train or download it again.") from None
    if not prefixes or any(p not in ("unet", "prior") for p in prefixes):
        raise LorakitError(
            f"{file} is not a Kandinsky 2.2 LoRA from lorakit (its keys start with {', '.join(prefixes) or 'nothing'}, "
            "expected unet. or prior.); train it with --arch kandinsky22 or kandinsky22-prior."
        )
    return prefixes


def lora_model(pipeline, prefix: str):
    """The model a LoRA prefix belongs to; the combined pipeline names its prior ``prior_prior``."""
    names = ("unet",) if prefix == "unet" else ("prior", "prior_prior")
    for name in names:
        model = getattr(pipeline, name, None)
        if model is not None and hasattr(model, "load_lora_adapter"):
            return model
    return None


def write_lora_file(denoiser: str, lora_layers, output_dir, weight_name) -> None:
    """The trained ``denoiser``'s LoRA (its PEFT state and config) as one model-level file."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    state, metadata = {}, {}
    for name, (layers, meta) in lora_layers.items():
        if name != denoiser:
            raise LorakitError(f"Kandinsky 2.2 LoRA can only adapt the {denoiser}, not {name}.")
        state.update(LoraBaseMixin.pack_weights(layers, name))
        metadata.update(LoraBaseMixin.pack_weights(meta, name))
    LoraBaseMixin.write_lora_layers(
        state_dict=state,
        save_directory=str(output_dir),
        is_main_process=True,
        weight_name=weight_name,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata=metadata,
    )


def set_lora_scales(pipeline, adapter_names, scales) -> None:
    """Give each loaded adapter its scale, on whichever model (UNet or prior) holds it."""
    for prefix in ("unet", "prior"):
        model = lora_model(pipeline, prefix)
        held = getattr(model, "peft_config", None) or {}
        pairs = [(n, s) for n, s in zip(adapter_names, scales) if n in held]
        if pairs:
            model.set_adapters([n for n, _ in pairs], weights=[s for _, s in pairs])
