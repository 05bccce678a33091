"""Options belong to who declares them: the core, an objective, an arch or a mode.

A run accepts the core's options plus its arch's, its objective's and its modes'; any
other is refused in one line that says whose option it is. Config files use the flags'
names. No torch, no model: these tests only need the plugins' declarations.
"""

from __future__ import annotations

import pytest

from lorakit import Arch, ArchInfo, LorakitError, Option, plugins
from lorakit.config import TrainConfig, build_config, resume_keys, run_options, validate


class _Flowish(Arch):
    """A declaration-only arch: its own option, the flow objective, a 16-px size multiple."""

    info = ArchInfo(
        description="toy flow arch (options test)",
        denoiser="transformer",
        default_targets={"transformer": ["to_q"]},
        objective="flow",
        size_multiple=16,
        options=(Option("guidance", float, 1.0, "Guidance value the transformer is trained with.", minimum=0,
                        resume=True, panel="toy"),),
        refuses={"random_flip": "--arch toyflow is trained on text-aligned layouts; drop --random-flip."},
    )


@pytest.fixture
def toyflow():
    plugins.register("toyflow", _Flowish)
    yield "toyflow"
    plugins.unregister("toyflow")


def _config(arch, **values):
    return TrainConfig(arch=arch, model="m", data="d", output="o", **values)


def test_an_arch_declares_its_own_option_with_a_default_and_a_range(toyflow):
    assert validate(_config(toyflow)).guidance == 1.0
    assert validate(_config(toyflow, guidance=3.5)).guidance == 3.5
    with pytest.raises(LorakitError, match=r"^--guidance must be >= 0, got -1\.$"):
        validate(_config(toyflow, guidance=-1.0))
    assert "guidance" in resume_keys(_config(toyflow))


def test_another_archs_option_is_refused_naming_its_owner(toyflow):
    with pytest.raises(LorakitError, match=r"--guidance does not apply to --arch sd15 \(it is an option of --arch toyflow\)"):
        validate(_config("sd15", guidance=2.0))


def test_objective_options_apply_only_to_archs_of_that_objective(toyflow):
    assert "snr_gamma" in run_options("sd15") and "snr_gamma" not in run_options(toyflow)
    assert "weighting_scheme" in run_options(toyflow) and "weighting_scheme" not in run_options("sd15")
    with pytest.raises(LorakitError, match=r"--snr-gamma does not apply to --arch toyflow \(it is an option of the ddpm objective"):
        validate(_config(toyflow, snr_gamma=5.0))
    with pytest.raises(LorakitError, match=r"--weighting-scheme must be one of none, sigma_sqrt, cosmap"):
        validate(_config(toyflow, weighting_scheme="uniform"))


def test_refused_core_option_gets_the_archs_reason_and_the_default_is_fine(toyflow):
    with pytest.raises(LorakitError, match=r"^--arch toyflow is trained on text-aligned layouts; drop --random-flip\.$"):
        validate(_config(toyflow, random_flip=True))
    validate(_config(toyflow, random_flip=False))  # the default value is not a request


def test_resolution_must_be_a_multiple_of_the_archs_size_multiple(toyflow):
    with pytest.raises(LorakitError, match=r"--resolution must be a multiple of 16 for --arch toyflow, got 40"):
        validate(_config(toyflow, resolution=40))
    validate(_config(toyflow, resolution=48))
    validate(_config("sd15", resolution=40))  # sd15's multiple is 8


def test_config_file_keys_are_the_flags_names_and_yaml_numbers_work(tmp_path, toyflow):
    path = tmp_path / "run.yaml"
    path.write_text(
        "arch: toyflow\nmodel: m\ndata: d\noutput: o\nlearning-rate: 1e-4\nlora-dropout: 0.1\n"
        "guidance: 2\ntarget_modules: to_q,to_k\n"
    )
    config = build_config({}, str(path))
    assert config.learning_rate == 1e-4 and config.dropout == 0.1 and config.guidance == 2.0
    assert config.target_modules == ["to_q", "to_k"]
    assert build_config({"learning_rate": 5e-4}, str(path)).learning_rate == 5e-4  # a flag wins


def test_config_file_value_of_the_wrong_type_or_unknown_key_is_one_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('arch = "sd15"\nmodel = "m"\ndata = "d"\noutput = "o"\nmax-steps = 2.5\n')
    with pytest.raises(LorakitError, match=r"'max-steps' must be a whole number, got 2\.5"):
        build_config({}, str(path))
    path.write_text('arch = "sd15"\nmodel = "m"\ndata = "d"\noutput = "o"\nlearning-rat = 1e-3\n')
    with pytest.raises(LorakitError, match=r"unknown option 'learning-rat'"):
        build_config({}, str(path))


def test_the_saved_run_config_is_a_valid_config_file(tmp_path):
    config = build_config({"arch": "sd15", "model": "m", "data": "d", "output": "o", "rank": 8, "snr_gamma": 5.0})
    path = tmp_path / "lorakit_config.json"
    path.write_text(config.to_json())
    again = build_config({}, str(path))
    assert again == config


def test_non_finite_numbers_are_refused_up_front():
    for value in (float("nan"), float("inf")):
        with pytest.raises(LorakitError, match=r"--learning-rate must be a finite number"):
            validate(_config("sd15", learning_rate=value))
