"""Turning an image into training pixels: decoding, augmentation draws, cropping, resizing,
flipping.

Every opener of training images (folders, datasets' bytes and paths, class images) decodes
through :func:`decode_image`, so bucket sizes, crops and pixels all see the same upright RGB
image. Every draw is a pure function of (seed, epoch, sample key), so a run resumes exactly and
an image's encoding can be cached per (image, flip). Nothing here imports torch until an
image is prepared.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

WHITE = (255, 255, 255)
_WIDE_INTEGER_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def decode_image(source, background: tuple[int, int, int] = WHITE):
    """Decode ``source`` (a path, bytes, a binary file or a PIL image) into an 8-bit RGB image
    as a viewer shows it: EXIF orientation applied, 16/32-bit integer values scaled (not
    clipped) to 8 bit, transparency composited onto ``background`` (the colour hidden under
    transparent pixels must not train)."""
    import io

    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source), background)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with Image.open(source) as img:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img), background)


def to_rgb(image, background: tuple[int, int, int] = WHITE):
    """``image`` as 8-bit RGB: wide integer modes scaled to 8 bit, alpha composited."""
    from PIL import Image

    if image.mode in _WIDE_INTEGER_MODES:
        image = _scaled_to_8_bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _scaled_to_8_bit(image):
    """A 16-bit (or 32-bit) grayscale image as 8-bit ``L``, scaled by its bit depth.

    ``I`` (32-bit signed) is what PIL gives some 16-bit files: values within 0..65535 are
    taken as 16 bit, larger ones scale from the full 32-bit range."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode != "I" or (low >= 0 and high <= 65535):
        scaled = values * (255 / 65535)
    elif low >= 0:
        scaled = values * (255 / (2**31 - 1))
    else:
        scaled = (values + 2**31) * (255 / (2**32 - 1))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class Augment:
    """The augmentation drawn for one sample in one epoch (deterministic, see :func:`augment_for`)."""

    flip: bool = False
    crop_jitter: float = 0.5  # 0..1 position of the crop window; 0.5 = centre


def augment_for(seed: int, epoch: int, key: str, random_flip: bool, random_crop: bool) -> Augment:
    """Augmentation for a sample, a pure function of (seed, epoch, key): resumable, cacheable."""
    if not (random_flip or random_crop):
        return Augment()
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    flip = random_flip and rng.random() < 0.5
    jitter = rng.random() if random_crop else 0.5
    return Augment(flip=flip, crop_jitter=jitter)


def caption_dropped(seed: int, epoch: int, key: str, probability: float) -> bool:
    if probability <= 0:
        return False
    digest = hashlib.blake2b(f"caption:{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little")).random() < probability


def crop_geometry(width: int, height: int, size: tuple[int, int], augment: Augment):
    """Where an image of ``width x height`` is cut to ``size = (w, h)``: resized to cover it,
    then cropped at the augment's position. Returns ``((new_w, new_h), (top, left))``, the
    crop's ``left`` as seen after the augment's flip."""
    target_w, target_h = size
    scale = max(target_w / width, target_h / height)
    new_w = max(target_w, round(width * scale))
    new_h = max(target_h, round(height * scale))
    top = int(round((new_h - target_h) * augment.crop_jitter))
    left = int(round((new_w - target_w) * augment.crop_jitter))
    if augment.flip:
        left = new_w - target_w - left  # where the crop sits in the flipped image
    return (new_w, new_h), (top, left)


#: ``--image-interpolation-mode``'s choices: PIL's resampling filters by the names diffusers'
#: script uses (its torchvision InterpolationMode names; ``nearest_exact`` is PIL's ``nearest``).
INTERPOLATION = ("bicubic", "bilinear", "lanczos", "box", "hamming", "nearest", "nearest_exact")


def resampling(mode: str):
    """PIL's filter for an ``--image-interpolation-mode`` name."""
    from PIL import Image

    name = {"nearest_exact": "nearest"}.get(mode, mode)
    return getattr(Image.Resampling, name.upper())


def prepare_image(image, resolution: int, augment: Augment, size: tuple[int, int] | None = None,
                  interpolation: str = "bicubic"):
    """Resize to cover ``size = (width, height)`` (default: ``resolution`` square, i.e. the
    short side becomes ``resolution``), crop, maybe flip.

    Returns ``(pixel_values, original_size, crop_top_left)``: a ``(3, H, W)`` float tensor
    in ``[-1, 1]``, the image's ``(height, width)`` before resizing, and the crop's
    ``(top, left)`` in resized pixels (some archs condition on both). ``interpolation`` names
    the resize filter (:data:`INTERPOLATION`).
    """
    import numpy as np
    import torch
    from PIL import Image

    image = to_rgb(image)
    size = size or (resolution, resolution)
    original_size = (image.height, image.width)
    (new_w, new_h), (top, left) = crop_geometry(image.width, image.height, size, Augment(crop_jitter=augment.crop_jitter))
    if (new_w, new_h) != (image.width, image.height):
        image = image.resize((new_w, new_h), resampling(interpolation))
    image = image.crop((left, top, left + size[0], top + size[1]))
    if augment.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - size[0] - left  # where the crop sits in the flipped image
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, original_size, (top, left)
