"""Caching encodes large images a few at a time: a VAE encoder needs ~2.5 GB of activations
per 1024 px image in fp32, so a fixed chunk of eight would run a 24 GB GPU out of memory."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorakit import cache as cache_module
from lorakit.cache import image_chunk
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer


def test_chunk_shrinks_with_the_image():
    assert image_chunk((1024, 1024)) == 1
    assert image_chunk((1024, 2048)) == 1
    assert image_chunk((768, 768)) == 1
    assert image_chunk((512, 512)) == 4
    assert image_chunk((256, 256)) == 8
    assert image_chunk((32, 32)) == 8


@pytest.mark.parametrize("disk", [False, True])
def test_small_chunks_train_the_same_weights(tmp_path, lorakit_tiny_model, monkeypatch, disk):
    model = lorakit_tiny_model("sd15")

    def run(name):
        seen = []
        real = cache_module.EncodingCache.encode_images

        def recording(self, prepared):
            seen.append(len(prepared))
            return real(self, prepared)

        monkeypatch.setattr(cache_module.EncodingCache, "encode_images", recording)
        config = tiny_config("sd15", model, example_data(), tmp_path / name, max_steps=3, random_flip=True,
                             disk_cache=disk, cache_dir=str(tmp_path / f"cache-{name}"))
        result = Trainer(config).setup().run()
        monkeypatch.undo()
        return seen, load_file(str(result.weights))

    default_chunks, default = run("default")
    monkeypatch.setattr(cache_module, "CACHE_PIXELS", 32 * 32 * 3)  # three 32 px images at a time
    small_chunks, small = run("small")
    assert max(default_chunks) == 8 and max(small_chunks) == 3
    assert sum(small_chunks) == sum(default_chunks)  # every image (both flips) encoded once either way
    assert default.keys() == small.keys()
    for key in default:
        assert torch.equal(default[key], small[key]), key
