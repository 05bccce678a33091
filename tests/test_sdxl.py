"""The SDXL arch plugin, end to end on a tiny SDXL (no network, CPU only).

Training runs are shared between tests through the module-scoped ``runs`` memo, so the
file trains three short runs in all. Every config uses one torch thread: the tiny
model's ops gain nothing from a second one, and on a busy 2-core machine OpenMP's
spin-waiting makes two threads up to ten times slower.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit import lora
from lorakit.errors import LorakitError
from lorakit.testing import assert_same_lora, example_data, tiny_config
from lorakit.training import WEIGHT_NAME, Trainer

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet",) + TEXT_ENCODERS
FULL = dict(
    train_text_encoder=True,
    rank=4,
    alpha=8,
    learning_rate=1e-3,
    text_encoder_lr=5e-4,
    max_steps=4,
    checkpoint_every=2,
    num_threads=1,
)


def sdxl_config(model, data, output, **overrides):
    return tiny_config("sdxl", model, data, output, **{"num_threads": 1, **overrides})


@pytest.fixture(scope="module")
def runs():
    """Training runs shared by this module's tests, built on first use."""
    return {}


@pytest.fixture
def sdxl_model(lorakit_tiny_model):
    return lorakit_tiny_model("sdxl")


@pytest.fixture
def full_run(runs, sdxl_model, tmp_path_factory):
    """4 steps with LoRA on the UNet and both text encoders, rank 4, alpha 8, checkpoints at 2 and 4."""
    if "full" not in runs:
        out = tmp_path_factory.mktemp("sdxl-full")
        trainer = Trainer(sdxl_config(sdxl_model, example_data(), out, **FULL)).setup()
        started = time.perf_counter()
        result = trainer.run()
        runs["full"] = (trainer, result, time.perf_counter() - started)
    return runs["full"]


# --- training and reloading in diffusers ---------------------------------------------------


def _lora_scales(module):
    return {s for _, m in module.named_modules() if hasattr(m, "scaling") for s in m.scaling.values()}


