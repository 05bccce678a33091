"""Kandinsky 2.2 inference: prior -> decoder as diffusers' combined pipeline, or one stage
alone (which takes LoRAs but cannot turn prompts into images). Torch is imported only when called.
"""

from __future__ import annotations


def combine(decoder_pipe, prior_pipe):
    """Prior -> decoder in one pipeline that takes prompts (diffusers' combined pipeline)."""
    from diffusers import KandinskyV22CombinedPipeline

    return KandinskyV22CombinedPipeline(
        unet=decoder_pipe.unet,
        scheduler=decoder_pipe.scheduler,
        movq=decoder_pipe.movq,
        **{f"prior_{name}": module for name, module in prior_pipe.components.items()},
    )


def inference_pipeline(decoder_folder, prior_folder, device, dtype):
    """The Kandinsky pipeline of what there is: prior -> decoder combined, or one stage alone
    (which takes LoRAs but cannot turn prompts into images; ``generate`` says so)."""
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    decoder_pipe = KandinskyV22Pipeline.from_pretrained(decoder_folder, dtype=dtype) if decoder_folder else None
    prior_pipe = KandinskyV22PriorPipeline.from_pretrained(prior_folder, dtype=dtype) if prior_folder else None
    pipeline = combine(decoder_pipe, prior_pipe) if decoder_pipe and prior_pipe else decoder_pipe or prior_pipe
    return pipeline.to(device)


def is_combined(pipeline) -> bool:
    return hasattr(pipeline, "prior_pipe")


def generate(pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale):
    """Prior -> decoder, step by step as docs/archs/kandinsky22.md shows (the same generator
    and guidance for both stages, so the two give the same image)."""
    embeds = pipeline.prior_pipe(
        list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator
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
        guidance_scale=guidance_scale,
        generator=generator,
    ).images
