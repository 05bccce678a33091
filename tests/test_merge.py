"""lorakit merge: the merged file's effect equals the inputs' weighted sum (loaded as separate
adapters at those weights in diffusers), exactly when ranks are concatenated, and with the
reported error when truncated by SVD."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.merge import merge, parse_weights
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

W = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two SD1.5 LoRAs that differ in everything a merge must honour: rank, alpha (!= rank),
    targets (proj_in only in B, to_k only in A) and text-encoder LoRA (only in A)."""
    from lorakit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("merge")
    model = make_tiny_model("sd15", root / "model")
    a = Trainer(tiny_config("sd15", model, example_data(), root / "a", max_steps=2, learning_rate=1e-2, rank=4,
                            alpha=8, train_text_encoder=True)).setup().run()
    b = Trainer(tiny_config("sd15", model, example_data(), root / "b", max_steps=2, learning_rate=1e-2, seed=1,
                            rank=2, alpha=1, target_modules=["to_q", "to_v", "proj_in"])).setup().run()
    return model, a.weights, b.weights


def _outputs(pipe):
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, 512, (1, 77), generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 500]), cond).sample, pipe.text_encoder(ids)[0]


def _pipe(model, *files, weights=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    names = []
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f"l{i}")
        names.append(f"l{i}")
    if weights is not None:
        pipe.set_adapters(names, adapter_weights=weights)
    return pipe


def test_merged_file_equals_the_inputs_at_their_weights(loras, tmp_path):
    model, a, b = loras
    result = merge("sd15", [a, b], tmp_path / "m.safetensors", [0.7, 0.3])
    want = _outputs(_pipe(model, a, b, weights=[0.7, 0.3]))
    got = _outputs(_pipe(model, result.path))
    base = _outputs(_pipe(model))
    for w, g, o in zip(want, got, base):
        assert (w - g).abs().max().item() < 1e-5
        assert (w - o).abs().max().item() > 1e-3  # the LoRAs really change the output
    assert result.rank is None and result.error == 0.0
    print(f"merged vs two adapters: unet {(want[0] - got[0]).abs().max().item():.2e}, "
          f"text encoder {(want[1] - got[1]).abs().max().item():.2e}")


def test_merged_file_concatenates_ranks_and_loads_in_older_peft(loras, tmp_path):
    model, a, b = loras
    path = merge("sd15", [a, b], tmp_path / "m.safetensors", [1.0, 1.0]).path
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    tensors = load_file(str(path))
    # one rank and alpha per component (6 = 4 + 2 where both have the layer; lower ranks padded)
    assert meta["unet.r"] == meta["unet.lora_alpha"] == 6 and meta["unet.rank_pattern"] == {}
    assert meta["text_encoder.r"] == meta["text_encoder.lora_alpha"] == 4
    assert set(meta["unet.target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0", "proj_in"}
    proj_in = [k for k in tensors if k.endswith("proj_in.lora_A.weight")]
    assert proj_in and all(tensors[k].shape[0] == 6 for k in proj_in)
    assert all(k.startswith("text_encoder.text_model.") for k in tensors if k.startswith("text_encoder."))


def test_rank_truncation_reports_its_error(loras, tmp_path):
    model, a, b = loras
    exact = merge("sd15", [a, b], tmp_path / "exact.safetensors", [0.7, 0.3])
    small = merge("sd15", [a, b], tmp_path / "r2.safetensors", [0.7, 0.3], rank=2)
    full = merge("sd15", [a, b], tmp_path / "r6.safetensors", [0.7, 0.3], rank=6)
    e, s = load_file(str(exact.path)), load_file(str(small.path))
    assert all(s[k].shape[0] == 2 for k in s if k.endswith("lora_A.weight"))
    total = lost = 0.0
    for key in e:
        if key.endswith("lora_A.weight"):
            bk = key.replace("lora_A", "lora_B")
            d = e[bk].flatten(1).double() @ e[key].flatten(1).double()
            d2 = s[bk].flatten(1).double() @ s[key].flatten(1).double()
            total, lost = total + float((d ** 2).sum()), lost + float(((d - d2) ** 2).sum())
    assert math.isclose(small.error, math.sqrt(lost / total), rel_tol=1e-4)
    assert 0.01 < small.error < 1 and "relative Frobenius error" in small.summary()
    assert full.error < 1e-6  # rank 6 holds the whole merge
    want = _outputs(_pipe(model, a, b, weights=[0.7, 0.3]))
    got = _outputs(_pipe(model, full.path))
    assert all((w - g).abs().max().item() < 1e-5 for w, g in zip(want, got))


def test_inputs_in_kohya_format_merge_the_same(loras, tmp_path):
    from lorakit.convert import convert

    model, a, b = loras
    kohya = convert("sd15", a, tmp_path / "a-kohya.safetensors", "kohya", model=str(model))
    one = merge("sd15", [a, b], tmp_path / "m1.safetensors", [0.5, 2.0])
    two = merge("sd15", [kohya, b], tmp_path / "m2.safetensors", [0.5, 2.0], model=str(model))
    for w, g in zip(_outputs(_pipe(model, one.path)), _outputs(_pipe(model, two.path))):
        assert (w - g).abs().max().item() < 1e-5


def test_mistakes_are_one_line(loras, tmp_path):
    model, a, b = loras
    with pytest.raises(LorakitError, match="gives 1 weights for 2 LoRAs"):
        parse_weights("0.7", 2)
    with pytest.raises(LorakitError, match="finite"):
        parse_weights("0.7,nan", 2)
    with pytest.raises(LorakitError, match="one number per LoRA"):
        parse_weights("0.7;0.3", 2)
    (tmp_path / "mine.safetensors").write_bytes(b"mine")
    with pytest.raises(LorakitError, match="exists; pass --overwrite"):
        merge("sd15", [a, b], tmp_path / "mine.safetensors")
    assert (tmp_path / "mine.safetensors").read_bytes() == b"mine"
    with pytest.raises(LorakitError, match="--rank must be at least 1"):
        merge("sd15", [a, b], tmp_path / "x.safetensors", rank=0)
    assert not (tmp_path / "x.safetensors").exists()


def test_files_from_before_the_text_model_layout_merge_with_model(loras, tmp_path):
    """A LoRA written before text-encoder keys gained ``text_model.`` (transformers 5's own paths)
    merges with a current one given --model; without it the two layouts are refused in one line."""
    from safetensors.torch import save_file

    model, a, b = loras
    with safe_open(str(a), framework="pt") as f:
        header = f.metadata()
    old = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(str(a)).items()}
    assert old.keys() != load_file(str(a)).keys()
    save_file(old, str(tmp_path / "old.safetensors"), metadata=header)
    with pytest.raises(LorakitError, match="in two module layouts; pass --model"):
        merge("sd15", [tmp_path / "old.safetensors", a], tmp_path / "x.safetensors", [0.5, 0.5])
    got = merge("sd15", [tmp_path / "old.safetensors", a], tmp_path / "m.safetensors", [0.5, 0.5], model=str(model))
    want = merge("sd15", [a, a], tmp_path / "w.safetensors", [0.5, 0.5])
    for w, g in zip(_outputs(_pipe(model, want.path)), _outputs(_pipe(model, got.path))):
        assert (w - g).abs().max().item() < 1e-5


def test_full_disk_is_one_line_and_leaves_no_file(loras, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    _, a, b = loras

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(LorakitError, match="the disk is full: .*m.safetensors was not written"):
        merge("sd15", [a, b], tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
