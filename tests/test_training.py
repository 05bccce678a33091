"""The shared loop's options, checked on the tiny SD1.5 (the loop itself is arch-agnostic)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from safetensors.torch import load_file

from lorakit import plugins
from lorakit.errors import LorakitError
from lorakit.hookspecs import hookimpl
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("loop") / "model")


def _sd15_with(compute_loss):
    """The SD1.5 plugin with its compute_loss replaced (a fault-injecting arch for tests);
    ``compute_loss(own, components, batch, config, generator)`` gets the plugin's own as ``own``."""
    import lorakit_plugins.sd15 as sd15

    if isinstance(getattr(sd15, "SD15", None), type):  # the plugin is a class
        class Variant(sd15.SD15):
            @hookimpl
            def compute_loss(self, components, batch, config, generator):
                own = lambda *args: sd15.SD15.compute_loss(self, *args)  # noqa: E731
                return compute_loss(own, components, batch, config, generator)

        return Variant
    arch = types.ModuleType("sd15_variant")
    for name in dir(sd15):
        obj = getattr(sd15, name)
        if callable(obj) and hasattr(obj, "lorakit_impl"):
            setattr(arch, name, obj)
    arch.compute_loss = hookimpl(lambda components, batch, config, generator: compute_loss(
        sd15.compute_loss, components, batch, config, generator))
    return arch


def weights(result):
    return load_file(str(result.weights))


@pytest.mark.parametrize(
    "options",
    [
        {"gradient_accumulation": 2},
        {"lr_scheduler": "cosine", "lr_warmup_steps": 1},
        {"snr_gamma": 5.0},
        {"noise_offset": 0.1},
        {"prediction_type": "v_prediction"},
        {"center_crop": False, "random_flip": True},
        {"caption_dropout": 0.5},
        {"gradient_checkpointing": True},
        {"mixed_precision": "bf16"},
        {"lora_dropout": 0.1},
        {"init_lora_weights": "default"},
    ],
    ids=lambda o: ",".join(o),
)
def test_option_trains_and_changes_the_adapter(model, tmp_path, options):
    options = dict(options)
    if "lora_dropout" in options:
        options["dropout"] = options.pop("lora_dropout")
    trainer = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "out", max_steps=3, **options)).setup()
    before = {k: v.clone() for k, v in trainer.lora_layers()["unet"][0].items()}
    result = trainer.run()
    after = weights(result)
    assert all(math.isfinite(l) for l in result.losses)
    changed = sum(not torch.equal(before[k], after[f"unet.{k}"]) for k in before)
    assert changed > 0
    for p in trainer.params:  # LoRA weights stay fp32 whatever the precision
        assert p.dtype == torch.float32


def test_mixed_precision_keeps_frozen_weights_low_precision(model, tmp_path):
    trainer = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "o", mixed_precision="bf16")).setup()
    unet = trainer.components["unet"]
    frozen = [p for n, p in unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainer.components["vae"].dtype == torch.float32


def test_fp16_on_cpu_is_refused(model, tmp_path):
    with pytest.raises(LorakitError, match="fp16 needs a GPU"):
        Trainer(tiny_config("sd15", model, example_data(), tmp_path / "o", mixed_precision="fp16")).setup()


def test_cached_and_fresh_encodings_train_the_same(model, tmp_path):
    """Encoders are pure: caching them is an optimisation, not a change of result."""
    a = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "a", max_steps=3, batch_size=2)).setup().run()
    b = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "b", max_steps=3, batch_size=2, cache=False)).setup().run()
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_same_seed_same_result_other_seed_differs(model, tmp_path):
    a = weights(Trainer(tiny_config("sd15", model, example_data(), tmp_path / "a", max_steps=2)).setup().run())
    b = weights(Trainer(tiny_config("sd15", model, example_data(), tmp_path / "b", max_steps=2)).setup().run())
    c = weights(Trainer(tiny_config("sd15", model, example_data(), tmp_path / "c", max_steps=2, seed=1)).setup().run())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_limit_keeps_newest(model, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny_config("sd15", model, example_data(), out, max_steps=5, checkpoint_every=1, checkpoints_limit=2)).setup().run()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert not list(out.glob(".checkpoint-*"))  # no half-written checkpoint left


def test_resume_refuses_a_checkpoint_of_another_setup(model, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny_config("sd15", model, example_data(), out, max_steps=2, checkpoint_every=2)).setup().run()
    with pytest.raises(LorakitError, match="different run .*rank: checkpoint 4 vs now 8"):
        Trainer(tiny_config("sd15", model, example_data(), out, max_steps=4, rank=8, resume="latest")).setup()


