"""A run stopped before its first checkpoint restarts (``--resume latest``, from step 0) on
another number of processes when the global batch (--batch-size x processes) is the same, as
a resume from a checkpoint does (tests/test_invariance.py); another global batch is refused
in one line naming the --batch-size to use. The process count is recorded in the run config
(``lorakit_config.json``); a run config without it is compared as before (batch size strictly)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit import outputs
from lorakit.config import build_config, validate
from lorakit.errors import LorakitError
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

RUN = dict(max_steps=2, random_flip=True, caption_dropout=0.25)


@pytest.fixture
def model(lorakit_tiny_model):
    return lorakit_tiny_model("sd15")


def stopped_before_checkpoint(model, out, batch_size=2):
    """A run whose setup finished (run config written, cache filled) and which then stopped."""
    Trainer(tiny_config("sd15", model, example_data(), out, batch_size=batch_size, **RUN)).setup().guard.close()
    assert (out / outputs.RUN_CONFIG).is_file() and not list(out.glob("checkpoint-*"))


def restart(model, out, batch_size):
    return outputs.check_output_dir(out, validate(tiny_config("sd15", model, example_data(), out,
                                                              batch_size=batch_size, resume="latest", **RUN)))


def test_the_run_config_records_the_process_count_and_stays_a_config_file(model, tmp_path):
    out = tmp_path / "out"
    stopped_before_checkpoint(model, out)
    saved = json.loads((out / outputs.RUN_CONFIG).read_text())
    assert saved["num_processes"] == 1 and saved["batch_size"] == 2
    again = build_config({}, str(out / outputs.RUN_CONFIG))  # --config lorakit_config.json still works
    assert again.batch_size == 2 and "num_processes" not in again.to_dict()


def test_a_restart_from_step_0_may_change_the_process_count_not_the_global_batch(model, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    stopped_before_checkpoint(model, out, batch_size=2)  # 1 process x batch 2
    monkeypatch.setattr(outputs, "process_count", lambda: 2)
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert restart(model, out, batch_size=1) is None  # 2 x 1: the same global batch, from step 0
    assert "started by 1 process(es), this run has 2: the same global batch of 2" in caplog.text
    with pytest.raises(LorakitError) as refused:
        restart(model, out, batch_size=2)
    assert str(refused.value) == (
        f"--resume latest: {out} holds a run with a global batch of 2 (--batch-size 2 x 1 process(es)) and no "
        "checkpoint yet, this run's is 4 (--batch-size 2 x 2); use --batch-size 1, or --overwrite to replace it.")
    monkeypatch.setattr(outputs, "process_count", lambda: 3)
    with pytest.raises(LorakitError, match=r"global batch of 2 .*; use a process count that divides 2, or --overwrite"):
        restart(model, out, batch_size=1)


def test_a_run_killed_while_its_cache_filled_restarts_on_another_process_count(model, tmp_path, monkeypatch):
    from lorakit import cache as cache_module

    def killed(self, prepared):
        raise KeyboardInterrupt  # a kill while the encoding cache fills

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(cache_module.EncodingCache, "encode_images", killed)
        with pytest.raises(KeyboardInterrupt):
            Trainer(tiny_config("sd15", model, example_data(), out, batch_size=2, **RUN)).setup()
    assert not list(out.glob("checkpoint-*"))
    monkeypatch.setattr(outputs, "process_count", lambda: 2)
    assert restart(model, out, batch_size=1) is None  # nothing to compare yet: it starts from step 0


def test_a_run_config_without_the_process_count_compares_the_batch_size_as_before(model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    stopped_before_checkpoint(model, out, batch_size=2)
    saved = json.loads((out / outputs.RUN_CONFIG).read_text())
    del saved["num_processes"]  # written by an older lorakit
    (out / outputs.RUN_CONFIG).write_text(json.dumps(saved))
    monkeypatch.setattr(outputs, "process_count", lambda: 2)
    with pytest.raises(LorakitError, match=r"other settings \(batch_size: saved 2 vs now 1\)"):
        restart(model, out, batch_size=1)


def _launch(processes: int, model, out, *extra):
    """`lorakit train` as a user runs it, under `accelerate launch` with CPU processes (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["train", "--arch", "sd15", "--model", str(model), "--data", str(example_data()), "--output", str(out),
            "--resolution", "32", "--num-threads", "1", "--max-steps", "2", "--random-flip", "--caption-dropout",
            "0.25", "--learning-rate", "1e-3", "--rank", "4", "--resume", "latest", *extra]
    return subprocess.run([sys.executable, *launcher, "-m", "lorakit.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_two_processes_restart_a_one_process_run_stopped_before_its_first_checkpoint(model, tmp_path):
    straight = Trainer(tiny_config("sd15", model, example_data(), tmp_path / "straight", batch_size=2, **RUN)).setup().run()
    out = tmp_path / "out"
    stopped_before_checkpoint(model, out, batch_size=2)

    refused = _launch(2, model, out, "--batch-size", "2")
    errors = [line for line in refused.stderr.splitlines() + refused.stdout.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and errors, refused.stderr[-3000:]
    assert errors[0] == (f"error: --resume latest: {out} holds a run with a global batch of 2 (--batch-size 2 x 1 "
                         "process(es)) and no checkpoint yet, this run's is 4 (--batch-size 2 x 2); use --batch-size 1, "
                         "or --overwrite to replace it.")

    proc = _launch(2, model, out, "--batch-size", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert said.count("was started by 1 process(es), this run has 2: the same global batch of 2") == 1, said[-3000:]
    assert json.loads((out / outputs.RUN_CONFIG).read_text())["num_processes"] == 2
    a, b = load_file(str(out / outputs.WEIGHT_NAME)), load_file(str(straight.weights))
    assert a.keys() == b.keys()
    for only, tolerance in (("", 1e-6), ("lora_B", 1e-3)):  # tests/test_invariance.py's tolerances
        keys = [k for k in sorted(b) if only in k]
        x, y = (torch.cat([d[k].double().reshape(-1) for k in keys]) for d in (a, b))
        assert float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y)) <= tolerance, only
