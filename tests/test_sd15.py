"""SD1.5 end to end: the file diffusers loads reproduces the trained UNet, resume is exact,
and training really learns."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.lora import count_lora_layers
from lorakit.testing import assert_same_lora, tiny_config
from lorakit.training import Trainer

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lorakit.testing import example_data
    from lorakit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("sd15")
    model = make_tiny_model("sd15", root / "model")
    config = tiny_config(
        "sd15", model, example_data(), root / "out", rank=4, alpha=8, target_modules=TARGETS, max_steps=3,
        train_text_encoder=True,
    )
    trainer = Trainer(config).setup()
    result = trainer.run()
    return model, trainer, result


def test_diffusers_reload_reproduces_trained_unet(trained):
    from diffusers import StableDiffusionPipeline

    model, trainer, result = trained
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(result.output_dir), weight_name=result.weights.name)

    trained_unet = trainer.components["unet"].eval()
    assert count_lora_layers(pipe.unet) == count_lora_layers(trained_unet) > 0
    assert_same_lora(trained_unet, pipe.unet)

    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    cond = torch.randn(2, 77, 32)
    with torch.no_grad():
        want = trained_unet(x, torch.tensor([10, 500]), cond).sample
        got = pipe.unet(x, torch.tensor([10, 500]), cond).sample
    assert (want - got).abs().max().item() < 1e-5


def test_diffusers_reload_reproduces_trained_text_encoder(trained):
    from diffusers import StableDiffusionPipeline

    model, trainer, result = trained
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(result.output_dir), weight_name=result.weights.name)
    trained_te = trainer.components["text_encoder"].eval()
    assert count_lora_layers(pipe.text_encoder) == count_lora_layers(trained_te) == 8
    ids = pipe.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    base = StableDiffusionPipeline.from_pretrained(model).text_encoder
    with torch.no_grad():
        want, got, orig = trained_te(ids)[0], pipe.text_encoder(ids)[0], base(ids)[0]
    assert (want - got).abs().max().item() < 1e-5
    assert (want - orig).abs().max().item() > 1e-4  # the LoRA really changed the encoder


def test_saved_file_carries_alpha_and_targets(trained):
    _, _, result = trained
    with safe_open(str(result.weights), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8
    assert set(meta["unet.target_modules"]) == set(TARGETS)
    # non-attention targets are stored too (diffusers' key conversion would drop them)
    assert any(".proj_in.lora_A" in k for k in load_file(str(result.weights)))


def test_every_checkpoint_is_loadable_and_run_is_documented(trained):
    _, _, result = trained
    assert (result.output_dir / "lorakit_config.json").is_file()
    assert "lorakit" in (result.output_dir / "README.md").read_text()


def test_resume_equals_uninterrupted_run(tmp_path, lorakit_tiny_model):
    from lorakit.testing import example_data

    model = lorakit_tiny_model("sd15")
    common = dict(max_steps=10, checkpoint_every=5, batch_size=2, random_flip=True, lora_dropout=0.0)
    common.pop("lora_dropout")
    straight = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "a", **common)).setup().run()

    first = tiny_config("sd15", model, example_data(), tmp_path / "b", **{**common, "max_steps": 5})
    Trainer(first).setup().run()
    second = tiny_config("sd15", model, example_data(), tmp_path / "b", **common, resume="latest")
    trainer = Trainer(second).setup()
    assert trainer.global_step == 5
    resumed = trainer.run()

    a, b = load_file(str(straight.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.losses[5:] == resumed.losses


def _colour_folder(path, shades):
    from PIL import Image

    path.mkdir()
    rows = []
    for name, rgbs in shades.items():
        for i, rgb in enumerate(rgbs):
            Image.new("RGB", (32, 32), rgb).save(path / f"{name}{i}.png")
            rows.append({"file_name": f"{name}{i}.png", "text": f"a {name} image"})
    (path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_learns_a_toy_task(tmp_path, lorakit_tiny_model):
    """Plain-colour images captioned with their colour: the denoising loss on held-out
    shades (not trained on), at fixed noise and timesteps, must drop clearly."""
    from lorakit.data import load_captioned_images

    train = _colour_folder(tmp_path / "train", {
        "red": [(230, 20, 20), (200, 30, 30)],
        "green": [(20, 200, 40), (40, 170, 60)],
        "blue": [(20, 40, 230), (40, 60, 200)],
    })
    held_out = load_captioned_images(str(_colour_folder(tmp_path / "held", {
        "red": [(215, 25, 25)], "green": [(30, 185, 50)], "blue": [(30, 50, 215)],
    })))
    model = lorakit_tiny_model("sd15")
    config = tiny_config("sd15", model, train, tmp_path / "out", max_steps=150, learning_rate=1e-2, rank=8, batch_size=3)
    trainer = Trainer(config).setup()
    before = trainer.eval_loss(held_out, seed=7, repeats=8)
    trainer.run()
    after = trainer.eval_loss(held_out, seed=7, repeats=8)
    print(f"held-out loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)


def test_vae_replaces_the_models_own_and_a_wrong_one_is_refused(tmp_path, lorakit_tiny_model):
    """--vae is honoured (not silently ignored): the replacement's weights encode the images."""
    from diffusers import AutoencoderKL

    from lorakit.errors import LorakitError
    from lorakit.testing import example_data

    model = lorakit_tiny_model("sd15")
    own = AutoencoderKL.from_pretrained(model, subfolder="vae")
    other = AutoencoderKL.from_config(own.config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "vae")
    trainer = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "o", vae=str(tmp_path / "vae"))).setup()
    loaded = trainer.components["vae"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())
    with pytest.raises(LorakitError, match=r"--vae .* is a UNet2DConditionModel model, not an AutoencoderKL"):
        Trainer(tiny_config("sd15", model, example_data(), tmp_path / "o2", vae=str(model / "unet"))).setup()


def test_cached_text_encoder_and_vae_leave_memory(tmp_path, lorakit_tiny_model):
    """Once every caption and image is cached, SD1.5's frozen text encoder and VAE are freed
    (they held ~0.8 GB of a full-size model's RAM through the whole run); a trained text encoder stays."""
    from lorakit.testing import example_data

    model = lorakit_tiny_model("sd15")
    frozen = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "a", max_steps=2)).setup()
    frozen.run()
    assert frozen.cache.released == ["vae", "text_encoder"]
    assert frozen.components["vae"] is None and frozen.components["text_encoder"] is None
    trained = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "b", max_steps=2,
                                  train_text_encoder=True)).setup()
    trained.run()
    assert trained.cache.released == ["vae"]
    assert isinstance(trained.components["text_encoder"], torch.nn.Module)
