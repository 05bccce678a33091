"""No run lost, nothing silently wrong, no user file touched: what a user whose job is
preempted, whose disk fills, or who shares a folder sees.

One tiny SD1.5 run (6 steps, a checkpoint every 3) is trained once per module; each test
works on a copy of its output folder.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import fsutil
from lorakit.errors import LorakitError
from lorakit.step import Stepper
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

WEIGHTS = "pytorch_lora_weights.safetensors"
SETTINGS = dict(max_steps=6, checkpoint_every=3, random_flip=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("trust") / "model")


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """The uninterrupted run: its folder (checkpoint-3, checkpoint-6, final file) and weights."""
    out = tmp_path_factory.mktemp("trained") / "out"
    result = Trainer(tiny_config("sd15", model, example_data(), out, **SETTINGS)).setup().run()
    return out, load_file(str(result.weights))


def config(model, out, **overrides):
    return tiny_config("sd15", model, example_data(), out, **{**SETTINGS, **overrides})


def same(weights: dict, path: Path) -> bool:
    other = load_file(str(path))
    return weights.keys() == other.keys() and all(torch.equal(weights[k], other[k]) for k in weights)


def copy_run(trained, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    (out / WEIGHTS).unlink()  # as if killed before the end: only checkpoints to go on
    return out


# ---------------------------------------------------------------------------- before checkpoint-1
def test_resume_latest_before_the_first_checkpoint_starts_from_step_0(model, trained, tmp_path, caplog):
    out = tmp_path / "out"
    first = Trainer(config(model, out)).setup()  # killed after setup: the run config, no checkpoint
    first.guard.close()
    assert (out / "lorakit_config.json").is_file() and not list(out.glob("checkpoint-*"))
    with caplog.at_level(logging.INFO, logger="lorakit"):
        result = Trainer(config(model, out, resume="latest")).setup().run()
    notes = [r.getMessage() for r in caplog.records if "starting from step 0" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert same(trained[1], result.weights)

    again = tmp_path / "again"
    Trainer(config(model, again)).setup().guard.close()
    assert same(trained[1], Trainer(config(model, again, resume="latest", overwrite=True)).setup().run().weights)


def test_resume_latest_before_the_first_checkpoint_refuses_other_settings(model, tmp_path):
    out = tmp_path / "out"
    Trainer(config(model, out)).setup().guard.close()
    with pytest.raises(LorakitError) as refused:
        Trainer(config(model, out, resume="latest", rank=8, seed=3)).setup()
    message = str(refused.value)
    assert "rank: saved 4 vs now 8" in message and "seed: saved 0 vs now 3" in message and "\n" not in message


# ---------------------------------------------------------------------------- SIGTERM
def _signal_at(monkeypatch, sig, when):
    """Send ``sig`` to this process from inside the loop: ``when(stepper)`` True at the moment."""
    original = Stepper._update

    def update(self, apply):
        if when(self, "update"):
            os.kill(os.getpid(), sig)  # arrives while the weights are being updated
        return original(self, apply)

    monkeypatch.setattr(Stepper, "_update", update)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_during_an_update_finishes_the_step_and_saves_it(model, trained, tmp_path, monkeypatch, sig, code):
    before = signal.getsignal(sig)
    _signal_at(monkeypatch, sig, lambda stepper, where: stepper.state.global_step == 3)  # step 4's update
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as stopped:
        Trainer(config(model, out)).setup().run()
    assert stopped.value.exit_code == code and "saved checkpoint-4" in stopped.value.lorakit_note
    assert signal.getsignal(sig) is before  # the run's handler is gone
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not (out / ".lorakit.lock").exists()
    monkeypatch.undo()
    result = Trainer(config(model, out, resume="latest")).setup().run()
    assert result.losses and same(trained[1], result.weights)


def test_sigterm_between_updates_rolls_the_step_back(model, trained, tmp_path, monkeypatch):
    """Mid-step (here: as step 5's loss is computed) the step is rolled back, steps 1-4 saved."""
    calls = {"n": 0}
    original = Stepper.loss_on

    def loss_on(self, batch, generator, rows=None):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, generator, rows)

    monkeypatch.setattr(Stepper, "loss_on", loss_on)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as stopped:
        Trainer(config(model, out)).setup().run()
    assert stopped.value.exit_code == 143
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    monkeypatch.undo()
    assert same(trained[1], Trainer(config(model, out, resume="latest")).setup().run().weights)


# ---------------------------------------------------------------------------- damaged checkpoints
FILES = ["lora_params.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.safetensors",
         "training_state.json", WEIGHTS]


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":
        path.write_bytes(bytes(len(data)))
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "deleted":
        path.unlink()
    elif how == "flipped":  # a few bytes inside the tensors (or the text), same size
        middle = len(data) * 3 // 4
        path.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 8]) + data[middle + 8:])


