"""kohya's names for an SDXL UNet: the original (SGM/ldm) module paths, derived from the config.

kohya-ss trains SDXL on its own port of Stability's UNet (``library/sdxl_original_unet.py``),
whose module paths are the checkpoint's: ``input_blocks.N.M``, ``middle_block.N``,
``output_blocks.N.M``, ``time_embed``, ``label_emb``, ``out``. A LoRA layer there is named
``lora_unet_<path with '_' for '.'>`` (``networks/lora.py``: ``prefix + "." + name + "." +
child_name``), so a kohya SDXL file must use those paths, or kohya's ``sdxl_merge_lora.py`` and
``--network_weights`` drop every UNet module.

The block numbering follows the UNet's config, as the ldm layout builds it (and as diffusers'
``convert_ldm_unet_checkpoint`` and kohya's ``make_unet_conversion_map`` read it for the real
model): per down block, ``layers_per_block`` (resnet, attention if the block has one) pairs and
a downsampler except after the last; the middle block is resnet, attention, resnet; per up
block ``layers_per_block + 1`` pairs, the last with an upsampler except in the last block.
Inside a transformer block the names are diffusers' own; inside a resnet they are ldm's.
No torch here.
"""

from __future__ import annotations

from lorakit.errors import LorakitError

#: diffusers' resnet layer -> ldm's (``ResBlock``: in_layers = norm, act, conv; out_layers = norm, act, drop, conv)
RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
#: layers outside the blocks
TOP = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _per_block(value, count: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * count


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def block_prefixes(config: dict) -> dict:
    """``{diffusers block prefix: ldm block prefix}`` for a ``UNet2DConditionModel`` config."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    layers = _per_block(config.get("layers_per_block", 2), len(down))
    out, index = {}, 1
    for i, kind in enumerate(down):
        for j in range(layers[i]):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if _has_attention(kind):
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < len(down) - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    mid_attention = _has_attention(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn")
    out["mid_block.resnets.0"] = "middle_block.0"
    if mid_attention:
        out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = f"middle_block.{2 if mid_attention else 1}"
    index = 0
    for i, (kind, count) in enumerate(zip(up, reversed(layers))):
        for j in range(count + 1):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if _has_attention(kind):
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == count and i < len(up) - 1:
                out[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{index}.{2 if _has_attention(kind) else 1}"
            index += 1
    return out


def sgm_module_names(modules, config: dict) -> dict:
    """``{diffusers module path: SGM module path}`` for the given UNet layers; refuses a layer
    the original UNet has no place for (one line)."""
    blocks = block_prefixes(config)
    # longest prefix first: "down_blocks.1.attentions.0" must not be taken for "...attentions.1"
    ordered = sorted(blocks, key=len, reverse=True)
    out = {}
    for module in modules:
        if module in TOP:
            out[module] = TOP[module]
            continue
        prefix = next((p for p in ordered if module.startswith(p + ".") or module == p), None)
        if prefix is None:
            raise LorakitError(
                f"UNet layer {module} has no name in the original SDXL UNet that kohya's tools use; "
                "it cannot be written in kohya's format (drop it from --target-modules)."
            )
        rest = module[len(prefix) + 1:]
        if ".resnets." in prefix:
            head, _, tail = rest.partition(".")
            rest = ".".join(x for x in (RESNET.get(head, head), tail) if x)
        out[module] = f"{blocks[prefix]}.{rest}" if rest else blocks[prefix]
    return out
