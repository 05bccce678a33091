"""`lorakit train` that counts torch.distributed's collective calls made inside each optimizer
step (tests/test_invariance.py launches it under `accelerate launch`).

Writes ``$LORAKIT_PROBE_OUT.<rank>.json``: one list of collective names per step.
"""

import json
import os
import sys

import torch.distributed as dist

from lorakit import step
from lorakit.cli import main

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "barrier", "broadcast", "broadcast_object_list", "gather", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "scatter",
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
    before = len(calls)
    try:
        return _step(self, stream)
    finally:
        per_step.append(calls[before:])


step.Stepper.step = _counted_step

if __name__ == "__main__":
    sys.argv = ["lorakit", *sys.argv[1:]]
    try:
        main()
    finally:
        rank = os.environ.get("RANK", "0")
        with open(f"{os.environ['LORAKIT_PROBE_OUT']}.{rank}.json", "w") as f:
            json.dump(per_step, f)
