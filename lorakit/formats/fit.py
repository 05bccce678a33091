"""Does a LoRA fit a model? Checked on names and shapes before anything is loaded, so a LoRA
for another arch or model size is one line naming the layer (and the arch it fits), never a
``size mismatch`` traceback from deep inside a loader.
"""

from __future__ import annotations


def mismatch(module, state: dict) -> str | None:
    """``None`` when every ``<layer>.lora_{A,B}.weight`` of ``state`` fits a Linear/Conv layer of
    ``module``; else ``"<layer>: <why>"`` for the first one that does not."""
    import torch

    layers = dict(module.named_modules())
    for key in sorted(state):
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue  # DoRA magnitudes, LoRA biases: they follow the layer's own shape
        layer, _, which = key.rpartition(".lora_")
        target = layers.get(layer)
        if target is None:
            return f"{layer}: no such layer in the model"
        base = getattr(target, "base_layer", target)  # a layer already carrying a LoRA
        tensor = state[key]
        if isinstance(base, torch.nn.Linear):
            size = base.in_features if which.startswith("A") else base.out_features
        elif isinstance(base, torch.nn.Conv2d):
            size = base.in_channels if which.startswith("A") else base.out_channels
        else:
            return f"{layer}: a {type(base).__name__}, which takes no LoRA"
        have = tensor.shape[1] if which.startswith("A") else tensor.shape[0]
        if tensor.dim() < 2 or have != size:
            side = "inputs" if which.startswith("A") else "outputs"
            return f"{layer}: the LoRA has {have} {side}, the model's layer {size}"
    return None


def arch_hint(lora, arch: str, model) -> str:
    """The end of a "does not fit" line: which arch the LoRA is for, as far as the file tells."""
    others = fitting_archs(lora, arch)
    if len(others) == 1:
        return f"it is a LoRA for --arch {others[0]}"
    if others:
        return f"it looks like a LoRA for --arch {' or '.join(others)}, or for another model size of {arch}"
    return f"it was trained for another model (or model size) than --model {model}"


def fitting_archs(lora, current: str) -> list[str]:
    """Installed archs other than ``current`` whose components and kohya prefixes could hold
    the LoRA (its run config's arch first when it has one): what an error suggests."""
    import json

    from lorakit.plugins import arch_entries, arch_info

    run = lora.path.parent / "lorakit_config.json"
    try:
        named = json.loads(run.read_text()).get("arch") if run.is_file() else None
    except (OSError, ValueError):
        named = None
    if named and named != current:
        return [named]
    keys = list(lora.tensors)
    out = []
    for arch in arch_entries():
        if arch == current:
            continue
        try:
            info = arch_info(arch)
        except Exception:  # a broken plugin is no suggestion
            continue
        components = {info.denoiser, *info.text_encoders}
        if lora.kind == "kohya":
            prefixes = set((info.kohya_prefixes or {}).values())
            used = {k.split(".", 1)[0] for k in keys}
            if prefixes and all(any(n.startswith(p + "_") for p in prefixes) for n in used):
                out.append(arch)
        elif lora.components and lora.components <= components:
            out.append(arch)
    version = str(lora.header.get("ss_base_model_version", ""))
    if version:
        out = [a for a in out if _declares(a, version)] or out
    return out


def _declares(arch: str, version: str) -> bool:
    """The arch's own ``kohya_metadata`` hook names this base model version."""
    from lorakit.plugins import get_plugin_manager

    try:
        meta = get_plugin_manager(arch).hook.kohya_metadata(model_configs={}) or {}
    except Exception:
        return False
    return meta.get("ss_base_model_version") == version
