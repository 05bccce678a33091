"""The FLUX.1 arch plugin, end to end on a tiny FLUX.1-dev (no network, CPU only, one thread).

Runs are shared between tests through the module-scoped ``runs`` memo. T5 pads to
``t5_max_length``; most runs here use 32 tokens (the default, 512, is covered by the
contract suite in test_arch_contract.py).
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorakit.lora import count_lora_layers
from lorakit.testing import assert_same_lora, example_data, tiny_config
from lorakit.training import Trainer

T5_LENGTH = 32
PROMPT = "a red circle on a white background"
#: FLUX.1-dev's public transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def flux_config(model, data, output, **overrides):
    return tiny_config("flux", model, data, output, **{"t5_max_length": T5_LENGTH, **overrides})


@pytest.fixture(scope="module")
def runs():
    return {}


@pytest.fixture
def flux_model(lorakit_tiny_model):
    return lorakit_tiny_model("flux")


@pytest.fixture
def trained(runs, flux_model, tmp_path_factory):
    """``trained(te)`` -> (trainer, result): 3 steps, rank 4, alpha 8, CLIP LoRA when ``te``."""

    def get(te: bool):
        if te not in runs:
            out = tmp_path_factory.mktemp(f"flux-te{int(te)}")
            config = flux_config(flux_model, example_data(), out, rank=4, alpha=8, max_steps=3, train_text_encoder=te)
            trainer = Trainer(config).setup()
            runs[te] = (trainer, trainer.run())
        return runs[te]

    return get


def _inputs(generator_seed=0):
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(generator_seed)
    latents = torch.randn(1, 16, 4, 4, generator=g)
    return dict(
        hidden_states=FluxPipeline._pack_latents(latents, 1, 16, 4, 4),
        timestep=torch.tensor([0.6]),
        guidance=torch.tensor([1.0]),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32),
        txt_ids=torch.zeros(T5_LENGTH, 3),
    )


def _out(transformer, pooled, embeds, inputs):
    with torch.no_grad():
        return transformer(pooled_projections=pooled, encoder_hidden_states=embeds, return_dict=False, **inputs)[0]


def test_tiny_model_has_flux_dev_shape(flux_model):
    index = json.loads((flux_model / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["text_encoder"][1] == "CLIPTextModel" and index["text_encoder_2"][1] == "T5EncoderModel"
    transformer = json.loads((flux_model / "transformer" / "config.json").read_text())
    vae = json.loads((flux_model / "vae" / "config.json").read_text())
    scheduler = json.loads((flux_model / "scheduler" / "scheduler_config.json").read_text())
    assert transformer["guidance_embeds"] and transformer["in_channels"] == 4 * vae["latent_channels"] == 64
    assert vae["shift_factor"] == 0.1159 and vae["scaling_factor"] == 0.3611
    assert scheduler["use_dynamic_shifting"] and scheduler["max_shift"] == 1.15


@pytest.mark.parametrize("te", [False, True], ids=["transformer", "transformer+clip"])
def test_fresh_pipeline_reproduces_the_trained_transformer(trained, flux_model, te):
    from diffusers import FluxPipeline

    from lorakit_plugins.flux import Flux

    trainer, result = trained(te)
    pipe = FluxPipeline.from_pretrained(flux_model)
    pipe.load_lora_weights(str(result.output_dir), weight_name=result.weights.name)
    base = FluxPipeline.from_pretrained(flux_model)
    names = ["transformer"] + (["text_encoder"] if te else [])
    for name in names:
        assert count_lora_layers(trainer.components[name]) == count_lora_layers(getattr(pipe, name)) > 0
        assert_same_lora(trainer.components[name], getattr(pipe, name))
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=T5_LENGTH)
        base_embeds, base_pooled, _ = base.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=T5_LENGTH)
        for name in names:
            trainer.components[name].eval()
        # a frozen CLIP was released once cached; a trained one is the trainer's own
        ours = Flux().encode_text(trainer.components, [PROMPT], "text_encoder")["pooled_prompt_embeds"] if te else pooled
    inputs = _inputs()
    trained_out = _out(trainer.components["transformer"], ours, embeds, inputs)
    loaded_out = _out(pipe.transformer, pooled, embeds, inputs)
    base_out = _out(base.transformer, base_pooled, base_embeds, inputs)
    for name in names:
        trainer.components[name].train()
    diff = float((trained_out - loaded_out).abs().max())
    effect = float((loaded_out - base_out).abs().max())
    layers = {n: count_lora_layers(getattr(pipe, n)) for n in names}
    print(f"flux {'+'.join(names)}: layers {layers}, max |trained - reloaded| {diff:.2e}, LoRA effect {effect:.3e}")
    assert diff < 1e-5
    assert effect > 1e-4, "the LoRA changes nothing: the comparison above could not fail"


def test_t5_runs_once_per_distinct_caption_over_a_whole_run(flux_model, tmp_path, monkeypatch):
    from transformers import CLIPTextModel, T5EncoderModel

    calls = {"t5": 0, "t5_rows": 0, "clip": 0}
    t5_forward, clip_forward = T5EncoderModel.forward, CLIPTextModel.forward

    def counting_t5(self, input_ids=None, *args, **kwargs):
        calls["t5"] += 1
        calls["t5_rows"] += input_ids.shape[0]
        return t5_forward(self, input_ids, *args, **kwargs)

    def counting_clip(self, *args, **kwargs):
        calls["clip"] += 1
        return clip_forward(self, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "forward", counting_t5)
    monkeypatch.setattr(CLIPTextModel, "forward", counting_clip)
    captions = {json.loads(line)["text"] for line in (example_data() / "metadata.jsonl").read_text().splitlines()}
    steps, batch = 18, 2  # 36 samples of 12 images: 3 epochs
    config = flux_config(flux_model, example_data(), tmp_path / "o", train_text_encoder=True, max_steps=steps,
                         batch_size=batch, caption_dropout=0.2)
    result = Trainer(config).setup().run()
    print(f"flux: {steps} steps x {batch}, {len(captions)} captions + empty: T5 {calls['t5']} calls for "
          f"{calls['t5_rows']} captions, CLIP (trained) {calls['clip']} calls")
    assert result.global_step == steps
    assert calls["t5_rows"] == len(captions) + 1  # each distinct caption once, the dropout "" included
    assert calls["t5"] == math.ceil((len(captions) + 1) / 8)
    assert calls["clip"] == steps  # the trained encoder runs in every step


@pytest.fixture
def mixed_data(tmp_path):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    rows = []
    for i, (name, size) in enumerate([("red.png", (64, 32)), ("blue_circle.png", (32, 64)), ("green.png", (48, 48)),
                                      ("yellow_circle.png", (64, 32))]):
        Image.open(example_data() / name).convert("RGB").resize(size).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"shape {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_buckets_of_16_px_multiples_train(flux_model, mixed_data, tmp_path):
    trainer = Trainer(flux_config(flux_model, mixed_data, tmp_path / "o", resolution=48, buckets=True,
                                  max_steps=3)).setup()
    sizes = {trainer.size_of(s) for s in trainer.dataset.samples()}
    assert len(sizes) > 1 and all(w % 16 == 0 and h % 16 == 0 for w, h in sizes), sizes
    assert all(math.isfinite(loss) for loss in trainer.run().losses)


def test_resume_with_clip_lora_equals_a_straight_run(flux_model, tmp_path):
    # (the contract suite, tests/test_arch_contract.py, checks resume too; this one with CLIP LoRA
    # and caption dropout, so the trained encoder's RNG use and the cached "" are covered)
    settings = dict(train_text_encoder=True, caption_dropout=0.3, max_steps=4, checkpoint_every=2, batch_size=2)
    straight = Trainer(flux_config(flux_model, example_data(), tmp_path / "a", **settings)).setup().run()
    Trainer(flux_config(flux_model, example_data(), tmp_path / "b", **{**settings, "max_steps": 2})).setup().run()
    resumed = Trainer(flux_config(flux_model, example_data(), tmp_path / "b", **settings, resume="latest")).setup().run()
    a, b = load_file(str(straight.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_update(flux_model, tmp_path):
    a = Trainer(flux_config(flux_model, example_data(), tmp_path / "a", max_steps=2)).setup().run()
    b = Trainer(flux_config(flux_model, example_data(), tmp_path / "b", max_steps=2,
                            gradient_checkpointing=True)).setup().run()
    wa, wb = load_file(str(a.weights)), load_file(str(b.weights))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_schnell_without_guidance_embedding_trains(flux_model, tmp_path, caplog):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    schnell = tmp_path / "schnell"
    shutil.copytree(flux_model, schnell)
    config = FluxTransformer2DModel.load_config(flux_model / "transformer")
    FluxTransformer2DModel.from_config({**config, "guidance_embeds": False}).save_pretrained(schnell / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False).save_pretrained(schnell / "scheduler")
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        result = Trainer(flux_config(schnell, example_data(), tmp_path / "o", max_steps=2,
                                     training_guidance=3.5)).setup().run()
    assert all(math.isfinite(loss) for loss in result.losses)
    assert any("no guidance embedding" in r.getMessage() for r in caplog.records)


def test_generate_with_the_lora_writes_an_image(trained, flux_model, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from lorakit.cli import app

    _, result = trained(False)
    out = tmp_path / "image.png"
    r = CliRunner().invoke(app, ["generate", "--arch", "flux", "--model", str(flux_model), "--prompt", PROMPT,
                                 "--lora", str(result.output_dir), "--steps", "2", "--resolution", "32",
                                 "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (32, 32)


def test_dreambooth_trains_with_a_generated_class_image(flux_model, tmp_path):
    instance, classes = tmp_path / "instance", tmp_path / "class"
    for folder, names in ((instance, ("red.png", "red_circle.png")), (classes, ("blue.png", "green.png"))):
        folder.mkdir()
        for name in names:
            shutil.copy(example_data() / name, folder / name)
    config = flux_config(
        flux_model, None, tmp_path / "out", modes=["dreambooth"], instance_data=str(instance),
        instance_prompt="a photo of sks shape", class_prompt="a photo of a shape", class_data=str(classes),
        num_class_images=3, class_generation_steps=2, max_steps=2,
    )
    result = Trainer(config).setup().run()
    assert len(list(classes.glob("*.png"))) == 3  # two given, one generated through build_pipeline
    assert result.global_step == 2 and result.weights.is_file()


def test_convert_to_kohya_says_not_supported_in_one_line(trained, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    _, result = trained(False)
    r = CliRunner().invoke(app, ["convert", str(result.weights), str(tmp_path / "k.safetensors"),
                                 "--to", "kohya", "--arch", "flux"])
    print(repr(r.output))
    assert r.exit_code != 0
    assert len(r.output.strip().splitlines()) == 1 and "flux" in r.output and "kohya" in r.output


# --- ComfyUI: its key-mapping rules for a diffusers-format FLUX LoRA ---------------------------
# Restated from ComfyUI's comfy/lora.py (model_lora_keys_unet / model_lora_keys_clip) and
# comfy/utils.py (flux_to_diffusers): for a Flux model, "transformer.<diffusers module>" maps to
# the BFL weight (q/k/v into slices of the fused qkv / linear1), "text_encoder.text_model.encoder.
# layers.N.<module>" to CLIP-L; load_lora then takes "<key>.lora_B.weight" / "<key>.lora_A.weight"
# and warns "lora key not loaded" for any other key. No "<key>.alpha": the scale is 1 (= alpha/rank
# for lorakit's default alpha).

CLIP_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def comfy_flux_key_map(depth: int, single: int, hidden: int, clip_layers: int) -> dict:
    out = {}
    for i in range(depth):
        d, b = f"transformer.transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        for j, n in enumerate("qkv"):
            out[f"{d}.attn.to_{n}"] = (f"{b}.img_attn.qkv.weight", (0, j * hidden, hidden))
            out[f"{d}.attn.add_{n}_proj"] = (f"{b}.txt_attn.qkv.weight", (0, j * hidden, hidden))
        for src, dst in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
                         ("ff_context.net.2", "txt_mlp.2"), ("norm1.linear", "img_mod.lin"),
                         ("norm1_context.linear", "txt_mod.lin")):
            out[f"{d}.{src}"] = f"{b}.{dst}.weight"
    for i in range(single):
        s, b = f"transformer.single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        for j, n in enumerate("qkv"):
            out[f"{s}.attn.to_{n}"] = (f"{b}.linear1.weight", (0, j * hidden, hidden))
        out[f"{s}.proj_mlp"] = (f"{b}.linear1.weight", (0, 3 * hidden, 4 * hidden))
        out[f"{s}.proj_out"] = f"{b}.linear2.weight"
        out[f"{s}.norm.linear"] = f"{b}.modulation.lin.weight"
    for layer in range(clip_layers):
        for m in CLIP_MODULES:
            out[f"text_encoder.text_model.encoder.layers.{layer}.{m}"] = (
                f"clip_l.transformer.text_model.encoder.layers.{layer}.{m}.weight")
    return out


def test_comfyui_maps_every_key_of_the_lora(trained, flux_model):
    trainer, result = trained(True)
    t = trainer.components["transformer"].config
    hidden = t.num_attention_heads * t.attention_head_dim
    clip_layers = trainer.components["text_encoder"].config.num_hidden_layers
    key_map = comfy_flux_key_map(t.num_layers, t.num_single_layers, hidden, clip_layers)
    # the mapping written out for block 0 of the tiny model (hidden 16)
    assert key_map["transformer.transformer_blocks.0.attn.to_k"] == (
        "diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, 16, 16))
    assert key_map["transformer.transformer_blocks.0.attn.to_out.0"] == "diffusion_model.double_blocks.0.img_attn.proj.weight"
    assert key_map["transformer.single_transformer_blocks.0.attn.to_v"] == (
        "diffusion_model.single_blocks.0.linear1.weight", (0, 32, 16))
    assert key_map["text_encoder.text_model.encoder.layers.1.self_attn.q_proj"] == (
        "clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight")
    state = load_file(str(result.weights))
    loaded, targets = set(), {}
    for key, target in key_map.items():
        up, down = f"{key}.lora_B.weight", f"{key}.lora_A.weight"
        if up in state:
            assert down in state
            loaded |= {up, down}
            targets[key] = target
            if isinstance(target, tuple):  # a slice of a fused weight: the LoRA's output must fit it
                assert state[up].shape[0] == target[1][2]
    not_loaded = sorted(set(state) - loaded)
    print(f"flux -> ComfyUI: {len(targets)} layers mapped, {len(not_loaded)} keys not loaded")
    assert not not_loaded, not_loaded[:5]
    assert len(targets) == sum(count_lora_layers(trainer.components[n]) for n in ("transformer", "text_encoder"))


# --- the real FLUX.1-dev, on the meta device ---------------------------------------------------

GB = 1e9


def flux_dev_estimate(rank: int = 16, resolution: int = 1024, t5_tokens: int = 512, batch: int = 1) -> dict:
    """LoRA parameter count of the default targets and a GPU-memory estimate for training FLUX.1-dev,
    from the real configs built on the meta device (no weights)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lorakit_plugins.flux import ATTENTION

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV)
        base = sum(p.numel() for p in transformer.parameters())
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=ATTENTION), transformer)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, projection_dim=768))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    lora = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)
    layers = count_lora_layers(transformer)
    count = {n: sum(p.numel() for p in m.parameters()) for n, m in (("t5", t5), ("clip", clip), ("vae", vae))}
    d = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    tokens = (resolution // 16) ** 2 + t5_tokens
    blocks = FLUX_DEV["num_layers"] + FLUX_DEV["num_single_layers"]
    weights = 2 * (base + count["clip"])  # bf16 transformer + CLIP-L; T5 and VAE leave once cached
    lora_state = 16 * lora  # fp32 weight + grad + AdamW exp_avg + exp_avg_sq
    checkpoints = 2 * batch * tokens * d * blocks  # bf16 input of every block, kept for the backward
    block = 2 * batch * tokens * d * 32  # one block recomputed in the backward: ~32 d-wide bf16 tensors
    training = weights + lora_state + checkpoints + block
    caching = 2 * (base + count["clip"] + count["t5"]) + 4 * count["vae"]  # everything on the device at load
    return dict(lora_params=lora, lora_layers=layers, transformer_params=base, tokens=tokens, **count,
                weights_gb=weights / GB, lora_state_gb=lora_state / GB, checkpoints_gb=checkpoints / GB,
                block_gb=block / GB, training_gb=training / GB, caching_gb=caching / GB)


def test_flux_dev_on_the_meta_device_lora_count_and_memory_estimate():
    e = flux_dev_estimate()
    d = 24 * 128
    # 19 double blocks x (to_q, to_k, to_v, to_out.0) + 38 single blocks x (to_q, to_k, to_v), all d -> d
    assert e["lora_layers"] == 19 * 4 + 38 * 3 == 190
    assert e["lora_params"] == 190 * 16 * (d + d) == 18_677_760
    print("FLUX.1-dev rank 16 default targets:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in e.items()})
    assert 11.8e9 < e["transformer_params"] < 12.0e9
    assert 20 < e["training_gb"] < 40
