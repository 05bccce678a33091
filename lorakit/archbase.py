"""Base classes for arch plugins: what every arch shares, derived once from its ArchInfo.

An arch plugin subclasses :class:`Arch` (any model family) or :class:`DiffusersArch` (a
diffusers pipeline with ``load_lora_weights``), sets ``info = ArchInfo(...)`` and
implements only what differs: ``load_components``, ``encode_images``, ``encode_prompt``
(or ``encode_text``), ``compute_loss`` and ``write_tiny_model``. Every inherited hook is
an ordinary pluggy hook implementation, so a subclass overrides one by defining a method
of the same name (decorated with ``@hookimpl`` again).

The entry point names the class (``my-arch = "my_pkg.my_arch:MyArch"``): each run gets a
fresh instance. Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.arch import ArchInfo
from lorakit.errors import LorakitError
from lorakit.hookspecs import hookimpl


def default_target_modules(info: ArchInfo, config) -> dict:
    """``{component: [layer names]}`` from the arch's data: ``--target-modules`` (or the
    default targets) for the denoiser, plus each text encoder's defaults with
    ``--train-text-encoder``."""
    denoiser = info.denoiser
    targets = {denoiser: list(config.target_modules or info.default_targets.get(denoiser, ()))}
    if not targets[denoiser]:
        raise LorakitError(f"--arch {config.arch} has no default LoRA targets; pass --target-modules.")
    if config.train_text_encoder:
        for name in info.text_encoders:
            targets[name] = list(info.default_targets.get(name, ()))
    return targets


def missing_subfolders(path: Path, subfolders) -> list[str]:
    return [s for s in subfolders if not (Path(path) / s).is_dir()]


class Arch:
    """Hooks every arch derives from its :class:`ArchInfo` (set ``info`` in the subclass)."""

    info: ArchInfo

    @hookimpl
    def arch_info(self):
        return self.info

    @hookimpl
    def recognizes_model(self, model_index):
        return model_index.get("_class_name") in self.info.recognised_classes

    @hookimpl
    def target_modules(self, config, components):
        return default_target_modules(self.info, config)

    @hookimpl
    def kohya_prefixes(self):
        return self.info.kohya_prefixes

    def check_layout(self, path, subfolders=None, config=None) -> None:
        """Refuse a model folder that lacks one of the arch's subfolders, in one line (``vae/``
        is not needed when ``config`` brings a ``--vae``)."""
        wanted = self.info.subfolders if subfolders is None else subfolders
        if config is not None and getattr(config, "vae", None):
            wanted = [s for s in wanted if s != "vae"]
        missing = missing_subfolders(path, wanted)
        if missing:
            expected = self.info.pipeline_class or "model of this arch"
            raise LorakitError(
                f"--model {path} lacks the subfolder(s) {', '.join(missing)} of a diffusers "
                f"{expected}; pass a complete diffusers-format model."
            )


class DiffusersArch(Arch):
    """An arch whose diffusers pipeline (``info.pipeline_class``) has ``load_lora_weights``:
    saving, loading, scaling several LoRAs, assembling a pipeline and generating are the
    pipeline's own."""

    #: Extra keyword arguments when assembling the pipeline from loaded components.
    pipeline_kwargs: dict = {}
    #: Scheduler class used for sampling when the model's scheduler class is unknown.
    inference_scheduler: str = "DDIMScheduler"

    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.info.pipeline_class)

    @hookimpl
    def encode_images(self, components, pixel_values, batch):
        """The latents of ``components["vae"]`` as the pipeline expects them (override for an
        arch that encodes images otherwise)."""
        return {"latents": vae_latents(components["vae"], pixel_values)}

    @hookimpl
    def save_lora(self, components, lora_layers, output_dir, weight_name):
        # PEFT keys are saved unconverted, with each component's LoRA config as metadata:
        # diffusers' key conversion silently drops non-attention targets, and without the
        # metadata a reload resets alpha to the rank.
        kwargs = {}
        for name, (state, meta) in lora_layers.items():
            kwargs[f"{name}_lora_layers"] = state
            kwargs[f"{name}_lora_adapter_metadata"] = meta
        self.pipeline_cls().save_lora_weights(str(output_dir), weight_name=weight_name, **kwargs)

    @hookimpl
    def build_pipeline(self, components, config):
        """The pipeline over the run's own (LoRA-carrying) components, for samples and class images."""
        import inspect

        cls = self.pipeline_cls()
        wanted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "scheduler")]
        parts = {name: components[name] for name in wanted if name in components}
        parts.update(self.pipeline_kwargs)
        parts["scheduler"] = scheduler_from_folder(components["model_path"], self.inference_scheduler)
        return cls(**parts)

    @hookimpl
    def load_pipeline(self, model_path, device, dtype):
        self.check_layout(Path(model_path))
        return self.pipeline_cls().from_pretrained(model_path, dtype=dtype).to(device)

    @hookimpl
    def load_lora(self, pipeline, path, adapter_name):
        from lorakit.pipelines import lora_file

        folder, weight_name = lora_file(path)
        pipeline.load_lora_weights(folder, weight_name=weight_name, adapter_name=adapter_name)

    @hookimpl
    def set_lora_scales(self, pipeline, adapter_names, scales):
        pipeline.set_adapters(list(adapter_names), adapter_weights=list(scales))

    @hookimpl
    def generate_images(self, pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale):
        if guidance_scale is None:
            guidance_scale = self.info.guidance_scale
        extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        return pipeline(
            list(prompts),
            num_inference_steps=num_inference_steps,
            height=resolution,
            width=resolution,
            generator=generator,
            **extra,
        ).images


