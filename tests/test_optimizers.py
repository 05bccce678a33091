"""--optimizer, --scale-lr and --allow-tf32: the optimizer a run builds, its exact resume, and one
line (before the model loads) for a missing package, an unsupported device or a changed choice."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit import optimizers
from lorakit.errors import LorakitError
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("optimizers") / "model")


def config(model, output, **overrides):
    values = dict(report_to="none", random_flip=True)
    values.update(overrides)
    return tiny_config("sd15", model, example_data(), output, **values)


def _weights(result):
    return load_file(str(result.output_dir / "pytorch_lora_weights.safetensors"))


def _resume_is_exact(model, tmp_path, **settings):
    first = Trainer(config(model, tmp_path / "a", max_steps=4, **settings)).setup()
    straight = first.run()
    Trainer(config(model, tmp_path / "b", max_steps=2, checkpoint_every=2, **settings)).setup().run()
    trainer = Trainer(config(model, tmp_path / "b", max_steps=4, resume="latest", **settings)).setup()
    resumed = trainer.run()
    a, b = _weights(straight), _weights(resumed)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == straight.losses[2:]
    ups = [t for k, t in a.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(bool(t.abs().sum() > 0) for t in ups)  # it trained (B starts at zero)
    return first, trainer


def test_the_default_is_torch_adamw(model, tmp_path):
    trainer = Trainer(config(model, tmp_path / "o", max_steps=1)).setup()
    assert type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)) is torch.optim.AdamW
    trainer.guard.close()


def test_adafactor_trains_and_resumes_exactly(model, tmp_path):
    _, trainer = _resume_is_exact(model, tmp_path, optimizer="adafactor")
    from transformers.optimization import Adafactor

    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), Adafactor)


def test_prodigy_trains_and_resumes_exactly_with_its_step_size_estimate(model, tmp_path):
    pytest.importorskip("prodigyopt")
    straight, resumed = _resume_is_exact(model, tmp_path, optimizer="prodigy", learning_rate=1.0)
    # Prodigy's own state (its step-size estimate lives in the parameter groups) went through the checkpoint
    a, b = (getattr(t.optimizer, "optimizer", t.optimizer).param_groups[0] for t in (straight, resumed))
    assert a["k"] == b["k"] == 4
    assert (a["d"], a["d_numerator"], a["d_max"]) == (b["d"], b["d_numerator"], b["d_max"]) and a["d_numerator"] != 0


def test_a_resume_with_another_optimizer_is_refused(model, tmp_path):
    Trainer(config(model, tmp_path / "o", max_steps=1, checkpoint_every=1)).setup().run()
    with pytest.raises(LorakitError, match="different run .*optimizer: checkpoint 'adamw' vs now 'adafactor'"):
        Trainer(config(model, tmp_path / "o", max_steps=2, resume="latest", optimizer="adafactor")).setup()


def test_a_missing_package_is_one_line_before_the_model_loads(model, tmp_path, monkeypatch):
    monkeypatch.setattr(optimizers, "find_spec", lambda name: None)
    with pytest.raises(LorakitError, match=r"--optimizer prodigy needs the prodigyopt package; pip install lorakit\[prodigy\]"):
        Trainer(config(model, tmp_path / "o", optimizer="prodigy"))


def test_adamw8bit_on_cpu_is_one_line_before_the_model_loads(model, tmp_path, monkeypatch):
    monkeypatch.setattr(optimizers, "find_spec", lambda name: object())  # as if bitsandbytes were installed
    trainer = Trainer(config(model, tmp_path / "o", optimizer="adamw8bit"))
    with pytest.raises(LorakitError, match="--optimizer adamw8bit .bitsandbytes. needs a CUDA GPU") as caught:
        trainer.setup()
    assert "\n" not in str(caught.value) and not hasattr(trainer, "components")


def test_scale_lr_multiplies_by_accumulation_batch_and_processes(model, tmp_path):
    trainer = Trainer(config(model, tmp_path / "o", max_steps=1, batch_size=2, gradient_accumulation=3,
                             learning_rate=1e-4, text_encoder_lr=2e-5, train_text_encoder=True, scale_lr=True)).setup()
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"unet": pytest.approx(6e-4), "text_encoder": pytest.approx(1.2e-4)}
    trainer.run()
    saved = json.loads((tmp_path / "o" / "lorakit_config.json").read_text())
    assert saved["learning_rate"] == 1e-4 and saved["scale_lr"] is True  # the rates as given
    plain = Trainer(config(model, tmp_path / "p", max_steps=1, batch_size=2, gradient_accumulation=3)).setup()
    assert {g["lr"] for g in plain.optimizer.param_groups} == {1e-3}
    plain.guard.close()


def test_allow_tf32_sets_torchs_switch(model, tmp_path):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        trainer = Trainer(config(model, tmp_path / "o", max_steps=1, allow_tf32=True)).setup()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        trainer.guard.close()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------- the rest of the guide's options


def test_max_train_samples_takes_the_first_examples_in_the_datas_order(model, tmp_path):
    full = Trainer(config(model, tmp_path / "a", max_steps=None, epochs=1, batch_size=4)).setup()
    some = Trainer(config(model, tmp_path / "b", max_steps=None, epochs=2, batch_size=4, max_train_samples=4)).setup()
    keys = lambda t: [s.key for e in t.dataset.examples for s in e]  # noqa: E731
    assert len(full.dataset) == 12 and keys(some) == keys(full)[:4]
    assert full.config.max_steps == 3 and some.config.max_steps == 2  # one batch of 4 an epoch
    for t in (full, some):
        t.guard.close()


def test_dataloader_workers_is_the_scripts_name_for_num_workers(tmp_path, model):
    from typer.testing import CliRunner

    from lorakit.cli import app

    result = CliRunner().invoke(app, ["train", "--arch", "sd15", "--model", str(model), "--data", str(example_data()),
                                      "--output", str(tmp_path / "o"), "--dataloader-workers", "2", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "num_workers: 2" in result.stdout.splitlines()


def test_an_undone_update_also_restores_the_optimizers_group_state():
    """A bad update is undone whole: besides the weights and per-parameter state, the entries an
    optimizer keeps per parameter group (Prodigy's step-size estimate d, its counters)."""
    import torch

    from lorakit.step import UpdateUndo

    class GroupState(torch.optim.SGD):  # like Prodigy: an estimate kept in the group
        def step(self, closure=None):
            for group in self.param_groups:
                group["d"] = group["d"] * 2.0
                group["k"] += 1
            return super().step(closure)

    weight = torch.nn.Parameter(torch.ones(3))
    opt = GroupState([{"params": [weight], "d": 1e-6, "k": 0}], lr=0.1, momentum=0.9)
    undo = UpdateUndo([weight], opt)
    for _ in range(2):  # a good step first: state exists, buffers are reused on the next save
        undo.save()
        weight.grad = torch.ones(3)
        opt.step()
    before = (weight.detach().clone(), dict((k, v) for k, v in opt.param_groups[0].items() if k != "params"),
              opt.state[weight]["momentum_buffer"].clone())
    undo.save()
    weight.grad = torch.full((3,), float("nan"))
    opt.step()
    undo.restore()
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    assert torch.equal(weight.detach(), before[0]) and group == before[1]
    assert torch.equal(opt.state[weight]["momentum_buffer"], before[2])
    assert opt.param_groups[0]["params"] == [weight]
