"""LoRA file formats other tools write, and the model facts converting between them needs.

* :mod:`lorakit.formats.kohya` -- kohya-ss / A1111 / ComfyUI files (``lora_unet_...``
  keys with ``lora_down`` / ``lora_up`` / ``alpha``), both ways;
* :mod:`lorakit.formats.layout` -- a base model's component configs and layer names, read
  from its folder without loading weights;
* :mod:`lorakit.formats.read` -- any of the formats below as the layers lorakit trains and saves;
* :mod:`lorakit.formats.write` -- those layers written in any of them.

lorakit's own format is what the arch's ``save_lora`` hook writes: PEFT keys
(``<component>.<module>.lora_A.weight``) and the adapter configs under ``lora_adapter_metadata``.
"""

from __future__ import annotations

import re

METADATA_KEY = "lora_adapter_metadata"
#: a lorakit (PEFT-named) LoRA weight: ``<component>.<module path>.lora_{A,B}.weight``
PEFT_KEY = re.compile(r"^(?P<component>[^.]+)\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
#: the prefix PEFT's ``PeftModel.save_pretrained`` gives every key of ``adapter_model.safetensors``
PEFT_MODEL_PREFIX = "base_model.model."

#: Formats lorakit reads and writes, with what writes each (the names ``--to`` takes).
FORMATS = {
    "lorakit": "lorakit train and diffusers' save_lora_weights: PEFT keys per component, adapter configs in the header",
    "kohya": "kohya-ss sd-scripts, A1111, Forge, ComfyUI: lora_unet_/lora_te*_ keys with lora_down/lora_up/alpha",
    "diffusers-example": "diffusers' example scripts (and old attention-processor files): no header, alpha = rank",
    "peft": "PEFT's save_pretrained: base_model.model. keys, adapter_config.json beside the file",
}
#: ``--to`` spellings that mean the same format
ALIASES = {"diffusers": "lorakit"}


def detect_format(keys, header: dict | None = None) -> str:
    """A LoRA file's format from its keys (and header): one of :data:`FORMATS` or ``"unknown"``.

    ``lorakit`` is a PEFT-keyed file with adapter metadata; the same keys without it (what
    diffusers' current examples and ``save_lora_weights`` without metadata write) read as
    ``diffusers-example``, as do the older ``lora.down`` / ``lora_linear_layer`` /
    ``processor.to_q_lora`` keys."""
    keys = list(keys)
    if not keys:
        return "unknown"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    if all(k.startswith(PEFT_MODEL_PREFIX) for k in keys):
        return "peft"
    if any(PEFT_KEY.match(k) for k in keys) and METADATA_KEY in (header or {}):
        return "lorakit"
    old = (".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
           "_lora.down.weight", "_lora.up.weight")
    if any(k.endswith(old) for k in keys) or any(PEFT_KEY.match(k) for k in keys):
        return "diffusers-example"
    return "unknown"
