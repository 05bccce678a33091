"""The SD3 / SD3.5 arch plugin, end to end on a tiny SD3.5-shaped model (no network, CPU, one thread).

Runs are shared through the module-scoped ``runs`` memo: the file trains two short runs
for the reload checks (with and without CLIP LoRA) plus the resume, bucket, DreamBooth and
contract runs.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit import lora
from lorakit.testing import assert_same_lora, example_data, run_arch_contract, tiny_config
from lorakit.training import WEIGHT_NAME, Trainer

CLIPS = ("text_encoder", "text_encoder_2")
WITH_TE = ("transformer",) + CLIPS
# 8 steps of batch 4 over 12 captioned images: more than two epochs, checkpoints at 4 and 8.
FULL = dict(train_text_encoder=True, rank=4, alpha=8, learning_rate=1e-3, max_steps=8, batch_size=4, checkpoint_every=4)
PLAIN = dict(rank=4, alpha=8, learning_rate=1e-3, max_steps=4)


def sd3_config(model, data, output, **overrides):
    return tiny_config("sd3", model, data, output, **{"num_threads": 1, **overrides})


@pytest.fixture(scope="module")
def runs():
    return {}


@pytest.fixture
def sd3_model(lorakit_tiny_model):
    return lorakit_tiny_model("sd3")


def _train_counting_t5(config):
    """Train with every T5 forward counted: ``(trainer, result, captions per call)``."""
    from transformers import T5EncoderModel

    calls, forward = [], T5EncoderModel.forward

    def counted(self, input_ids=None, *args, **kwargs):
        calls.append(int(input_ids.shape[0]))
        return forward(self, input_ids, *args, **kwargs)

    T5EncoderModel.forward = counted
    try:
        trainer = Trainer(config).setup()
        result = trainer.run()
    finally:
        T5EncoderModel.forward = forward
    return trainer, result, calls


@pytest.fixture
def full_run(runs, sd3_model, tmp_path_factory):
    if "full" not in runs:
        runs["full"] = _train_counting_t5(sd3_config(sd3_model, example_data(), tmp_path_factory.mktemp("sd3-full"), **FULL))
    return runs["full"]


@pytest.fixture
def plain_run(runs, sd3_model, tmp_path_factory):
    if "plain" not in runs:
        runs["plain"] = _train_counting_t5(sd3_config(sd3_model, example_data(), tmp_path_factory.mktemp("sd3-plain"), **PLAIN))
    return runs["plain"]


# --- the tiny model and the conditioning ---------------------------------------------------------


def test_tiny_model_has_sd35_shape(sd3_model):
    index = json.loads((sd3_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder"][1] == index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    assert index["text_encoder_3"][1] == "T5EncoderModel"
    transformer = json.loads((sd3_model / "transformer" / "config.json").read_text())
    vae = json.loads((sd3_model / "vae" / "config.json").read_text())
    scheduler = json.loads((sd3_model / "scheduler" / "scheduler_config.json").read_text())
    assert transformer["dual_attention_layers"] == [0] and transformer["qk_norm"] == "rms_norm"
    assert vae["latent_channels"] == 16 and (vae["scaling_factor"], vae["shift_factor"]) == (1.5305, 0.0609)
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0


def test_prompt_embeds_equal_the_pipelines(sd3_model):
    """What the transformer trains on is what StableDiffusion3Pipeline.encode_prompt feeds it."""
    from diffusers import StableDiffusion3Pipeline

    from lorakit_plugins.sd3 import SD3, prompt_embeds

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model)
    components = {**pipe.components, "t5_max_length": 256}
    captions = ["a red circle on a white background", "a plain blue image"]
    with torch.no_grad():
        ours, ours_pooled = prompt_embeds(SD3().encode_prompt(components, captions))
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False)
    assert ours.shape == theirs.shape == (2, 77 + 256, 64)  # CLIP 16 + 32 wide, zero-padded to T5's 64
    assert torch.equal(ours, theirs) and torch.equal(ours_pooled, theirs_pooled)


# --- training and reloading in diffusers -------------------------------------------------------


def _outputs(transformer, te, te2, latents, hidden, pooled, ids):
    with torch.no_grad():
        o1, o2 = te(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
        t = torch.tensor([100.0, 800.0])
        return {
            "transformer": transformer(hidden_states=latents, timestep=t, encoder_hidden_states=hidden,
                                       pooled_projections=pooled).sample,
            "text_encoder": o1.hidden_states[-2], "text_encoder.pooled": o1.text_embeds,
            "text_encoder_2": o2.hidden_states[-2], "text_encoder_2.pooled": o2.text_embeds,
        }


@pytest.mark.parametrize("which", ["full", "plain"])
def test_diffusers_load_lora_weights_reproduces_trained_model(which, request, sd3_model):
    from diffusers import StableDiffusion3Pipeline

    trainer, result, _ = request.getfixturevalue(f"{which}_run")
    trained_names = WITH_TE if which == "full" else ("transformer",)
    comps = trainer.components
    for name in trained_names:
        comps[name].eval()
    with safe_open(str(result.weights), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == set(trained_names) and "lora_adapter_metadata" in meta

    fresh, pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model), StableDiffusion3Pipeline.from_pretrained(sd3_model)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 4, 6, generator=g)
    hidden = torch.randn(2, 77 + 256, 64, generator=g)
    pooled = torch.randn(2, 48, generator=g)
    ids = comps["tokenizer"](["a red circle"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    args = (latents, hidden, pooled, ids)
    base = _outputs(fresh.transformer, fresh.text_encoder, fresh.text_encoder_2, *args)
    pipe.load_lora_weights(str(result.output_dir), weight_name=WEIGHT_NAME)
    loaded = _outputs(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, *args)
    # a frozen encoder was released once its outputs were cached: the base model's stands in
    ours = [comps[n] if n in trained_names else getattr(fresh, n) for n in WITH_TE]
    trained = _outputs(*ours, *args)

    diffs = {k: (trained[k] - loaded[k]).abs().max().item() for k in trained}
    effect = {k: (trained[k] - base[k]).abs().max().item() for k in trained}
    print(f"\n[{which}] max |trained - loaded|:", {k: f"{v:.1e}" for k, v in diffs.items()})
    print(f"[{which}] max |trained - base|:  ", {k: f"{v:.1e}" for k, v in effect.items()})
    assert all(v < 1e-5 for v in diffs.values()), diffs
    for key, value in effect.items():
        if key.split(".")[0] in trained_names:
            assert value > 1e-4, (key, value)  # the LoRA changed this output: the comparison can fail
        else:
            assert diffs[key] == 0, (key, diffs[key])  # loading left an untrained encoder as it was
    counts = {n: (lora.count_lora_layers(comps[n]), lora.count_lora_layers(getattr(pipe, n))) for n in trained_names}
    print(f"[{which}] LoRA layers (trained, loaded):", counts)
    for name, (ours, theirs) in counts.items():
        assert ours == theirs > 0, (name, ours, theirs)
        assert_same_lora(comps[name], getattr(pipe, name))
    # 2 blocks x 8 projections, minus the last block's text output (it reads the text only)
    assert counts["transformer"][0] == 15


def test_t5_runs_once_per_distinct_caption_while_the_clips_train(full_run):
    trainer, result, t5_calls = full_run
    captions = {s.caption for s in trainer.dataset.samples()}
    epochs = FULL["max_steps"] * FULL["batch_size"] / len(trainer.dataset)
    print(f"\nT5 forward calls: {len(t5_calls)} (captions per call {t5_calls}); {len(captions)} distinct captions; "
          f"{epochs:.2f} epochs, {result.global_step} steps")
    assert epochs > 2 and sum(t5_calls) == len(captions) and len(t5_calls) == 2  # cached in chunks of 8
    assert trainer.trained_text_encoders == list(CLIPS)
    assert trainer.components["text_encoder_3"] is None  # released once cached


def test_resume_equals_an_uninterrupted_run(full_run, sd3_model, tmp_path):
    _, straight, _ = full_run
    out = tmp_path / "resumed"
    Trainer(sd3_config(sd3_model, example_data(), out, **{**FULL, "max_steps": 4})).setup().run()
    resumed = Trainer(sd3_config(sd3_model, example_data(), out, **FULL, resume="latest")).setup()
    assert resumed.global_step == 4
    a, b = load_file(str(straight.weights)), load_file(str(resumed.run().weights))
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == set(WITH_TE)
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_buckets_of_16px_multiples_train_with_gradient_checkpointing(sd3_model, tmp_path):
    from PIL import Image

    data = tmp_path / "mixed"
    data.mkdir()
    rows = []
    for i, (name, size) in enumerate({"wide.png": (96, 48), "tall.png": (40, 100), "square.png": (70, 70)}.items()):
        Image.new("RGB", size, (80 * i, 200, 255 - 80 * i)).save(data / name)
        rows.append(json.dumps({"file_name": name, "text": f"a {name[:-4]} image"}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    config = sd3_config(sd3_model, data, tmp_path / "out", buckets=True, max_steps=3, gradient_checkpointing=True)
    trainer = Trainer(config).setup()
    sizes = {trainer.size_of(s) for s in trainer.dataset.samples()}
    print("\nbucket sizes:", sorted(sizes))
    assert len(sizes) > 1 and all(w % 16 == 0 and h % 16 == 0 for w, h in sizes)
    assert trainer.components["transformer"].gradient_checkpointing
    result = trainer.run()
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_lorakit_generate_with_the_lora_writes_an_image(plain_run, sd3_model, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from lorakit.cli import app

    _, result, _ = plain_run
    out = tmp_path / "img.png"
    args = ["generate", "--arch", "sd3", "--model", str(sd3_model), "--prompt", "a red circle",
            "--lora", f"{result.output_dir}:0.8", "--steps", "2", "--resolution", "32", "--output", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (32, 32)


def test_dreambooth_with_given_class_images_trains(sd3_model, tmp_path):
    instance, classes = tmp_path / "instance", tmp_path / "class"
    instance.mkdir(), classes.mkdir()
    for name in ("red.png", "blue_circle.png"):
        shutil.copy(example_data() / name, instance / name)
    for name in ("green.png", "purple_circle.png"):
        shutil.copy(example_data() / name, classes / name)
    config = sd3_config(
        sd3_model, None, tmp_path / "out", modes=["dreambooth"], instance_data=str(instance),
        instance_prompt="a photo of sks shape", class_prompt="a photo of a shape", class_data=str(classes),
        num_class_images=2, max_steps=2, train_text_encoder=True,
    )
    trainer = Trainer(config).setup()
    assert trainer.dataset.group_size == 2
    result = trainer.run()
    assert result.global_step == 2 and result.weights.is_file()


def test_contract_suite(tmp_path):
    figures = run_arch_contract("sd3", tmp_path)
    print("\nsd3 contract:", figures)
    reload = figures.get("reload", figures)  # the suite's figures grew sections while it was rewritten
    assert reload["layers"]["transformer"] == 15


# --- ComfyUI's key mapping ----------------------------------------------------------------------


def comfyui_sd3_targets(num_layers: int) -> dict:
    """The diffusers-format SD3 LoRA module names ComfyUI recognises, and the ComfyUI weight each
    patches, restated from ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``: for an SD3
    model, ``"transformer." + k`` for every weight key ``k`` of ``comfy.utils.mmdit_to_diffusers``;
    ``model_lora_keys_clip``: ``text_encoder.text_model.encoder.layers.N.<proj>`` -> clip_l,
    ``text_encoder_2...`` -> clip_g). A value ``(key, slice)`` is a part of a fused qkv weight.
    ``load_lora`` reads each module's ``<name>.lora_B.weight`` / ``<name>.lora_A.weight``."""
    out = {}
    for i in range(num_layers):
        src, dst = f"transformer.transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        for part, names in (("x_block.attn", ("to_q", "to_k", "to_v")), ("context_block.attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for j, name in enumerate(names):
                out[f"{src}.attn.{name}"] = (f"{dst}.{part}.qkv.weight", j)
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{src}.attn2.{name}"] = (f"{dst}.x_block.attn2.qkv.weight", j)
        for diffusers_name, comfy_name in {
            "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
            "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
            "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
            "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
        }.items():
            out[f"{src}.{diffusers_name}"] = f"{dst}.{comfy_name}.weight"
    for prefix, clip in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        for i in range(32):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                name = f"text_model.encoder.layers.{i}.self_attn.{proj}"
                out[f"{prefix}.{name}"] = f"{clip}.transformer.{name}.weight"
    return out