@pytest.mark.parametrize("how", ["truncated", "zeroed", "emptied", "deleted", "flipped"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact(model, trained, tmp_path, caplog, name, how):
    out = copy_run(trained, tmp_path)
    damage(out / "checkpoint-6" / name, how)
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        trainer = Trainer(config(model, out, resume="latest")).setup()
        assert trainer.global_step == 3
        result = trainer.run()
    warned = [r.getMessage() for r in caplog.records if "checkpoint-6 is damaged" in r.getMessage()]
    assert len(warned) == 1 and name in warned[0], caplog.text
    assert same(trained[1], result.weights)  # never wrong weights


def test_no_intact_checkpoint_is_refused_in_one_line(model, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    damage(out / "checkpoint-6" / "optimizer.pt", "truncated")
    damage(out / "checkpoint-3" / "lora_params.safetensors", "flipped")
    with pytest.raises(LorakitError) as refused:
        Trainer(config(model, out, resume="latest")).setup()
    message = str(refused.value)
    assert "no intact checkpoint" in message and "optimizer.pt is truncated" in message and "\n" not in message
    assert "lora_params.safetensors does not match its checksum" in message
    with pytest.raises(LorakitError, match=r"--resume .*checkpoint-3 is damaged \(lora_params"):
        Trainer(config(model, out, resume=str(out / "checkpoint-3"), overwrite=True)).setup()


def _unseal(checkpoint: Path) -> None:
    """Make ``checkpoint`` look as one written before checksums existed."""
    (checkpoint / "lorakit_checksums.json").unlink()
    state = json.loads((checkpoint / "training_state.json").read_text())
    del state["checksums"]
    (checkpoint / "training_state.json").write_text(json.dumps(state))


def test_a_checkpoint_from_before_checksums_resumes_and_is_checked_as_far_as_possible(model, trained, tmp_path, caplog):
    out = copy_run(trained, tmp_path)
    for c in out.glob("checkpoint-*"):
        _unseal(c)
    trainer = Trainer(config(model, out, resume="latest")).setup()
    assert trainer.global_step == 6
    assert same(trained[1], trainer.run().weights)

    out = copy_run(trained, tmp_path / "b")
    for c in out.glob("checkpoint-*"):
        _unseal(c)
    damage(out / "checkpoint-6" / "optimizer.pt", "truncated")
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        trainer = Trainer(config(model, out, resume="latest")).setup()
    assert trainer.global_step == 3 and "checkpoint-6 is damaged (it does not load" in caplog.text
    # the sealed kind says it was sealed: its checksums file cannot just go missing
    out = copy_run(trained, tmp_path / "c")
    (out / "checkpoint-6" / "lorakit_checksums.json").unlink()
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        assert Trainer(config(model, out, resume="latest")).setup().global_step == 3
    assert "lorakit_checksums.json is missing" in caplog.text


# ---------------------------------------------------------------------------- a full disk
def test_disk_full_while_writing_a_checkpoint(model, trained, tmp_path, monkeypatch):
    real = fsutil.write_bytes

    def write_bytes(path, data):
        if ".checkpoint-6.tmp" in str(path) and Path(path).name == "optimizer.pt":
            real(path, data[: len(data) // 3])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(fsutil, "write_bytes", write_bytes)
    out = tmp_path / "out"
    with pytest.raises(LorakitError) as full:
        Trainer(config(model, out)).setup().run()
    message = str(full.value)
    assert "\n" not in message and "disk full writing checkpoint-6" in message and "needs about" in message
    assert "--resume latest (continues from checkpoint-3" in message
    assert not list(out.glob(".checkpoint-*")) and not (out / "checkpoint-6").exists()
    from lorakit.checkpoints import damage as checkpoint_damage

    assert checkpoint_damage(out / "checkpoint-3") is None  # the earlier checkpoint is intact
    monkeypatch.undo()
    assert same(trained[1], Trainer(config(model, out, resume="latest")).setup().run().weights)


def test_disk_full_while_writing_the_final_file_publishes_nothing(model, trained, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if ".lorakit-final" in str(filename):
            Path(filename).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "out"
    with pytest.raises(LorakitError) as full:
        Trainer(config(model, out)).setup().run()
    assert "\n" not in str(full.value) and "disk full writing the final LoRA" in str(full.value)
    assert not (out / WEIGHTS).exists() and not list(out.glob(".*lorakit-tmp"))
    monkeypatch.undo()
    (out / ".checkpoint-9.tmp").mkdir()  # a stray from a kill during a save
    (out / ".checkpoint-9.tmp" / "optimizer.pt").write_bytes(b"x")
    result = Trainer(config(model, out, resume="latest", checkpoint_every=None)).setup().run()
    assert not (out / ".checkpoint-9.tmp").exists() and same(trained[1], result.weights)


# ---------------------------------------------------------------------------- one run per folder
def test_two_runs_on_one_output_never_both_proceed(model, trained, tmp_path, monkeypatch):
    out = tmp_path / "out"
    running, tried = threading.Event(), threading.Event()
    original = Stepper.step

    def step(self, stream):
        if self.state.global_step == 2:
            running.set()
            tried.wait(60)
        return original(self, stream)

    monkeypatch.setattr(Stepper, "step", step)
    results = {}
    first = threading.Thread(target=lambda: results.update(a=Trainer(config(model, out)).setup().run()))
    first.start()
    assert running.wait(120)
    try:
        with pytest.raises(LorakitError) as refused:
            Trainer(config(model, out, seed=1, overwrite=True)).setup()
    finally:
        tried.set()
        first.join(120)
    message = str(refused.value)
    assert f"in use by another lorakit run (pid {os.getpid()} on {socket.gethostname()}, since" in message
    assert "\n" not in message
    assert same(trained[1], results["a"].weights)  # the first run was not disturbed
    assert json.loads((out / "lorakit_config.json").read_text())["seed"] == 0


def test_a_lock_left_by_a_dead_process_is_taken_over(model, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    code = ("import os, sys; from lorakit.locking import OutputLock; lock = OutputLock.acquire(sys.argv[1]); "
            "print(os.getpid(), flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
    dead = int(proc.stdout.split()[0])
    assert json.loads((out / ".lorakit.lock").read_text())["pid"] == dead
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        Trainer(config(model, out, max_steps=1)).setup().run()
    assert f"took over the lock left by pid {dead}" in caplog.text and "that process has ended" in caplog.text
    assert not (out / ".lorakit.lock").exists()


# ---------------------------------------------------------------------------- --overwrite
def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_overwrite_removes_only_what_lorakit_wrote(model, tmp_path):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "holiday.png").write_bytes(b"\x89PNG not really")
    (out / "samples" / "notes.txt").write_text("my notes\n")
    (out / "samples" / "step-000003-0.png").write_bytes(b"my own picture with lorakit's name")
    (out / "README.md").write_text("# My LoRAs\n\nThese were trained with lorakit, see its docs.\n")
    users = _files(out)
    # (no tracker: it logs every samples/step-*.png by name, the user's one included)
    samples = dict(validation_prompt="a red circle", validation_every=3, report_to="none")
    Trainer(config(model, out, **samples)).setup().run()
    assert _files(out).items() >= users.items()  # nothing of the user's written over
    assert (out / "samples" / "step-000006-0.png").is_file() and (out / "lorakit_model_card.md").is_file()

    written = set(_files(out)) - set(users)
    Trainer(config(model, out, seed=1, overwrite=True, checkpoint_every=4, max_steps=4, report_to="none")).setup().run()
    after = _files(out)
    assert {k: after.get(k) for k in users} == users  # every file lorakit did not write: byte-identical
    assert not (out / "checkpoint-3").exists() and not (out / "samples" / "step-000006-0.png").exists()
    assert (out / "checkpoint-4").is_dir() and written - set(after)


def test_a_foreign_weight_file_is_never_replaced(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / WEIGHTS).write_bytes(b"someone else's LoRA")
    with pytest.raises(LorakitError, match="which lorakit did not write"):
        Trainer(config(model, out, overwrite=True)).setup()
    assert (out / WEIGHTS).read_bytes() == b"someone else's LoRA"


# ---------------------------------------------------------------------------- real kills
def _kill_test():
    spec = importlib.util.spec_from_file_location("kill_test", Path(__file__).parent / "benchmarks" / "kill_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_kills_resume_to_the_same_weights(tmp_path):
    """Three real CLI processes: SIGKILL during a checkpoint write, SIGTERM mid-run, SIGINT
    before the first checkpoint; each resumed with --resume latest ends bit-identical."""
    kt = _kill_test()
    model, data, reference = kt.prepare(tmp_path)
    rng = random.Random(0)
    plan = [("SIGKILL", "checkpoint-write"), ("SIGTERM", "mid-run"), ("SIGINT", "before-first-checkpoint")]
    rows = [kt.trial(tmp_path, model, data, reference, i, s, p, rng) for i, (s, p) in enumerate(plan)]
    print(kt.report(rows))
    assert [r["phase"] for r in rows] == [p for _, p in plan]
    assert [r["rc"] for r in rows] == [-9, 143, 130], rows
    # the SIGTERM run says it saved the step it stopped after: mid-run, past checkpoint-3, before the end
    assert kt.EVERY < rows[1]["stopped_at"] < kt.STEPS and rows[2]["stopped_at"] <= kt.EVERY, rows
    assert all(r["clean_exit"] and r["resumed"] and r["matched"] for r in rows), rows
