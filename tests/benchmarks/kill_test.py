"""Kill test: runs killed at random moments (SIGKILL, SIGTERM, SIGINT), each resumed with the
same command plus ``--resume latest``, must finish with weights bit-identical to an
uninterrupted run.

    python tests/benchmarks/kill_test.py --trials 30

Every run is a real ``python -m lorakit.cli train`` process on a tiny SD1.5 model (12 steps,
a checkpoint every 3, one thread). The moment of each kill is drawn over the whole run and
recorded by what was observed when the signal went out:

- ``setup``: before the first step finished (imports, model loading, caching);
- ``before-first-checkpoint``: a step done, no ``checkpoint-3`` yet;
- ``checkpoint-write``: while a ``.checkpoint-N.tmp`` folder exists (a save in progress);
- ``mid-run``: between later steps;
- ``after-last-step``: the last step done, the final files being written;
- ``after-the-run-returned``: the signal came after the run had published its files and
  handed the signal handlers back (the exiting process ends as the signal's default says).

The process is frozen (SIGSTOP) at the chosen moment, its phase read, the signal sent, and only
then let go on (SIGCONT): the signal lands where the phase was read. (Unfrozen, a tiny run's
last steps take ~30 ms each: a signal meant for "mid-run" at step 10 of 12 that the harness sent
~0.1 s late, as on a loaded CI machine, landed while the final files were written: the run
completed, exit 0, and the trial was taken for a mid-run stop that had not stopped.)
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

STEPS, EVERY = 12, 3
PHASES = ("setup", "before-first-checkpoint", "checkpoint-write", "mid-run", "after-last-step")
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
WEIGHTS = "pytorch_lora_weights.safetensors"
PROGRESS = re.compile(r"\bstep (\d+)/(\d+)\b")  # a progress line: "[epoch e/E ]step n/N loss=..."
STOP_NOTE = re.compile(r"stopped by SIG\w+ at step (\d+); saved checkpoint-\1\b")


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def command(model: Path, data: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "lorakit.cli", "train", "--arch", "sd15", "--model", str(model), "--data", str(data),
            "--output", str(out), "--resolution", "32", "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY),
            "--learning-rate", "1e-3", "--random-flip", "--num-threads", "1", *extra]


class Watched:
    """A training process whose progress lines are read as they come; ``pause_at``: frozen
    (:meth:`pause`) by the reader as soon as the progress line of that step arrives."""

    def __init__(self, cmd: list[str], out: Path, pause_at: int | None = None):
        self.out, self.pause_at, self.paused = out, pause_at, threading.Event()
        # a shell's background job (nohup ... &) ignores SIGINT, and so would its children
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.steps, self.stderr, self.started = 0, [], time.monotonic()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            match = PROGRESS.search(line)
            if match and "loss=" in line:
                self.steps = int(match.group(1))
                if self.pause_at is not None and self.steps >= self.pause_at and not self.paused.is_set():
                    self.pause()
        self.paused.set()  # (the process has ended)

    def pause(self) -> None:
        """Freeze the process where it is (SIGSTOP): what it does next waits for :meth:`go_on`."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused.set()

    def go_on(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGCONT)

    def writing_checkpoint(self) -> bool:
        try:
            return any(e.name.startswith(".checkpoint-") and e.name.endswith(".tmp") for e in os.scandir(self.out))
        except FileNotFoundError:
            return False

    def phase(self) -> str:
        if self.writing_checkpoint():
            return "checkpoint-write"
        if self.steps >= STEPS:
            return "after-last-step"
        if self.steps == 0:
            return "setup"
        if not (self.out / f"checkpoint-{EVERY}").is_dir():
            return "before-first-checkpoint"
        return "mid-run"

    def alive(self) -> bool:
        return self.proc.poll() is None


def _wait_until(watched: Watched, condition, timeout: float = 120.0, poll: float = 0.001) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and watched.alive():
        if condition():
            return True
        time.sleep(poll)
    return False


def kill_once(cmd: list[str], out: Path, sig: int, target: str, rng: random.Random) -> tuple[str, int | None, str]:
    """Start ``cmd``, send ``sig`` at a moment of phase ``target``; return (observed phase, exit
    status, stderr). The process is frozen while its phase is read and the signal sent."""
    at = {"before-first-checkpoint": lambda: rng.randint(1, EVERY - 1),
          # a few steps before the end: the stop must land mid-run, not among the final files
          "mid-run": lambda: rng.randint(EVERY + 1, STEPS - 3)}.get(target, lambda: None)()
    w = Watched(cmd, out, pause_at=at)
    if target == "setup":
        _wait_until(w, lambda: time.monotonic() - w.started > rng.uniform(0.5, 8.0) or w.steps > 0)
    elif at is not None:
        _wait_until(w, w.paused.is_set)
    elif target == "checkpoint-write":
        _wait_until(w, w.writing_checkpoint)
    else:
        _wait_until(w, lambda: w.steps >= STEPS)
        time.sleep(rng.uniform(0.0, 0.15))
    w.pause()
    time.sleep(0.2)  # the frozen process writes nothing more: the reader takes in what it wrote
    phase = w.phase() if w.alive() else "after-exit"
    if w.alive():
        w.proc.send_signal(sig)
    w.go_on()
    try:
        rc = w.proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        w.proc.kill()
        rc = None
    time.sleep(0.05)  # let the reader threads finish
    return phase, rc, "".join(w.stderr)


