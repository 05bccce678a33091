"""One loop for CPU, one GPU or many: two CPU processes under `accelerate launch`."""

import os
import subprocess
import sys

from safetensors.torch import load_file

from lorakit.testing import example_data


def test_two_processes_train_one_adapter(tmp_path, lorakit_tiny_model):
    model = lorakit_tiny_model("sd15")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lorakit.cli", "train", "--arch", "sd15",
         "--model", str(model), "--data", str(example_data()), "--output", str(out), "--max-steps", "3",
         "--resolution", "32", "--checkpoint-every", "3", "--num-threads", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the run checks that both processes hold identical LoRA weights before saving
    assert len(load_file(str(out / "pytorch_lora_weights.safetensors"))) > 0
    assert (out / "checkpoint-3" / "optimizer.pt").is_file()
    assert proc.stdout.count("step 3/3") == 1  # progress only from the main process
