"""Test helpers for plugin authors, loaded as a pytest plugin (``pytest11`` entry point).

Fixtures:

* ``lorakit_tiny_model(arch)`` -> folder of a tiny model written by the arch's
  ``write_tiny_model`` hook (one per arch per test session).
* ``lorakit_image_folder`` -> a fresh copy of lorakit's bundled captioned images.

Functions:

* :func:`tiny_config` -- a TrainConfig sized for tiny models (fast on CPU).
* :func:`lora_deltas` -- every LoRA layer's effective weight delta, for comparing a
  trained component with one a pipeline loaded from file.

Nothing here imports torch until a fixture or function is used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent / "examples"


def example_data(name: str = "shapes") -> Path:
    """Path of a bundled example dataset (read-only; copy before modifying)."""
    return EXAMPLES / name


def tiny_config(arch: str, model, data, output, **overrides):
    """A TrainConfig for a quick run on a tiny model."""
    from lorakit.config import TrainConfig

    values = dict(
        arch=arch,
        model=str(model),
        data=str(data) if data is not None else None,
        output=str(output),
        resolution=32,
        max_steps=4,
        learning_rate=1e-3,
        rank=4,
        seed=0,
        num_threads=1,  # tiny models: one thread is fastest, and test workers run side by side
    )
    values.update(overrides)
    return TrainConfig(**values)


def lora_deltas(module) -> dict:
    """``{layer name: scale * B @ A}`` for every LoRA layer of ``module`` (all adapters summed)."""
    out = {}
    for name, layer in module.named_modules():
        if not hasattr(layer, "lora_A") or len(getattr(layer, "lora_A")) == 0:
            continue
        total = None
        for adapter in layer.lora_A:
            a = layer.lora_A[adapter].weight.detach().float()
            b = layer.lora_B[adapter].weight.detach().float()
            delta = (b.flatten(1) @ a.flatten(1)) * layer.scaling[adapter]
            total = delta if total is None else total + delta
        out[name.replace("base_model.model.", "")] = total.cpu()
    return out


def assert_same_lora(trained, loaded, atol: float = 1e-6) -> None:
    """Every LoRA layer of ``trained`` is present in ``loaded`` with the same delta."""
    import torch

    a, b = lora_deltas(trained), lora_deltas(loaded)
    missing = sorted(set(a) - set(b))
    assert not missing, f"{len(missing)} trained LoRA layers missing after load, e.g. {missing[:3]}"
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), f"LoRA delta differs at {name}"


@pytest.fixture(scope="session")
def _lorakit_tiny_models(tmp_path_factory):
    return {}


@pytest.fixture
def lorakit_tiny_model(_lorakit_tiny_models, tmp_path_factory):
    """Factory: ``lorakit_tiny_model("my-arch")`` -> Path of a tiny model (cached per session)."""

    def make(arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in _lorakit_tiny_models:
            from lorakit.tiny import make_tiny_model

            path = tmp_path_factory.mktemp(f"tiny-{arch}") / "model"
            make_tiny_model(arch, path, seed=seed)
            _lorakit_tiny_models[key] = path
        return _lorakit_tiny_models[key]

    return make


@pytest.fixture
def lorakit_image_folder(tmp_path) -> Path:
    """A writable copy of the bundled captioned images (metadata.jsonl layout)."""
    target = tmp_path / "images"
    shutil.copytree(example_data(), target)
    return target


def _pipeline_component(pipeline, name, trained):
    """The pipeline's module for trained component ``name``: same attribute name, else the
    only module of the same class that carries LoRA layers."""
    from lorakit.lora import count_lora_layers

    found = getattr(pipeline, name, None)
    if found is not None:
        return found
    modules = getattr(pipeline, "components", {}) or {}
    same = [m for m in modules.values() if type(m) is type(trained) and count_lora_layers(m) > 0]
    return same[0] if len(same) == 1 else None


def run_arch_contract(arch: str, tmp_path, data=None, **overrides) -> dict:
    """The checks every arch plugin must pass, for a plugin's own test suite.

    1. a tiny model trains (rank 4, alpha 8) and writes ``pytorch_lora_weights.safetensors``;
    2. the file loads into the arch's inference pipeline through its ``load_lora`` hook and
       every trained layer is there with the same effective weight (where the pipeline
       exposes the trained component under the same name);
    3. 2 steps + ``--resume latest`` + 2 steps equals 4 uninterrupted steps, bit for bit.

    Returns figures (layer counts, the largest reload difference) for reporting.
    """
    import torch
    from safetensors.torch import load_file

    from lorakit.plugins import get_plugin_manager
    from lorakit.tiny import make_tiny_model
    from lorakit.training import Trainer

    tmp_path = Path(tmp_path)
    data = example_data() if data is None else data
    model = make_tiny_model(arch, tmp_path / "model")
    settings = dict(rank=4, alpha=8, max_steps=4, checkpoint_every=2)
    settings.update(overrides)
    trainer = Trainer(tiny_config(arch, model, data, tmp_path / "straight", **settings)).setup()
    straight = trainer.run()
    assert straight.weights.is_file(), "no pytorch_lora_weights.safetensors written"
    figures = {"layers": {}, "max_delta_diff": 0.0}

    pm = get_plugin_manager(arch)
    if pm.hook.load_pipeline.get_hookimpls() and pm.hook.load_lora.get_hookimpls():
        pipeline = pm.hook.load_pipeline(model_path=model, device="cpu", dtype=torch.float32)
        pm.hook.load_lora(pipeline=pipeline, path=straight.weights, adapter_name="default")
        compared = 0
        for name in trainer.lora_configs:
            loaded = _pipeline_component(pipeline, name, trainer.components[name])
            if loaded is None:
                continue
            assert_same_lora(trainer.components[name], loaded, atol=1e-6)
            want, got = lora_deltas(trainer.components[name]), lora_deltas(loaded)
            figures["layers"][name] = len(want)
            for key in want:
                figures["max_delta_diff"] = max(figures["max_delta_diff"], float((want[key] - got[key]).abs().max()))
            compared += 1
        assert compared, "the pipeline exposes none of the trained components by name"

    Trainer(tiny_config(arch, model, data, tmp_path / "resumed", **{**settings, "max_steps": 2})).setup().run()
    resumed = Trainer(tiny_config(arch, model, data, tmp_path / "resumed", **settings, resume="latest")).setup().run()
    a, b = load_file(str(straight.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"resumed run differs at {key}"
    return figures


def eval_loss(trainer, dataset=None, seed: int = 1234, repeats: int = 4) -> float:
    """Mean denoising loss of a set-up :class:`lorakit.training.Trainer` over ``dataset``
    (default: its training set) with fixed noise and timesteps drawn from ``seed``; no
    update, LoRA dropout off."""
    import torch

    dataset = trainer.dataset if dataset is None else dataset
    by_size: dict = {}  # one size per batch (a single group unless --buckets)
    for i, example in enumerate(dataset.examples):
        by_size.setdefault(trainer.size_of(example[0]), []).append(i)
    bs = trainer.config.batch_size
    chunks = []
    for size in sorted(by_size):
        ids = by_size[size]
        chunks += [ids[i : i + bs] for i in range(0, len(ids), bs)]
    generator = torch.Generator().manual_seed(seed)
    trained = [trainer.components[n] for n in trainer.lora_configs]
    for module in trained:
        module.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for _ in range(repeats):
                for indices in chunks:
                    batch = trainer.make_batch(0, indices, dataset)
                    loss, _ = trainer.loss_on(batch, generator)
                    total, n = total + float(loss), n + 1
    finally:
        for module in trained:
            module.train()
    return total / n
