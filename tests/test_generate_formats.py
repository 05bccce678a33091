"""``lorakit generate --lora`` takes every format lorakit reads, with separate denoiser and
text-encoder strengths, and refuses a LoRA of another arch in one line naming the arch it fits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import lorakit
from lorakit.convert import convert
from lorakit.errors import LorakitError
from lorakit.inference import generate, load_pipeline_with_loras, parse_lora_spec
from lorakit.testing import example_data, tiny_config

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]


def _trained_style(tmp_path_factory, arch: str, folder: str, output: str):
    """``(tiny model, its trained LoRA file, the folder)``: 2 steps with text-encoder LoRA."""
    from lorakit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp(folder)
    model = make_tiny_model(arch, root / "model")
    config = tiny_config(arch, model, example_data(), root / output, alpha=8, train_text_encoder=True,
                         target_modules=TARGETS, max_steps=2, learning_rate=5e-2)
    return model, lorakit.train(config).weights, root


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return _trained_style(tmp_path_factory, "sd15", "gen-formats", "style")


def images(model, *specs):
    out = generate("sd15", str(model), ["a red circle"], [parse_lora_spec(str(s)) for s in specs], steps=2,
                   resolution=32, seed=0, device="cpu")
    return np.asarray(out[0], dtype=np.int16)


def test_kohya_file_train_wrote_generates_the_same_image(sd15):
    model, weights, root = sd15
    kohya = root / "style" / "style.safetensors"  # --save-format both (the default for sd15)
    assert kohya.is_file()
    base, ours, theirs = images(model), images(model, weights), images(model, kohya)
    assert np.abs(ours - base).max() > 0, "the LoRA changes nothing; the test would prove nothing"
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("fmt", ["diffusers-example", "kohya"])
def test_other_formats_generate_the_same_image(sd15, fmt, tmp_path):
    model, weights, _ = sd15
    other = convert("sd15", weights, tmp_path / f"{fmt}.safetensors", fmt, model=model)
    assert np.abs(images(model, other) - images(model, weights)).max() <= 1


def test_text_encoder_strength_is_separate(sd15):
    from test_convert import text_output, unet_output

    model, weights, _ = sd15
    _, base = load_pipeline_with_loras("sd15", str(model), [], device="cpu")
    _, both = load_pipeline_with_loras("sd15", str(model), [parse_lora_spec(f"{weights}:1")], device="cpu")
    _, unet_only = load_pipeline_with_loras("sd15", str(model), [parse_lora_spec(f"{weights}:1:0")], device="cpu")
    assert torch.equal(text_output(unet_only.text_encoder), text_output(base.text_encoder))
    assert not torch.equal(text_output(both.text_encoder), text_output(base.text_encoder))
    assert torch.equal(unet_output(unet_only.unet), unet_output(both.unet))
    assert parse_lora_spec(f"{weights}:0.8:0.5") == (weights, 0.8, 0.5)
    assert parse_lora_spec(f"{weights}:0.8") == (weights, 0.8)


def test_another_arch_is_refused_in_one_line_naming_it(sd15, lorakit_tiny_model, tmp_path):
    model, _, _ = sd15
    sdxl = lorakit_tiny_model("sdxl")
    run = lorakit.train(tiny_config("sdxl", sdxl, example_data(), tmp_path / "xl", max_steps=1, train_text_encoder=True))
    bare = tmp_path / "bare" / "lora.safetensors"  # without the run config beside it: told by its layers
    bare.parent.mkdir()
    shutil.copy(run.weights, bare)
    kohya = tmp_path / "xl" / "xl.safetensors"
    for lora in (run.weights, bare, kohya):
        with pytest.raises(LorakitError, match=r"does not fit --arch sd15 .*it is a LoRA for --arch sdxl\.$") as info:
            load_pipeline_with_loras("sd15", str(model), [parse_lora_spec(str(lora))], device="cpu")
        assert "\n" not in str(info.value)


def test_a_kohya_file_of_another_model_size_names_the_layer(sd15, tmp_path):
    """An SD1.5 kohya file whose cross-attention is wider than the model's (an SD2-like LoRA)."""
    from safetensors.torch import load_file, save_file

    model, _, root = sd15
    state = load_file(str(root / "style" / "style.safetensors"))
    key = next(k for k in state if "attn2_to_k.lora_down" in k)
    state[key] = torch.zeros(state[key].shape[0], 1024)
    wide = tmp_path / "wide.safetensors"
    save_file(state, str(wide))
    with pytest.raises(LorakitError, match=r"attn2.to_k: the LoRA has 1024 inputs, the model's layer 32"):
        load_pipeline_with_loras("sd15", str(model), [parse_lora_spec(str(wide))], device="cpu")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _trained_style(tmp_path_factory, "sdxl", "gen-formats-xl", "xl-style")


def test_sdxl_kohya_file_train_wrote_has_kohyas_names_and_generates_the_same_image(sdxl):
    from safetensors import safe_open

    model, weights, root = sdxl
    kohya = root / "xl-style" / "xl-style.safetensors"
    with safe_open(str(kohya), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and not any("down_blocks" in k for k in keys)
    assert any(k.startswith("lora_te1_text_model_") for k in keys) and any(k.startswith("lora_te2_text_model_") for k in keys)

    def image(*specs):
        out = generate("sdxl", str(model), ["a red circle"], [parse_lora_spec(str(s)) for s in specs], steps=2,
                       resolution=32, seed=0, device="cpu")
        return np.asarray(out[0], dtype=np.int16)

    ours = image(weights)
    assert np.abs(ours - image()).max() > 0
    assert np.array_equal(ours, image(kohya))
    example = convert("sdxl", weights, root / "example.safetensors", "diffusers-example", model=model)
    assert np.abs(image(example) - ours).max() <= 1  # scales folded into lora_up: float rounding at most
    from diffusers import StableDiffusionXLPipeline
    from test_convert import outputs

    def loaded(path):  # diffusers' own loader reads the example file, both text encoders included
        pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        return outputs(pipe, ["text_encoder", "text_encoder_2"])

    a, b = loaded(weights), loaded(example)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5


def test_sdxl_init_lora_from_the_kohya_file(sdxl, tmp_path):
    from safetensors.torch import load_file

    from lorakit.training import Trainer

    model, weights, root = sdxl
    config = tiny_config("sdxl", model, example_data(), tmp_path / "more", max_steps=1,
                         init_lora=str(root / "xl-style" / "xl-style.safetensors"))
    trainer = Trainer(config).setup()
    assert set(trainer.lora_configs) == {"unet", "text_encoder", "text_encoder_2"}
    start = {f"{c}.{k}": t for c, (state, _) in trainer.lora_layers().items() for k, t in state.items()}
    original = load_file(str(weights))
    assert start.keys() == original.keys() and all(torch.equal(start[k], original[k]) for k in original)
    assert trainer.run().global_step == 1
