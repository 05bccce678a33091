"""A stop of a two-process run keeps every finished step: SIGTERM to ONE process (``kill PID``)
or Ctrl-C to the whole process group, mid-run. The stop request rides in the step's one
gradient reduction, so both processes finish the same step, the main one saves it while the
other waits, and both exit with the signal's status; ``--resume latest`` (on two processes, or
on one with the global batch kept) ends with the uninterrupted run's weights.

Real processes under ``accelerate launch`` (CPU, gloo), through tests/collectives_probe.py: it
writes each process's pid (to signal one of them), its exit status, the collective calls of
each step, and sleeps before each step so that the signal lands mid-run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.testing import example_data

PROBE = Path(__file__).parent / "collectives_probe.py"
STEPS = 8
WEIGHTS = "pytorch_lora_weights.safetensors"
SETTINGS = ("--max-steps", str(STEPS), "--random-flip", "--learning-rate", "1e-3")
NOTE = re.compile(r"stopped by (SIG\w+) at step (\d+); saved checkpoint-(\d+); continue with: lorakit train .* "
                  r"--resume latest\.")


def command(model, out, processes: int = 2, *extra) -> list[str]:
    launcher = [] if processes == 1 else [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [sys.executable, *launcher, str(PROBE), "train", "--arch", "sd15", "--model", str(model),
            "--data", str(example_data()), "--output", str(out), "--resolution", "32", "--num-threads", "1",
            "--batch-size", str(2 // processes), *SETTINGS, *extra]


def env(probe: Path, sleep: float = 0.0, final_sleep: float = 0.0) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1",
            "LORAKIT_PROBE_OUT": str(probe), "LORAKIT_PROBE_STEP_SLEEP": str(sleep),
            "LORAKIT_PROBE_FINAL_SLEEP": str(final_sleep)}


def run(model, out, probe, processes: int = 2, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(model, out, processes, *extra), capture_output=True, text=True, timeout=300,
                          env=env(probe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("stop") / "model")


@pytest.fixture(scope="module")
def straight(model, tmp_path_factory):
    """The uninterrupted two-process run's weights."""
    root = tmp_path_factory.mktemp("straight")
    run(model, root / "out", root / "probe")
    return load_file(str(root / "out" / WEIGHTS))


