"""``--arch kandinsky22``: LoRA on the decoder UNet, which denoises MoVQ latents of a
training image conditioned on the CLIP image embedding of the same image (no captions).
The CLIP image encoder comes from the prior kept in ``<model>/prior/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorakit import ArchInfo, hookimpl
from lorakit.errors import LorakitError

from .base import Kandinsky22
from .clip import image_embeds, load_image_encoder
from .layout import DECODER_PIPELINES, DECODER_SUBFOLDERS, DECODER_TARGETS, DOCS, PRIOR_DIR, has_prior_pipeline
from .pipeline import combine, inference_pipeline
from .tiny import write_tiny_decoder, write_tiny_prior

log = logging.getLogger("lorakit")


class Decoder(Kandinsky22):
    """``--arch kandinsky22``: LoRA on the decoder UNet, conditioned on CLIP image embeddings."""

    info = ArchInfo(
        description="Kandinsky 2.2 decoder: LoRA on the UNet (image-embedding conditioned; prior in <model>/prior)",
        denoiser="unet",
        default_targets={"unet": DECODER_TARGETS},
        text_encoders=(),
        default_resolution=512,
        pipeline_class="KandinskyV22Pipeline",
        pipeline_loads_lora=False,
        pipeline_classes=DECODER_PIPELINES,
        subfolders=DECODER_SUBFOLDERS,
        size_multiple=8,  # MoVQ downsamples by 8
        objective="ddpm",
        input_encoders=("movq", "image_encoder"),
        # captions never reach the decoder, and MoVQ is its own VAE
        refuses={
            "caption_dropout": "--arch kandinsky22 conditions on the image embedding, not on captions; drop --caption-dropout.",
            "vae": "--arch kandinsky22 uses the decoder's own MoVQ and takes no --vae; drop it.",
        },
        guidance_scale=4.0,
    )
    cannot_generate = (
        f"--arch kandinsky22 needs the prior in {PRIOR_DIR}/ of the --model folder to turn prompts into image "
        f"embeddings; download kandinsky-community/kandinsky-2-2-prior there (see {DOCS})."
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
        self.check_layout(path)
        prior_folder = self._prior_folder(path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=weight_dtype)
        # MoVQ stays in fp32: it only encodes (once, when cached), like an SD VAE.
        movq = VQModel.from_pretrained(path, subfolder="movq", dtype=torch.float32)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        apply_prediction_type(noise_scheduler, config.prediction_type)
        image_encoder, image_processor = load_image_encoder(prior_folder, device, weight_dtype)
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
        return {"latents": latents, "image_embeds": image_embeds(components, pixel_values)}

    @hookimpl
    def encode_prompt(self, components, captions):
        return {}  # the decoder never sees text; the prior does

    @hookimpl
    def compute_loss(self, components, batch, config, rows):
        from lorakit.diffusion import denoising_loss

        unet = components["unet"]
        added = {"image_embeds": batch["image_embeds"].to(unet.dtype)}

        def predict(noisy, timesteps):
            out = unet(noisy.to(unet.dtype), timesteps, None, added_cond_kwargs=added, return_dict=False)[0]
            return out[:, : noisy.shape[1]]  # the rest is the learned variance

        return denoising_loss(predict, batch["latents"].float(), components["noise_scheduler"], config, rows)

    @hookimpl
    def build_pipeline(self, components, config):
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

        path, unet = components["model_path"], components["unet"]
        prior_folder = path / PRIOR_DIR
        if not has_prior_pipeline(prior_folder):
            log.warning("no sample images: %s is not a complete Kandinsky 2.2 prior (see %s)", prior_folder, DOCS)
            return None
        decoder_pipe = KandinskyV22Pipeline.from_pretrained(path, unet=unet, movq=components["movq"])
        prior_pipe = KandinskyV22PriorPipeline.from_pretrained(
            prior_folder,
            image_encoder=components["image_encoder"],
            image_processor=components["image_processor"],
            dtype=unet.dtype,
        )
        return combine(decoder_pipe, prior_pipe).to(unet.device)

    @hookimpl
    def load_pipeline(self, model_path, device, dtype):
        path = Path(model_path)
        self.check_layout(path)
        prior_folder = path / PRIOR_DIR
        return inference_pipeline(path, prior_folder if has_prior_pipeline(prior_folder) else None, device, dtype)

    @hookimpl
    def write_tiny_model(self, path, seed):
        write_tiny_decoder(Path(path), seed)
        write_tiny_prior(Path(path) / PRIOR_DIR, seed)
