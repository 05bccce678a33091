"""Kandinsky 2.2: LoRA on the decoder UNet (arch ``kandinsky22``) or on the prior (``kandinsky22-prior``).

Kandinsky 2.2 generates in two stages. The *prior* (``PriorTransformer``) turns a caption
into a CLIP image embedding; the *decoder* (``UNet2DConditionModel`` + MoVQ) turns that
embedding into an image. Each stage is trained on its own:

* ``kandinsky22``: the decoder UNet learns to denoise MoVQ latents of a training image,
  conditioned on the CLIP image embedding of the same image (captions are not used).
* ``kandinsky22-prior``: the prior learns to predict the normalised CLIP image embedding of
  a training image from its caption (CLIP text model), with the prior's own
  ``UnCLIPScheduler`` (prediction of the sample).

Model folder. The decoder needs the CLIP image encoder, which on the Hub lives in the prior
repository, so a ``kandinsky22`` model folder is the decoder with the prior inside it::

    k22/                     kandinsky-community/kandinsky-2-2-decoder (unet, movq, scheduler)
    k22/prior/               kandinsky-community/kandinsky-2-2-prior (prior, text_encoder,
                             tokenizer, image_encoder, image_processor, scheduler)

``lorakit tiny kandinsky22 DIR`` writes exactly that; ``kandinsky22-prior`` trains on
``k22/prior`` (or any prior folder). ``lorakit generate`` chains prior -> decoder with
``KandinskyV22CombinedPipeline`` and accepts decoder and prior LoRAs together.

Kandinsky pipelines have no ``load_lora_weights``: :func:`load_lora_into` is the way back.
The LoRA file is ``pytorch_lora_weights.safetensors`` holding PEFT keys prefixed with
``unet.`` or ``prior.`` and the adapter config as ``lora_adapter_metadata``, i.e. what
``model.load_lora_adapter(folder, weight_name=..., prefix="unet" | "prior")`` reads exactly.

Registered through the ``lorakit.archs`` entry points ``kandinsky22`` (:data:`decoder`) and
``kandinsky22-prior`` (:data:`prior`). Nothing here imports torch at import time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lorakit.arch import ArchInfo
from lorakit.checkpoints import WEIGHT_NAME
from lorakit.errors import LorakitError
from lorakit.hookspecs import hookimpl
from lorakit.pipelines import resolve_lora_file, tokenize

log = logging.getLogger("lorakit")

__all__ = ["decoder", "prior", "load_lora_into", "clip_pixel_values", "WEIGHT_NAME"]

DECODER_PIPELINES = ("KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline")
PRIOR_PIPELINES = ("KandinskyV22PriorPipeline", "KandinskyV22PriorEmb2EmbPipeline")
DECODER_SUBFOLDERS = ("unet", "movq", "scheduler")
PRIOR_SUBFOLDERS = ("prior", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler")
#: Where a decoder folder keeps its prior (and with it the CLIP image encoder).
PRIOR_DIR = "prior"
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: The decoder's attention also projects the image tokens (added key/value projections).
DECODER_TARGETS = ATTENTION_TARGETS + ["add_k_proj", "add_v_proj"]
PRIOR_TARGETS = list(ATTENTION_TARGETS)
DOCS = "docs/archs/kandinsky22.md"


# ----------------------------------------------------------------------------- public API


def load_lora_into(pipeline, path, adapter_name: str = "default") -> list[str]:
    """Load a lorakit Kandinsky 2.2 LoRA into a diffusers Kandinsky 2.2 pipeline.

    ``pipeline``: a ``KandinskyV22Pipeline`` (decoder LoRA), ``KandinskyV22PriorPipeline``
    (prior LoRA) or ``KandinskyV22CombinedPipeline`` (either). ``path``: a training output
    folder or its ``pytorch_lora_weights.safetensors``. The file says which model it adapts
    (its keys start with ``unet.`` or ``prior.``); the adapter is loaded with diffusers'
    model-level ``load_lora_adapter`` under ``adapter_name`` and is active afterwards. To mix
    several adapters, load each under its own name, then
    ``pipeline.unet.set_adapters([...], weights=[...])`` (or ``pipeline.prior``).

    Returns which models received the adapter: ``["unet"]`` or ``["prior"]``.
    """
    file = resolve_lora_file(path)
    loaded = []
    for prefix in _lora_prefixes(file):
        model = _lora_model(pipeline, prefix)
        if model is None:
            wanted = "KandinskyV22Pipeline" if prefix == "unet" else "KandinskyV22PriorPipeline"
            raise LorakitError(
                f"{file} is a Kandinsky 2.2 {'decoder' if prefix == 'unet' else 'prior'} LoRA but "
                f"{type(pipeline).__name__} has no {prefix}; load it into a {wanted} or KandinskyV22CombinedPipeline."
            )
        if adapter_name in (getattr(model, "peft_config", None) or {}):
            raise LorakitError(
                f"the {prefix} of this pipeline already has an adapter named '{adapter_name}'; "
                "pass another adapter_name."
            )
        model.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=prefix, adapter_name=adapter_name)
        loaded.append(prefix)
    return loaded


def _lora_prefixes(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            prefixes = sorted({key.split(".", 1)[0] for key in handle.keys()})
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise LorakitError(f"{file} is not a readable safetensors file ({exc}); train or download it again.") from None
    if not prefixes or any(p not in ("unet", "prior") for p in prefixes):
        raise LorakitError(
            f"{file} is not a Kandinsky 2.2 LoRA from lorakit (its keys start with {', '.join(prefixes) or 'nothing'}, "
            "expected unet. or prior.); train it with --arch kandinsky22 or kandinsky22-prior."
        )
    return prefixes


def _lora_model(pipeline, prefix: str):
    """The model a LoRA prefix belongs to; the combined pipeline names its prior ``prior_prior``."""
    names = ("unet",) if prefix == "unet" else ("prior", "prior_prior")
    for name in names:
        model = getattr(pipeline, name, None)
        if model is not None and hasattr(model, "load_lora_adapter"):
            return model
    return None


# ----------------------------------------------------------------------------- helpers


def _check_layout(path: Path, subfolders, what: str) -> None:
    missing = [s for s in subfolders if not (path / s).is_dir()]
    if missing:
        raise LorakitError(
            f"--model {path} lacks the subfolder(s) {', '.join(missing)} of a diffusers {what}; "
            f"pass a complete diffusers-format model (see {DOCS})."
        )


def _read_class_name(path: Path) -> str:
    from lorakit.models import read_model_index

    return read_model_index(path).get("_class_name", "") if path.is_dir() else ""


def _size_value(size, key):
    """A field of an image processor's ``size``/``crop_size`` (a dict or transformers' SizeDict)."""
    if size is None or isinstance(size, int):
        return size
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def clip_pixel_values(pixel_values, image_processor):
    """``(B, 3, H, W)`` pixels in ``[-1, 1]`` -> CLIP vision inputs, the processor's steps done in torch.

    Resize (shortest edge, bicubic with antialiasing), centre crop, normalise with the
    processor's mean and std, as ``CLIPImageProcessor`` does on PIL images.
    """
    import torch
    import torch.nn.functional as F

    x = (pixel_values.float() + 1.0) / 2.0
    height, width = x.shape[-2:]
    if getattr(image_processor, "do_resize", True):
        size = image_processor.size
        short = _size_value(size, "shortest_edge")
        if short:
            scale = short / min(height, width)
            new = (max(short, round(height * scale)), max(short, round(width * scale)))
        else:
            new = (_size_value(size, "height"), _size_value(size, "width"))
        if new != (height, width):
            x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    if getattr(image_processor, "do_center_crop", True):
        crop_h = _size_value(image_processor.crop_size, "height")
        crop_w = _size_value(image_processor.crop_size, "width")
        height, width = x.shape[-2:]
        if crop_h and crop_w and (crop_h, crop_w) != (height, width):
            top, left = max(0, (height - crop_h) // 2), max(0, (width - crop_w) // 2)
            x = x[..., top : top + crop_h, left : left + crop_w]
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(image_processor.image_std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def _load_image_encoder(folder: Path, device, weight_dtype):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder, subfolder="image_encoder", dtype=weight_dtype)
    image_processor = CLIPImageProcessor.from_pretrained(folder, subfolder="image_processor")
    image_encoder.to(device).eval()
    return image_encoder, image_processor


def _image_embeds(components, pixel_values):
    image_encoder = components["image_encoder"]
    clip_inputs = clip_pixel_values(pixel_values, components["image_processor"])
    return image_encoder(pixel_values=clip_inputs.to(image_encoder.dtype)).image_embeds.float()


def _combine(decoder_pipe, prior_pipe):
    """Prior -> decoder in one pipeline that takes prompts (diffusers' combined pipeline)."""
    from diffusers import KandinskyV22CombinedPipeline

    return KandinskyV22CombinedPipeline(
        unet=decoder_pipe.unet,
        scheduler=decoder_pipe.scheduler,
        movq=decoder_pipe.movq,
        **{f"prior_{name}": module for name, module in prior_pipe.components.items()},
    )


def _inference_pipeline(decoder_folder, prior_folder, device, dtype):
    """The Kandinsky pipeline of what there is: prior -> decoder combined, or one stage alone
    (which takes LoRAs but cannot turn prompts into images; ``generate_images`` says so)."""
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    decoder_pipe = KandinskyV22Pipeline.from_pretrained(decoder_folder, dtype=dtype) if decoder_folder else None
    prior_pipe = KandinskyV22PriorPipeline.from_pretrained(prior_folder, dtype=dtype) if prior_folder else None
    pipeline = _combine(decoder_pipe, prior_pipe) if decoder_pipe and prior_pipe else decoder_pipe or prior_pipe
    return pipeline.to(device)


def _has_prior_pipeline(folder: Path) -> bool:
    return _read_class_name(folder) in PRIOR_PIPELINES and all((folder / s).is_dir() for s in PRIOR_SUBFOLDERS)


def _write_tiny_prior(path: Path, seed: int) -> None:
    import torch
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    torch.manual_seed(seed)
    embed_dim, image_size = 32, 32
    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        embedding_dim=embed_dim,
        num_embeddings=77,  # one per token: the tokenizer's model_max_length
        additional_embeddings=4,
    )
    with torch.no_grad():
        # A fresh prior has clip_std = 0; a trained one holds the CLIP embedding statistics.
        prior.clip_mean.copy_(0.1 * torch.randn(1, embed_dim))
        prior.clip_std.copy_(0.5 + torch.rand(1, embed_dim))
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            projection_dim=embed_dim,
        )
    )
    text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(hidden_size=embed_dim, projection_dim=embed_dim))
    # unCLIP's prior schedule (squaredcos_cap_v2 betas), predicting the clean embedding.
    scheduler = UnCLIPScheduler(
        num_train_timesteps=1000,
        variance_type="fixed_small_log",
        clip_sample=True,
        clip_sample_range=10.0,
        prediction_type="sample",
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    pipe = KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        scheduler=scheduler,
        image_processor=image_processor,
    )
    pipe.save_pretrained(str(path))
    # Without torchvision the processor is saved as CLIPImageProcessorPil; name the class the
    # Hub's prior names, so loading takes the same path as with real weights.
    index_file = Path(path) / "model_index.json"
    index = json.loads(index_file.read_text())
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_tiny_decoder(path: Path, seed: int) -> None:
    import torch
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=8,  # noise and learned variance, like the real decoder
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=32,  # the CLIP image embedding size (the prior's embedding_dim)
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        addition_embed_type_num_heads=4,
        cross_attention_dim=32,
        attention_head_dim=8,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        norm_num_groups=8,
    )
    movq = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    # A latent-diffusion DDPM schedule (linear betas 0.00085-0.012), predicting the noise.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(str(path))


