"""--print-config: the resolved options, as a config file that gives the same run, and no training."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.config import build_config
from lorakit.testing import example_data


def test_print_config_prints_a_config_file_of_the_same_run_and_trains_nothing(tmp_path, lorakit_tiny_model):
    model, out = lorakit_tiny_model("sd15"), tmp_path / "o"
    (tmp_path / "base.toml").write_text('rank = 8\nvalidation-prompt = "a red circle, on white"\n')
    args = ["train", "--config", str(tmp_path / "base.toml"), "--arch", "sd15", "--model", str(model),
            "--data", str(example_data()), "--output", str(out), "--lr", "3e-4", "--optimizer", "adafactor",
            "--validation-prompt", "a blue square", "--validation-prompt", "a, b", "--print-config"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["rank"] == 8 and printed["learning_rate"] == 3e-4 and printed["optimizer"] == "adafactor"
    assert printed["validation_prompt"] == ["a blue square", "a, b"]  # the flags win over the file
    assert printed["snr_gamma"] is None and "prediction_type" in printed  # the arch's objective options too
    assert not out.exists()  # nothing trained, nothing written
    (tmp_path / "printed.yaml").write_text(result.stdout)
    again = build_config({}, str(tmp_path / "printed.yaml"))
    assert again.to_dict() == build_config({k.replace("-", "_"): v for k, v in printed.items()}).to_dict()
    assert again.to_dict() == printed
