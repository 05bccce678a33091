"""lorakit fuse: the fused model's outputs equal the base model's with the LoRAs loaded at their
scales, as a diffusers folder and as a single-file checkpoint; the output policy keeps users' files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.fuse import fuse
from lorakit.inference import load_pipeline_with_loras
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer


def _train(arch, model, out, **kw):
    return Trainer(tiny_config(arch, model, example_data(), out, max_steps=2, learning_rate=1e-2, **kw)).setup().run().weights


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("fuse-sd15")
    model = make_tiny_model("sd15", root / "model")
    a = _train("sd15", model, root / "a", rank=4, alpha=8, train_text_encoder=True)
    b = _train("sd15", model, root / "b", seed=1, rank=2, target_modules=["to_q", "to_v", "proj_in"])
    return model, [(a, 0.8), (b, 0.5)]


def _outputs(pipe, sdxl=False):
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    extra = {}
    if sdxl:
        time_dim = 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, cfg.projection_class_embeddings_input_dim - time_dim, generator=g),
                                      "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    ids = torch.randint(0, 512, (1, 77), generator=g)
    with torch.no_grad():
        out = [pipe.unet(x, torch.tensor([10, 500]), cond, **extra).sample, pipe.text_encoder(ids)[0]]
        if sdxl:
            out.append(pipe.text_encoder_2(ids)[0])
    return out


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_fused_folder_equals_base_plus_loras(sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    model, loras = sd15
    out = fuse("sd15", str(model), loras, tmp_path / "fused")
    _, with_loras = load_pipeline_with_loras("sd15", str(model), loras, device="cpu")
    want = _outputs(with_loras)
    got = _outputs(StableDiffusionPipeline.from_pretrained(out))
    base = _outputs(StableDiffusionPipeline.from_pretrained(model))
    print(f"fused folder vs base + LoRAs: max abs diff {_max_diff(want, got):.2e}")
    assert _max_diff(want, got) < 1e-4
    assert _max_diff(want, base) > 1e-3  # the LoRAs really change the model
    facts = json.loads((out / "lorakit_fused.json").read_text())
    assert [spec["scales"] for spec in facts["loras"]] == [[0.8], [0.5]]
    manifest = json.loads((out / "lorakit_manifest.json").read_text())["paths"]
    assert "unet/diffusion_pytorch_model.safetensors" in manifest and not list(tmp_path.glob(".fused*"))


def test_fused_single_file_loads_in_from_single_file(sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    model, loras = sd15
    file = fuse("sd15", str(model), loras, tmp_path / "fused.safetensors")
    single = StableDiffusionPipeline.from_single_file(str(file), config=str(model))
    _, with_loras = load_pipeline_with_loras("sd15", str(model), loras, device="cpu")
    diff = _max_diff(_outputs(with_loras), _outputs(single))
    print(f"fused single file vs base + LoRAs: max abs diff {diff:.2e}")
    assert diff < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["fused.safetensors"]  # no temporary left


def test_sdxl_single_file_with_both_text_encoders(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lorakit.tiny import make_tiny_model

    model = make_tiny_model("sdxl", tmp_path / "model")
    lora = _train("sdxl", model, tmp_path / "a", rank=4, alpha=8, train_text_encoder=True)
    file = fuse("sdxl", str(model), [(lora, 0.7)], tmp_path / "fused.safetensors")
    single = StableDiffusionXLPipeline.from_single_file(str(file), config=str(model))
    _, with_lora = load_pipeline_with_loras("sdxl", str(model), [(lora, 0.7)], device="cpu")
    want, got = _outputs(with_lora, sdxl=True), _outputs(single, sdxl=True)
    print(f"sdxl fused single file vs base + LoRA: max abs diff {_max_diff(want, got):.2e}")
    assert _max_diff(want, got) < 1e-4
    assert _max_diff(want, _outputs(StableDiffusionXLPipeline.from_pretrained(model), sdxl=True)) > 1e-3


def test_output_policy_keeps_users_files(sd15, tmp_path):
    model, loras = sd15
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(LorakitError, match="is not empty; pass --overwrite"):
        fuse("sd15", str(model), loras[:1], mine)
    with pytest.raises(LorakitError, match="holds notes.txt, which lorakit did not write"):
        fuse("sd15", str(model), loras[:1], mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = fuse("sd15", str(model), loras[:1], tmp_path / "fused")
    with pytest.raises(LorakitError, match="is not empty"):
        fuse("sd15", str(model), loras, out)
    fuse("sd15", str(model), loras, out, overwrite=True)  # an earlier fuse's folder: replaced
    assert len(json.loads((out / "lorakit_fused.json").read_text())["loras"]) == 2
    (out / "unet" / "extra.txt").write_text("mine")
    with pytest.raises(LorakitError, match="holds unet/extra.txt"):
        fuse("sd15", str(model), loras, out, overwrite=True)
    (tmp_path / "x.safetensors").write_bytes(b"mine")
    with pytest.raises(LorakitError, match="exists; pass --overwrite"):
        fuse("sd15", str(model), loras, tmp_path / "x.safetensors")
    assert (tmp_path / "x.safetensors").read_bytes() == b"mine"
    with pytest.raises(LorakitError, match="has no single-file checkpoint layout"):
        fuse("flux", str(model), loras, tmp_path / "y.safetensors")


def test_cli_fuse_and_merge(sd15, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    model, loras = sd15
    (a, _), (b, _) = loras
    logging.getLogger("lorakit").handlers.clear()
    r = CliRunner().invoke(app, ["merge", str(a), str(b), "--weights", "0.8,0.5", "--arch", "sd15",
                                 "--output", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 0, r.output
    assert "exact: ranks concatenated" in r.output
    r = CliRunner().invoke(app, ["fuse", "--arch", "sd15", "--model", str(model), "--lora", f"{tmp_path / 'm.safetensors'}:1.0",
                                 "--output", str(tmp_path / "fused")])
    assert r.exit_code == 0, r.output
    from diffusers import StableDiffusionPipeline

    _, with_loras = load_pipeline_with_loras("sd15", str(model), loras, device="cpu")
    got = _outputs(StableDiffusionPipeline.from_pretrained(tmp_path / "fused"))
    assert _max_diff(_outputs(with_loras), got) < 1e-4  # merge then fuse == both LoRAs at their scales


@pytest.mark.parametrize("arch", ["flux"])
def test_every_lora_layer_is_fused(arch, tmp_path):
    """Weight by weight: fused = base + scale * B @ A in every component holding LoRA, whatever
    the pipeline fuses by default (FLUX's fuse_lora alone leaves its CLIP LoRA out)."""
    from lorakit.testing import lora_deltas
    from lorakit.tiny import make_tiny_model

    model = make_tiny_model(arch, tmp_path / "model")
    lora = Trainer(tiny_config(arch, model, example_data(), tmp_path / "a", max_steps=1, learning_rate=1e-2,
                               train_text_encoder=True)).setup().run().weights
    out = fuse(arch, str(model), [(lora, 0.6)], tmp_path / "fused")
    _, with_lora = load_pipeline_with_loras(arch, str(model), [(lora, 0.6)], device="cpu")
    cls = type(with_lora)
    fused, base = cls.from_pretrained(out), cls.from_pretrained(model)
    checked = {}
    for name, component in with_lora.components.items():
        deltas = lora_deltas(component) if isinstance(component, torch.nn.Module) else {}
        if not deltas:
            continue
        after, before = dict(getattr(fused, name).named_modules()), dict(getattr(base, name).named_modules())
        for layer, delta in deltas.items():
            want = before[layer].weight + delta.reshape(before[layer].weight.shape)
            assert torch.allclose(after[layer].weight, want, atol=1e-6), f"{name}.{layer} not fused"
            checked[name] = checked.get(name, 0) + 1
    assert set(checked) == {"transformer", "text_encoder"} and all(checked.values()), checked


def test_full_disk_leaves_the_earlier_model_and_no_partial_one(sd15, tmp_path, monkeypatch):
    import errno

    from diffusers import StableDiffusionPipeline

    model, loras = sd15
    out = fuse("sd15", str(model), loras[:1], tmp_path / "fused")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full(self, folder, **kwargs):  # the disk fills up halfway through writing
        (Path(folder) / "unet").mkdir(parents=True, exist_ok=True)
        (Path(folder) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", full)
    with pytest.raises(LorakitError, match="the disk is full: the fused model for --output .* was not written"):
        fuse("sd15", str(model), loras, out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]
