"""What both Kandinsky 2.2 stages share: the LoRA file, loading it back, scales, generation.

Kandinsky's pipelines have no ``load_lora_weights``, so the stages subclass :class:`Arch`
(not ``DiffusersArch``) and keep their own model-level save and load (:mod:`.lora_io`).
"""

from __future__ import annotations

from lorakit import Arch, hookimpl
from lorakit.archbase import missing_subfolders
from lorakit.errors import LorakitError

from .layout import DOCS
from .lora_io import load_lora_into, set_lora_scales, write_lora_file
from .pipeline import generate, is_combined


class Kandinsky22(Arch):
    """Hooks both stages share. ``info.denoiser`` is the component that receives LoRA,
    which is also the key prefix in the LoRA file."""

    #: Why ``lorakit generate`` cannot make images from this stage alone, and the fix.
    cannot_generate = ""

    def check_layout(self, path, subfolders=None) -> None:
        """Refuse a model folder that lacks one of the stage's subfolders, pointing to the docs."""
        missing = missing_subfolders(path, self.info.subfolders if subfolders is None else subfolders)
        if missing:
            raise LorakitError(
                f"--model {path} lacks the subfolder(s) {', '.join(missing)} of a diffusers "
                f"{self.info.pipeline_class}; pass a complete diffusers-format model (see {DOCS})."
            )

    @hookimpl
    def save_lora(self, components, lora_layers, output_dir, weight_name):
        write_lora_file(self.info.denoiser, lora_layers, output_dir, weight_name)

    @hookimpl
    def load_lora(self, pipeline, path, adapter_name):
        load_lora_into(pipeline, path, adapter_name=adapter_name)

    @hookimpl
    def set_lora_scales(self, pipeline, adapter_names, scales):
        set_lora_scales(pipeline, adapter_names, scales)

    @hookimpl
    def generate_images(self, pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale):
        if not is_combined(pipeline):  # one stage alone: no way from prompts to images
            raise LorakitError(self.cannot_generate)
        scale = self.info.guidance_scale if guidance_scale is None else guidance_scale
        return generate(pipeline, prompts, generator, num_inference_steps, resolution, scale)
