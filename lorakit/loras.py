"""Loading a user's LoRA file of any format into an arch's pipeline, for ``lorakit generate``
(and everything that loads LoRAs the way it does).

Every format :mod:`lorakit.formats.read` reads is accepted: lorakit/diffusers files, kohya /
A1111 / ComfyUI files (TheLastBen's use the same keys), diffusers' example-script files and
old attention-processor files, and PEFT folders -- the formats diffusers' LoRA loading guide
lists. Before anything is loaded, each layer of the file is checked against the loaded
pipeline's layers (names and shapes): a LoRA for another arch or model size is refused in
one line naming the layer and the arch the file fits, never a ``size mismatch`` traceback.

This holds for archs with a kohya layout (their components are the pipeline's own); other
archs' files go to the arch's ``load_lora`` hook as they are. A file in lorakit's
format is handed to that hook unchanged after the check; others are read into lorakit's layers
and written as a temporary lorakit file first, so the arch's loader sees one format.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lorakit.errors import LorakitError


def scales_of(spec: tuple, info, arch: str):
    """``W`` (a float) or, with a text-encoder strength, ``{component: strength}``."""
    if len(spec) < 3:
        return spec[1] if len(spec) > 1 else 1.0
    if not info.text_encoders:
        raise LorakitError(
            f"--lora {spec[0]}:{spec[1]:g}:{spec[2]:g}: --arch {arch} has no text-encoder LoRA, so there is no second "
            f"strength; write {spec[0]}:{spec[1]:g}."
        )
    return {info.denoiser: spec[1], **{name: spec[2] for name in info.text_encoders}}


def _refuse(lora, arch: str, model: str, problem: str) -> LorakitError:
    from lorakit.formats.fit import arch_hint

    return LorakitError(f"--lora {lora.path} does not fit --arch {arch} with --model {model} ({problem}); "
                        f"{arch_hint(lora, arch, model)}.")


def check_fits(pipeline, layers: dict, lora, arch: str, model: str) -> None:
    import torch

    from lorakit.formats.fit import mismatch

    for component, (state, _) in sorted(layers.items()):
        module = getattr(pipeline, component, None)
        if not isinstance(module, torch.nn.Module):
            raise _refuse(lora, arch, model, f"it has LoRA for '{component}', which this pipeline lacks")
        problem = mismatch(module, _model_layout(module, state))
        if problem:
            raise _refuse(lora, arch, model, f"{component}.{problem}")


def _model_layout(module, state: dict) -> dict:
    """Keys written for transformers 4 (``text_model.``) matched to this module's own paths."""
    names = {n for n, _ in module.named_modules()}
    out = {}
    for key, tensor in state.items():
        layer, _, rest = key.rpartition(".lora_")
        if layer not in names and layer.startswith("text_model.") and layer[len("text_model."):] in names:
            key = f"{layer[len('text_model.'):]}.lora_{rest}"
        out[key] = tensor
    return out


def load_lora(pm, pipeline, arch: str, model: str, model_dir: Path, path: Path, adapter_name: str) -> None:
    """Load the LoRA file ``path`` (any format) into ``pipeline`` as ``adapter_name``."""
    from lorakit.formats.read import open_lora, read_layers

    if not pm.hook.kohya_prefixes():  # components may be renamed or nested (combined pipelines): its own loader
        return _hand_over(pm, pipeline, arch, model, path, adapter_name)
    lora = open_lora(path, what="--lora")
    try:
        layers = read_layers(lora, pm, Path(model_dir))
    except LorakitError as exc:  # e.g. kohya names that match no layer of this model
        raise _refuse(lora, arch, model, str(exc).split("; is the LoRA")[0].rstrip(".")) from None
    check_fits(pipeline, layers, lora, arch, model)
    if lora.kind == "lorakit":
        return _hand_over(pm, pipeline, arch, model, lora.path, adapter_name)
    from lorakit.formats.write import write_lorakit
    from lorakit.outputs import WEIGHT_NAME

    with tempfile.TemporaryDirectory(prefix="lorakit-lora-") as tmp:
        converted = write_lorakit(pm, layers, Path(tmp) / WEIGHT_NAME, Path(model_dir))
        _hand_over(pm, pipeline, arch, model, converted, adapter_name, shown=lora.path)


def _hand_over(pm, pipeline, arch, model, path: Path, adapter_name: str, shown: Path | None = None) -> None:
    try:
        pm.hook.load_lora(pipeline=pipeline, path=path, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or names of another model
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        first = next((line for line in lines if "size mismatch" in line), lines[0])[:240]
        raise LorakitError(
            f"--lora {shown or path} does not fit --arch {arch} with --model {model} ({first}); it was trained "
            "for another model or arch."
        ) from None