def finish(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd + ["--resume", "latest"], capture_output=True, text=True, timeout=600, env=env())


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    import torch

    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def prepare(root: Path) -> tuple[Path, Path, Path]:
    """(model, data, reference weights): a tiny SD1.5 and one uninterrupted run through the CLI."""
    from lorakit.testing import example_data
    from lorakit.tiny import make_tiny_model

    model = make_tiny_model("sd15", root / "model")
    data = example_data()
    reference = root / "reference"
    proc = subprocess.run(command(model, data, reference), capture_output=True, text=True, timeout=600, env=env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return model, data, reference / WEIGHTS


def trial(root: Path, model: Path, data: Path, reference: Path, index: int, sig_name: str, target: str,
          rng: random.Random) -> dict:
    out = root / f"run-{index:03d}"
    cmd = command(model, data, out)
    phase, rc, stderr = kill_once(cmd, out, SIGNALS[sig_name], target, rng)
    expected_rc = {"SIGKILL": -9, "SIGTERM": 143, "SIGINT": 130}[sig_name]
    # a signal that lands after the run returned (its files published, the handlers given
    # back) ends the exiting process the default way: the run is complete all the same
    completed = f"trained {STEPS} steps" in stderr and (out / WEIGHTS).is_file()
    clean = rc == expected_rc or rc == 0 or (completed and rc == -SIGNALS[sig_name])
    one_line = sig_name == "SIGKILL" or "Traceback" not in stderr
    done = finish(cmd)
    resumed = done.returncode == 0
    matched = resumed and same_weights(out / WEIGHTS, reference)
    if completed and phase == "after-last-step" and rc == -SIGNALS[sig_name]:  # (exit 0: deferred, run complete)
        phase = "after-the-run-returned"
    stopped = STOP_NOTE.search(stderr)  # the step the run itself says it stopped after
    return {"signal": sig_name, "target": target, "phase": phase, "rc": rc, "clean_exit": clean and one_line,
            "stopped_at": int(stopped.group(1)) if stopped else None,
            "resumed": resumed, "matched": matched, "resume_stderr": done.stderr[-1500:] if not resumed else "",
            "kill_stderr": stderr[-1500:] if not (clean and one_line and matched) else ""}


def report(rows: list[dict]) -> str:
    lines = [f"trials {len(rows)}  resumed {sum(r['resumed'] for r in rows)}  matched {sum(r['matched'] for r in rows)}"
             f"  clean exits {sum(r['clean_exit'] for r in rows)}"]
    for key in ("signal", "phase"):
        groups = defaultdict(list)
        for r in rows:
            groups[r[key]].append(r)
        lines.append(f"by {key}:")
        for name, group in sorted(groups.items()):
            lines.append(f"  {name:<24} trials {len(group):>3}  resumed {sum(r['resumed'] for r in group):>3}  "
                         f"matched {sum(r['matched'] for r in group):>3}")
    rcs = Counter((r["signal"], r["rc"]) for r in rows)
    lines.append("exit status of the killed run: " + ", ".join(f"{s} {rc}: {n}" for (s, rc), n in sorted(rcs.items(), key=str)))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model, data, reference = prepare(root)
        plan = [(s, p) for p in PHASES for s in SIGNALS]  # every signal in every phase, then random
        while len(plan) < args.trials:
            plan.append((rng.choice(list(SIGNALS)), rng.choice(PHASES)))
        rows = []
        for i, (sig_name, target) in enumerate(plan[: args.trials]):
            row = trial(root, model, data, reference, i, sig_name, target, rng)
            rows.append(row)
            print(f"{i:3d} {sig_name:<8} target {target:<24} observed {row['phase']:<24} rc {row['rc']!s:<5} "
                  f"resumed {row['resumed']} matched {row['matched']}", flush=True)
            for k in ("kill_stderr", "resume_stderr"):
                if row[k]:
                    print("    " + row[k].replace("\n", "\n    "), flush=True)
        print(report(rows))
        return 0 if all(r["matched"] and r["clean_exit"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
