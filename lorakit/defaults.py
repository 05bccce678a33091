"""lorakit's own implementations of the hooks that have a default (modes may override)."""

from __future__ import annotations

from lorakit.hookspecs import hookimpl


@hookimpl
def build_dataset(config, components, pm):
    from lorakit.data import load_captioned_images
    from lorakit.diskcache import readable_in_cache

    return load_captioned_images(config.data, caption_column=config.caption_column, image_column=config.image_column,
                                 known_readable=readable_in_cache(config))


@hookimpl
def reduce_loss(per_sample_loss, batch, config):
    loss = per_sample_loss.mean()
    return loss, {}
