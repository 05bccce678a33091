"""Wuerstchen prior (--arch wuerstchen) end to end on tiny models, offline.

What a user would notice: the saved file loads into diffusers' WuerstchenPriorPipeline and
reproduces the trained prior; a resumed run ends where an uninterrupted one does; the
prior -> decoder chain makes images and the LoRA changes them; the image encoder has the
published checkpoint's names and shapes, runs at full size, and its weights are never
unpickled.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.lora import count_lora_layers
from lorakit.testing import assert_same_lora, tiny_config
from lorakit.training import Trainer

ARCH = "wuerstchen"
RES = 64  # EfficientNet downsamples 32x: 2x2 image embeddings
WEIGHTS = "pytorch_lora_weights.safetensors"

# Training runs and the full-size encoder are shared by the tests of this module (built on first use).
_shared: dict = {}


def _wuerstchen():
    import lorakit_plugins.wuerstchen as plugin

    return plugin


@pytest.fixture
def tiny_model(lorakit_tiny_model):
    return lorakit_tiny_model(ARCH)


@pytest.fixture
def trained(tiny_model, lorakit_image_folder, tmp_path_factory):
    """A 4-step run, checkpoint every 2 steps, alpha != rank (so a lost alpha would show)."""
    if "trained" not in _shared:
        out = tmp_path_factory.mktemp("wuerstchen-run") / "out"
        config = tiny_config(
            ARCH, tiny_model, lorakit_image_folder, out, resolution=RES, alpha=8, learning_rate=1e-2, checkpoint_every=2
        )
        trainer = Trainer(config).setup()
        result = trainer.run()
        _shared["trained"] = (config, trainer, result)
    return _shared["trained"]


@pytest.fixture
def full_encoder_dir(tmp_path_factory):
    """The real EfficientNetV2-S encoder architecture with random weights, saved as the plugin reads it."""
    if "full" not in _shared:
        plugin = _wuerstchen()
        torch.manual_seed(0)
        encoder = plugin.EfficientNetEncoder()
        _shared["full"] = plugin.save_image_encoder(encoder, tmp_path_factory.mktemp("effnet") / "image_encoder")
    return _shared["full"]


def _fresh_prior_pipeline(model: Path):
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPriorPipeline

    prior, text_encoder, tokenizer, scheduler = _wuerstchen()._load_prior_parts(Path(model))
    return WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, scheduler=scheduler)


def _prior_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 2, 2, generator=g), torch.tensor([0.25, 0.9]), torch.randn(2, 77, 32, generator=g)


# ------------------------------------------------------------------------- plugin basics


def test_plugin_import_and_list_archs_stay_torch_free():
    code = (
        "import sys; from lorakit.plugins import arch_info; info = arch_info('wuerstchen'); "
        "import lorakit_plugins.wuerstchen; print(info.denoiser, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["prior", "False"]


def test_core_names_no_architecture():
    core = Path(__import__("lorakit").__file__).parent
    offenders = [p.name for p in core.rglob("*.py") if "wuerstchen" in p.read_text().lower()]
    assert offenders == []


# ------------------------------------------------------------------------- train -> save -> diffusers reload


def test_saved_lora_reloads_exactly_into_prior_pipeline(trained, tiny_model):
    _, trainer, result = trained
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))

    state = load_file(str(result.weights))
    assert state and all(k.startswith("prior.") for k in state), "prior LoRA is stored under 'prior.' (PEFT keys)"
    with safe_open(str(result.weights), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["prior.r"] == 4 and meta["prior.lora_alpha"] == 8

    pipe = _fresh_prior_pipeline(tiny_model)
    x, r, c = _prior_inputs()
    with torch.no_grad():
        base = pipe.prior(x, r, c)
    pipe.load_lora_weights(str(result.output_dir), weight_name=WEIGHTS)

    trained_prior = trainer.components["prior"].eval()
    projections = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
    attention_layers = sum(1 for n, _ in pipe.prior.named_modules() if n.endswith(projections))
    assert count_lora_layers(trained_prior) == count_lora_layers(pipe.prior) == attention_layers == 8
    assert_same_lora(trained_prior, pipe.prior)
    with torch.no_grad():
        want = trained_prior(x, r, c)
        got = pipe.prior(x, r, c)
    assert (want - got).abs().max().item() < 1e-5
    assert (want - base).abs().max().item() > 1e-3, "the trained LoRA changes the prior's output"


def test_text_encoder_lora_reloads_too(tiny_model, lorakit_image_folder, tmp_path):
    config = tiny_config(
        ARCH, tiny_model, lorakit_image_folder, tmp_path / "te", resolution=RES, max_steps=2, train_text_encoder=True
    )
    trainer = Trainer(config).setup()
    result = trainer.run()
    pipe = _fresh_prior_pipeline(tiny_model)
    pipe.load_lora_weights(str(result.output_dir), weight_name=WEIGHTS)
    assert count_lora_layers(pipe.text_encoder) == count_lora_layers(trainer.components["text_encoder"]) > 0
    assert_same_lora(trainer.components["text_encoder"], pipe.text_encoder)
    assert_same_lora(trainer.components["prior"], pipe.prior)


def test_resume_equals_uninterrupted_run(trained, tiny_model, lorakit_image_folder, tmp_path):
    straight_config, _, straight = trained
    common = dict(resolution=RES, alpha=8, learning_rate=1e-2, checkpoint_every=2)
    first = tiny_config(ARCH, tiny_model, lorakit_image_folder, tmp_path / "b", max_steps=2, **common)
    Trainer(first).setup().run()
    second = tiny_config(ARCH, tiny_model, lorakit_image_folder, tmp_path / "b", max_steps=4, resume="latest", **common)
    trainer = Trainer(second).setup()
    assert trainer.global_step == 2
    resumed = trainer.run()

    want, got = load_file(str(straight.weights)), load_file(str(resumed.weights))
    assert want.keys() == got.keys() and len(want) == 16
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_loss_draws_randomness_from_the_generator_only(trained):
    _, trainer, _ = trained
    plugin = _wuerstchen()
    prior = trainer.components["prior"].train()  # as during training: the published prior has dropout 0.1
    batch = trainer.make_batch(0, [0, 1])

    def loss(seed, global_seed):
        torch.manual_seed(global_seed)
        with torch.no_grad():
            return plugin.compute_loss(trainer.components, batch, trainer.config, torch.Generator().manual_seed(seed))

    assert torch.equal(loss(1, 0), loss(1, 99))
    assert not torch.equal(loss(1, 0), loss(2, 0))
    t = plugin.sample_timesteps(10_000, torch.Generator().manual_seed(0), "cpu")
    assert 0.0 <= t.min() and t.max() < 1.0 and 0.45 < t.mean() < 0.55
    prior.eval()


# ------------------------------------------------------------------------- prior -> decoder images


def test_prior_decoder_chain_generates_images_with_the_lora(trained, tiny_model):
    from lorakit.inference import generate

    import numpy as np

    _, _, result = trained

    def image(loras):
        prompts = ["a red circle", "a blue square"]  # several prompts: one image each
        images = generate(ARCH, str(tiny_model), prompts, loras=loras, steps=2, resolution=RES, seed=0)
        assert len(images) == 2
        return images[0]

    base = image([])
    with_lora = image([(result.weights, 1.0)])
    switched_off = image([(result.weights, 0.0)])
    # prior: ceil(64 / 42.67) = 2 -> decoder latents int(2 * 10.67) = 21 -> tiny VQGAN x4 = 84 px
    assert base.size == with_lora.size == (84, 84)
    a, b, c = (np.asarray(i, dtype=np.int16) for i in (base, with_lora, switched_off))
    assert np.abs(a - b).max() > 0, "the LoRA changes the generated image"
    assert np.array_equal(a, c), "scale 0 gives the base model's image"

    # one generator per prompt (per-image seeds): an image does not depend on the others
    from lorakit.plugins import get_plugin_manager

    pm = get_plugin_manager(ARCH)
    pipe = pm.hook.load_pipeline(model_path=tiny_model, device="cpu", dtype=torch.float32)

    def images(prompts, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pm.hook.generate_images(
            pipeline=pipe, prompts=prompts, generator=gens, num_inference_steps=2, resolution=RES, guidance_scale=None
        )

    pair = images(["a red circle", "a blue square"], [0, 1])
    alone = images(["a blue square"], [1])
    assert np.array_equal(np.asarray(pair[1]), np.asarray(alone[0]))


def test_missing_decoder_is_one_clear_error(tiny_model, tmp_path):
    model = tmp_path / "prior-only"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("decoder"))
    with pytest.raises(LorakitError, match="decoder"):
        _wuerstchen().find_decoder(model)


# ------------------------------------------------------------------------- the image encoder

# Names and shapes of torchvision's efficientnet_v2_s().features (prefixed "backbone.") and the
# stage-B mapper, read off torchvision/models/efficientnet.py and diffusers' research example.
KNOWN_ENCODER_TENSORS = {
    "backbone.0.0.weight": (24, 3, 3, 3),  # stem conv, stride 2
    "backbone.0.1.running_var": (24,),  # its BatchNorm
    "backbone.1.0.block.0.0.weight": (24, 24, 3, 3),  # FusedMBConv, expand 1: one 3x3 conv
    "backbone.2.0.block.0.0.weight": (96, 24, 3, 3),  # FusedMBConv, expand 4: 3x3 expand ...
    "backbone.2.0.block.1.0.weight": (48, 96, 1, 1),  # ... and 1x1 project
    "backbone.4.0.block.0.0.weight": (256, 64, 1, 1),  # MBConv: 1x1 expand
    "backbone.4.0.block.1.0.weight": (256, 1, 3, 3),  # depthwise 3x3
    "backbone.4.0.block.2.fc1.weight": (16, 256, 1, 1),  # squeeze-excitation (input // 4)
    "backbone.4.0.block.2.fc2.bias": (256,),
    "backbone.4.0.block.3.0.weight": (128, 256, 1, 1),  # 1x1 project
    "backbone.5.8.block.2.fc1.weight": (40, 960, 1, 1),  # last block of the 9-layer stage
    "backbone.6.14.block.3.1.weight": (256,),  # last block of the 15-layer stage
    "backbone.7.0.weight": (1280, 256, 1, 1),  # final 1x1 conv to 1280
    "backbone.7.1.num_batches_tracked": (),
    "mapper.0.weight": (16, 1280, 1, 1),  # 1x1 conv to the 16 embedding channels, no bias
    "mapper.1.running_mean": (16,),  # BatchNorm2d(16)
}
#: torchvision's EfficientNet_V2_S_Weights meta: 21,458,488 parameters, minus the 1280 -> 1000 classifier.
V2_S_FEATURE_PARAMS = 21_458_488 - (1280 * 1000 + 1000)


def test_encoder_matches_torchvision_efficientnet_v2_s_naming(full_encoder_dir):
    state = load_file(str(full_encoder_dir / "diffusion_pytorch_model.safetensors"))
    for name, shape in KNOWN_ENCODER_TENSORS.items():
        assert name in state, name
        assert tuple(state[name].shape) == shape, name
    assert not any("mapper.0.bias" == k for k in state)
    encoder = _wuerstchen().load_image_encoder(full_encoder_dir)
    params = dict(encoder.named_parameters())
    assert sum(p.numel() for n, p in params.items() if n.startswith("backbone.")) == V2_S_FEATURE_PARAMS
    assert sum(p.numel() for n, p in params.items() if n.startswith("mapper.")) == 1280 * 16 + 2 * 16
    assert encoder.backbone[0][1].eps == 1e-3 and encoder.mapper[1].eps == 1e-5
    assert sorted({k.split(".")[1] for k in state if k.startswith("backbone.")}, key=int) == [str(i) for i in range(8)]


def test_image_embeddings_with_the_full_size_encoder(full_encoder_dir, tiny_model, lorakit_image_folder, tmp_path):
    """--vae points the tiny prior at the real-size encoder; training encodes through it and steps."""
    plugin = _wuerstchen()
    config = tiny_config(
        ARCH, tiny_model, lorakit_image_folder, tmp_path / "full", resolution=RES, max_steps=1,
        vae=str(full_encoder_dir),
    )
    trainer = Trainer(config).setup()
    encoder = trainer.components["image_encoder"]
    assert sum(p.numel() for p in encoder.backbone.parameters()) == V2_S_FEATURE_PARAMS
    assert len(trainer.image_cache) == len(trainer.dataset)
    embeds = torch.stack([v["image_embeds"] for v in trainer.image_cache.values()])
    assert embeds.shape == (len(trainer.dataset), 16, RES // 32, RES // 32) and torch.isfinite(embeds).all()

    # the scaling of the original stage-C training: ImageNet-normalised [0, 1] pixels, then (x + 1) / 42
    sample = trainer.dataset.samples()[0]
    from lorakit.data import Augment, prepare_image

    pixels = prepare_image(sample.open(), RES, Augment(flip=False))[0][None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        manual = (encoder(((pixels + 1) / 2 - mean) / std) + 1) / 42
    assert torch.allclose(trainer.image_cache[(sample.key, False)]["image_embeds"], manual[0], atol=1e-6)
    assert len(trainer.run().losses) == 1


class _Trap:
    """Unpickling this object would create ``marker``: proof that a file was never unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_encoder_weights_are_never_unpickled(tmp_path):
    plugin = _wuerstchen()
    torch.manual_seed(1)
    source = plugin.EfficientNetEncoder(plugin.TINY_ENCODER)
    tensors_only = {k: v.clone() for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}

    # the published layout (a dict holding effnet_state_dict) converts through torch.load(weights_only=True)
    good = tmp_path / "model_v2_stage_b.pt"
    torch.save({"effnet_state_dict": tensors_only, "step": 3}, good)
    out = plugin.convert_encoder_checkpoint(good, tmp_path / "encoder", config=plugin.TINY_ENCODER)
    loaded = plugin.load_image_encoder(out)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tensors_only.items())

    # a checkpoint carrying code is refused before anything in it runs
    marker = tmp_path / "was-unpickled"
    evil = tmp_path / "evil.pt"
    torch.save({"effnet_state_dict": tensors_only, "trap": _Trap(marker)}, evil)
    with pytest.raises(LorakitError, match="never unpickles"):
        plugin.convert_encoder_checkpoint(evil, tmp_path / "never", config=plugin.TINY_ENCODER)
    assert plugin.main(["convert-encoder", str(evil), str(tmp_path / "never")]) == 2
    assert not marker.exists()

    # an encoder folder with only pickled weights is not opened at all
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(plugin.TINY_ENCODER))
    shutil.copy(evil, folder / "pytorch_model.bin")
    with pytest.raises(LorakitError, match="convert-encoder"):
        plugin.load_image_encoder(folder)
    assert not marker.exists()


def test_user_mistakes_are_one_line_errors(tiny_model, lorakit_image_folder, tmp_path):
    no_encoder = tmp_path / "no-encoder"
    shutil.copytree(tiny_model, no_encoder, ignore=shutil.ignore_patterns("image_encoder"))
    config = tiny_config(ARCH, no_encoder, lorakit_image_folder, tmp_path / "o1", resolution=RES)
    with pytest.raises(LorakitError, match=r"image_encoder.*--vae") as info:
        Trainer(config).setup()
    assert "\n" not in str(info.value)

    config = tiny_config(ARCH, tiny_model, lorakit_image_folder, tmp_path / "o2", prediction_type="v_prediction")
    with pytest.raises(LorakitError, match="prediction-type"):
        Trainer(config).setup()

    config = tiny_config(ARCH, tiny_model, lorakit_image_folder, tmp_path / "o3", vae=str(tmp_path))
    with pytest.raises(LorakitError, match="--vae"):
        Trainer(config).setup()
