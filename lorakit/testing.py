"""Test helpers for plugin authors, loaded as a pytest plugin (``pytest11`` entry point).

The contract suite (:mod:`lorakit.contract`) checks an arch plugin the way a user meets it,
one named check per property (:data:`CONTRACT_CHECKS`). Two ways to run it:

* ``run_arch_contract(arch, tmp_path)`` -- every check; returns figures per check (``"not
  offered: ..."`` for a capability the arch lacks) or raises an AssertionError naming the
  failing check and hook.
* one test per (arch, check), sharing one tiny model and training run per arch::

      @pytest.mark.parametrize("check", CONTRACT_CHECKS)
      def test_contract(check, lorakit_contract):
          lorakit_contract("my-arch").verify(check)

Fixtures:

* ``lorakit_contract(arch, **overrides)`` -> the session's :class:`ArchContract` of ``arch``.
* ``lorakit_tiny_model(arch)`` -> folder of a tiny model written by the arch's
  ``write_tiny_model`` hook (one per arch per test session).
* ``lorakit_image_folder`` -> a fresh copy of lorakit's bundled captioned images.

Functions:

* :func:`tiny_config` -- a TrainConfig sized for tiny models (fast on CPU).
* :func:`lora_deltas` / :func:`assert_same_lora` -- every LoRA layer's effective weight
  delta, for comparing a trained component with one a pipeline loaded from file.

Nothing here imports torch until a fixture or function is used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorakit.contract import (  # noqa: F401  (the suite's public names, importable from here)
    CONTRACT_CHECKS,
    ArchContract,
    ContractFailure,
    NotOffered,
    register_mode_recipe,
)

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


@pytest.fixture(scope="session")
def _lorakit_contracts():
    return {}


@pytest.fixture
def lorakit_contract(_lorakit_contracts, tmp_path_factory):
    """Factory: ``lorakit_contract(arch, **overrides)`` -> the :class:`ArchContract` of ``arch``,
    one per (arch, overrides) per test session, so its checks share one model and run."""

    def get(arch: str, **overrides) -> ArchContract:
        key = (arch, repr(sorted(overrides.items())))
        if key not in _lorakit_contracts:
            _lorakit_contracts[key] = ArchContract(arch, tmp_path_factory.mktemp(f"contract-{arch}"), **overrides)
        return _lorakit_contracts[key]

    return get


def run_arch_contract(arch: str, tmp_path, data=None, **overrides) -> dict:
    """Every contract check of ``arch`` (:data:`CONTRACT_CHECKS`), for a plugin's own test suite.

    Trains a tiny model once (rank 4, alpha 8, 4 steps; text-encoder LoRA where supported)
    and checks targets, per-sample loss, batch-first encoders, exact reloads of model outputs
    (the arch's loader and diffusers'), exact resume, generation, samples and registered modes.
    Returns ``{check: figures}``, with ``"not offered: <why>"`` for what the arch does not
    offer; raises an AssertionError naming each failed check and its hook.
    """
    return ArchContract(arch, tmp_path, data, **overrides).run_all()


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
