"""The recorded reference runs still give bit-identical weights (see tests/reference/runs.py).

A refactor of the loop, the plugin contract or a plugin must not change what a run
trains; a change that is meant to must re-record and say why.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.reference.runs import RUNS, reference, run


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_reference_run_is_bit_identical(name, tmp_path):
    want = load_file(str(reference(name)))
    got = run(name, tmp_path)
    assert sorted(got) == sorted(want), f"{name}: the LoRA keys changed"
    moved = [k for k in want if not torch.equal(got[k], want[k])]
    if moved:
        worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in moved)
        pytest.fail(f"{name}: {len(moved)} of {len(want)} tensors differ (max abs diff {worst:.3g}), e.g. {moved[0]}")