def scheduler_from_folder(model_path, fallback: str):
    """The inference scheduler a diffusers model folder names in ``scheduler/`` (``fallback``,
    a diffusers class name, when that class is unknown to the installed diffusers)."""
    import diffusers

    path = Path(model_path)
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None) or getattr(diffusers, fallback)
    return cls.from_pretrained(path, subfolder="scheduler")


def vae_latents(vae, pixel_values):
    """Latents of an ``AutoencoderKL`` as diffusers' pipelines expect them: the distribution's
    mode (pure, so cacheable), shifted and scaled by the VAE's config."""
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def load_text_encoder(path, encoder_cls, subfolder: str, tokenizer_cls, tokenizer_subfolder: str, dtype):
    """``(tokenizer, text encoder)`` from a model folder: the frozen encoder straight in the run's
    precision (never in fp32 in host memory under bf16), the tokenizer checked to fit it."""
    from lorakit.tiny import check_tokenizer_matches

    tokenizer = tokenizer_cls.from_pretrained(path, subfolder=tokenizer_subfolder)
    encoder = encoder_cls.from_pretrained(path, subfolder=subfolder, dtype=dtype)
    check_tokenizer_matches(tokenizer, encoder, f"--model {path} ({tokenizer_subfolder})")
    return tokenizer, encoder


def load_vae(config, model_path: Path, device, weight_dtype, fallback_dtype=None):
    """The model's own ``AutoencoderKL`` (in ``fallback_dtype``, fp32 by default: SD VAEs
    overflow in fp16), or ``--vae`` (a VAE folder, hub id, or pipeline folder with ``vae/``)
    in ``weight_dtype``: a user who passes one (e.g. an fp16-safe one) vouches
    that it is safe in the run's precision."""
    import torch
    from diffusers import AutoencoderKL

    from lorakit.models import resolve_model

    if not config.vae:
        return AutoencoderKL.from_pretrained(model_path, subfolder="vae", dtype=fallback_dtype or torch.float32).to(device)
    if Path(config.vae).expanduser().is_file():  # a single-file VAE, read with the model's vae/ config
        from lorakit.singlefile import vae_from_file

        return vae_from_file(config.vae, model_path, weight_dtype).to(device)
    source = resolve_model(config.vae, flag="--vae")
    if (source / "vae" / "config.json").is_file():  # a whole pipeline folder: take its VAE
        subfolder = "vae"
    elif (source / "config.json").is_file():
        subfolder = None
    else:
        raise LorakitError(
            f"--vae {config.vae} holds no config.json (nor vae/config.json); pass an AutoencoderKL folder or hub id."
        )
    cfg = json.loads(((source / subfolder) if subfolder else source).joinpath("config.json").read_text())
    if cfg.get("_class_name") != "AutoencoderKL":
        raise LorakitError(
            f"--vae {config.vae} is a {cfg.get('_class_name') or 'non-diffusers'} model, not an AutoencoderKL; "
            "pass an AutoencoderKL folder or hub id."
        )
    return AutoencoderKL.from_pretrained(source, subfolder=subfolder, dtype=weight_dtype).to(device)
