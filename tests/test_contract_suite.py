"""The contract suite catches broken plugins, naming the hook that broke its contract.

Run on the toy arch of ``tests/toy_arch.py`` (no built-in plugin involved), and on the
same breakages derived from sd15 (skipped if that plugin is not installed).
"""

import dataclasses

import pytest

from lorakit.contract import ArchContract, ContractFailure, NotOffered
from lorakit.hookspecs import hookimpl
from lorakit.plugins import MODE_GROUP, register, unregister
from tests.toy_arch import ToyArch, ToyTextEncoder


def sd15():
    return pytest.importorskip("lorakit_plugins.sd15").SD15


BASES = {"toy": lambda: ToyArch, "sd15": sd15}


@pytest.fixture
def contract_of(tmp_path):
    """``contract_of(cls)``: the ArchContract of plugin class ``cls``, registered for this test."""
    names = []

    def make(cls, modes=None, **overrides):
        name = f"contract-{cls.__name__.lower()}-{len(names)}"
        register(name, cls)
        names.append(name)
        return ArchContract(name, tmp_path / name, modes=modes or {}, **overrides)

    yield make
    for name in names:
        unregister(name)


def failure(contract, check) -> ContractFailure:
    with pytest.raises(ContractFailure) as caught:
        contract.check(check)
    return caught.value


def test_toy_arch_passes_every_check_it_offers(contract_of):
    figures = contract_of(ToyArch).run_all()
    assert figures["targets"]["layers"] == {"denoiser": 4, "text_encoder": 1}
    assert figures["reload"]["max_output_diff"] < 1e-5 < figures["reload"]["lora_effect"]
    assert figures["loss"]["batch"] == 2 and figures["resume"]["steps"] == "2+2 == 4"
    assert figures["batch_first"]["encode_text(text_encoder)"] == {"text_embeds": [3, 16]}
    for check, missing in (("diffusers_reload", "pipeline_class"), ("generate", "generate_images"),
                           ("samples", "build_pipeline"), ("modes", "mode recipe")):
        assert figures[check].startswith("not offered: ") and missing in figures[check], figures[check]


@pytest.mark.parametrize("base", BASES)
def test_a_scalar_loss_fails_naming_compute_loss(base, contract_of):
    parent = BASES[base]()

    class ScalarLoss(parent):
        @hookimpl
        def compute_loss(self, components, batch, config, generator):
            return parent.compute_loss(self, components, batch, config, generator).mean()

    found = failure(contract_of(ScalarLoss), "loss")
    assert found.check == "loss" and found.hooks == ("compute_loss",)
    assert "compute_loss" in str(found) and "shape ()" in str(found), found


@pytest.mark.parametrize("base", BASES)
def test_a_loss_of_shape_b_by_1_fails(base, contract_of):
    parent = BASES[base]()

    class ColumnLoss(parent):
        @hookimpl
        def compute_loss(self, components, batch, config, generator):
            return parent.compute_loss(self, components, batch, config, generator)[:, None]

    assert "shape (2, 1)" in str(failure(contract_of(ColumnLoss), "loss"))


@pytest.mark.parametrize("base", BASES)
def test_a_transposed_prompt_encoding_fails_naming_encode_prompt(base, contract_of):
    parent = BASES[base]()

    class Transposed(parent):
        @hookimpl
        def encode_prompt(self, components, captions):
            out = parent.encode_prompt(self, components, captions)
            return {key: value.transpose(0, -1) for key, value in out.items()}

    found = failure(contract_of(Transposed), "batch_first")
    assert found.hooks == ("encode_prompt",) and "expected batch first (3, ...)" in str(found), found


@pytest.mark.parametrize("base", BASES)
def test_a_target_naming_no_layer_fails_naming_target_modules(base, contract_of):
    parent = BASES[base]()
    targets = dict(parent.info.default_targets)
    targets[parent.info.denoiser] = [*targets[parent.info.denoiser], "to_qq"]

    class BadTarget(parent):
        info = dataclasses.replace(parent.info, default_targets=targets)

    found = failure(contract_of(BadTarget), "targets")
    assert found.hooks == ("target_modules",) and "to_qq" in str(found), found


