"""What an arch plugin tells the core about itself: data, not code.

:class:`ArchInfo` (returned by the ``arch_info`` hook) says what the core needs to know
about a model family; from it the core derives what every arch used to restate (model
recognition, LoRA targets, size checks, kohya naming, which options apply). The base
classes that turn this data into hook implementations live in :mod:`lorakit.archbase`.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Objective families an arch can declare; each brings its own options (lorakit.objectives).
OBJECTIVES = ("ddpm", "flow", "custom")


@dataclass(frozen=True)
class ArchInfo:
    #: One line shown by ``lorakit list-archs``.
    description: str
    #: Component that ``--target-modules`` applies to (e.g. "unet", "prior", "transformer").
    denoiser: str
    #: Default LoRA targets per component, used when the user gives none.
    default_targets: dict = field(default_factory=dict)
    #: Components that ``--train-text-encoder`` adds LoRA to; empty = unsupported.
    text_encoders: tuple = ()
    #: Square training resolution used when ``--resolution`` is not given (and the model's
    #: config does not say).
    default_resolution: int = 512
    #: diffusers pipeline class of the base model (messages, docs, and the shared loaders
    #: of :class:`lorakit.archbase.DiffusersArch`).
    pipeline_class: str = ""
    #: True when the arch's inference pipeline accepts ``load_lora_weights``.
    pipeline_loads_lora: bool = True
    #: ``model_index.json`` class names this arch trains (default: ``pipeline_class``).
    pipeline_classes: tuple = ()
    #: Subfolders a model folder must have; a missing one is refused in one line.
    subfolders: tuple = ()
    #: Image sides must be multiples of this (latent downsampling x patch size).
    size_multiple: int = 8
    #: The objective family (``ddpm`` or ``flow``; ``custom`` = the arch's own options only).
    objective: str = "ddpm"
    #: Every text encoder whose outputs condition the denoiser, in the order the arch's
    #: ``encode_text`` hook knows them; the core caches each one's outputs separately. Empty:
    #: ``text_encoders`` are taken to be what ``encode_prompt`` runs (released once prompts are cached).
    prompt_encoders: tuple = ()
    #: Frozen components that only encode inputs (a VAE, an image encoder): released from the
    #: device once every input is cached.
    input_encoders: tuple = ()
    #: kohya-style key prefix per component (see the ``kohya_prefixes`` hook; the paths after it come
    #: from the ``kohya_module_names`` hook, where an arch has one); None = no convention.
    kohya_prefixes: dict | None = None
    #: The arch's own options (:class:`lorakit.options.Option`), accepted with ``--arch`` this arch.
    options: tuple = ()
    #: Core or objective options that do not apply to this arch, refused when given: a tuple of
    #: names (a generic message), or ``{name: the one-line message saying why and what to do}``.
    refuses: tuple | dict = ()
    #: Default guidance scale of the inference pipeline (``generate``, samples).
    guidance_scale: float | None = None
    #: Precision ``lorakit generate`` runs the pipeline in on a GPU ("float16" or "bfloat16",
    #: the model's native one); fp32 on CPU.
    inference_dtype: str = "float16"
    #: Key prefixes that together mark a single-file checkpoint (original ldm/SGM layout) of this
    #: arch; empty = ``--model FILE.safetensors`` is refused. The file is read by the
    #: ``from_single_file`` of ``pipeline_class`` (see :mod:`lorakit.singlefile`).
    single_file_keys: tuple = ()
    #: How ``lorakit tiny --single-file`` writes each component into one file:
    #: ``{component: (key prefix, layout)}``, layouts as in :mod:`lorakit.ldm`.
    single_file_layout: dict = field(default_factory=dict)

    @property
    def recognised_classes(self) -> tuple:
        return tuple(self.pipeline_classes) or ((self.pipeline_class,) if self.pipeline_class else ())
