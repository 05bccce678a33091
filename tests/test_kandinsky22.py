"""Kandinsky 2.2 end to end, both stages: a LoRA trained by lorakit loads back into diffusers'
Kandinsky pipelines exactly (through ``load_lora_into``), resume is exact, and a prior LoRA
and a decoder LoRA chained prior -> decoder generate an image offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.lora import count_lora_layers
from lorakit.testing import assert_same_lora, lora_deltas, tiny_config
from lorakit.training import Trainer
from lorakit_plugins.kandinsky22 import WEIGHT_NAME, load_lora_into

DECODER, PRIOR = "kandinsky22", "kandinsky22-prior"
# One thread: these models are too small to gain from two, and on a busy machine two threads
# contending for cores make each step several times slower.
RUN = dict(rank=4, alpha=8, max_steps=4, checkpoint_every=2, batch_size=2, learning_rate=5e-3, num_threads=1)


@pytest.fixture(scope="module")
def _runs():
    return {}


@pytest.fixture
def models(lorakit_tiny_model):
    """Tiny model folders: the decoder (with its prior in prior/) and the stand-alone prior."""
    return {DECODER: lorakit_tiny_model(DECODER), PRIOR: lorakit_tiny_model(PRIOR)}


@pytest.fixture
def trained(_runs, models, lorakit_image_folder, tmp_path_factory):
    """``trained(arch)`` -> (trainer, result) of a 4-step run with checkpoints every 2 (one per module)."""

    def get(arch):
        if arch not in _runs:
            out = tmp_path_factory.mktemp(f"{arch}-run") / "out"
            trainer = Trainer(tiny_config(arch, models[arch], lorakit_image_folder, out, **RUN)).setup()
            _runs[arch] = (trainer, trainer.run())
        return _runs[arch]

    return get


def _decoder_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 32, generator=g)


def _unet_out(unet, latents, timesteps, embeds):
    with torch.no_grad():
        return unet(latents, timesteps, None, added_cond_kwargs={"image_embeds": embeds}).sample


def _prior_inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[:, 20:] = False
    return dict(
        hidden_states=torch.randn(2, 32, generator=g),
        timestep=torch.tensor([10, 700]),
        proj_embedding=torch.randn(2, 32, generator=g),
        encoder_hidden_states=torch.randn(2, 77, 32, generator=g),
        attention_mask=mask,
    )


def _prior_out(prior, inputs):
    with torch.no_grad():
        return prior(**inputs).predicted_image_embedding


def test_plugin_module_imports_without_torch():
    code = "import sys, lorakit_plugins.kandinsky22; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("crop, sizes", [(32, (32, 64)), (224, (224, 512))])
def test_clip_inputs_match_clip_image_processor(crop, sizes):
    """The embeddings lorakit trains on see what CLIPImageProcessor makes of the same image."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from lorakit.testing import example_data
    from lorakit_plugins.kandinsky22 import clip_pixel_values

    processor = CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    image = Image.open(example_data() / "red_circle.png").convert("RGB")
    for size in sizes:
        resized = image.resize((size, size), Image.BICUBIC)
        want = torch.from_numpy(processor(resized, return_tensors="np").pixel_values)
        pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None].float() / 127.5 - 1
        got = clip_pixel_values(pixels, processor)
        assert got.shape == want.shape == (1, 3, crop, crop)
        assert (got - want).abs().mean().item() < 5e-3 and (got - want).abs().max().item() < 0.15


def test_decoder_lora_reloads_exactly_into_kandinsky_pipeline(trained, models):
    from diffusers import KandinskyV22Pipeline

    trainer, result = trained(DECODER)
    pipe = KandinskyV22Pipeline.from_pretrained(models[DECODER])
    base = _unet_out(pipe.unet, *_decoder_inputs())
    assert load_lora_into(pipe, result.output_dir) == ["unet"]

    trained_unet = trainer.components["unet"].eval()
    layers = count_lora_layers(trained_unet)
    assert count_lora_layers(pipe.unet) == layers == 24
    assert_same_lora(trained_unet, pipe.unet)
    assert any(name.endswith("add_k_proj") for name in lora_deltas(pipe.unet))
    want, got = _unet_out(trained_unet, *_decoder_inputs()), _unet_out(pipe.unet, *_decoder_inputs())
    assert (want - got).abs().max().item() < 1e-5
    assert (got - base).abs().max().item() > 1e-3  # the LoRA really changes the decoder