def test_every_key_maps_in_comfyui(full_run):
    trainer, result, _ = full_run
    targets = comfyui_sd3_targets(trainer.components["transformer"].config.num_layers)
    keys = list(load_file(str(result.weights)))
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert all(f"{m}.lora_A.weight" in keys and f"{m}.lora_B.weight" in keys for m in modules)
    unmapped = sorted(m for m in modules if m not in targets)
    print(f"\n{len(modules)} LoRA modules, {len(unmapped)} unmapped in ComfyUI; e.g.",
          {m: targets[m] for m in sorted(modules)[:2]})
    assert not unmapped, unmapped
    assert targets["transformer.transformer_blocks.0.attn.to_k"] == ("diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", 1)
    assert targets["text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj"] == (
        "clip_g.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight")


# --- the real SD3.5-medium on the meta device ---------------------------------------------------

#: stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)


class _FusedAttention(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` while counting: keeps for backward what a
    fused (flash / memory-efficient) GPU kernel keeps -- q, k, v, the output and a float32
    log-sum-exp per query -- not the N x N matrix the CPU math fallback would."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _saved_activation_bytes(model, tokens_side: int, text_tokens: int, monkeypatch) -> tuple[int, int]:
    """(bytes autograd keeps for backward over one forward, the largest single block's share)."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, **kw: _FusedAttention.apply(q, k, v))
    where, seen = {"block": None}, []
    hooks = []
    for i, block in enumerate(model.transformer_blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: where.update(block=i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: where.update(block=None)))

    def pack(t):
        seen.append((where["block"], t.numel() * t.element_size()))
        return t

    meta = dict(device="meta", dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(hidden_states=torch.empty(1, 16, tokens_side, tokens_side, **meta), timestep=torch.empty(1, device="meta"),
              encoder_hidden_states=torch.empty(1, text_tokens, 4096, **meta), pooled_projections=torch.empty(1, 2048, **meta))
    for h in hooks:
        h.remove()
    per_block: dict = {}
    for block, n in seen:
        per_block[block] = per_block.get(block, 0) + n
    return sum(n for _, n in seen), max((v for k, v in per_block.items() if k is not None), default=0)


def test_sd35_medium_lora_size_and_memory_estimate(monkeypatch):
    """Rank-16 default targets on the real SD3.5-medium transformer, and what 1024 px training
    needs on a GPU. The formula (batch 1, bf16 frozen base, fp32 LoRA with AdamW, text and
    latents cached so the encoders are gone):

        weights 2 B x base params + LoRA 16 B x LoRA params (fp32 weight, grad, two Adam moments)
        + activations: with gradient checkpointing, the saved block inputs plus one block's
          activations while it is recomputed; without, everything autograd saves.

    Activation bytes are counted by autograd's saved-tensor hooks over a meta-device forward
    (no memory used), with fused attention as on a GPU. Not counted: the CUDA context and
    allocator slack (~0.5-1 GiB), transient gradients of activations. Unmeasured until a GPU run
    confirms it; docs/archs/sd3.md quotes these figures."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from lorakit_plugins.sd3 import ATTENTION

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = SD3Transformer2DModel(**SD35_MEDIUM)
            base = sum(p.numel() for p in model.parameters())
            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=ATTENTION))
    finally:
        torch.set_default_dtype(torch.float32)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.data = p.data.float()
        p.requires_grad_(True)
    n_lora = sum(p.numel() for p in lora_params)
    # 23 full blocks x 8 projections + the last block's 7, each 16 x (1536 + 1536)
    assert n_lora == (23 * 8 + 7) * 16 * (1536 + 1536) == 9_388_032
    assert lora.count_lora_layers(model) == 191

    model.train()
    side, text = 1024 // 8, 77 + 256  # 128 x 128 latents -> 4096 image tokens; CLIP 77 + T5 256 text tokens
    full, block = _saved_activation_bytes(model, side, text, monkeypatch)
    model.enable_gradient_checkpointing()
    checkpointed, _ = _saved_activation_bytes(model, side, text, monkeypatch)
    gib = 2**30
    weights = (base * 2 + n_lora * 16) / gib
    with_gc, without_gc = weights + (checkpointed + block) / gib, weights + full / gib
    print(f"\nSD3.5-medium transformer: {base:,} params; rank-16 LoRA (default targets): {n_lora:,} params, 191 layers")
    print(f"weights {base * 2 / gib:.2f} GiB bf16 + LoRA/grad/Adam {n_lora * 16 / gib:.2f} GiB; activations at 1024 px: "
          f"{full / gib:.2f} GiB saved without checkpointing, {checkpointed / gib:.2f} GiB + one block {block / gib:.2f} GiB with")
    print(f"estimate at 1024 px, batch 1: {with_gc:.1f} GiB with --gradient-checkpointing, {without_gc:.1f} GiB without")
    assert base == 2_243_171_520
    assert 4 < with_gc < 8 and 12 < without_gc < 20


def test_sd35_encoders_while_caching_on_the_meta_device():
    """Before the cache is filled every model is on the device at once: the peak of a run.
    The encoders' public configs (CLIP-L, CLIP-G / OpenCLIP bigG, the T5 v1.1 XXL encoder,
    SD3's 16-channel VAE), built on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                            num_attention_heads=12, projection_dim=768))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                            num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5), ("vae", vae))}
    gib = 2**30
    caching = (2 * (counts["clip_l"] + counts["clip_g"] + counts["t5"] + 2_243_171_520) + 4 * counts["vae"]) / gib
    print("\nencoder params:", {k: f"{v:,}" for k, v in counts.items()})
    print(f"while caching (bf16 encoders + transformer, fp32 VAE): {caching:.1f} GiB of weights")
    assert 4.7e9 < counts["t5"] < 4.8e9 and 6.9e8 < counts["clip_g"] < 7.0e8 and 1.2e8 < counts["clip_l"] < 1.3e8


def test_bf16_run_keeps_the_base_in_bf16_and_lora_in_fp32(sd3_model, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # accelerate's process-wide precision: clear it around a bf16 run
    try:
        config = sd3_config(sd3_model, example_data(), tmp_path / "out", mixed_precision="bf16", max_steps=2,
                            train_text_encoder=True)
        trainer = Trainer(config).setup()
        comps = trainer.components
        assert comps["vae"].dtype == torch.float32  # it only encodes, once
        for name in WITH_TE:
            dtypes = {(("lora_" in n), p.dtype) for n, p in comps[name].named_parameters()}
            assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}, (name, dtypes)
        result = trainer.run()
        assert all(torch.isfinite(torch.tensor(result.losses)))
    finally:
        AcceleratorState._reset_state()
