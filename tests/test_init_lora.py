"""``--init-lora``: a run continues someone else's LoRA (here a kohya file without lorakit's
header, as A1111/kohya users share them): its layers, rank and alpha come from the file, the
weights at step 0 are the file's exactly, training goes on from there, and a resume is exact."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import LorakitError
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A trained SD1.5 LoRA (UNet + text encoder, alpha 8 != rank 4) and the kohya file train
    wrote beside it, stripped of lorakit's header (a file from another tool)."""
    from lorakit.formats.kohya import KOHYA_METADATA_KEY
    from lorakit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("init-lora")
    model = make_tiny_model("sd15", root / "model")
    config = tiny_config("sd15", model, example_data(), root / "theirs", alpha=8, train_text_encoder=True,
                         target_modules=TARGETS, max_steps=2, learning_rate=1e-2)
    weights = lorakit.train(config).weights
    with safe_open(str(root / "theirs" / "theirs.safetensors"), "pt") as f:
        header = {k: v for k, v in (f.metadata() or {}).items() if k != KOHYA_METADATA_KEY}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kohya = root / "someone-elses.safetensors"
    save_file(tensors, str(kohya), metadata=header)
    return model, weights, kohya


def init_config(model, output, init, **overrides):
    settings = dict(init_lora=str(init), max_steps=2, learning_rate=1e-2)
    settings.update(overrides)
    return tiny_config("sd15", model, example_data(), output, **settings)


def test_step_zero_is_the_file_and_training_goes_on(shared, tmp_path):
    from test_convert import unet_output

    model, weights, kohya = shared
    trainer = Trainer(init_config(model, tmp_path / "out", kohya)).setup()
    config = trainer.config
    assert (config.rank, config.alpha, config.train_text_encoder) == (4, 8.0, True)  # from the file
    assert set(trainer.lora_configs) == {"unet", "text_encoder"}
    start = {f"{c}.{k}": t for c, (state, _) in trainer.lora_layers().items() for k, t in state.items()}
    original = load_file(str(weights))
    assert start.keys() == original.keys() and all(torch.equal(start[k], original[k]) for k in original)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
    assert (unet_output(trainer.components["unet"]) - unet_output(pipe.unet)).abs().max() < 1e-5

    result = trainer.run()
    assert result.global_step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    after = load_file(str(result.weights))
    assert after.keys() == original.keys()
    assert any(not torch.equal(after[k], original[k]) for k in original), "training did not move the LoRA"
    assert trainer.config.init_lora_sha256 and len(trainer.config.init_lora_sha256) == 64


def test_resume_of_an_init_lora_run_is_exact(shared, tmp_path):
    model, _, kohya = shared
    straight = lorakit.train(init_config(model, tmp_path / "straight", kohya, max_steps=4))
    out = tmp_path / "resumed"
    # a run stopped after checkpoint-2 (2 steps, same settings), then continued to 4
    half = lorakit.train(init_config(model, out, kohya, max_steps=2, checkpoint_every=2))
    assert (out / "checkpoint-2").is_dir() and half.global_step == 2
    resumed = lorakit.train(init_config(model, out, kohya, max_steps=4, checkpoint_every=2,
                                        resume=str(out / "checkpoint-2"), overwrite=True))
    assert resumed.losses == straight.losses[2:]
    a, b = load_file(str(straight.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_file_under_the_same_name(shared, tmp_path):
    model, _, kohya = shared
    init = tmp_path / "init.safetensors"
    init.write_bytes(kohya.read_bytes())
    out = tmp_path / "out"
    lorakit.train(init_config(model, out, init, max_steps=2, checkpoint_every=2))
    state = load_file(str(init))
    name = next(k for k in state if k.endswith(".lora_up.weight"))
    state[name] = state[name] * 2
    save_file(state, str(init))
    with pytest.raises(LorakitError, match="init_lora_sha256"):
        Trainer(init_config(model, out, init, max_steps=4, resume=str(out / "checkpoint-2"), overwrite=True)).setup()


def test_conflicting_options_are_one_line(shared, tmp_path):
    model, weights, kohya = shared
    with pytest.raises(LorakitError, match=r"--rank 8 conflicts with --init-lora .* \(rank 4\); drop --rank"):
        Trainer(init_config(model, tmp_path / "a", kohya, rank=8)).setup()
    with pytest.raises(LorakitError, match="--alpha 2 conflicts with --init-lora"):
        Trainer(init_config(model, tmp_path / "b", kohya, alpha=2)).setup()
    with pytest.raises(LorakitError, match="--target-modules to_q names other layers than --init-lora"):
        Trainer(init_config(model, tmp_path / "c", kohya, target_modules=["to_q"])).setup()
    Trainer(init_config(model, tmp_path / "d", weights, target_modules=TARGETS)).setup()  # the same layers: fine