@pytest.mark.parametrize("base", BASES)
def test_a_saved_file_that_reloads_differently_fails_the_reload(base, contract_of):
    parent = BASES[base]()

    class Scaled(parent):
        @hookimpl
        def save_lora(self, components, lora_layers, output_dir, weight_name):
            scaled = {name: ({k: v * 1.01 if "lora_B" in k else v for k, v in state.items()}, meta)
                      for name, (state, meta) in lora_layers.items()}
            parent.save_lora(self, components, scaled, output_dir, weight_name)

    contract = contract_of(Scaled)
    found = failure(contract, "reload")
    assert "save_lora" in found.hooks and "load_lora" in found.hooks and "differs from the trained one" in str(found)
    if parent.info.pipeline_loads_lora and parent.info.pipeline_class:
        assert "save_lora" in str(failure(contract, "diffusers_reload"))


def test_a_loader_that_drops_a_component_fails_the_reload(contract_of):
    class DropsTextEncoder(ToyArch):
        @hookimpl
        def load_lora(self, pipeline, path, adapter_name):
            ToyArch.load_lora(self, pipeline, path, adapter_name)
            pipeline.components["text_encoder"] = pipeline.text_encoder = ToyTextEncoder()

    found = failure(contract_of(DropsTextEncoder), "reload")
    assert "no ToyTextEncoder carrying LoRA for the trained component 'text_encoder'" in str(found), found


def test_a_lora_without_effect_cannot_pass_the_reload(contract_of):
    class Untrained(ToyArch):
        @hookimpl
        def compute_loss(self, components, batch, config, generator):
            return ToyArch.compute_loss(self, components, batch, config, generator) * 0

    found = failure(contract_of(Untrained), "reload")
    assert "does not change the denoiser's output" in str(found), found


def test_a_loss_with_its_own_random_state_breaks_resume(contract_of):
    import torch

    noise = torch.Generator().manual_seed(0)  # outside the run's checkpointed state

    class OwnNoise(ToyArch):
        @hookimpl
        def compute_loss(self, components, batch, config, generator):
            return ToyArch.compute_loss(self, components, batch, config, noise)

    found = failure(contract_of(OwnNoise), "resume")
    assert "compute_loss" in found.hooks and "straight steps" in str(found), found


def test_a_missing_capability_is_reported_not_passed(contract_of):
    class NoReload(ToyArch):
        load_pipeline = None
        load_lora = None

    with pytest.raises(NotOffered, match="no load_pipeline / load_lora hook"):
        contract_of(NoReload).check("reload")


def test_run_arch_contract_names_the_failing_check_and_hook(tmp_path):
    from lorakit.testing import run_arch_contract

    class ScalarLoss(ToyArch):
        @hookimpl
        def compute_loss(self, components, batch, config, generator):
            return ToyArch.compute_loss(self, components, batch, config, generator).sum()

    register("contract-scalar", ScalarLoss)
    try:
        with pytest.raises(AssertionError) as caught:
            run_arch_contract("contract-scalar", tmp_path, modes={})
    finally:
        unregister("contract-scalar")
    message = str(caught.value)
    # the loss check names compute_loss; the training run refuses the scalar too
    assert "contract check 'loss' failed (hook compute_loss)" in message, message
    assert "contract check 'reload' failed" in message and "compute_loss returned shape ()" in message, message


class ToyMode:
    """A mode that changes nothing: enough to run the modes check without a built-in mode."""

    @hookimpl
    def declare_options(self):
        return []


def test_modes_run_their_recipes_and_a_failing_one_is_named(contract_of):
    def recipe(contract, folder):
        _, result = contract.train(folder, modes=["toy-mode"], max_steps=1)
        return {"steps": result.global_step}

    def broken(contract, folder):
        raise RuntimeError("the mode's loss broke")

    register("toy-mode", ToyMode, group=MODE_GROUP)
    try:
        figures = contract_of(ToyArch, modes={"toy-mode": recipe}).check("modes")
        assert figures["toy-mode"] == {"steps": 1}
        found = failure(contract_of(ToyArch, modes={"toy-mode": broken}), "modes")
        assert found.hooks[0] == "mode toy-mode" and "the mode's loss broke" in str(found), found
    finally:
        unregister("toy-mode", group=MODE_GROUP)