# ----------------------------------------------------------------------------- plugins


class _Kandinsky22:
    """Hooks both stages share: file format, loading a LoRA back, generation, model checks."""

    #: The component that receives LoRA, which is also the key prefix in the LoRA file.
    denoiser = ""
    pipelines: tuple = ()
    default_targets: list = []
    #: Why ``lorakit generate`` cannot make images from this stage alone, and the fix.
    cannot_generate = ""

    @hookimpl
    def recognizes_model(self, model_index):
        return model_index.get("_class_name") in self.pipelines

    @hookimpl
    def save_lora(self, components, lora_layers, output_dir, weight_name):
        from diffusers.loaders.lora_base import LoraBaseMixin

        state, metadata = {}, {}
        for name, (layers, meta) in lora_layers.items():
            if name != self.denoiser:
                raise LorakitError(f"Kandinsky 2.2 LoRA can only adapt the {self.denoiser}, not {name}.")
            state.update(LoraBaseMixin.pack_weights(layers, name))
            metadata.update(LoraBaseMixin.pack_weights(meta, name))
        LoraBaseMixin.write_lora_layers(
            state_dict=state,
            save_directory=str(output_dir),
            is_main_process=True,
            weight_name=weight_name,
            save_function=None,
            safe_serialization=True,
            lora_adapter_metadata=metadata,
        )

    @hookimpl
    def load_lora(self, pipeline, path, adapter_name):
        load_lora_into(pipeline, path, adapter_name=adapter_name)

    @hookimpl
    def set_lora_scales(self, pipeline, adapter_names, scales):
        for prefix in ("unet", "prior"):
            model = _lora_model(pipeline, prefix)
            held = getattr(model, "peft_config", None) or {}
            pairs = [(n, s) for n, s in zip(adapter_names, scales) if n in held]
            if pairs:
                model.set_adapters([n for n, _ in pairs], weights=[s for _, s in pairs])

    @hookimpl
    def generate_images(self, pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale):
        if not hasattr(pipeline, "prior_pipe"):  # one stage alone: no way from prompts to images
            raise LorakitError(self.cannot_generate)
        # Prior -> decoder, step by step as docs/archs/kandinsky22.md shows (the same generator
        # and guidance for both stages, so the two give the same image).
        scale = 4.0 if guidance_scale is None else guidance_scale
        embeds = pipeline.prior_pipe(
            list(prompts), num_inference_steps=num_inference_steps, guidance_scale=scale, generator=generator
        )
        decoder = pipeline.decoder_pipe
        if resolution is None:  # the decoder's native size
            resolution = decoder.unet.config.sample_size * decoder.movq_scale_factor
        return decoder(
            image_embeds=embeds.image_embeds,
            negative_image_embeds=embeds.negative_image_embeds,
            height=resolution,
            width=resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=scale,
            generator=generator,
        ).images

    @hookimpl
    def target_modules(self, config, components):
        return {self.denoiser: list(config.target_modules or self.default_targets)}


