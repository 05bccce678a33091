"""`lorakit train` that counts torch.distributed's collective calls made inside each optimizer
step (tests/test_invariance.py launches it under `accelerate launch`).

Writes ``$LORAKIT_PROBE_OUT.<rank>.json``: one list of collective names per step;
``.<rank>.pid``: the process id, at start (a test signals one process of the run by it);
``.<rank>.exit``: the exit status the process ends with (nothing when a signal killed it).
``$LORAKIT_PROBE_STEP_SLEEP`` seconds of sleep before each step make a tiny run slow enough to
be stopped mid-run at a known step; ``$LORAKIT_PROBE_FINAL_SLEEP`` before the final files.
"""

import json
import os
import sys
import time

import torch.distributed as dist

from lorakit import step, training
from lorakit.cli import main

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "barrier", "broadcast", "broadcast_object_list", "gather", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "scatter",
    # torch 2.13's single-tensor forms: FSDP2 gathers a sharded block with all_gather_single
    "all_gather_single", "reduce_scatter_single", "all_gather_coalesced", "all_reduce_coalesced",
)
calls: list = []
per_step: list = []


def _counting(name, fn):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapper


for _name in COLLECTIVES:
    if hasattr(dist, _name):
        setattr(dist, _name, _counting(_name, getattr(dist, _name)))

_step = step.Stepper.step


def _counted_step(self, stream):
    time.sleep(float(os.environ.get("LORAKIT_PROBE_STEP_SLEEP", "0")))
    before = len(calls)
    try:
        return _step(self, stream)
    finally:
        per_step.append(calls[before:])


step.Stepper.step = _counted_step
_save_final = training.Trainer.save_final


def _slow_save_final(self):
    time.sleep(float(os.environ.get("LORAKIT_PROBE_FINAL_SLEEP", "0")))
    return _save_final(self)


training.Trainer.save_final = _slow_save_final

if __name__ == "__main__":
    sys.argv = ["lorakit", *sys.argv[1:]]
    rank, out = os.environ.get("RANK", "0"), os.environ["LORAKIT_PROBE_OUT"]
    with open(f"{out}.{rank}.pid", "w") as f:
        f.write(str(os.getpid()))
    status = "exception"
    try:
        main()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    finally:
        with open(f"{out}.{rank}.json", "w") as f:
            json.dump(per_step, f)
        with open(f"{out}.{rank}.exit", "w") as f:
            f.write(str(status))
