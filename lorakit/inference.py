"""Generating images with a base model and one or several lorakit LoRAs."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import PluginError


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``path`` or ``path:scale`` -> (path, scale)."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    from lorakit.pipelines import resolve_lora_file

    return resolve_lora_file(path, what="--lora"), scale


def load_pipeline_with_loras(arch: str, model: str, loras: list[tuple[Path, float]], device=None, dtype=None):
    import torch

    from lorakit.models import resolve_model
    from lorakit.plugins import get_plugin_manager

    pm = get_plugin_manager(arch)
    for hook in ("load_pipeline", "generate_images"):
        if not getattr(pm.hook, hook).get_hookimpls():
            raise PluginError(f"arch '{arch}' cannot generate images (no {hook} hook).")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:  # the arch's native half precision on a GPU; fp32 on CPU
        dtype = getattr(torch, pm.hook.arch_info().inference_dtype) if device == "cuda" else torch.float32
    pipeline = pm.hook.load_pipeline(model_path=resolve_model(model), device=device, dtype=dtype)
    names = []
    for i, (path, _) in enumerate(loras):
        name = f"lora{i}"
        pm.hook.load_lora(pipeline=pipeline, path=path, adapter_name=name)
        names.append(name)
    if names:
        pm.hook.set_lora_scales(pipeline=pipeline, adapter_names=names, scales=[s for _, s in loras])
    return pm, pipeline


def generate(
    arch: str,
    model: str,
    prompts: list[str],
    loras: list[tuple[Path, float]] = (),
    steps: int = 25,
    resolution: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    device=None,
):
    """Images for ``prompts`` from the base ``model`` with ``loras`` (path, scale) applied."""
    import torch

    pm, pipeline = load_pipeline_with_loras(arch, model, list(loras), device=device)
    generator = torch.Generator().manual_seed(seed)
    return pm.hook.generate_images(
        pipeline=pipeline,
        prompts=list(prompts),
        generator=generator,
        num_inference_steps=steps,
        resolution=resolution,
        guidance_scale=guidance_scale,
    )