def test_text_encoder_lr_is_its_own_group(model, tmp_path):
    trainer = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "o", train_text_encoder=True,
                                  learning_rate=1e-3, text_encoder_lr=5e-5)).setup()
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"unet": 1e-3, "text_encoder": 5e-5}


def test_target_that_matches_nothing_is_explained(model, tmp_path):
    with pytest.raises(LorakitError, match="match no layer of 'unet'; pick names such as"):
        Trainer(tiny_config("sd15", model, example_data(), tmp_path / "o", target_modules=["to_qq"])).setup()


def test_non_finite_loss_stops_with_a_clear_message(model, tmp_path):
    """A loss that goes NaN never updates the weights and stops the run after a few steps."""
    def compute_loss(own, components, batch, config, generator):
        return own(components, batch, config, generator) * float("nan")

    plugins.register("sd15-nan", _sd15_with(compute_loss))
    try:
        trainer = Trainer(tiny_config("sd15-nan", model, example_data(), tmp_path / "o", max_steps=20)).setup()
        before = {k: v.clone() for k, v in trainer.lora_layers()["unet"][0].items()}
        with pytest.raises(LorakitError, match="loss was not finite for 5 steps"):
            trainer.run()
        after = trainer.lora_layers()["unet"][0]
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        plugins.unregister("sd15-nan")


def test_validation_samples_are_written(model, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny_config("sd15", model, example_data(), out, max_steps=2, validation_prompt="a red circle",
                        validation_every=2)).setup().run()
    from PIL import Image

    sample = out / "samples" / "step-000002-0.png"
    assert Image.open(sample).size == (32, 32)


def test_validation_samples_under_bf16(model, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny_config("sd15", model, example_data(), out, max_steps=1, mixed_precision="bf16",
                        validation_prompt="a red circle", validation_every=1)).setup().run()
    assert (out / "samples" / "step-000001-0.png").is_file()


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(model, tmp_path):
    """Interrupted in the middle of an accumulation step, the run keeps its finished steps,
    and resuming gives the same adapter as never stopping."""
    calls = {"n": 0}

    def compute_loss(own, components, batch, config, generator):
        calls["n"] += 1
        if calls["n"] == 8:  # step 4's second micro-batch
            raise KeyboardInterrupt
        return own(components, batch, config, generator)

    plugins.register("sd15-flaky", _sd15_with(compute_loss))
    try:
        settings = dict(max_steps=6, gradient_accumulation=2, random_flip=True, dropout=0.1)
        straight = Trainer(tiny_config("sd15-flaky", model, example_data(), tmp_path / "a", **settings))
        calls["n"] = -1000
        straight = straight.setup().run()

        calls["n"] = 0
        out = tmp_path / "b"
        with pytest.raises(KeyboardInterrupt):
            Trainer(tiny_config("sd15-flaky", model, example_data(), out, **settings)).setup().run()
        assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
        calls["n"] = -1000
        resumed = Trainer(tiny_config("sd15-flaky", model, example_data(), out, **settings, resume="latest")).setup().run()
    finally:
        plugins.unregister("sd15-flaky")
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_while_writing_samples_resumes_exactly(model, tmp_path, monkeypatch):
    """Interrupted after a step finished (here: while writing sample images), the saved
    checkpoint holds the RNG state of the end of that step, as a regular checkpoint does."""
    interrupt_at = {"step": None}

    def save_samples(self):
        if self.global_step == interrupt_at["step"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_samples", save_samples)
    settings = dict(max_steps=5, random_flip=True, validation_prompt="a red circle", validation_every=1)
    straight = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "a", **settings)).setup().run()

    out = tmp_path / "b"
    interrupt_at["step"] = 3
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config("sd15", model, example_data(), out, **settings)).setup().run()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    interrupt_at["step"] = None
    resumed = Trainer(tiny_config("sd15", model, example_data(), out, **settings, resume="latest")).setup().run()
    assert resumed.losses == straight.losses[3:]
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_an_older_checkpoint_never_loses_newer_ones_silently(model, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny_config("sd15", model, example_data(), out, max_steps=4, checkpoint_every=2)).setup().run()
    with pytest.raises(LorakitError, match="holds checkpoint-4, newer than --resume checkpoint-2"):
        Trainer(tiny_config("sd15", model, example_data(), out, max_steps=4, resume=str(out / "checkpoint-2"))).setup()
    assert (out / "checkpoint-4").is_dir()
    Trainer(tiny_config("sd15", model, example_data(), out, max_steps=6, checkpoint_every=2, checkpoints_limit=1,
                        resume=str(out / "checkpoint-2"), overwrite=True)).setup().run()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