class Decoder(_Kandinsky22):
    """``--arch kandinsky22``: LoRA on the decoder UNet, conditioned on CLIP image embeddings."""

    denoiser = "unet"
    pipelines = DECODER_PIPELINES
    default_targets = DECODER_TARGETS
    cannot_generate = (
        f"--arch kandinsky22 needs the prior in {PRIOR_DIR}/ of the --model folder to turn prompts into image "
        f"embeddings; download kandinsky-community/kandinsky-2-2-prior there (see {DOCS})."
    )

    @hookimpl
    def arch_info(self):
        return ArchInfo(
            description="Kandinsky 2.2 decoder: LoRA on the UNet (image-embedding conditioned; prior in <model>/prior)",
            denoiser="unet",
            default_targets={"unet": DECODER_TARGETS},
            text_encoders=(),
            default_resolution=512,
            pipeline_class="KandinskyV22Pipeline",
            pipeline_loads_lora=False,
        )

    @staticmethod
    def _prior_folder(path: Path) -> Path:
        folder = path / PRIOR_DIR
        missing = [s for s in ("image_encoder", "image_processor") if not (folder / s).is_dir()]
        if missing:
            raise LorakitError(
                f"--model {path} has no {PRIOR_DIR}/{' or '.join(missing)}: the decoder is conditioned on CLIP image "
                f"embeddings from the Kandinsky 2.2 prior; use a local decoder folder with "
                f"kandinsky-community/kandinsky-2-2-prior in its {PRIOR_DIR}/ (see {DOCS})."
            )
        return folder

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

        from lorakit.diffusion import apply_prediction_type

        path = Path(model_path)
        _check_layout(path, DECODER_SUBFOLDERS, "KandinskyV22Pipeline")
        if config.caption_dropout:
            raise LorakitError(
                "--arch kandinsky22 conditions on the image embedding, not on captions; drop --caption-dropout."
            )
        if config.vae:
            raise LorakitError("--arch kandinsky22 uses the decoder's own MoVQ and takes no --vae; drop it.")
        prior_folder = self._prior_folder(path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=weight_dtype)
        # MoVQ stays in fp32: it only encodes (once, when cached), like an SD VAE.
        movq = VQModel.from_pretrained(path, subfolder="movq", dtype=torch.float32)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        apply_prediction_type(noise_scheduler, config.prediction_type)
        image_encoder, image_processor = _load_image_encoder(prior_folder, device, weight_dtype)
        expected = unet.config.encoder_hid_dim
        if image_encoder.config.projection_dim != expected:
            raise LorakitError(
                f"--model {path}: {prior_folder}/image_encoder makes {image_encoder.config.projection_dim}-d "
                f"embeddings but the UNet expects {expected}; put the matching Kandinsky 2.2 prior in {prior_folder}."
            )
        movq.to(device).eval()
        unet.to(device).eval()
        components = {
            "unet": unet,
            "movq": movq,
            "image_encoder": image_encoder,
            "image_processor": image_processor,
            "noise_scheduler": noise_scheduler,
            "model_path": path,
        }
        if isinstance(unet.config.sample_size, int):
            movq_scale = 2 ** (len(movq.config.block_out_channels) - 1)
            components["default_resolution"] = unet.config.sample_size * movq_scale
        return components

    @hookimpl
    def encode_images(self, components, pixel_values, batch):
        movq = components["movq"]
        # Kandinsky's decoder denoises MoVQ encoder outputs as they are (no scaling factor).
        latents = movq.encode(pixel_values.to(movq.dtype)).latents
        return {"latents": latents, "image_embeds": _image_embeds(components, pixel_values)}

    @hookimpl
    def encode_prompt(self, components, captions):
        return {}  # the decoder never sees text; the prior does

    @hookimpl
    def compute_loss(self, components, batch, config, generator):
        from lorakit.diffusion import denoising_loss

        unet = components["unet"]
        added = {"image_embeds": batch["image_embeds"].to(unet.dtype)}

        def predict(noisy, timesteps):
            out = unet(noisy.to(unet.dtype), timesteps, None, added_cond_kwargs=added, return_dict=False)[0]
            return out[:, : noisy.shape[1]]  # the rest is the learned variance

        return denoising_loss(predict, batch["latents"].float(), components["noise_scheduler"], config, generator)

    @hookimpl
    def build_pipeline(self, components, config):
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

        path, unet = components["model_path"], components["unet"]
        prior_folder = path / PRIOR_DIR
        if not _has_prior_pipeline(prior_folder):
            log.warning("no sample images: %s is not a complete Kandinsky 2.2 prior (see %s)", prior_folder, DOCS)
            return None
        decoder_pipe = KandinskyV22Pipeline.from_pretrained(path, unet=unet, movq=components["movq"])
        prior_pipe = KandinskyV22PriorPipeline.from_pretrained(
            prior_folder,
            image_encoder=components["image_encoder"],
            image_processor=components["image_processor"],
            dtype=unet.dtype,
        )
        return _combine(decoder_pipe, prior_pipe).to(unet.device)

    @hookimpl
    def load_pipeline(self, model_path, device, dtype):
        path = Path(model_path)
        _check_layout(path, DECODER_SUBFOLDERS, "KandinskyV22Pipeline")
        prior_folder = path / PRIOR_DIR
        return _inference_pipeline(path, prior_folder if _has_prior_pipeline(prior_folder) else None, device, dtype)

    @hookimpl
    def write_tiny_model(self, path, seed):
        _write_tiny_decoder(Path(path), seed)
        _write_tiny_prior(Path(path) / PRIOR_DIR, seed)


