"""A result is either right or not written: no non-finite weight reaches a file, a bad update
is skipped or undone (parameters and optimizer state), and LoRA targets that match nothing
are refused before training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorakit import plugins
from lorakit.cli import app
from lorakit.errors import LorakitError, PluginError
from lorakit.step import MAX_BAD_STEPS
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer
from test_training import _sd15_with


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("trust") / "model")


def invoke(*args):
    """The real CLI in-process. lorakit's log handler holds the stderr of the invocation that
    added it (CliRunner closes it afterwards), so each invocation starts without one."""
    import logging

    logging.getLogger("lorakit").handlers.clear()
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _every_saved_tensor_is_finite(folder):
    files = sorted(folder.rglob("*.safetensors"))
    for f in files:
        for key, t in load_file(str(f)).items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), f"{f}: {key} is not finite"
    return files


def _optimizer_state(path):
    return torch.load(path, weights_only=True)["state"]


def _same_state(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            assert torch.equal(torch.as_tensor(a[i][k]), torch.as_tensor(b[i][k])), (i, k)


@pytest.mark.parametrize("lr", ["1e30", "1e36"])
def test_huge_learning_rate_stops_in_one_line_and_writes_nothing_non_finite(model, tmp_path, lr):
    """Finite but absurd weights after step 1, then a non-finite loss at every step after."""
    out = tmp_path / "out"
    r = invoke("train", "--arch", "sd15", "--model", model, "--data", example_data(), "--output", out,
               "--max-steps", "20", "--resolution", "32", "--num-threads", "1", "--learning-rate", lr,
               "--checkpoint-every", "1")
    line = _one_error_line(r)
    assert f"{MAX_BAD_STEPS} steps in a row" in line and "--learning-rate" in line, line
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert _every_saved_tensor_is_finite(out)  # checkpoints were written, all finite


def test_a_learning_rate_past_float32_is_refused_before_training(model, tmp_path):
    r = invoke("train", "--arch", "sd15", "--model", model, "--data", example_data(), "--output", tmp_path / "o",
               "--max-steps", "2", "--resolution", "32", "--num-threads", "1", "--learning-rate", "1e39")
    assert "beyond float32's range" in _one_error_line(r)
    assert not list((tmp_path / "o").glob("**/*.safetensors"))


def test_an_overflowing_update_is_undone_with_its_optimizer_state(model, tmp_path):
    """Step 3's update makes no weight NaN but takes AdamW's second moment past fp32's range:
    it is undone (weights and moments as after step 2) and the run goes on."""
    calls = {"n": 0}

    class Huge(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1e30

    def compute_loss(own, components, batch, config, generator):
        calls["n"] += 1
        loss = own(components, batch, config, generator)
        return Huge.apply(loss) if calls["n"] == 3 else loss

    plugins.register("sd15-huge", _sd15_with(compute_loss))
    try:
        out = tmp_path / "o"
        trainer = Trainer(tiny_config("sd15-huge", model, example_data(), out, max_steps=4, checkpoint_every=1,
                                      max_grad_norm=0.0)).setup()
        result = trainer.run()
    finally:
        plugins.unregister("sd15-huge")
    two, three = out / "checkpoint-2", out / "checkpoint-3"
    w2, w3 = load_file(str(two / "lora_params.safetensors")), load_file(str(three / "lora_params.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    _same_state(_optimizer_state(two / "optimizer.pt"), _optimizer_state(three / "optimizer.pt"))
    w4 = load_file(str(out / "checkpoint-4" / "lora_params.safetensors"))
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # training went on after the undone step
    _every_saved_tensor_is_finite(out)
    assert result.global_step == 4


def test_nan_gradient_with_a_finite_loss_skips_the_update(model, tmp_path):
    """A compute_loss whose value is finite but whose gradient is NaN (at step 3 only):
    the weights after step 3 equal those after step 2, and training goes on."""
    calls = {"n": 0}

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * torch.full_like(g, float("nan"))

    def compute_loss(own, components, batch, config, generator):
        calls["n"] += 1
        loss = own(components, batch, config, generator)
        return NanGrad.apply(loss) if calls["n"] == 3 else loss

    plugins.register("sd15-nangrad", _sd15_with(compute_loss))
    try:
        out = tmp_path / "o"
        trainer = Trainer(tiny_config("sd15-nangrad", model, example_data(), out, max_steps=4,
                                      checkpoint_every=1)).setup()
        result = trainer.run()
    finally:
        plugins.unregister("sd15-nangrad")
    import math

    assert all(math.isfinite(x) for x in result.losses)
    two, three = out / "checkpoint-2", out / "checkpoint-3"
    w2, w3 = load_file(str(two / "lora_params.safetensors")), load_file(str(three / "lora_params.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    _same_state(_optimizer_state(two / "optimizer.pt"), _optimizer_state(three / "optimizer.pt"))
    _every_saved_tensor_is_finite(out)


def test_nan_gradients_every_step_stop_in_one_line(model, tmp_path):
    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    def compute_loss(own, components, batch, config, generator):
        return NanGrad.apply(own(components, batch, config, generator))

    plugins.register("sd15-nangrad2", _sd15_with(compute_loss))
    try:
        trainer = Trainer(tiny_config("sd15-nangrad2", model, example_data(), tmp_path / "o", max_steps=20)).setup()
        before = {k: v.clone() for k, v in trainer.lora_layers()["unet"][0].items()}
        with pytest.raises(LorakitError, match="gradients were not finite for 5 steps in a row"):
            trainer.run()
        after = trainer.lora_layers()["unet"][0]
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        plugins.unregister("sd15-nangrad2")


def test_a_non_finite_weight_is_never_saved(model, tmp_path):
    out = tmp_path / "o"
    trainer = Trainer(tiny_config("sd15", model, example_data(), out, max_steps=1)).setup()
    with torch.no_grad():
        trainer.params[0].view(-1)[0] = float("inf")
    with pytest.raises(LorakitError, match=r"LoRA weight unet\..* is not finite") as info:
        trainer.save_final()
    assert "\n" not in str(info.value)
    with pytest.raises(LorakitError, match="is not finite"):
        trainer.save_checkpoint()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("targets, wrong", [(["to_q", "to_kk"], "to_kk"), (["to_qq", "to_kk"], "to_qq, to_kk")])
def test_every_target_name_must_match_a_layer(model, tmp_path, targets, wrong):
    with pytest.raises(LorakitError) as info:
        Trainer(tiny_config("sd15", model, example_data(), tmp_path / "o", target_modules=targets)).setup()
    message = str(info.value)
    assert f"--target-modules {wrong} match no layer of 'unet'" in message, message
    assert "to_k" in message.split("such as")[1]  # the close match comes first
    assert not isinstance(info.value, PluginError)


def test_partial_suffixes_do_not_count_as_a_match(model, tmp_path):
    """PEFT matches whole dotted parts: 'o_q' is not a suffix of a layer named 'to_q'."""
    with pytest.raises(LorakitError, match="--target-modules o_q match no layer"):
        Trainer(tiny_config("sd15", model, example_data(), tmp_path / "o", target_modules=["to_q", "o_q"])).setup()


def test_an_arch_whose_default_targets_match_nothing_is_a_plugin_bug(model, tmp_path):
    import dataclasses

    import lorakit_plugins.sd15 as sd15
    class Broken(sd15.SD15):
        info = dataclasses.replace(sd15.SD15.info, default_targets={"unet": ["to_q", "to_qkv"]})

    plugins.register("sd15-badtargets", Broken)
    try:
        with pytest.raises(PluginError) as info:
            Trainer(tiny_config("sd15-badtargets", model, example_data(), tmp_path / "o")).setup()
    finally:
        plugins.unregister("sd15-badtargets")
    message = str(info.value)
    assert "arch plugin 'sd15-badtargets'" in message and "default_targets" in message, message
    assert "name to_qkv, which match no layer" in message, message


def test_a_target_that_is_not_a_layer_type_lora_takes(model, tmp_path):
    """A name that matches a whole block (not a Linear or Conv) is one line, not a traceback."""
    with pytest.raises(LorakitError, match="--target-modules attn1 names Attention blocks of 'unet', not layers"):
        Trainer(tiny_config("sd15", model, example_data(), tmp_path / "o", target_modules=["attn1"])).setup()
