"""LoRA file formats other tools write, and the model facts converting between them needs.

* :mod:`lorakit.formats.kohya` -- kohya-ss / A1111 / ComfyUI files (``lora_unet_...``
  keys with ``lora_down`` / ``lora_up`` / ``alpha``), both ways;
* :mod:`lorakit.formats.layout` -- a base model's component configs and layer names, read
  from its folder without loading weights.

lorakit's own format is what the arch's ``save_lora`` hook writes: PEFT keys
(``<component>.<module>.lora_A.weight``) and the adapter configs under ``lora_adapter_metadata``.
"""

from __future__ import annotations

import re

METADATA_KEY = "lora_adapter_metadata"
#: a lorakit (PEFT-named) LoRA weight: ``<component>.<module path>.lora_{A,B}.weight``
PEFT_KEY = re.compile(r"^(?P<component>[^.]+)\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def detect_format(keys) -> str:
    """``"kohya"`` (``*.lora_down.weight`` keys), ``"lorakit"`` (PEFT keys) or ``"unknown"``."""
    keys = list(keys)
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    if any(PEFT_KEY.match(k) for k in keys):
        return "lorakit"
    return "unknown"