class Prior(_Kandinsky22):
    """``--arch kandinsky22-prior``: LoRA on the PriorTransformer (caption -> CLIP image embedding)."""

    denoiser = "prior"
    pipelines = PRIOR_PIPELINES
    default_targets = PRIOR_TARGETS
    cannot_generate = (
        f"--arch kandinsky22-prior makes image embeddings, not images, and its --model is not the {PRIOR_DIR}/ of a "
        f"decoder folder; generate with --arch kandinsky22 --model <decoder folder with this prior in {PRIOR_DIR}/> "
        f"--lora <this LoRA> (see {DOCS})."
    )

    @hookimpl
    def arch_info(self):
        return ArchInfo(
            description="Kandinsky 2.2 prior: LoRA on the PriorTransformer (caption -> CLIP image embedding)",
            denoiser="prior",
            default_targets={"prior": PRIOR_TARGETS},
            text_encoders=(),
            default_resolution=224,
            pipeline_class="KandinskyV22PriorPipeline",
            pipeline_loads_lora=False,
        )

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        from diffusers import PriorTransformer, UnCLIPScheduler
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        from lorakit.tiny import check_tokenizer_matches

        path = Path(model_path)
        _check_layout(path, PRIOR_SUBFOLDERS, "KandinskyV22PriorPipeline")
        if config.prediction_type is not None:
            raise LorakitError(
                "--arch kandinsky22-prior predicts what its scheduler says (the sample); drop --prediction-type."
            )
        if config.noise_offset:
            raise LorakitError("--noise-offset is for image latents; the prior denoises an embedding, drop it.")
        if config.gradient_checkpointing:
            raise LorakitError("the Kandinsky 2.2 prior does not support --gradient-checkpointing; drop the flag.")
        if config.vae:
            raise LorakitError("--arch kandinsky22-prior encodes images with its CLIP image encoder, not a VAE; drop --vae.")
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", dtype=weight_dtype)
        check_tokenizer_matches(tokenizer, text_encoder, f"--model {path}")
        prior = PriorTransformer.from_pretrained(path, subfolder="prior", dtype=weight_dtype)
        noise_scheduler = UnCLIPScheduler.from_pretrained(path, subfolder="scheduler")
        if prior.config.num_embeddings != tokenizer.model_max_length:
            raise LorakitError(
                f"--model {path}: the prior takes {prior.config.num_embeddings} tokens but the tokenizer makes "
                f"{tokenizer.model_max_length}; the folder mixes models, re-download it."
            )
        if not bool((prior.clip_std != 0).all()):
            raise LorakitError(
                f"--model {path}: the prior's clip_std holds zeros (an untrained prior); pass a trained Kandinsky 2.2 prior."
            )
        image_encoder, image_processor = _load_image_encoder(path, device, weight_dtype)
        text_encoder.to(device).eval()
        prior.to(device).eval()
        components = {
            "prior": prior,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "image_encoder": image_encoder,
            "image_processor": image_processor,
            "noise_scheduler": noise_scheduler,
            "model_path": path,
        }
        crop = _size_value(image_processor.crop_size, "height")
        if isinstance(crop, int) and crop >= 8 and crop % 8 == 0:
            components["default_resolution"] = crop  # what CLIP sees: no point in larger images
        return components

    @hookimpl
    def encode_images(self, components, pixel_values, batch):
        return {"image_embeds": _image_embeds(components, pixel_values)}

    @hookimpl
    def encode_prompt(self, components, captions):
        tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
        tokens = tokenize(tokenizer, captions)
        out = text_encoder(tokens.input_ids.to(text_encoder.device))
        return {
            "prompt_embeds": out.text_embeds,
            "text_hidden_states": out.last_hidden_state,
            "text_mask": tokens.attention_mask.bool().to(text_encoder.device),
        }

    @hookimpl
    def compute_loss(self, components, batch, config, generator):
        import torch

        from lorakit.diffusion import compute_snr, per_sample_mse, sample_noise, sample_timesteps, target_for

        prior, scheduler = components["prior"], components["noise_scheduler"]
        embeds = batch["image_embeds"].float()
        clean = (embeds - prior.clip_mean.float()) / prior.clip_std.float()
        noise = sample_noise(clean, generator)
        timesteps = sample_timesteps(scheduler, clean.shape[0], generator, clean.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = prior(
            noisy.to(prior.dtype),
            timestep=timesteps,
            proj_embedding=batch["prompt_embeds"].to(prior.dtype),
            encoder_hidden_states=batch["text_hidden_states"].to(prior.dtype),
            attention_mask=batch["text_mask"],
            return_dict=False,
        )[0]
        loss = per_sample_mse(prediction, target_for(scheduler, clean, noise, timesteps))
        if config.snr_gamma:
            snr = compute_snr(scheduler, timesteps)
            weight = torch.clamp(snr, max=config.snr_gamma)  # min-SNR-gamma for a sample (x0) target
            if scheduler.config.prediction_type == "epsilon":
                weight = weight / snr
            loss = loss * weight
        return loss

    @staticmethod
    def _decoder_folder(path: Path):
        """A prior kept as ``prior/`` inside a decoder folder (the kandinsky22 layout) has its decoder above it."""
        folder = Path(os.path.abspath(path))  # not resolve(): k22/prior may be a symbolic link
        if folder.name == PRIOR_DIR and _read_class_name(folder.parent) in DECODER_PIPELINES:
            return folder.parent
        return None

    @hookimpl
    def build_pipeline(self, components, config):
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

        path, prior = components["model_path"], components["prior"]
        decoder_folder = self._decoder_folder(path)
        if decoder_folder is None:
            log.warning("no sample images: %s is not the prior/ of a Kandinsky 2.2 decoder folder (see %s)", path, DOCS)
            return None
        prior_pipe = KandinskyV22PriorPipeline.from_pretrained(
            path,
            **{k: components[k] for k in ("prior", "text_encoder", "tokenizer", "image_encoder", "image_processor")},
        )
        decoder_pipe = KandinskyV22Pipeline.from_pretrained(decoder_folder, dtype=prior.dtype)
        return _combine(decoder_pipe, prior_pipe).to(prior.device)

    @hookimpl
    def load_pipeline(self, model_path, device, dtype):
        path = Path(model_path)
        _check_layout(path, PRIOR_SUBFOLDERS, "KandinskyV22PriorPipeline")
        return _inference_pipeline(self._decoder_folder(path), path, device, dtype)

    @hookimpl
    def write_tiny_model(self, path, seed):
        _write_tiny_prior(Path(path), seed)


#: Plugin objects named by the entry points (stateless, so one instance serves every run).
decoder = Decoder()
prior = Prior()
