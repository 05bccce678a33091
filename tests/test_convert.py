"""`lorakit convert --to kohya`: diffusers' own kohya loader reproduces the trained model exactly
(kohya's, ComfyUI's and A1111's own naming rules are checked in test_kohya.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.convert import convert_to_kohya
from lorakit.testing import example_data, tiny_config

runner = CliRunner()
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # proj_in: a conv 1x1 in SD1.5, a linear in SDXL


def train_lora(arch, model, output):
    config = tiny_config(arch, model, example_data(), output, rank=4, alpha=8, train_text_encoder=True,
                         target_modules=TARGETS, max_steps=2, learning_rate=1e-2)
    return lorakit.train(config).weights


@pytest.fixture(scope="module")
def sd15_lora(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("convert")
    model = make_tiny_model("sd15", root / "model")
    return model, train_lora("sd15", model, root / "out")


def unet_output(unet):
    g = torch.Generator().manual_seed(0)
    c = unet.config
    sample = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
    hidden = torch.randn(1, 7, c.cross_attention_dim, generator=g)
    kwargs = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        return unet(sample, 10, hidden, **kwargs).sample


def text_output(text_encoder):
    with torch.no_grad():
        return text_encoder(torch.arange(1, 9)[None])[0]


def outputs(pipeline, text_encoders):
    return {"unet": unet_output(pipeline.unet), **{n: text_output(getattr(pipeline, n)) for n in text_encoders}}


def check_kohya_matches_lorakit(pipeline_class, model, weights, kohya, text_encoders):
    def load(lora=None):
        pipe = pipeline_class.from_pretrained(str(model))
        if lora is not None:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        return outputs(pipe, text_encoders)

    base, trained, converted = load(), load(weights), load(kohya)
    diffs = {}
    for name in trained:
        assert (trained[name] - base[name]).abs().max() > 1e-3, f"{name}: the LoRA changes nothing; the test proves nothing"
        diffs[name] = (converted[name] - trained[name]).abs().max().item()
        assert diffs[name] < 1e-5, (name, diffs[name])
    return diffs


def test_sd15_kohya_file_loads_in_diffusers_exactly(sd15_lora, tmp_path):
    from diffusers import StableDiffusionPipeline

    model, weights = sd15_lora
    kohya = convert_to_kohya("sd15", weights, tmp_path / "x.safetensors")
    with safe_open(str(kohya), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.alpha").item() == 8.0
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0" and "lorakit_adapter_metadata" in meta
    check_kohya_matches_lorakit(StableDiffusionPipeline, model, weights, kohya, ["text_encoder"])


def test_sdxl_kohya_file_loads_in_diffusers_exactly(lorakit_tiny_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model = lorakit_tiny_model("sdxl")
    weights = train_lora("sdxl", model, tmp_path / "out")
    kohya = convert_to_kohya("sdxl", tmp_path / "out", tmp_path / "x.safetensors")
    with safe_open(str(kohya), framework="pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_") for k in keys)
    check_kohya_matches_lorakit(StableDiffusionXLPipeline, model, weights, kohya, ["text_encoder", "text_encoder_2"])


def test_alpha_pattern_and_rslora_give_each_layer_its_trained_scale():
    from lorakit.convert import kohya_state_dict

    a, b = torch.zeros(4, 3), torch.zeros(3, 4)
    tensors = {f"unet.blk.{m}.lora_{x}.weight": t for m in ("to_q", "to_k") for x, t in (("A", a), ("B", b))}
    meta = {"unet.lora_alpha": 8.0, "unet.alpha_pattern": {"to_k": 2.0}}
    out = kohya_state_dict(tensors, meta, {"unet": "lora_unet"})
    assert out["lora_unet_blk_to_q.alpha"].item() == 8.0 and out["lora_unet_blk_to_k.alpha"].item() == 2.0
    out = kohya_state_dict(tensors, {**meta, "unet.use_rslora": True}, {"unet": "lora_unet"})
    assert out["lora_unet_blk_to_q.alpha"].item() == 16.0  # alpha / sqrt(4) == 16 / 4


# --- mistakes end in one line -------------------------------------------------------


def convert_cli(*args):
    return runner.invoke(app, ["convert", *[str(a) for a in args]])


def assert_one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_converts_and_refuses_to_overwrite(sd15_lora, tmp_path):
    _, weights = sd15_lora
    out = tmp_path / "kohya.safetensors"
    ok = convert_cli("--arch", "sd15", "--to", "kohya", weights, out)
    assert ok.exit_code == 0 and out.is_file(), ok.output
    assert_one_line_error(convert_cli("--arch", "sd15", "--to", "kohya", weights, out), "exists", "--overwrite")
    assert convert_cli("--arch", "sd15", "--to", "kohya", "--overwrite", weights, out).exit_code == 0


def test_cli_converts_back_to_diffusers_exactly(sd15_lora, tmp_path):
    from safetensors.torch import load_file

    model, weights = sd15_lora
    kohya, back = tmp_path / "kohya.safetensors", tmp_path / "back.safetensors"
    assert convert_cli("--arch", "sd15", "--to", "kohya", weights, kohya).exit_code == 0
    assert_one_line_error(convert_cli("--arch", "sd15", "--to", "diffusers", kohya, back), "pass --model")
    ok = convert_cli("--arch", "sd15", "--to", "diffusers", "--model", model, kohya, back)
    assert ok.exit_code == 0, ok.output
    original, again = load_file(str(weights)), load_file(str(back))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_cli_errors(sd15_lora, tmp_path):
    _, weights = sd15_lora
    out = tmp_path / "k.safetensors"
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"not opened")
    assert_one_line_error(convert_cli("--arch", "sd15", "--to", "kohya", pickle, out), "not a .safetensors file")
    assert_one_line_error(convert_cli("--arch", "sd15", "--to", "kohya", tmp_path / "nope.safetensors", out), "does not exist")
    assert_one_line_error(convert_cli("--arch", "kandinsky22", "--to", "kohya", weights, out), "no kohya naming")
    assert_one_line_error(convert_cli("--arch", "sd15", "--to", "webui", weights, out), "--to webui", "kohya, diffusers")
    assert not out.exists()
