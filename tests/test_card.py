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
