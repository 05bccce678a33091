"""kohya files as kohya, A1111 and ComfyUI read them, judged by those tools' own rules.

Each tool's naming rule is restated here from its source (not imported from lorakit):

* kohya-ss sd-scripts ``networks/lora.py`` ``LoRANetwork.create_modules``: for every module of
  class ``Transformer2DModel`` (UNet) or ``CLIPAttention`` / ``CLIPMLP`` (text encoders), each
  Linear/Conv2d child gets ``(prefix + "." + name + "." + child_name).replace(".", "_")`` with
  prefixes ``lora_unet``, ``lora_te`` (SD1) or ``lora_te1`` / ``lora_te2`` (SDXL); SDXL's ``name``
  is the path in kohya's original UNet (``library/sdxl_original_unet.py``), whose numbering
  ``library/sdxl_model_util.make_unet_conversion_map`` gives for the real model (3 blocks,
  ``range(2)`` resnets down, ``range(3)`` up): restated here for any ``layers_per_block`` and
  checked against diffusers' own ``convert_ldm_unet_checkpoint``. Text encoders are transformers
  4 ``CLIPTextModel``s: paths under ``text_model``.
* ComfyUI ``comfy/lora.py``: ``model_lora_keys_unet`` (``lora_unet_`` + the ldm key, or + the
  diffusers key from ``utils.unet_to_diffusers``), ``model_lora_keys_clip`` (``LORA_CLIP_MAP``;
  ``lora_te_``/``lora_te1_`` for clip_l, ``lora_te2_`` for clip_g when clip_l is present).
* A1111 v1.10 ``extensions-builtin/Lora``: ``networks.load_network`` (``convert_diffusers_name_to_compvis``,
  the ``re_x_proj`` fallback, then ``lora_unet`` -> ``diffusion_model`` and ``lora_te1_text_model``
  -> ``0_transformer_text_model``) against ``assign_network_names_to_compvis_modules``' names,
  and ``network.NetworkOnDisk.detect_version``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.convert import convert
from lorakit.testing import example_data, tiny_config

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]  # proj_in, ff.net.2: not attention
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # lorakit's default text-encoder targets
TEXT_ENCODERS = {"sd15": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request, tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    arch = request.param
    root = tmp_path_factory.mktemp(f"kohya-{arch}")
    model = make_tiny_model(arch, root / "model")
    config = tiny_config(arch, model, example_data(), root / "out", rank=4, alpha=8, train_text_encoder=True,
                         target_modules=TARGETS, max_steps=2, learning_rate=1e-2)
    weights = lorakit.train(config).weights
    kohya = convert(arch, root / "out", root / "kohya.safetensors", "kohya")  # the model comes from the run
    return arch, model, weights, kohya


def keys_and_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys()), f.metadata() or {}


def modules_of(keys):
    return {k.split(".")[0] for k in keys}


def load_parts(model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {"unet": UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
             "text_encoder": CLIPTextModel.from_pretrained(model, subfolder="text_encoder")}
    if (model / "text_encoder_2").is_dir():
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
    return parts


# ---- kohya's original-UNet numbering (sdxl_model_util.make_unet_conversion_map, any layers_per_block)


def ldm_blocks(config) -> dict:
    """kohya's table with its constants (3 = layers + 1, range(2), range(3)) read from the config."""
    n, layers = len(config["down_block_types"]), config["layers_per_block"]
    table = {}
    for i in range(n):
        for j in range(layers):
            table[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.0."
            table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.1."
        for j in range(layers + 1):
            table[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(layers + 1) * i + j}.0."
            table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(layers + 1) * i + j}.1."
        table[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
        has_attention = "CrossAttn" in config["up_block_types"][i]  # kohya's "change for sdxl": .2 after an attention
        table[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(layers + 1) * i + layers}.{2 if has_attention else 1}."
    table.update({"mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.0.": "middle_block.0.",
                  "mid_block.resnets.1.": "middle_block.2."})
    return table


RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."),
          ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
       "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
       "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def to_ldm(key: str, config) -> str:
    """convert_diffusers_unet_state_dict_to_sdxl: the longest matching prefix is replaced."""
    table = dict(TOP)
    for hf, sd in ldm_blocks(config).items():
        if ".resnets." in hf:
            table.update({hf + h: sd + s for s, h in RESNET})
        else:
            table[hf] = sd
    for prefix in sorted(table, key=len, reverse=True):
        if (key + ".").startswith(prefix):
            return (table[prefix] + key[len(prefix):]).rstrip(".")
    raise KeyError(key)


def ldm_state_keys(unet) -> dict:
    """{ldm key: diffusers key} for every tensor of the UNet; diffusers' own ldm converter must
    give back exactly the diffusers keys (so the restated table is right for this config)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = dict(unet.config)
    keys = {to_ldm(k, config): k for k in unet.state_dict()}
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: torch.zeros(1) for k in keys}, config)
    assert set(back) == set(unet.state_dict()), "the restated kohya table disagrees with diffusers' ldm converter"
    return keys


def kohya_expected_names(arch, parts, targets) -> set:
    """networks/lora.py create_modules on the same model, kept to the targets lorakit trained."""
    def wanted(child, names):
        return any(child == t or child.endswith("." + t) for t in names)

    names = set()
    unet = parts["unet"]
    config = dict(unet.config)
    for name, module in unet.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        path = to_ldm(name, config) if arch == "sdxl" else name
        for child, layer in module.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and wanted(child, targets):
                names.add(("lora_unet." + path + "." + child).replace(".", "_"))
    prefixes = {"sd15": {"text_encoder": "lora_te"}, "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}[arch]
    for component, prefix in prefixes.items():
        for name, module in parts[component].named_modules():
            if type(module).__name__ in ("CLIPAttention", "CLIPMLP"):
                path = name if name.startswith("text_model.") else "text_model." + name  # transformers 4's layout
                for child, layer in module.named_modules():
                    if isinstance(layer, torch.nn.Linear) and wanted(child, CLIP_TARGETS):
                        names.add((prefix + "." + path + "." + child).replace(".", "_"))
    return names


def test_key_set_is_what_kohya_creates_for_the_same_targets(trained):
    arch, model, _, kohya = trained
    keys, _ = keys_and_meta(kohya)
    parts = load_parts(model)
    if arch == "sdxl":
        ldm_state_keys(parts["unet"])  # the table is right for this (tiny) config
    expected = kohya_expected_names(arch, parts, TARGETS)
    assert modules_of(keys) == expected
    assert keys == {f"{n}.{s}" for n in expected for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    if arch == "sdxl":  # the original UNet's names, not diffusers'
        assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in expected
        assert "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2" in expected
        assert "lora_unet_middle_block_1_proj_in" in expected
        assert not [k for k in keys if "down_blocks" in k or "up_blocks" in k or "mid_block" in k]
    else:  # kohya trains SD1.x on diffusers' UNet
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in expected


def test_restated_table_matches_diffusers_for_full_size_layouts():
    from diffusers import UNet2DConditionModel

    sd15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    sdxl = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    for config in (sd15, sdxl):
        with torch.device("meta"):
            ldm_state_keys(UNet2DConditionModel.from_config(config))


# ---- ComfyUI (comfy/lora.py) -------------------------------------------------------------

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def comfyui_key_map(arch, parts) -> set:
    unet = parts["unet"]
    keys = set()
    ldm = ldm_state_keys(unet)
    for ldm_key, diffusers_key in ldm.items():  # model_lora_keys_unet: the ldm keys, then unet_to_diffusers
        if ldm_key.endswith(".weight"):
            keys.add("lora_unet_" + ldm_key[: -len(".weight")].replace(".", "_"))
            keys.add("lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_"))
    clips = {"clip_l": parts["text_encoder"].config.num_hidden_layers}
    if "text_encoder_2" in parts:
        clips["clip_g"] = parts["text_encoder_2"].config.num_hidden_layers
    for b in range(32):  # model_lora_keys_clip
        for c in LORA_CLIP_MAP:
            if b < clips["clip_l"]:
                keys.add(f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}")
                keys.add(f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}")
            if b < clips.get("clip_g", 0):  # clip_l present
                keys.add(f"lora_te2_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}")
    return keys


def test_comfyui_maps_every_module(trained):
    arch, model, _, kohya = trained
    keys, _ = keys_and_meta(kohya)
    key_map = comfyui_key_map(arch, load_parts(model))
    assert not modules_of(keys) - key_map
    # load_lora: each module's lora_up/lora_down/alpha are taken, so no "lora key not loaded"
    assert all(f"{m}.lora_up.weight" in keys and f"{m}.lora_down.weight" in keys for m in modules_of(keys))


# ---- A1111 (extensions-builtin/Lora) ------------------------------------------------------

RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
SUFFIX_CONVERSION = {"attentions": {}, "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                                                    "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1",
                                                    "conv_shortcut": "skip_connection"}}


def a1111_compvis(key: str, is_sd2=False) -> str:
    """networks.convert_diffusers_name_to_compvis (v1.10; SD1 numbering: 3 per down block)."""
    def match(pattern):
        r = re.match(pattern, key)
        return [int(x) if re.match(r"\d+", x) else x for x in r.groups()] if r else None

    if m := match(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if m := match(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = SUFFIX_CONVERSION.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def a1111_module(name: str, mapping: set):
    """networks.load_network's lookup chain for one network key; the matched layer or None."""
    key = a1111_compvis(name)
    if key in mapping:
        return key
    m = RE_X_PROJ.match(key)
    if m and m.group(1) in mapping:
        return m.group(1)
    if "lora_unet" in name:  # "SDXL loras seem to already have correct compvis keys"
        key = name.replace("lora_unet", "diffusion_model")
        return key if key in mapping else None
    if "lora_te1_text_model" in name:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            key = name.replace("lora_te1_text_model", replacement)
            if key in mapping:
                return key
    return None


def a1111_layer_names(arch, unet_ldm_modules, clip_layers: dict) -> set:
    """assign_network_names_to_compvis_modules on A1111's ldm/sgm model: the UNet as
    ``diffusion_model_*``; SD1's CLIP as ``transformer_text_model_*`` (FrozenCLIPEmbedder);
    SDXL's embedders as ``0_transformer_text_model_*`` and OpenCLIP's ``1_model_transformer_resblocks_*``."""
    names = {"diffusion_model_" + m.replace(".", "_") for m in unet_ldm_modules}
    clip = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    first = "transformer_text_model" if arch == "sd15" else "0_transformer_text_model"
    names |= {f"{first}_encoder_layers_{i}_{c}" for i in range(clip_layers["text_encoder"]) for c in clip}
    for i in range(clip_layers.get("text_encoder_2", 0)):
        names |= {f"1_model_transformer_resblocks_{i}_{c}" for c in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")}
    return names


def a1111_detect_version(metadata: dict) -> str:
    """network.NetworkOnDisk.detect_version."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if len(metadata) else "Unknown"


def test_a1111_reads_the_base_model_version(trained):
    arch, _, _, kohya = trained
    _, meta = keys_and_meta(kohya)
    assert a1111_detect_version(meta) == {"sd15": "SD1", "sdxl": "SDXL"}[arch]
    assert meta["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[arch] and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"


def test_a1111_maps_every_module_of_sdxl(trained):
    arch, model, _, kohya = trained
    if arch != "sdxl":
        pytest.skip("SD1 in A1111: numbered for the full-size layout only, see the next test")
    keys, _ = keys_and_meta(kohya)
    parts = load_parts(model)
    ldm = {k.rsplit(".", 1)[0] for k in ldm_state_keys(parts["unet"])}
    layers = {c: parts[c].config.num_hidden_layers for c in TEXT_ENCODERS[arch]}
    mapping = a1111_layer_names(arch, ldm, layers)
    unmatched = [m for m in modules_of(keys) if a1111_module(m, mapping) is None]
    assert not unmatched


def test_a1111_maps_every_module_of_full_size_sd15(tmp_path):
    """A1111's SD1 rule hard-codes SD1's 2 resnets per block, so it is checked on the full-size
    SD1.5 layout (built on the meta device, LoRA on every target of the tests above)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit.convert import kohya_names
    from lorakit.plugins import get_plugin_manager

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
        clip = CLIPTextModel(CLIPTextConfig(num_hidden_layers=12))
    pm = get_plugin_manager("sd15")
    wanted = lambda name, targets: any(name == t or name.endswith("." + t) for t in targets)  # noqa: E731
    unet_layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and wanted(n, TARGETS)]
    clip_layers = [n for n, m in clip.named_modules() if isinstance(m, torch.nn.Linear) and wanted(n, CLIP_TARGETS)]
    names = list(kohya_names(pm, "unet", unet_layers, None).values()) + list(kohya_names(pm, "text_encoder", clip_layers, None).values())
    assert len(names) == 16 * 10 + 12 * 4  # 16 transformers x (8 attention + proj_in + ff.net.2), 12 CLIP layers x 4
    ldm = {k.rsplit(".", 1)[0] for k in ldm_state_keys(unet)}
    mapping = a1111_layer_names("sd15", ldm, {"text_encoder": 12})
    assert not [n for n in names if a1111_module(n, mapping) is None]


# ---- diffusers loads the kohya file; the way back is exact ------------------------------


def test_diffusers_loads_the_kohya_file_exactly(trained):
    from test_convert import check_kohya_matches_lorakit

    arch, model, weights, kohya = trained
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[arch]
    diffs = check_kohya_matches_lorakit(cls, model, weights, kohya, TEXT_ENCODERS[arch])
    assert max(diffs.values()) < 1e-5, diffs


def test_round_trip_is_bit_exact(trained, tmp_path):
    arch, model, weights, kohya = trained
    back = convert(arch, kohya, tmp_path / "back.safetensors", "diffusers", model=model)
    original, again = load_file(str(weights)), load_file(str(back))
    assert original.keys() == again.keys()
    assert all(original[k].dtype == again[k].dtype and torch.equal(original[k], again[k]) for k in original)
    (_, meta_a), (_, meta_b) = keys_and_meta(weights), keys_and_meta(back)
    assert json.loads(meta_a["lora_adapter_metadata"]) == json.loads(meta_b["lora_adapter_metadata"])


def test_kohya_file_without_lorakit_header_reads_rank_and_alpha_from_tensors(trained, tmp_path):
    """A file from kohya or A1111 users: no lorakit header, one layer at another alpha and rank."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from test_convert import outputs

    arch, model, weights, kohya = trained
    state = load_file(str(kohya))
    odd = sorted(k for k in state if k.endswith("proj_in.alpha"))[0].rsplit(".", 1)[0]
    state[f"{odd}.alpha"] = torch.tensor(2.0)
    state[f"{odd}.lora_down.weight"] = state[f"{odd}.lora_down.weight"][:2].contiguous()
    state[f"{odd}.lora_up.weight"] = state[f"{odd}.lora_up.weight"][:, :2].contiguous()
    foreign = tmp_path / "foreign.safetensors"
    save_file(state, str(foreign), metadata={"ss_network_dim": "4", "ss_network_alpha": "8.0"})
    back = convert(arch, foreign, tmp_path / "back.safetensors", "lorakit", model=model)
    config = json.loads(keys_and_meta(back)[1]["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8.0
    assert list(config["unet.rank_pattern"].values()) == [2] and list(config["unet.alpha_pattern"].values()) == [2.0]

    cls = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[arch]

    def load(path):
        pipe = cls.from_pretrained(str(model))
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        return outputs(pipe, TEXT_ENCODERS[arch])

    ours, theirs = load(back), load(foreign)  # diffusers' own kohya loader as the reference
    assert max((ours[n] - theirs[n]).abs().max().item() for n in ours) < 1e-5


def test_mistakes_are_one_line(trained, tmp_path):
    from lorakit.errors import LorakitError

    arch, model, weights, kohya = trained
    with pytest.raises(LorakitError, match="already in kohya format; pass --to diffusers"):
        convert(arch, kohya, tmp_path / "k.safetensors", "kohya", model=model)
    with pytest.raises(LorakitError, match="needs the base model: pass --model"):
        convert(arch, kohya, tmp_path / "k.safetensors", "diffusers")
    other = {"sd15": "sdxl", "sdxl": "sd15"}[arch]
    with pytest.raises(LorakitError, match=f"trained with --arch {arch}"):
        convert(other, weights, tmp_path / "k.safetensors", "kohya")
    with pytest.raises(LorakitError, match="--to webui is not a known format"):
        convert(arch, weights, tmp_path / "k.safetensors", "webui")
    assert not (tmp_path / "k.safetensors").exists()