def test_tiny_model_has_sdxl_shape(sdxl_model):
    index = json.loads((sdxl_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"][1] == "CLIPTextModel"
    assert index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    assert index["tokenizer"][1] == index["tokenizer_2"][1] == "CLIPTokenizer"
    unet = json.loads((sdxl_model / "unet" / "config.json").read_text())
    vae = json.loads((sdxl_model / "vae" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == 64  # 64 px -> 8x8 latents


def test_trains_unet_and_both_text_encoders_with_their_own_lr(full_run):
    trainer, result, _ = full_run
    assert result.global_step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert set(trainer.lora_configs) == set(COMPONENTS)
    assert trainer.trained_text_encoders == list(TEXT_ENCODERS)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"unet": 1e-3, "text_encoder": 5e-4, "text_encoder_2": 5e-4}
    # PEFT initialises lora_B to zero: non-zero B means the text encoders really trained.
    # SDXL reads the first encoder's penultimate layer, so its last layer gets no gradient
    # (as in diffusers' own SDXL script); the second encoder's pooled output uses all layers.
    last = trainer.components["text_encoder"].config.num_hidden_layers - 1
    for name in TEXT_ENCODERS:
        b = {n: p for n, p in trainer.components[name].named_parameters() if "lora_B" in n}
        live = {n: p for n, p in b.items() if name == "text_encoder_2" or f"layers.{last}." not in n}
        assert live and all(p.abs().max() > 0 for p in live.values()), name


def test_diffusers_load_lora_weights_reproduces_trained_model(full_run, sdxl_model):
    from diffusers import StableDiffusionXLPipeline

    trainer, result, _ = full_run
    comps = trainer.components
    for name in COMPONENTS:
        comps[name].eval()

    # One file, PEFT keys unconverted, all three components, with adapter metadata.
    with safe_open(str(result.weights), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == set(COMPONENTS)
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert "lora_adapter_metadata" in meta

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_model)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 77, comps["unet"].config.cross_attention_dim, generator=g)
    added = {
        "text_embeds": torch.randn(2, comps["text_encoder_2"].config.projection_dim, generator=g),
        "time_ids": torch.tensor([[64.0, 96, 0, 16, 64, 64], [120, 48, 48, 0, 64, 64]]),
    }
    t = torch.tensor([10, 700])
    ids = comps["tokenizer"](["a red circle"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_2 = comps["tokenizer_2"](["a red circle"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outputs(unet, te, te2):
        with torch.no_grad():
            o1, o2 = te(ids, output_hidden_states=True), te2(ids_2, output_hidden_states=True)
            return {
                "unet": unet(latents, t, hidden, added_cond_kwargs=added).sample,
                "text_encoder": o1.hidden_states[-2],
                "text_encoder.pooled": o1.pooler_output,
                "text_encoder_2": o2.hidden_states[-2],
                "text_encoder_2.text_embeds": o2.text_embeds,
            }

    base = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    pipe.load_lora_weights(str(result.output_dir), weight_name=WEIGHT_NAME)
    loaded = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    trained = outputs(comps["unet"], comps["text_encoder"], comps["text_encoder_2"])

    diffs = {k: (trained[k] - loaded[k]).abs().max().item() for k in trained}
    effect = {k: (trained[k] - base[k]).abs().max().item() for k in trained}
    print("\nmax |trained - loaded|:", {k: f"{v:.1e}" for k, v in diffs.items()})
    print("max |trained - base|:  ", {k: f"{v:.1e}" for k, v in effect.items()})
    assert all(v < 1e-5 for v in diffs.values()), diffs
    assert all(v > 1e-4 for v in effect.values()), effect  # the LoRA changed every output

    counts = {}
    for name in COMPONENTS:
        ours, theirs = comps[name], getattr(pipe, name)
        counts[name] = (lora.count_lora_layers(ours), lora.count_lora_layers(theirs))
        assert counts[name][0] == counts[name][1] > 0, (name, counts[name])
        assert_same_lora(ours, theirs)
        assert _lora_scales(theirs) == {2.0}  # alpha 8 / rank 4 survived the reload
    print("LoRA layers (trained, loaded):", counts)


def test_lorakit_generate_loads_the_lora(full_run, sdxl_model):
    from lorakit.inference import load_pipeline_with_loras, parse_lora_spec

    trainer, result, _ = full_run
    pm, pipe = load_pipeline_with_loras("sdxl", str(sdxl_model), [parse_lora_spec(f"{result.output_dir}:1.0")], "cpu")
    for name in COMPONENTS:
        assert_same_lora(trainer.components[name], getattr(pipe, name))
    images = pm.hook.generate_images(
        pipeline=pipe,
        prompts=["a red circle"],
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=2,
        resolution=32,
        guidance_scale=None,
    )
    assert len(images) == 1 and images[0].size == (32, 32)


def test_resume_with_text_encoder_lora_matches_uninterrupted_run(full_run, sdxl_model, tmp_path):
    _, uninterrupted, _ = full_run
    out = tmp_path / "resumed"
    first = Trainer(sdxl_config(sdxl_model, example_data(), out, **{**FULL, "max_steps": 2})).setup().run()
    assert first.global_step == 2
    saved = load_file(str(out / "checkpoint-2" / "lora_params.safetensors"))
    assert {k.split("/")[0] for k in saved} == set(COMPONENTS)

    second = Trainer(sdxl_config(sdxl_model, example_data(), out, **{**FULL, "resume": "latest"})).setup()
    assert second.global_step == 2
    result = second.run()

    expected, got = load_file(str(uninterrupted.weights)), load_file(str(result.weights))
    assert sorted(got) == sorted(expected)
    assert {k.split(".")[0] for k in got} == set(COMPONENTS)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    at_two = load_file(str(out / "checkpoint-2" / WEIGHT_NAME))
    assert any(not torch.equal(at_two[k], got[k]) for k in got if k.startswith("text_encoder_2."))


def test_train_step_is_fast(full_run):
    _, result, seconds = full_run
    per_step = seconds / result.global_step  # includes two checkpoints and the final save
    print(f"\n{per_step:.3f} s per step (4 steps, text-encoder LoRA, checkpoints included)")
    assert per_step < 1.0


# --- SDXL's conditioning ----------------------------------------------------------------------


def _write_mixed_sizes(folder):
    from PIL import Image

    folder.mkdir()
    sizes = {"wide.png": (96, 64), "tall.png": (48, 120), "square.png": (80, 80)}  # (width, height)
    lines = []
    for i, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * i, 200, 255 - 60 * i)).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": f"a {name[:-4]} image"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _time_ids_seen_by_unet(trainer, batch):
    seen = {}

    def capture(module, args, kwargs):
        seen["time_ids"] = kwargs["added_cond_kwargs"]["time_ids"].detach().clone()
        seen["text_embeds"] = kwargs["added_cond_kwargs"]["text_embeds"].detach().clone()

    handle = trainer.components["unet"].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            trainer.loss_on(batch, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return seen


def test_add_time_ids_follow_each_images_size_and_crop(sdxl_model, tmp_path):
    from lorakit_plugins import sdxl

    data = tmp_path / "mixed"
    _write_mixed_sizes(data)
    # No --resolution: the tiny model's native 64 px. Centre crops are cached.
    trainer = Trainer(sdxl_config(sdxl_model, data, tmp_path / "out", resolution=None, batch_size=3)).setup()
    assert trainer.resolution == 64
    batch = trainer.make_batch(0, [0, 1, 2])
    names = [s.key.rsplit("/", 1)[-1] for s in (trainer.dataset.examples[i][0] for i in range(3))]
    # (orig_h, orig_w, crop_top, crop_left, target_h, target_w), worked out by hand:
    # wide 96x64 -> 96x64, crop left 16; tall 48x120 -> 64x160, crop top 48; square -> 64x64.
    expected = {
        "wide.png": [64, 96, 0, 16, 64, 64],
        "tall.png": [120, 48, 48, 0, 64, 64],
        "square.png": [80, 80, 0, 0, 64, 64],
    }
    want = torch.tensor([expected[n] for n in names], dtype=torch.float32)
    assert torch.equal(sdxl.add_time_ids(batch), want)
    seen = _time_ids_seen_by_unet(trainer, batch)
    assert torch.equal(seen["time_ids"], want)
    assert len({tuple(r) for r in seen["time_ids"].tolist()}) == 3  # one row per image, all different
    # The pooled embedding of the second encoder, one per caption, reaches the UNet too.
    assert seen["text_embeds"].shape == (3, trainer.components["text_encoder_2"].config.projection_dim)


def test_add_time_ids_follow_random_crops_and_flips(sdxl_model, tmp_path):
    from lorakit.data import prepare_image

    data = tmp_path / "mixed"
    _write_mixed_sizes(data)
    config = sdxl_config(sdxl_model, data, tmp_path / "out", resolution=32, batch_size=3, center_crop=False, random_flip=True)
    trainer = Trainer(config).setup()
    rows = set()
    for epoch in range(3):
        batch = trainer.make_batch(epoch, [0, 1, 2])
        seen = _time_ids_seen_by_unet(trainer, batch)["time_ids"]
        for j in range(3):
            sample = trainer.dataset.examples[j][0]
            _, size, crop = prepare_image(sample.open(), 32, trainer._augment(epoch, sample))
            assert seen[j].tolist() == [*size, *crop, 32, 32]
            rows.add(tuple(seen[j].tolist()))
    assert len(rows) > 3  # crops moved between epochs


# --- errors a user can cause -----------------------------------------------------------------


def test_train_text_encoder_fails_early_when_peft_is_too_old(sdxl_model, tmp_path, monkeypatch):
    import transformers.integrations.peft as tf_peft

    monkeypatch.setattr(tf_peft, "MIN_PEFT_VERSION", "999.0.0")
    config = sdxl_config(sdxl_model, example_data(), tmp_path / "out", train_text_encoder=True)
    with pytest.raises(LorakitError, match=r"text-encoder LoRA needs peft >= 999\.0\.0.*--train-text-encoder"):
        Trainer(config).setup()


def test_sd15_run_on_sdxl_model_suggests_arch_sdxl(sdxl_model, tmp_path):
    config = tiny_config("sd15", sdxl_model, example_data(), tmp_path / "out")
    with pytest.raises(LorakitError, match=r"StableDiffusionXLPipeline.*use --arch sdxl"):
        Trainer(config).setup()


def test_sdxl_run_on_sd15_model_suggests_arch_sd15(lorakit_tiny_model, tmp_path):
    config = sdxl_config(lorakit_tiny_model("sd15"), example_data(), tmp_path / "out")
    with pytest.raises(LorakitError, match=r"use --arch sd15"):
        Trainer(config).setup()


def test_refiner_layout_is_refused_with_the_fix(sdxl_model, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(sdxl_model, refiner)
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    with pytest.raises(LorakitError, match=r"refiner.*stable-diffusion-xl-base-1.0"):
        Trainer(sdxl_config(refiner, example_data(), tmp_path / "out")).setup()


# --- VAE precision ---------------------------------------------------------------------------


@pytest.fixture
def bf16_accelerator():
    """Accelerate keeps one process-wide state whose mixed precision cannot change once set;
    clear it around a bf16 run (as accelerate's own test case does) so other tests keep "no"."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_vae_stays_fp32_under_bf16_by_default(sdxl_model, tmp_path, bf16_accelerator):
    trainer = Trainer(sdxl_config(sdxl_model, example_data(), tmp_path / "out", mixed_precision="bf16")).setup()
    comps = trainer.components
    assert comps["vae"].dtype == torch.float32
    assert comps["unet"].dtype == comps["text_encoder"].dtype == comps["text_encoder_2"].dtype == torch.bfloat16


def test_vae_flag_loads_that_vae_in_the_run_precision(sdxl_model, tmp_path, bf16_accelerator):
    from diffusers import AutoencoderKL

    # A stand-alone VAE folder (config.json at the top, like madebyollin/sdxl-vae-fp16-fix).
    own = AutoencoderKL.from_pretrained(sdxl_model, subfolder="vae")
    replacement = AutoencoderKL.from_config(own.config)
    torch.manual_seed(1)
    for p in replacement.parameters():
        torch.nn.init.normal_(p, std=0.02)
    replacement.save_pretrained(tmp_path / "vae")

    config = sdxl_config(sdxl_model, example_data(), tmp_path / "out", mixed_precision="bf16", vae=str(tmp_path / "vae"))
    trainer = Trainer(config).setup()
    vae = trainer.components["vae"]
    assert vae.dtype == torch.bfloat16
    w = "encoder.conv_in.weight"
    assert torch.equal(vae.state_dict()[w], replacement.state_dict()[w].to(torch.bfloat16))
    assert not torch.equal(vae.state_dict()[w].float(), own.state_dict()[w])
    loss, _ = trainer.loss_on(trainer.make_batch(0, [0]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_vae_flag_takes_the_vae_of_a_pipeline_folder(sdxl_model, tmp_path):
    from diffusers import AutoencoderKL

    trainer = Trainer(sdxl_config(sdxl_model, example_data(), tmp_path / "out", vae=str(sdxl_model))).setup()
    own = AutoencoderKL.from_pretrained(sdxl_model, subfolder="vae").state_dict()
    assert all(torch.equal(v, own[k]) for k, v in trainer.components["vae"].state_dict().items())


def test_vae_flag_errors_name_the_fix(sdxl_model, tmp_path):
    from diffusers import AutoencoderKL

    (tmp_path / "empty").mkdir()
    wide = AutoencoderKL.from_pretrained(sdxl_model, subfolder="vae").config
    AutoencoderKL.from_config({**wide, "latent_channels": 16}).save_pretrained(tmp_path / "vae16")
    with pytest.raises(LorakitError, match=r"--vae .*takes 4 input channels but this VAE gives 16; pass an SDXL VAE"):
        Trainer(sdxl_config(sdxl_model, example_data(), tmp_path / "o0", vae=str(tmp_path / "vae16"))).setup()
    with pytest.raises(LorakitError, match=r"--vae .* holds no config.json"):
        Trainer(sdxl_config(sdxl_model, example_data(), tmp_path / "o1", vae=str(tmp_path / "empty"))).setup()
    with pytest.raises(LorakitError, match=r"--vae .* is a UNet2DConditionModel model, not an AutoencoderKL"):
        Trainer(sdxl_config(sdxl_model, example_data(), tmp_path / "o2", vae=str(sdxl_model / "unet"))).setup()
