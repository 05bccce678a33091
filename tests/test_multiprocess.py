"""One loop for CPU, one GPU or many: two CPU processes under `accelerate launch`."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lorakit.testing import example_data


def _launch(model, out, *extra):
    # `accelerate launch --cpu` starts ONE process whatever --num_processes says; two CPU
    # processes need the distributed launcher (--multi_gpu) told to use the CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lorakit.cli", "train",
         "--arch", "sd15", "--model", str(model), "--data", str(example_data()), "--output", str(out),
         "--resolution", "32", "--num-threads", "1", *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )


def test_two_processes_train_one_adapter(tmp_path, lorakit_tiny_model):
    model = lorakit_tiny_model("sd15")
    out = tmp_path / "out"
    proc = _launch(model, out, "--max-steps", "3", "--checkpoint-every", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoint-3" / "training_state.json").read_text())
    assert state["num_processes"] == 2  # really two processes, not one run twice or alone
    # the run checks that both processes hold identical LoRA weights before saving
    assert len(load_file(str(out / "pytorch_lora_weights.safetensors"))) > 0
    assert (out / "checkpoint-3" / "optimizer.pt").is_file()
    assert proc.stdout.count("step 3/3") == 1  # progress only from the main process
    # and the closing lines once, not once per process
    assert proc.stdout.count(" (3 steps)\n") == 1 and proc.stderr.count("trained 3 steps") == 1


def test_two_processes_resume_exactly(tmp_path, lorakit_tiny_model):
    """Every draw is derived from (seed, step, the sample's place in the global batch): a
    checkpoint holds no per-process RNG state, and resuming on the same process count is
    bit-exact (on another count: tests/test_invariance.py)."""
    model = lorakit_tiny_model("sd15")
    straight = _launch(model, tmp_path / "a", "--max-steps", "4", "--random-flip")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _launch(model, tmp_path / "b", "--max-steps", "2", "--checkpoint-every", "2", "--random-flip")
    assert first.returncode == 0, first.stderr[-3000:]
    rng = load_file(str(tmp_path / "b" / "checkpoint-2" / "rng_state.safetensors"))
    assert sorted(rng) == ["generator", "torch"]  # the main process's, for the record only
    resumed = _launch(model, tmp_path / "b", "--max-steps", "4", "--random-flip", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
