"""Single-file base models: a tiny SD1.5 and SDXL written as one original-layout checkpoint
(``lorakit tiny ARCH DIR --single-file``) read back through diffusers' ``from_single_file``
to exactly the folder's weights, and trained through ``--model FILE`` to bit-identical LoRA
weights; the conversion is cached and re-made when damaged; a resume checks the file;
``--variant`` and a single-file ``--vae`` load the same bytes as the plain folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "lorakit-cache"
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    from lorakit.tiny import make_tiny_single_file

    root = tmp_path_factory.mktemp("single-file")
    return {arch: make_tiny_single_file(arch, root / arch) for arch in ("sd15", "sdxl")}


def _weights(folder, component) -> dict:
    out = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _train(arch, model, output, **extra):
    result = Trainer(tiny_config(arch, model, example_data(), output, max_steps=3, **extra)).setup().run()
    return result, load_file(str(result.weights))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_reads_back_to_the_folder_weights_exactly(arch, single_files, tmp_path):
    from lorakit.plugins import arch_info
    from lorakit.singlefile import model_folder

    file = single_files[arch]
    configs = tmp_path / "configs"  # configs and tokenizers only: every weight comes from the file
    shutil.copytree(file.parent, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    info = arch_info(arch)
    prefixes = [p for p, _ in info.single_file_layout.values()]
    assert all(any(k.startswith(p) for p in prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    assert not any(k.startswith(("down_blocks", "unet.", "vae.")) for k in keys)  # the original layout, not diffusers'
    converted, sha = model_folder(file, arch, model_config=str(configs))
    for component in info.single_file_layout:
        original, read = _weights(file.parent, component), _weights(converted, component)
        assert original.keys() == read.keys(), component
        different = [k for k in original if not torch.equal(original[k], read[k])]
        assert not different, f"{component}: {different[:3]}"
    assert len(sha) == 64


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_training_on_the_single_file_is_bit_identical_to_the_folder(arch, single_files, tmp_path):
    from lorakit.fsutil import sha256_of

    file = single_files[arch]
    _, folder_lora = _train(arch, file.parent, tmp_path / "folder")
    result, file_lora = _train(arch, file, tmp_path / "file", model_config=str(file.parent))
    assert folder_lora.keys() == file_lora.keys() and len(file_lora) > 0
    assert all(torch.equal(folder_lora[k], file_lora[k]) for k in folder_lora)
    recorded = json.loads((result.output_dir / "lorakit_config.json").read_text())
    assert recorded["model"] == str(file) and recorded["model_sha256"] == sha256_of(file)
    card = (result.output_dir / "README.md").read_text()  # its loading code loads the file, not a folder
    assert f'.from_single_file("{file}", config="{file.parent}")' in card
    assert f"--model {file} --model-config {file.parent} --lora" in card


def test_conversion_is_cached_and_remade_when_damaged(single_files, monkeypatch):
    import diffusers

    from lorakit.singlefile import model_folder

    file = single_files["sd15"]
    first, _ = model_folder(file, "sd15", model_config=str(file.parent))
    calls = []
    real = diffusers.StableDiffusionPipeline.from_single_file
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_single_file",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _ = model_folder(file, "sd15", model_config=str(file.parent))
    assert again == first and calls == []
    unet = next((first / "unet").glob("*.safetensors"))
    unet.write_bytes(unet.read_bytes()[:100])  # truncated in the cache
    remade, _ = model_folder(file, "sd15", model_config=str(file.parent))
    assert remade == first and calls == [1]
    assert _weights(remade, "unet").keys() == _weights(file.parent, "unet").keys()


def test_resume_refuses_another_single_file(single_files, tmp_path):
    from lorakit.ldm import write_single_file
    from lorakit.plugins import arch_info

    file = tmp_path / "model.safetensors"
    shutil.copy(single_files["sd15"], file)
    config = single_files["sd15"].parent
    Trainer(tiny_config("sd15", file, example_data(), tmp_path / "out", max_steps=2, checkpoint_every=1,
                        model_config=str(config))).setup().run()
    other = tmp_path / "other"
    shutil.copytree(config, other)
    unet = other / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(unet))
    weights["conv_in.bias"] = weights["conv_in.bias"] + 1
    save_file(weights, str(unet))
    write_single_file(other, arch_info("sd15").single_file_layout, file)  # same path, other weights
    with pytest.raises(LorakitError, match="comes from a different run.*model_sha256"):
        Trainer(tiny_config("sd15", file, example_data(), tmp_path / "out", max_steps=3, resume="latest",
                            model_config=str(config))).setup()


def test_variant_trains_on_the_variant_files(single_files, tmp_path):
    from diffusers import StableDiffusionPipeline

    plain = single_files["sd15"].parent
    variant = tmp_path / "variant"
    pipe = StableDiffusionPipeline.from_pretrained(plain, safety_checker=None, requires_safety_checker=False)
    pipe.save_pretrained(variant, variant="fp16")
    assert (variant / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (variant / "unet" / "diffusion_pytorch_model.safetensors").exists()
    before = {str(p): p.read_bytes() for p in variant.rglob("*") if p.is_file()}
    _, plain_lora = _train("sd15", plain, tmp_path / "plain")
    _, variant_lora = _train("sd15", variant, tmp_path / "fp16", variant="fp16")
    assert plain_lora.keys() == variant_lora.keys()
    assert all(torch.equal(plain_lora[k], variant_lora[k]) for k in plain_lora)
    assert {str(p): p.read_bytes() for p in variant.rglob("*") if p.is_file()} == before  # the user's folder untouched
    with pytest.raises(LorakitError, match=r"--variant bf16: .* holds no \*\.bf16\.safetensors weights"):
        _train("sd15", variant, tmp_path / "bf16", variant="bf16")


def test_single_file_vae_is_the_same_vae(single_files, tmp_path):
    from lorakit.ldm import vae_to_ldm

    folder = single_files["sd15"].parent
    vae_file = tmp_path / "vae.safetensors"
    config = json.loads((folder / "vae" / "config.json").read_text())
    ldm = {k: v.contiguous() for k, v in vae_to_ldm(_weights(folder, "vae"), config).items()}
    save_file(ldm, str(vae_file))
    _, plain_lora = _train("sd15", folder, tmp_path / "plain")
    _, vae_lora = _train("sd15", folder, tmp_path / "vae", vae=str(vae_file))
    assert plain_lora.keys() == vae_lora.keys()
    assert all(torch.equal(plain_lora[k], vae_lora[k]) for k in plain_lora)
    other_file = tmp_path / "other-vae.safetensors"  # and the file is what is used: another VAE, another LoRA
    save_file({**ldm, "encoder.conv_in.bias": ldm["encoder.conv_in.bias"] + 1}, str(other_file))
    _, other_lora = _train("sd15", folder, tmp_path / "other", vae=str(other_file))
    assert not all(torch.equal(plain_lora[k], other_lora[k]) for k in plain_lora)


def test_tiny_single_file_cli_and_training_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["tiny", "sd15", str(tmp_path / "m"), "--single-file"])
    assert r.exit_code == 0, r.output
    file = tmp_path / "m" / "model.safetensors"
    assert file.is_file() and f"--model {file} --model-config {tmp_path / 'm'}" in r.output
    r = runner.invoke(app, ["train", "--arch", "sd15", "--model", str(file), "--model-config", str(tmp_path / "m"),
                            "--data", str(example_data()), "--output", str(tmp_path / "out"), "--max-steps", "1",
                            "--resolution", "32", "--num-threads", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_file_keys_decide_the_arch(tmp_path):
    from lorakit.filearch import check_arch, checked_keys

    def fake(name, keys):
        path = tmp_path / name
        save_file({k: torch.zeros(1) for k in keys}, str(path))
        return path

    sdxl = fake("xl.safetensors", ["model.diffusion_model.out.0.weight", "conditioner.embedders.0.transformer.x",
                                   "conditioner.embedders.1.model.positional_embedding"])
    check_arch(sdxl, checked_keys(sdxl), "sdxl")
    with pytest.raises(LorakitError, match="is a single-file sdxl checkpoint, which --arch sd15 cannot train; use --arch sdxl"):
        check_arch(sdxl, checked_keys(sdxl), "sd15")
    refiner = fake("refiner.safetensors", ["model.diffusion_model.out.0.weight", "conditioner.embedders.0.model.x"])
    with pytest.raises(LorakitError, match="match none of the archs that take single files: sd15, sdxl"):
        check_arch(refiner, checked_keys(refiner), "sdxl")
    sd2 = fake("sd2.safetensors", ["model.diffusion_model.out.0.weight", "cond_stage_model.model.token_embedding.weight"])
    check_arch(sd2, checked_keys(sd2), "sd15")
    with pytest.raises(LorakitError, match="is a single-file sd15 checkpoint, which --arch flux cannot train"):
        check_arch(sd2, checked_keys(sd2), "flux")


def test_generate_from_the_single_file_equals_the_folder(single_files):
    import numpy as np

    from lorakit.inference import generate

    file = single_files["sd15"]
    kwargs = dict(steps=2, resolution=32, seed=3, device="cpu")
    from_folder = generate("sd15", str(file.parent), ["a red circle"], **kwargs)
    from_file = generate("sd15", str(file), ["a red circle"], model_config=str(file.parent), **kwargs)
    assert np.array_equal(np.asarray(from_folder[0]), np.asarray(from_file[0]))
    with pytest.raises(LorakitError, match="HF_HUB_OFFLINE is set.*pass --model-config"):
        generate("sd15", str(file), ["a red circle"], **kwargs)


def test_precision_of_the_file_is_kept_without_loss(single_files, tmp_path):
    from lorakit.singlefile import model_folder

    file = single_files["sd15"]
    state = load_file(str(file))
    mixed = tmp_path / "mixed.safetensors"  # an fp16 UNet beside an fp32 VAE and text encoder
    save_file({k: v.half() if k.startswith("model.diffusion_model.") else v for k, v in state.items()}, str(mixed))
    folder, _ = model_folder(mixed, "sd15", model_config=str(file.parent))
    unet, vae = _weights(folder, "unet"), _weights(folder, "vae")
    original_unet, original_vae = _weights(file.parent, "unet"), _weights(file.parent, "vae")
    assert all(unet[k].dtype == torch.float32 and torch.equal(unet[k], original_unet[k].half().float()) for k in unet)
    assert all(torch.equal(vae[k], original_vae[k]) for k in vae)
    half = tmp_path / "half.safetensors"  # all fp16: the cache stays fp16, not twice the file's size
    save_file({k: v.half() for k, v in state.items()}, str(half))
    folder, _ = model_folder(half, "sd15", model_config=str(file.parent))
    assert {v.dtype for v in _weights(folder, "unet").values()} == {torch.float16}


def test_tiny_files_use_the_original_checkpoint_names(single_files):
    """Names (and shapes) as released SD1.x / SDXL checkpoints spell them, not only what
    diffusers' lenient reader accepts."""
    shapes = {}
    for arch, file in single_files.items():
        with safe_open(str(file), framework="pt") as f:
            shapes[arch] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sd15, sdxl = shapes["sd15"], shapes["sdxl"]
    for name in (
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight", "model.diffusion_model.output_blocks.0.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight", "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.0.norm1.weight", "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.encoder.norm_out.weight", "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.quant_conv.weight", "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert name in sd15, name
    assert sd15["first_stage_model.encoder.mid.attn_1.q.weight"] == (32, 32, 1, 1)  # 1x1 convs, as ldm's VAE has
    assert sd15["first_stage_model.decoder.mid.attn_1.proj_out.weight"] == (32, 32, 1, 1)
    for name in (
        "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.token_embedding.weight", "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.ln_final.weight", "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.out_proj.weight",
    ):
        assert name in sdxl, name
    assert sdxl["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] == (3 * 48, 48)
    assert sdxl["conditioner.embedders.1.model.text_projection"] == (48, 32)  # width x embed dim, OpenCLIP's way round


def test_concurrent_loads_convert_once(single_files, monkeypatch):
    """Launched ranks (or two runs) loading the same file at once: one converts, the others
    wait for it and reuse its folder."""
    import threading

    import diffusers

    from lorakit.singlefile import model_folder

    file = single_files["sd15"]
    calls = []
    real = diffusers.StableDiffusionPipeline.from_single_file
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_single_file",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    results, errors = [], []

    def load():
        try:
            results.append(model_folder(file, "sd15", model_config=str(file.parent))[0])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and calls == [1]
    assert _weights(results[0], "unet").keys() == _weights(file.parent, "unet").keys()


def test_revision_picks_the_hub_snapshot(single_files, tmp_path, monkeypatch):
    """--revision reaches huggingface_hub: offline, a cached tag resolves to its own snapshot."""
    import huggingface_hub.constants

    from lorakit.config import TrainConfig
    from lorakit.models import resolve_run_model

    repo = tmp_path / "hub" / "models--me--tiny"
    for ref, commit, source in (("main", "a" * 40, single_files["sd15"].parent), ("v2", "b" * 40, single_files["sdxl"].parent)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(source, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_run_model(TrainConfig(arch="sd15", model="me/tiny")) == repo / "snapshots" / ("a" * 40)
    assert resolve_run_model(TrainConfig(arch="sdxl", model="me/tiny", revision="v2")) == repo / "snapshots" / ("b" * 40)
    with pytest.raises(LorakitError, match="me/tiny at revision v3 is not in the local Hugging Face cache"):
        resolve_run_model(TrainConfig(arch="sd15", model="me/tiny", revision="v3"))