def stop_mid_run(model, root: Path, send, when: str = rf"\bstep 2/{STEPS}\b", *extra, final_sleep=0.0) -> dict:
    """Start the two-process run; once its output shows ``when`` (by default: step 2 done),
    ``send(pids, launcher)``; return what each process ended with (a hang fails the test)."""
    out, probe = root / "out", root / "probe"
    proc = subprocess.Popen(command(model, out, 2, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env(probe, 0.5, final_sleep), start_new_session=True)  # its own process group
    lines, sent = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if not sent.is_set() and re.search(when, line):
                send([int(Path(f"{probe}.{rank}.pid").read_text()) for rank in (0, 1)], proc.pid)
                sent.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a process of the stopped run hung:\n" + "".join(lines)[-3000:])
    reader.join(10)
    text = "".join(lines)
    assert sent.is_set(), text[-3000:]
    exits = [Path(f"{probe}.{rank}.exit").read_text() if Path(f"{probe}.{rank}.exit").exists() else None
             for rank in (0, 1)]
    steps = [Path(f"{probe}.{rank}.json").read_text() if Path(f"{probe}.{rank}.json").exists() else None
             for rank in (0, 1)]
    return {"out": out, "text": text, "exits": exits, "steps": steps, "notes": NOTE.findall(text)}


def check_stopped(result: dict, name: str, status: int) -> int:
    """Both processes ended with ``status`` after the same step m < STEPS, checkpoint-m saved."""
    text = result["text"]
    assert result["exits"] == [str(status)] * 2, (result["exits"], text[-3000:])
    notes = result["notes"]
    assert len(notes) == 1, text[-3000:]  # the main process says it once (the others stopped after the same step)
    sig, step, saved = notes[0]
    m = int(step)
    assert sig == name and saved == step and 2 <= m < STEPS, text[-3000:]
    out = result["out"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{m}"]  # no --checkpoint-every
    assert not (out / WEIGHTS).exists()
    # no process ended on an error (torchrun prefixes a process's traceback with [rankN]:)
    assert "[rank" not in text and "Connection closed" not in text, text[-3000:]
    # the stop cost no collective: every step made its one all_reduce, and there were m of them
    assert [json.loads(s) for s in result["steps"]] == [[["all_reduce"]] * m] * 2, result["steps"]
    return m


def relative_difference(a: dict, b: dict, only: str = "") -> float:
    assert a.keys() == b.keys()
    keys = [k for k in sorted(b) if only in k]
    x, y = (torch.cat([d[k].double().reshape(-1) for k in keys]) for d in (a, b))
    return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_one_step_and_resumes_exactly(tmp_path, model, straight):
    result = stop_mid_run(model, tmp_path, lambda pids, launcher: os.kill(pids[1], signal.SIGTERM))  # not the main one
    m = check_stopped(result, "SIGTERM", 143)
    assert "exitcode  : 143" in result["text"] and "exitcode  : -15" not in result["text"]  # the launcher's report
    resumed = run(model, result["out"], tmp_path / "probe2", 2, "--resume", "latest")
    assert f"resumed from {result['out'] / f'checkpoint-{m}'} at step {m}" in resumed.stdout + resumed.stderr
    again = load_file(str(result["out"] / WEIGHTS))
    assert again.keys() == straight.keys() and all(torch.equal(again[k], straight[k]) for k in straight)


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_the_step_and_resumes_on_one_process(tmp_path, model, straight):
    # a terminal's Ctrl-C: the launcher and both processes get SIGINT (the launcher forwards one more)
    result = stop_mid_run(model, tmp_path, lambda pids, launcher: os.killpg(launcher, signal.SIGINT))
    m = check_stopped(result, "SIGINT", 130)
    # on one process with the global batch kept (--batch-size 2 instead of 2 x 1)
    resumed = run(model, result["out"], tmp_path / "probe2", 1, "--resume", "latest")
    assert f"at step {m}" in resumed.stdout + resumed.stderr
    again = load_file(str(result["out"] / WEIGHTS))
    whole, lora_b = relative_difference(again, straight), relative_difference(again, straight, "lora_B")
    print(f"stopped at {m} on 2, resumed on 1: relative L2 {whole:.3g} (whole adapter), {lora_b:.3g} (lora_B)")
    # the tolerances of tests/test_invariance.py across process counts (summation order only)
    assert whole <= 1e-6 and lora_b <= 1e-3, (whole, lora_b)


@pytest.mark.slow
def test_sigterm_to_one_process_during_caching_ends_the_run_without_a_hang(tmp_path, model):
    """Nothing to save yet: the signalled process ends at once with 143, the launcher ends the
    other, nobody waits forever; the same command with --resume latest then trains from step 0."""
    cache = tmp_path / "cache"  # empty: the run encodes its inputs first
    result = stop_mid_run(model, tmp_path, lambda pids, launcher: os.kill(pids[1], signal.SIGTERM),
                          r"^encoding cache ", "--cache-dir", str(cache))
    assert result["exits"][1] == "143", (result["exits"], result["text"][-3000:])
    assert "stopped by SIGTERM" in result["text"] and not list(result["out"].glob("checkpoint-*"))
    assert json.loads(result["steps"][1]) == []  # the signalled process took no step
    # (the other one ends by the launcher's SIGTERM, after gloo reported the lost peer in the
    # collective it waited in: status -15, not 143; what matters is that nobody hangs)
    run(model, result["out"], tmp_path / "probe2", 2, "--resume", "latest", "--cache-dir", str(cache))
    assert (result["out"] / WEIGHTS).is_file()


@pytest.mark.slow
def test_a_process_killed_mid_run_leaves_no_other_waiting(tmp_path, model):
    """SIGKILL (nothing can be saved): the other process, waiting in the step's collective,
    is not left there; the launcher ends the run."""
    started = time.monotonic()
    result = stop_mid_run(model, tmp_path, lambda pids, launcher: os.kill(pids[1], signal.SIGKILL))
    assert result["exits"][1] is None  # killed: it wrote no exit status
    assert time.monotonic() - started < 120 and not (result["out"] / WEIGHTS).exists()


@pytest.mark.slow
def test_sigterm_to_one_process_while_the_final_files_are_written_lets_the_run_complete(tmp_path, model, straight):
    """After the last step there is no step left to stop after: the request waits, the run
    completes on both processes (exit 0) with the uninterrupted run's weights."""
    result = stop_mid_run(model, tmp_path, lambda pids, launcher: os.kill(pids[1], signal.SIGTERM),
                          rf"\bstep {STEPS}/{STEPS}\b", final_sleep=1.0)
    assert result["exits"] == ["0", "0"], (result["exits"], result["text"][-3000:])
    assert "SIGTERM arrived while writing the final files; the run is complete" in result["text"]
    again = load_file(str(result["out"] / WEIGHTS))
    assert again.keys() == straight.keys() and all(torch.equal(again[k], straight[k]) for k in straight)


def test_a_stop_request_rides_in_the_step_reduction():
    """The flags after the loss: any process's request reaches every process, SIGTERM before
    SIGINT; the gradients and the loss come out as without them."""
    from lorakit.parallel import reduce_step

    class TwoProcesses:  # the other process holds twice this one's gradients and loss, and asks `other`
        num_processes, calls = 2, 0

        def __init__(self, other):
            self.other = other

        def reduce(self, tensor, reduction):
            assert reduction == "mean"
            self.calls += 1
            theirs = 2 * tensor
            theirs[-2:] = torch.tensor([float(self.other == signal.SIGINT), float(self.other == signal.SIGTERM)])
            return (tensor + theirs) / 2

    for mine, theirs, agreed in [(0, 0, 0), (signal.SIGTERM, 0, signal.SIGTERM), (0, signal.SIGINT, signal.SIGINT),
                                 (signal.SIGINT, signal.SIGTERM, signal.SIGTERM)]:
        params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
        grads = [torch.randn(3, 4), torch.randn(5)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        accelerator = TwoProcesses(theirs)
        loss, stop = reduce_step(accelerator, params, 0.5, "cpu", int(mine))
        assert accelerator.calls == 1 and stop == agreed and loss == pytest.approx(0.75)
        assert all(torch.allclose(p.grad, 1.5 * g) for p, g in zip(params, grads))
