"""What an arch plugin tells the core about itself (returned by the ``arch_info`` hook)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchInfo:
    #: One line shown by ``lorakit list-archs``.
    description: str
    #: Component that ``--target-modules`` applies to (e.g. "unet", "prior").
    denoiser: str
    #: Default LoRA targets per component, used when the user gives none.
    default_targets: dict = field(default_factory=dict)
    #: Components that ``--train-text-encoder`` adds LoRA to; empty = unsupported.
    text_encoders: tuple = ()
    #: Square training resolution used when ``--resolution`` is not given.
    default_resolution: int = 512
    #: diffusers pipeline class of the base model (for messages and docs).
    pipeline_class: str = ""
    #: True when the arch's inference pipeline accepts ``load_lora_weights``.
    pipeline_loads_lora: bool = True