def test_prior_lora_reloads_exactly_into_kandinsky_prior_pipeline(trained, models):
    from diffusers import KandinskyV22PriorPipeline

    trainer, result = trained(PRIOR)
    pipe = KandinskyV22PriorPipeline.from_pretrained(models[PRIOR])
    base = _prior_out(pipe.prior, _prior_inputs())
    assert load_lora_into(pipe, result.weights) == ["prior"]

    trained_prior = trainer.components["prior"].eval()
    assert count_lora_layers(pipe.prior) == count_lora_layers(trained_prior) == 4
    assert_same_lora(trained_prior, pipe.prior)
    want, got = _prior_out(trained_prior, _prior_inputs()), _prior_out(pipe.prior, _prior_inputs())
    assert (want - got).abs().max().item() < 1e-5
    assert (got - base).abs().max().item() > 1e-3


def test_file_is_what_model_level_load_lora_adapter_reads(trained, models):
    from diffusers import UNet2DConditionModel

    trainer, result = trained(DECODER)
    with safe_open(str(result.weights), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8  # alpha != rank: exact only via metadata
    assert {"add_k_proj", "add_v_proj"} <= set(meta["unet.target_modules"])
    assert all(k.startswith("unet.") for k in load_file(str(result.weights)))

    unet = UNet2DConditionModel.from_pretrained(models[DECODER], subfolder="unet")
    unet.load_lora_adapter(str(result.output_dir), weight_name=WEIGHT_NAME, prefix="unet")
    assert_same_lora(trainer.components["unet"], unet)


@pytest.mark.parametrize("arch", [DECODER, PRIOR])
def test_resume_equals_uninterrupted_run(arch, trained, models, lorakit_image_folder, tmp_path):
    _, straight = trained(arch)
    out = tmp_path / "out"
    Trainer(tiny_config(arch, models[arch], lorakit_image_folder, out, **{**RUN, "max_steps": 2})).setup().run()
    resumed = Trainer(tiny_config(arch, models[arch], lorakit_image_folder, out, **RUN, resume="latest"))
    resumed.setup()
    assert resumed.global_step == 2
    result = resumed.run()

    want, got = load_file(str(straight.weights)), load_file(str(result.weights))
    assert want.keys() == got.keys() and len(want) > 0
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert straight.losses[2:] == resumed.losses


def test_decoder_folder_holds_the_same_prior_as_tiny_prior(models):
    """So a LoRA trained on ``lorakit tiny kandinsky22-prior`` fits the decoder folder's prior."""
    for sub in ("prior", "text_encoder", "image_encoder"):
        bundled = sorted((models[DECODER] / "prior" / sub).glob("*.safetensors"))
        alone = sorted((models[PRIOR] / sub).glob("*.safetensors"))
        assert [p.read_bytes() for p in bundled] == [p.read_bytes() for p in alone]


def test_prior_and_decoder_loras_chain_into_an_image(trained, models):
    """The documented snippet (prior pipeline -> decoder pipeline) and `lorakit generate` agree."""
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from lorakit.inference import generate

    _, decoder_run = trained(DECODER)
    _, prior_run = trained(PRIOR)
    k22 = models[DECODER]

    prior_pipe = KandinskyV22PriorPipeline.from_pretrained(k22 / "prior")
    load_lora_into(prior_pipe, prior_run.output_dir)
    decoder_pipe = KandinskyV22Pipeline.from_pretrained(k22)
    load_lora_into(decoder_pipe, decoder_run.output_dir)
    generator = torch.Generator().manual_seed(0)
    embeds, negative = prior_pipe("a red circle", num_inference_steps=2, generator=generator).to_tuple()
    image = decoder_pipe(
        image_embeds=embeds, negative_image_embeds=negative, height=32, width=32, num_inference_steps=2,
        generator=generator,
    ).images[0]
    assert image.size == (32, 32)

    loras = [(decoder_run.weights, 1.0), (prior_run.weights, 1.0)]
    [generated] = generate(DECODER, str(k22), ["a red circle"], loras, steps=2, resolution=32, seed=0, device="cpu")
    assert np.array_equal(np.asarray(generated), np.asarray(image))

    # Through the prior's arch id too (its folder sits inside the decoder folder), and the
    # LoRAs matter: at scale 0 the image differs.
    [via_prior] = generate(PRIOR, str(k22 / "prior"), ["a red circle"], [(prior_run.weights, 1.0)], steps=2,
                           resolution=32, seed=0, device="cpu")
    assert via_prior.size == (32, 32)
    off = [(p, 0.0) for p, _ in loras]
    [plain] = generate(DECODER, str(k22), ["a red circle"], off, steps=2, resolution=32, seed=0, device="cpu")
    assert not np.array_equal(np.asarray(plain), np.asarray(image))


def test_user_errors_name_the_fix(trained, models, lorakit_image_folder, tmp_path):
    from diffusers import KandinskyV22Pipeline

    from lorakit.inference import generate

    _, prior_run = trained(PRIOR)
    with pytest.raises(LorakitError, match="prior LoRA but KandinskyV22Pipeline has no prior; load it into a KandinskyV22PriorPipeline"):
        load_lora_into(KandinskyV22Pipeline.from_pretrained(models[DECODER]), prior_run.weights)

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(LorakitError, match="is not a readable safetensors file"):
        load_lora_into(KandinskyV22Pipeline.from_pretrained(models[DECODER]), damaged)

    no_prior = tmp_path / "decoder-only"
    shutil.copytree(models[DECODER], no_prior, ignore=shutil.ignore_patterns("prior"))
    config = tiny_config(DECODER, no_prior, lorakit_image_folder, tmp_path / "out")
    with pytest.raises(LorakitError, match="has no prior/image_encoder.*kandinsky-community/kandinsky-2-2-prior in its prior/"):
        Trainer(config).setup()

    with pytest.raises(LorakitError, match="needs the prior in prior/ of the --model folder"):
        generate(DECODER, str(no_prior), ["x"], steps=2, resolution=32, device="cpu")

    with pytest.raises(LorakitError, match="use --arch kandinsky22-prior"):
        Trainer(tiny_config(DECODER, models[PRIOR], lorakit_image_folder, tmp_path / "out2")).setup()

    with pytest.raises(LorakitError, match="generate with --arch kandinsky22 --model"):
        generate(PRIOR, str(models[PRIOR]), ["x"], steps=2, resolution=32, device="cpu")


@pytest.mark.parametrize(
    "arch, option, message",
    [
        (DECODER, {"caption_dropout": 0.1}, "not on captions; drop --caption-dropout"),
        (DECODER, {"vae": "some-vae"}, "takes no --vae"),
        (PRIOR, {"noise_offset": 0.05}, "the prior denoises an embedding"),
        (PRIOR, {"prediction_type": "v_prediction"}, "drop --prediction-type"),
        (PRIOR, {"gradient_checkpointing": True}, "drop the flag"),
    ],
)
def test_options_that_do_not_apply_are_refused(arch, option, message, models, lorakit_image_folder, tmp_path):
    config = tiny_config(arch, models[arch], lorakit_image_folder, tmp_path / "out", **option)
    with pytest.raises(LorakitError, match=message):
        Trainer(config).setup()


def test_one_generator_per_prompt_gives_per_image_seeds(models):
    """The hookspec's list-of-generators form (DreamBooth class images rely on it)."""
    from lorakit.plugins import get_plugin_manager

    pm = get_plugin_manager(DECODER)
    pipe = pm.hook.load_pipeline(model_path=models[DECODER], device="cpu", dtype=torch.float32)

    def images(prompts, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pm.hook.generate_images(
            pipeline=pipe, prompts=prompts, generator=generators, num_inference_steps=2, resolution=32,
            guidance_scale=None,
        )

    both = images(["a red circle", "a blue square"], [0, 1])
    alone = images(["a blue square"], [1])
    # batched and single inference may round differently in the last bit of a pixel
    diff = np.abs(np.asarray(both[1]).astype(int) - np.asarray(alone[0]).astype(int))
    assert len(both) == 2 and diff.max() <= 2, diff.max()
