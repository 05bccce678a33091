"""Turning an image into training pixels: augmentation draws, cropping, resizing, flipping.

Every draw is a pure function of (seed, epoch, sample key), so a run resumes exactly and
an image's encoding can be cached per (image, flip). Nothing here imports torch until an
image is prepared.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

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


def prepare_image(image, resolution: int, augment: Augment, size: tuple[int, int] | None = None):
    """Resize to cover ``size = (width, height)`` (default: ``resolution`` square, i.e. the
    short side becomes ``resolution``), crop, maybe flip.

    Returns ``(pixel_values, original_size, crop_top_left)``: a ``(3, H, W)`` float tensor
    in ``[-1, 1]``, the image's ``(height, width)`` before resizing, and the crop's
    ``(top, left)`` in resized pixels (some archs condition on both).
    """
    import numpy as np
    import torch
    from PIL import Image

    image = image.convert("RGB")
    size = size or (resolution, resolution)
    original_size = (image.height, image.width)
    (new_w, new_h), (top, left) = crop_geometry(image.width, image.height, size, Augment(crop_jitter=augment.crop_jitter))
    if (new_w, new_h) != (image.width, image.height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + size[0], top + size[1]))
    if augment.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - size[0] - left  # where the crop sits in the flipped image
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, original_size, (top, left)
