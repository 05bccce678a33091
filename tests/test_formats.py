"""Every LoRA format lorakit reads converts to every other, and each result, loaded by the
tool that reads that format, computes what the original computes (denoiser and text-encoder
outputs within 1e-5). Sources include files written by the other tools' own code (diffusers'
example-script saving, PEFT's ``save_pretrained``), without any lorakit header.

Loaders used as the judge: diffusers' ``load_lora_weights`` for lorakit, kohya and
diffusers-example files; PEFT's ``PeftModel.from_pretrained`` for PEFT folders.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lorakit
from lorakit.convert import convert
from lorakit.errors import LorakitError
from lorakit.testing import example_data, tiny_config

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]  # not only attention
FORMATS = ["lorakit", "kohya", "diffusers-example", "peft"]


def outputs(pipe, text_encoders=("text_encoder",)):
    from test_convert import outputs as model_outputs

    return model_outputs(pipe, list(text_encoders))


def target_path(tmp_path, fmt, tag=""):
    if fmt == "peft":  # PEFT reads adapter_model.safetensors + adapter_config.json from a folder
        return tmp_path / f"peft{tag}" / "adapter_model.safetensors"
    return tmp_path / f"{fmt}{tag}.safetensors"


def load_outputs(model, path, fmt, text_encoders=("text_encoder",)):
    """What the tool that reads ``fmt`` computes with the file."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    if path is not None and fmt == "peft":
        from peft import PeftModel

        PeftModel.from_pretrained(pipe.unet, str(path.parent))
    elif path is not None:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return outputs(pipe, text_encoders)


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SD1.5 and two lorakit runs on it: UNet only (every format can hold it) and UNet
    plus text encoder; alpha 8 != rank 4, so a lost alpha shows."""
    from lorakit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("formats")
    model = make_tiny_model("sd15", root / "model")
    out = {}
    for name, te in (("unet", False), ("te", True)):
        config = tiny_config("sd15", model, example_data(), root / name, rank=4, alpha=8, train_text_encoder=te,
                             target_modules=TARGETS, max_steps=2, learning_rate=1e-2)
        out[name] = lorakit.train(config).weights
    base = load_outputs(model, None, None)
    return model, out, base


@pytest.fixture(scope="module")
def unet_sources(runs, tmp_path_factory):
    """The UNet-only LoRA in each format, converted from the lorakit file."""
    model, weights, base = runs
    root = tmp_path_factory.mktemp("sources")
    files = {"lorakit": weights["unet"]}
    for fmt in FORMATS[1:]:
        files[fmt] = convert("sd15", weights["unet"], target_path(root, fmt), fmt, model=model)
    reference = load_outputs(model, weights["unet"], "lorakit")
    assert max_diff(reference, base) > 1e-3, "the LoRA changes nothing; the test would prove nothing"
    return files, reference


@pytest.mark.parametrize("source", FORMATS)
@pytest.mark.parametrize("target", FORMATS)
def test_every_format_converts_to_every_other(runs, unet_sources, source, target, tmp_path):
    model, _, _ = runs
    files, reference = unet_sources
    if source == target:
        pytest.skip("same format")
    out = convert("sd15", files[source], target_path(tmp_path, target), target, model=model)
    got = load_outputs(model, out, target, text_encoders=())
    assert max_diff(got, {"unet": reference["unet"]}) < 1e-5


@pytest.mark.parametrize("target", ["kohya", "diffusers-example"])
def test_text_encoder_lora_converts_and_back(runs, target, tmp_path):
    """UNet + text encoder: to the format and back to lorakit, each step loads to the same outputs."""
    model, weights, _ = runs
    reference = load_outputs(model, weights["te"], "lorakit")
    there = convert("sd15", weights["te"], target_path(tmp_path, target), target, model=model)
    back = convert("sd15", there, tmp_path / "back.safetensors", "lorakit", model=model)
    for path, fmt in ((there, target), (back, "lorakit")):
        assert max_diff(load_outputs(model, path, fmt), reference) < 1e-5, (fmt, path)


def test_peft_and_back_is_bit_exact(runs, unet_sources, tmp_path):
    model, weights, _ = runs
    files, _ = unet_sources
    back = convert("sd15", files["peft"], tmp_path / "back.safetensors", "lorakit", model=model)
    original, again = load_file(str(weights["unet"])), load_file(str(back))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    with safe_open(str(weights["unet"]), "pt") as a, safe_open(str(back), "pt") as b:
        assert json.loads(a.metadata()["lora_adapter_metadata"]) == json.loads(b.metadata()["lora_adapter_metadata"])


def test_peft_file_written_by_peft_itself(runs, tmp_path):
    """``PeftModel.save_pretrained``'s folder, read with and without its adapter_config.json."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model

    model, _, base = runs
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    torch.manual_seed(1)
    peft_model = get_peft_model(pipe.unet, LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_v", "proj_in"],
                                                      init_lora_weights="gaussian"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    reference = load_outputs(model, tmp_path / "peft" / "adapter_model.safetensors", "peft", text_encoders=())
    assert max_diff(reference, {"unet": base["unet"]}) > 1e-3
    ours = convert("sd15", tmp_path / "peft", tmp_path / "ours.safetensors", "lorakit", model=model)  # the folder
    assert max_diff(load_outputs(model, ours, "lorakit", text_encoders=()), reference) < 1e-5
    (tmp_path / "peft" / "adapter_config.json").unlink()  # without it: alpha = rank, as PEFT's default
    bare = convert("sd15", tmp_path / "peft" / "adapter_model.safetensors", tmp_path / "bare.safetensors", "lorakit", model=model)
    with safe_open(str(bare), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == 2 and config["unet.lora_alpha"] == 2.0


def test_diffusers_example_file_written_by_diffusers_code(runs, tmp_path):
    """The train_text_to_image_lora.py way of saving (diffusers' key conversion, no header):
    lorakit reads it as diffusers does, alpha = rank."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model, _, base = runs
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    torch.manual_seed(2)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights="gaussian"))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                             init_lora_weights="gaussian"))  # diffusers reads a kohya TE LoRA only with out_proj
    for module in (pipe.unet, pipe.text_encoder):
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), weight_name="example.safetensors",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
    )
    example = tmp_path / "example.safetensors"
    reference = load_outputs(model, example, "diffusers-example")
    assert max_diff(reference, base) > 1e-3
    for fmt in ("lorakit", "kohya"):
        out = convert("sd15", example, target_path(tmp_path, fmt, "-out"), fmt, model=model)
        assert max_diff(load_outputs(model, out, fmt), reference) < 1e-5, fmt


def test_formats_are_detected_from_keys(runs, unet_sources):
    from lorakit.formats.read import open_lora

    files, _ = unet_sources
    assert {fmt: open_lora(path).kind for fmt, path in files.items()} == {f: f for f in FORMATS}


def test_mistakes_are_one_line(runs, unet_sources, tmp_path):
    model, weights, _ = runs
    files, _ = unet_sources
    with pytest.raises(LorakitError, match="holds one model's LoRA"):
        convert("sd15", weights["te"], tmp_path / "p" / "adapter_model.safetensors", "peft", model=model)
    with pytest.raises(LorakitError, match="--to webui is not a known format; pick one of: lorakit, kohya"):
        convert("sd15", weights["unet"], tmp_path / "x.safetensors", "webui")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "adapter_config.json").write_text("{}")  # not lorakit's: never written over
    with pytest.raises(LorakitError, match="adapter_config.json exists"):
        convert("sd15", weights["unet"], tmp_path / "q" / "adapter_model.safetensors", "peft", model=model)
    assert (tmp_path / "q" / "adapter_config.json").read_text() == "{}"
    junk = tmp_path / "junk.safetensors"
    from safetensors.torch import save_file

    save_file({"model.weight": torch.zeros(2)}, str(junk))
    with pytest.raises(LorakitError, match="no LoRA format lorakit knows"):
        convert("sd15", junk, tmp_path / "y.safetensors", "kohya", model=model)


# ---- train writes the kohya file itself (--save-format) ------------------------------------


def test_train_writes_both_files_by_default(runs):
    """sd15 has a kohya layout: the diffusers file and OUTPUT/<folder>.safetensors, the latter
    with the ss_* fields A1111/ComfyUI/kohya read, recorded in the manifest, named in the card,
    and equal to what `lorakit convert --to kohya` writes."""
    from test_kohya import a1111_detect_version

    model, weights, _ = runs
    folder = weights["te"].parent
    kohya = folder / f"{folder.name}.safetensors"
    with safe_open(str(kohya), "pt") as f:
        header, keys = f.metadata(), set(f.keys())
    assert a1111_detect_version(header) == "SD1"
    assert header["ss_base_model_version"] == "sd_v1" and header["ss_v2"] == "False"
    assert header["ss_network_module"] == "networks.lora"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "8.0")
    assert header["ss_max_train_steps"] == "2" and header["ss_steps"] == "2" and header["ss_seed"] == "0"
    assert header["ss_output_name"] == folder.name and header["ss_network_train_unet_only"] == "False"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    manifest = json.loads((folder / "lorakit_manifest.json").read_text())["paths"]
    assert kohya.name in manifest and "pytorch_lora_weights.safetensors" in manifest
    assert f"`{kohya.name}`" in (folder / "README.md").read_text()
    converted = convert("sd15", weights["te"], folder.parent / "converted.safetensors", "kohya", model=model)
    a, b = load_file(str(kohya)), load_file(str(converted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_format_kohya_writes_only_the_kohya_file(runs, tmp_path):
    model, _, _ = runs
    out = tmp_path / "only-kohya"
    result = lorakit.train(tiny_config("sd15", model, example_data(), out, max_steps=1, save_format="kohya"))
    assert result.weights == out / "only-kohya.safetensors" and result.weights.is_file()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((out / "lorakit_config.json").read_text())["save_format"] == "kohya"
    from lorakit.formats.read import open_lora

    assert open_lora(out).path == result.weights  # the output folder names its kohya file
    card = (out / "README.md").read_text()
    assert "Weights: `only-kohya.safetensors` (kohya format" in card and "pytorch_lora_weights" not in card.split(
        "## Use it")[1].split("lorakit convert")[0]
    # a finished kohya-only run is finished: --resume latest does not quietly start it again
    with pytest.raises(LorakitError, match="finished or checkpoint-less run"):
        lorakit.train(tiny_config("sd15", model, example_data(), out, max_steps=1, save_format="kohya", resume="latest"))


def test_save_format_mistakes_are_one_line(runs, tmp_path):
    from lorakit.training import Trainer

    model, _, _ = runs
    with pytest.raises(LorakitError, match="--arch kandinsky22 has no kohya layout.*use --save-format diffusers"):
        Trainer(tiny_config("kandinsky22", model, example_data(), tmp_path / "k", save_format="kohya"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "mine.safetensors").write_bytes(b"the user's own file")
    with pytest.raises(LorakitError, match="holds mine.safetensors, which lorakit did not write"):
        Trainer(tiny_config("sd15", model, example_data(), out, max_steps=1)).setup()
    assert (out / "mine.safetensors").read_bytes() == b"the user's own file"
    config = tiny_config("sd15", model, example_data(), out, max_steps=1, save_format="diffusers")
    lorakit.train(config)  # the diffusers file only: the user's file is no obstacle, and stays
    assert (out / "mine.safetensors").read_bytes() == b"the user's own file"


def test_old_attention_processor_file(runs, tmp_path):
    """``save_attn_procs``-era keys (``processor.to_q_lora.down``, no prefix, no alpha): read as
    diffusers reads them."""
    from safetensors.torch import save_file

    model, weights, _ = runs
    state = load_file(str(weights["unet"]))
    old = {}
    for key, tensor in state.items():
        module, _, which = key[len("unet."):].rpartition(".lora_")
        head, _, name = module.rpartition(".")
        if name == "0" and head.endswith(".to_out"):
            head, name = head[: -len(".to_out")], "to_out"
        if name not in ("to_q", "to_k", "to_v", "to_out"):
            continue  # the old format held attention processors only
        old[f"{head}.processor.{name}_lora.{'down' if which.startswith('A') else 'up'}.weight"] = tensor
    path = tmp_path / "pipeline.safetensors"  # diffusers 0.17-0.20 pipelines: `unet.` prefixed
    save_file({f"unet.{k}": t for k, t in old.items()}, str(path))
    reference = load_outputs(model, path, "diffusers-example", text_encoders=())
    assert max_diff(reference, {"unet": load_outputs(model, None, None, text_encoders=())["unet"]}) > 1e-3
    bare = tmp_path / "attn_procs.safetensors"  # unet.save_attn_procs: no prefix (diffusers 0.42 loads none of it)
    save_file(old, str(bare))
    for source in (path, bare):
        ours = convert("sd15", source, tmp_path / f"ours-{source.stem}.safetensors", "lorakit", model=model)
        assert max_diff(load_outputs(model, ours, "lorakit", text_encoders=()), reference) < 1e-5
        with safe_open(str(ours), "pt") as f:
            assert len(list(f.keys())) == len(old)
            assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 4.0  # no alpha: = rank


def test_peft_file_of_a_text_encoder_is_told_by_its_layers(runs, tmp_path):
    """A PEFT folder holds no component name: the base model's layers tell it is the text encoder's."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model

    model, _, base = runs
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    torch.manual_seed(3)
    peft_model = get_peft_model(pipe.text_encoder, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                                              init_lora_weights="gaussian"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    from test_convert import text_output

    reference = text_output(pipe.text_encoder)
    assert (reference - base["text_encoder"]).abs().max() > 1e-3
    peft_model.save_pretrained(str(tmp_path / "te-peft"))
    ours = convert("sd15", tmp_path / "te-peft", tmp_path / "ours.safetensors", "lorakit", model=model)
    with safe_open(str(ours), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"text_encoder"}
    assert (load_outputs(model, ours, "lorakit")["text_encoder"] - reference).abs().max() < 1e-5
