"""The model card: front matter the Hub reads, facts of the run, loading code that works."""

from __future__ import annotations

import yaml

from lorakit.card import model_card
from lorakit.config import TrainConfig, validate
from lorakit.plugins import arch_info


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_names_a_hub_base_model_and_tags_and_shows_loading_code():
    config = validate(TrainConfig(arch="sd15", model="stable-diffusion-v1-5/stable-diffusion-v1-5", data="d",
                                  output="o", rank=8, alpha=16))
    text = model_card(config, arch_info("sd15"), steps=500)
    front = _front_matter(text)
    assert front["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert front["library_name"] == "diffusers" and {"lora", "text-to-image", "sd15"} <= set(front["tags"])
    assert "rank 8, alpha 16" in text and "steps: 500" in text
    assert 'StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")' in text
    assert 'weight_name="pytorch_lora_weights.safetensors"' in text


def test_a_local_model_is_not_claimed_as_a_hub_base_model(tmp_path):
    config = validate(TrainConfig(arch="sd15", model=str(tmp_path), data="d", output="o"))
    front = _front_matter(model_card(config, arch_info("sd15"), steps=4))
    assert "base_model" not in front


def test_an_arch_whose_pipeline_cannot_load_loras_gets_no_diffusers_snippet():
    config = validate(TrainConfig(arch="kandinsky22", model="kandinsky-community/kandinsky-2-2-decoder",
                                  data="d", output="o"))
    text = model_card(config, arch_info("kandinsky22"), steps=4)
    assert "load_lora_weights" not in text and "lorakit generate --arch kandinsky22" in text


# ---------------------------------------------------------------------------- a quick-start run's card


import json  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from lorakit import losscurve  # noqa: E402
from lorakit.testing import example_data, tiny_config  # noqa: E402
from lorakit.training import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    folder = make_tiny_model("sd15", tmp_path_factory.mktemp("card") / "model")
    (folder / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [tiny]\n---\n# a tiny model\n")
    return folder


def _run(model, out, **overrides):
    values = dict(report_to="none", validation_prompt=["a red circle, on white", "a blue square"],
                  validation_steps=1, max_steps=4)
    values.update(overrides)
    return Trainer(tiny_config("sd15", model, example_data(), out, **values)).setup().run()


def test_a_quick_start_runs_card_has_front_matter_a_loss_curve_and_samples(model, tmp_path):
    out = tmp_path / "o"
    result = _run(model, out)
    text = (out / "README.md").read_text()
    front = _front_matter(text)
    assert front["library_name"] == "diffusers" and front["license"] == "creativeml-openrail-m"  # the base's card
    assert {"lora", "text-to-image", "sd15", "lorakit"} <= set(front["tags"])
    assert front["widget"] == [
        {"text": "a red circle, on white", "output": {"url": "samples/step-000004-0.png"}},
        {"text": "a blue square", "output": {"url": "samples/step-000004-1.png"}},
    ]
    assert all((out / w["output"]["url"]).is_file() for w in front["widget"])
    # the loss curve: a PNG written from the run's losses, shown in the card
    assert "![training loss per step](loss_curve.png)" in text
    with Image.open(out / "loss_curve.png") as curve:
        assert curve.format == "PNG" and curve.size == (720, 400)
        assert len(curve.convert("RGB").getcolors(1 << 20)) > 3  # axes, two curves: not a blank picture
    assert json.loads((out / losscurve.HISTORY).read_text())["losses"] == result.losses
    assert "![samples after step 4](samples/step-000004-grid.png)" in text
    # copy-paste loading: diffusers, and the kohya file A1111 / ComfyUI read (when the run wrote one)
    assert 'pipe.load_lora_weights("path/to/this/folder", weight_name="pytorch_lora_weights.safetensors")' in text
    assert (out / "o.safetensors").is_file()  # --save-format's default for sd15: both files
    assert "copy `o.safetensors` into `models/Lora` and add `<lora:o:0.8>`" in text
    assert "`o.safetensors` into `models/loras`" in text
    manifest = json.loads((out / "lorakit_manifest.json").read_text())["paths"]
    assert {"loss_curve.png", losscurve.HISTORY} <= set(manifest)


def test_license_flag_wins_over_the_base_models(model, tmp_path):
    config = validate(TrainConfig(arch="sd15", model=str(model), data="d", output="o", license="mit"))
    assert _front_matter(model_card(config, arch_info("sd15"), steps=1))["license"] == "mit"
    config = validate(TrainConfig(arch="sd15", model=str(tmp_path), data="d", output="o"))  # no card there
    assert "license" not in _front_matter(model_card(config, arch_info("sd15"), steps=1))


def test_a_resumed_runs_curve_starts_at_step_1(model, tmp_path):
    straight = _run(model, tmp_path / "a", validation_prompt=None)
    _run(model, tmp_path / "b", validation_prompt=None, max_steps=2, checkpoint_every=2)
    resumed = _run(model, tmp_path / "b", validation_prompt=None, resume="latest")
    assert resumed.losses == straight.losses[2:]
    assert json.loads((tmp_path / "b" / losscurve.HISTORY).read_text())["losses"] == straight.losses


def test_dreambooth_puts_its_instance_prompt_in_the_front_matter(model, tmp_path):
    from lorakit.plugins import get_plugin_manager
    from tests.test_dreambooth import INSTANCE_PROMPT, _db_config, _instance_folder

    config = validate(_db_config(model, tmp_path / "o", _instance_folder(tmp_path)))
    text = model_card(config, arch_info("sd15"), steps=3, pm=get_plugin_manager("sd15", ["dreambooth"]))
    front = _front_matter(text)
    assert front["instance_prompt"] == INSTANCE_PROMPT and "dreambooth" in front["tags"] and "sd15" in front["tags"]
    assert f"instance prompt `{INSTANCE_PROMPT}`" in text
    plain = model_card(config, arch_info("sd15"), steps=3, pm=get_plugin_manager("sd15"))
    assert "instance_prompt" not in _front_matter(plain)


def test_the_curve_has_gaps_where_no_loss_was_saved(tmp_path):
    losses = losscurve.history(tmp_path, 5, [0.3, 0.2])  # resumed at 3, nothing saved before
    assert losses == [None, None, None, 0.3, 0.2]
    assert losscurve.draw([None, None]) is None and losscurve.draw(losses).size == (720, 400)
