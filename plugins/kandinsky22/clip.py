"""The CLIP image embedding both stages train on: the decoder is conditioned on it, the
prior learns to predict it. Computed in torch from the training pixels, as
``CLIPImageProcessor`` would on PIL images. Torch is imported only when called.
"""

from __future__ import annotations


def _size_value(size, key):
    """A field of an image processor's ``size``/``crop_size`` (a dict or transformers' SizeDict)."""
    if size is None or isinstance(size, int):
        return size
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def crop_height(image_processor):
    return _size_value(image_processor.crop_size, "height")


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


def load_image_encoder(folder, device, weight_dtype):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder, subfolder="image_encoder", dtype=weight_dtype)
    image_processor = CLIPImageProcessor.from_pretrained(folder, subfolder="image_processor")
    image_encoder.to(device).eval()
    return image_encoder, image_processor


def image_embeds(components, pixel_values):
    image_encoder = components["image_encoder"]
    clip_inputs = clip_pixel_values(pixel_values, components["image_processor"])
    return image_encoder(pixel_values=clip_inputs.to(image_encoder.dtype)).image_embeds.float()
