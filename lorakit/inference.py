"""Generating images with a base model and one or several lorakit LoRAs."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError, PluginError


def parse_lora_spec(spec: str) -> tuple:
    """``PATH``, ``PATH:W`` or ``PATH:W:TEW`` -> ``(path, W)`` or ``(path, W, TEW)``: the LoRA's
    strength on the denoiser and, when given, a separate one on the text encoders. A path that
    itself holds ':' is taken whole."""
    import math

    from lorakit.pipelines import resolve_lora_file

    def number(text, whole):
        try:
            value = float(text)
        except ValueError:
            return None
        if not math.isfinite(value):
            raise LorakitError(f"--lora {whole}: the scale must be a finite number, got {text}.")
        return value

    path, scales = spec, []
    while len(scales) < 2 and not Path(path).expanduser().exists():
        head, sep, tail = path.rpartition(":")
        if not (sep and head):
            break
        value = number(tail, spec)
        if value is None:
            if Path(head).expanduser().exists():
                raise LorakitError(f"--lora {spec}: the scale '{tail}' is not a number; write PATH:0.8 or PATH:0.8:0.5.")
            break
        path, scales = head, [value] + scales
    return (resolve_lora_file(path, what="--lora"), *(scales or [1.0]))


def check_request(arch: str, steps: int, resolution, guidance_scale) -> None:
    """Refuse generation settings that cannot give an image, before the model loads."""
    import math

    from lorakit.plugins import arch_info

    info = arch_info(arch)
    if steps < 1:
        raise LorakitError(f"--steps must be at least 1, got {steps}.")
    multiple = max(8, int(info.size_multiple))
    if resolution is not None and (resolution < multiple or resolution % multiple):
        raise LorakitError(f"--resolution must be a positive multiple of {multiple} for --arch {arch}, got {resolution}.")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise LorakitError(f"--guidance-scale must be a finite number, got {guidance_scale}.")



def load_pipeline_with_loras(arch: str, model: str, loras: list[tuple], device=None, dtype=None,
                             model_config=None, revision=None, variant=None):
    """The arch's pipeline with ``loras`` (``(path, W)`` or ``(path, W, TEW)``, any format
    lorakit reads, see :mod:`lorakit.loras`) loaded at their strengths."""
    import torch

    from lorakit.loras import load_lora, scales_of
    from lorakit.models import resolve_model
    from lorakit.plugins import get_plugin_manager

    pm = get_plugin_manager(arch)
    for hook in ("load_pipeline", "generate_images"):
        if not getattr(pm.hook, hook).get_hookimpls():
            raise PluginError(f"arch '{arch}' cannot generate images (no {hook} hook).")
    info = pm.hook.arch_info()
    scales = [scales_of(spec, info, arch) for spec in loras]  # refused before the model loads
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:  # the arch's native half precision on a GPU; fp32 on CPU
        dtype = getattr(torch, info.inference_dtype) if device == "cuda" else torch.float32
    path = resolve_model(model, arch=arch, model_config=model_config, revision=revision, variant=variant)
    pipeline = pm.hook.load_pipeline(model_path=path, device=device, dtype=dtype)
    names = []
    for i, spec in enumerate(loras):
        name = f"lora{i}"
        load_lora(pm, pipeline, arch, model, path, Path(spec[0]), name)
        names.append(name)
    if names:
        pm.hook.set_lora_scales(pipeline=pipeline, adapter_names=names, scales=scales)
    return pm, pipeline


def generate(
    arch: str,
    model: str,
    prompts: list[str],
    loras: list[tuple] = (),
    steps: int = 25,
    resolution: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    device=None,
    model_config: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
):
    """Images for ``prompts`` from the base ``model`` with ``loras`` (path, W[, TEW]) applied
    (``model_config``, ``revision``, ``variant``: as :func:`lorakit.models.resolve_model` takes them)."""
    import torch

    check_request(arch, steps, resolution, guidance_scale)
    pm, pipeline = load_pipeline_with_loras(arch, model, list(loras), device=device, model_config=model_config,
                                            revision=revision, variant=variant)
    generator = torch.Generator().manual_seed(seed)
    return pm.hook.generate_images(
        pipeline=pipeline,
        prompts=list(prompts),
        generator=generator,
        num_inference_steps=steps,
        resolution=resolution,
        guidance_scale=guidance_scale,
    )
