"""Plugins written against an older contract keep working (specs grow, never lose arguments)."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from lorakit import plugins
from lorakit.testing import example_data, tiny_config
from lorakit.tiny import make_tiny_model
from lorakit.training import Trainer


def test_round_one_module_plugin_trains_saves_and_resumes(tmp_path):
    import tests.legacy_plugin as legacy

    plugins.register("legacy", legacy)
    try:
        model = make_tiny_model("legacy", tmp_path / "model")
        straight = Trainer(tiny_config("legacy", model, example_data(), tmp_path / "a", max_steps=4)).setup().run()
        Trainer(tiny_config("legacy", model, example_data(), tmp_path / "b", max_steps=2, checkpoint_every=2)).setup().run()
        resumed = Trainer(
            tiny_config("legacy", model, example_data(), tmp_path / "b", max_steps=4, resume="latest")
        ).setup().run()
        a, b = load_file(str(straight.weights)), load_file(str(resumed.weights))
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(math.isfinite(x) for x in straight.losses)
    finally:
        plugins.unregister("legacy")
