"""diffusers components -> one original-layout (ldm/SGM) single-file checkpoint.

diffusers reads single files (``from_single_file``) but ships no writer; the diffusers-to-original
conversion scripts in its repository (``scripts/convert_diffusers_to_original_*.py``) hard-code
the full-size block counts. This writer derives the UNet's block numbering from its config, so tiny models
(``lorakit tiny ARCH --single-file``) take the same loading path as users' checkpoints. Each
mapping is the inverse of diffusers' own reader (``loaders/single_file_utils.py``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``); tests/test_single_file.py checks the round trip bit for bit.

Which component goes under which key prefix, in which layout, is arch data
(``ArchInfo.single_file_layout``); the layouts are:

* ``ldm_unet``: a ``UNet2DConditionModel`` as the original ``openaimodel.UNetModel``;
* ``ldm_vae``: an ``AutoencoderKL`` as the original ``AutoencoderKL`` (1x1 conv attention);
* ``clip``: a transformers CLIP text model with transformers 4's paths (``text_model.*``);
* ``open_clip``: a CLIP text model with projection as OpenCLIP's ``TextTransformer``.
"""

from __future__ import annotations

LAYOUTS = ("ldm_unet", "ldm_vae", "clip", "open_clip")

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}


def unet_blocks(config: dict) -> dict:
    """``{diffusers block prefix: ldm block prefix}`` for a ``UNet2DConditionModel`` config: per
    down block ``layers_per_block`` (resnet, attention) pairs and a downsampler except after the
    last; middle resnet, attention, resnet; per up block one pair more, the last with an
    upsampler except in the last block (as ``convert_ldm_unet_checkpoint`` counts them)."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ValueError("the original UNet layout has one layers_per_block for every block")
    out, index = {}, 1
    for i, kind in enumerate(down):
        for j in range(layers):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if "Attn" in kind:
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < len(down) - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    mid_attention = "Attn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn")
    out["mid_block.resnets.0"] = "middle_block.0"
    if mid_attention:
        out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = f"middle_block.{2 if mid_attention else 1}"
    index = 0
    for i, kind in enumerate(up):
        for j in range(layers + 1):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if "Attn" in kind:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == layers and i < len(up) - 1:
                out[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{index}.{2 if 'Attn' in kind else 1}"
            index += 1
    return out


def _rename(key: str, blocks: dict, top: dict, resnet=_RESNET) -> str:
    for prefix in sorted(blocks, key=len, reverse=True):  # "attentions.1" before "attentions.1x"
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1:]
            if ".resnets" in prefix:
                for ours, theirs in resnet:
                    rest = rest.replace(ours + ".", theirs + ".")
            return f"{blocks[prefix]}.{rest}"
    module, _, param = key.rpartition(".")
    if module in top:
        return f"{top[module]}.{param}"
    raise ValueError(f"no original-layout name for {key}")


def unet_to_ldm(state: dict, config: dict) -> dict:
    blocks = unet_blocks(config)
    return {_rename(k, blocks, _UNET_TOP): v for k, v in state.items()}


def vae_to_ldm(state: dict, config: dict) -> dict:
    n_down, n_up = len(config["down_block_types"]), len(config["up_block_types"])
    blocks = {"encoder.mid_block.attentions.0": "encoder.mid.attn_1", "decoder.mid_block.attentions.0": "decoder.mid.attn_1"}
    for part in ("encoder", "decoder"):
        for k in (0, 1):
            blocks[f"{part}.mid_block.resnets.{k}"] = f"{part}.mid.block_{k + 1}"
    for i in range(n_down):
        blocks[f"encoder.down_blocks.{i}.resnets"] = f"encoder.down.{i}.block"
        blocks[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
    for i in range(n_up):
        blocks[f"decoder.up_blocks.{i}.resnets"] = f"decoder.up.{n_up - 1 - i}.block"
        blocks[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n_up - 1 - i}.upsample"
    top = {f"{p}.conv_norm_out": f"{p}.norm_out" for p in ("encoder", "decoder")}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if ".mid_block.attentions.0." in key:
            part, _, layer = module.partition(".mid_block.attentions.0.")
            out[f"{part}.mid.attn_1.{attention[layer]}.{param}"] = (
                value[:, :, None, None] if value.ndim == 2 else value  # ldm's attention is 1x1 convs
            )
            continue
        if module in top:
            out[f"{top[module]}.{param}"] = value
        elif any(key.startswith(p + ".") for p in blocks):
            out[_rename(key, blocks, {}, resnet=(("conv_shortcut", "nin_shortcut"),))] = value
        else:
            out[key] = value  # conv_in, conv_out, quant_conv, post_quant_conv: same names
    return out


def clip_to_ldm(state: dict, config: dict) -> dict:
    """transformers 4's paths: everything of the text model under ``text_model.``."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}


def open_clip_to_ldm(state: dict, config: dict) -> dict:
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    renames = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
               ("self_attn.out_proj", "attn.out_proj"))
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = value
        elif key.startswith("encoder.layers."):
            rest = key.removeprefix("encoder.layers.")
            layer, _, rest = rest.partition(".")
            head = f"transformer.resblocks.{layer}"
            if rest.startswith("self_attn.q_proj."):
                param = rest.rpartition(".")[2]
                parts = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                out[f"{head}.attn.in_proj_{param}"] = torch.cat(parts, dim=0)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue  # joined into in_proj with q_proj
            else:
                for ours, theirs in renames:
                    rest = rest.replace(ours, theirs)
                out[f"{head}.{rest}"] = value
        else:
            raise ValueError(f"no OpenCLIP name for {key}")
    return out


_WRITERS = {"ldm_unet": unet_to_ldm, "ldm_vae": vae_to_ldm, "clip": clip_to_ldm, "open_clip": open_clip_to_ldm}


def write_single_file(folder, layout: dict, path) -> None:
    """Write the diffusers model ``folder`` as one original-layout safetensors file at ``path``
    (atomically). ``layout`` is ``{component: (key prefix, layout name)}`` (the arch's
    ``single_file_layout``); every weight of those components is written."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from lorakit import fsutil

    folder, path = Path(folder), Path(path)
    tensors = {}
    for component, (prefix, kind) in layout.items():
        sub = folder / component
        config = json.loads((sub / "config.json").read_text())
        state = {}
        for file in sorted(sub.glob("*.safetensors")):
            state.update(load_file(str(file)))
        for key, value in _WRITERS[kind](state, config).items():
            tensors[prefix + key] = value.contiguous()
    tmp = path.with_name(f".{path.name}{fsutil.TMP_SUFFIX}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        fsutil.fsync_file(tmp)
        fsutil.publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
