"""Generating images with a base model and one or several lorakit LoRAs."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError, PluginError


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``path`` or ``path:scale`` -> (path, scale); a path that itself holds ':' is taken whole."""
    import math

    from lorakit.errors import LorakitError
    from lorakit.pipelines import resolve_lora_file

    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).expanduser().exists():
        try:
            scale = float(tail)
        except ValueError:
            if Path(head).expanduser().exists():
                raise LorakitError(f"--lora {spec}: the scale '{tail}' is not a number; write PATH:0.8.") from None
        else:
            if not math.isfinite(scale):
                raise LorakitError(f"--lora {spec}: the scale must be a finite number, got {tail}.")
            path = head
    return resolve_lora_file(path, what="--lora"), scale


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



def load_pipeline_with_loras(arch: str, model: str, loras: list[tuple[Path, float]], device=None, dtype=None,
                             model_config=None, revision=None, variant=None):
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
    path = resolve_model(model, arch=arch, model_config=model_config, revision=revision, variant=variant)
    pipeline = pm.hook.load_pipeline(model_path=path, device=device, dtype=dtype)
    names = []
    for i, (path, _) in enumerate(loras):
        name = f"lora{i}"
        try:
            pm.hook.load_lora(pipeline=pipeline, path=path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:  # shapes or names of another model
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            first = next((line for line in lines if "size mismatch" in line), lines[0])[:240]
            raise LorakitError(
                f"--lora {path} does not fit --arch {arch} with --model {model} ({first}); it was trained "
                "for another model or arch."
            ) from None
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
    model_config: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
):
    """Images for ``prompts`` from the base ``model`` with ``loras`` (path, scale) applied
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
