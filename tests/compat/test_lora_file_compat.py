"""What lorakit's diffusers-format file holds so that older stacks load it (see check_old_stack.sh,
which loads it in diffusers 0.39 / transformers 4.57 / peft 0.17): the exact adapter-metadata
field set, and CLIP text-encoder keys in the checkpoints' ``text_model.`` layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lorakit.lora import adapter_metadata, make_lora_config
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

#: Fields peft 0.17's LoraConfig knows; lorakit's metadata must stay inside them for default runs.
PEFT_017_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "eva_config",
    "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layer_replication",
    "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout",
    "megatron_config", "megatron_core", "modules_to_save", "peft_type", "qalora_group_size", "r",
    "rank_pattern", "revision", "runtime_config", "target_modules", "target_parameters", "task_type",
    "trainable_token_indices", "use_dora", "use_qalora", "use_rslora",
}
DEFAULT_FIELDS = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "init_lora_weights"}


def _meta(tmp_path, **overrides):
    config = tiny_config("sd15", tmp_path, None, tmp_path / "o", **overrides)
    return adapter_metadata(make_lora_config(config, ["to_q", "to_v"]))


def test_default_run_writes_only_what_shapes_the_adapter(tmp_path):
    meta = _meta(tmp_path)
    assert set(meta) == DEFAULT_FIELDS
    assert meta == {"r": 4, "lora_alpha": 4.0, "target_modules": ["to_q", "to_v"], "rank_pattern": {},
                    "alpha_pattern": {}, "init_lora_weights": "gaussian"}


@pytest.mark.parametrize("overrides, extra", [
    (dict(alpha=8.0), {}),
    (dict(dropout=0.1), {"lora_dropout": 0.1}),
    (dict(init_lora_weights="default"), {}),
])
def test_non_default_settings_are_written(tmp_path, overrides, extra):
    meta = _meta(tmp_path, **overrides)
    fields = (DEFAULT_FIELDS | set(extra)) - ({"init_lora_weights"} if overrides.get("init_lora_weights") else set())
    assert set(meta) == fields and set(meta) <= PEFT_017_FIELDS
    assert all(meta[k] == v for k, v in extra.items())
    if "alpha" in overrides:
        assert meta["lora_alpha"] == 8.0 and meta["r"] == 4


def test_a_reloaded_config_equals_the_trained_one(tmp_path):
    """A field left out takes peft's default again: the LoraConfig diffusers rebuilds is the same."""
    from peft import LoraConfig

    config = tiny_config("sd15", tmp_path, None, tmp_path / "o", alpha=8.0, dropout=0.1)
    trained = make_lora_config(config, ["to_q", "to_v", "proj_in"])
    rebuilt = LoraConfig(**adapter_metadata(trained))
    want, got = trained.to_dict(), rebuilt.to_dict()
    assert {k: v for k, v in got.items() if k != "peft_version"} == {k: v for k, v in want.items() if k != "peft_version"}


def test_file_metadata_and_text_encoder_layout(tmp_path, lorakit_tiny_model):
    model = lorakit_tiny_model("sd15")
    config = tiny_config("sd15", model, example_data(), tmp_path / "out", max_steps=1, alpha=8, dropout=0.1,
                         train_text_encoder=True)
    trainer = Trainer(config).setup()
    result = trainer.run()
    with safe_open(str(result.weights), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    fields = DEFAULT_FIELDS | {"lora_dropout"}
    assert set(meta) == {f"{c}.{k}" for c in ("unet", "text_encoder") for k in fields}
    assert meta["text_encoder.target_modules"] == ["k_proj", "out_proj", "q_proj", "v_proj"]
    te = [k for k in keys if k.startswith("text_encoder.")]
    assert te and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te)
    # lorakit's own stack (transformers 5: no text_model level) still reloads it exactly
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(result.output_dir), weight_name=result.weights.name)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        want = trainer.components["text_encoder"].eval()(ids)[0]
        got = pipe.text_encoder(ids)[0]
    assert (want - got).abs().max().item() < 1e-5
