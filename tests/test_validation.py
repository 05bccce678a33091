"""Validation samples that show progress: several prompts (commas and all), several images per
prompt at fixed seeds, a grid per check, checks before the first step, every N steps or
epochs and at the end; the images are those of the base model and of the trained LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lorakit import validation
from lorakit.config import build_config
from lorakit.errors import LorakitError
from lorakit.inference import generate
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

PROMPTS = ["a red circle, on white", "a blue square"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("validation") / "model")


def config(model, output, **overrides):
    values = dict(report_to="none", validation_prompt=PROMPTS, num_validation_images=2, validation_steps=2,
                  seed=3)
    values.update(overrides)
    return tiny_config("sd15", model, example_data(), output, **values)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "o"
    result = Trainer(config(model, out, max_steps=3, validation_every=2, learning_rate=5e-2)).setup().run()
    return out, result


def test_checks_before_the_first_step_every_n_steps_and_at_the_end(run):
    out, _ = run
    names = sorted(p.name for p in (out / "samples").iterdir())
    expected = sorted(f"step-{s:06d}-{k}.png" for s in (0, 2, 3) for k in range(4))
    assert names == sorted(expected + [f"step-{s:06d}-grid.png" for s in (0, 2, 3)])
    manifest = json.loads((out / "lorakit_manifest.json").read_text())["paths"]
    assert {f"samples/{n}" for n in names} <= set(manifest)


def test_the_grid_is_a_row_per_prompt_and_a_column_per_seed(run):
    out, _ = run
    grid = pixels(out / "samples" / "step-000002-grid.png")
    assert grid.shape == (64, 64, 3)
    for k in range(4):
        row, col = divmod(k, 2)
        tile = grid[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32]
        assert np.array_equal(tile, pixels(out / "samples" / f"step-000002-{k}.png"))


def test_step_0_is_the_base_model_and_the_end_is_the_trained_lora_at_fixed_seeds(model, run):
    out, result = run
    for k, (prompt, seed) in enumerate((p, s) for p in PROMPTS for s in (3, 4)):
        base = generate("sd15", str(model), [prompt], steps=2, resolution=32, seed=seed)[0]
        assert np.abs(np.asarray(base, dtype=np.int16) - pixels(out / "samples" / f"step-000000-{k}.png")).max() <= 1
        trained = generate("sd15", str(model), [prompt], [(result.weights, 1.0)], steps=2, resolution=32, seed=seed)[0]
        assert np.abs(np.asarray(trained, dtype=np.int16) - pixels(out / "samples" / f"step-000003-{k}.png")).max() <= 1
    # the same seed at every check, so the LoRA's effect is what changes; the seeds differ within a check
    assert not np.array_equal(pixels(out / "samples" / "step-000000-0.png"), pixels(out / "samples" / "step-000003-0.png"))
    assert not np.array_equal(pixels(out / "samples" / "step-000000-0.png"), pixels(out / "samples" / "step-000000-1.png"))


def test_every_n_epochs(model, tmp_path):
    out = tmp_path / "o"
    # 12 images at batch 4: 3 steps an epoch; checks at 0, after epochs 2 and 4 (steps 6, 12), and the end
    Trainer(config(model, out, max_steps=None, epochs=5, batch_size=4, validation_epochs=2,
                   validation_prompt=["a red circle"], num_validation_images=1)).setup().run()
    steps = sorted({int(p.name[5:11]) for p in (out / "samples").glob("step-*-grid.png")})
    assert steps == [0, 6, 12, 15]


def test_a_resumed_run_does_not_redo_step_0(model, tmp_path):
    out = tmp_path / "o"
    c = config(model, out, max_steps=1, num_validation_images=1)
    Trainer(c).setup().run()
    assert not validation.first_check_due(c, out, 0)
    stamp = (out / "samples" / "step-000000-0.png").stat().st_mtime_ns
    (out / "samples" / "step-000000-grid.png").unlink()
    assert validation.first_check_due(c, out, 0)  # a missing image: the check is done again
    assert not validation.first_check_due(c, out, 1)  # past step 0 (a resume from checkpoint-N)
    assert (out / "samples" / "step-000000-0.png").stat().st_mtime_ns == stamp


def test_prompts_with_commas_from_the_cli_and_config_files(model, tmp_path):
    base = dict(arch="sd15", model=str(model), data=str(example_data()), output=str(tmp_path / "o"))
    assert build_config({**base, "validation_prompt": ["a, b", "c"]}).validation_prompt == ["a, b", "c"]
    (tmp_path / "one.yaml").write_text('validation_prompt: "a red circle, on white"\n')
    assert build_config(base, str(tmp_path / "one.yaml")).validation_prompt == ["a red circle, on white"]
    (tmp_path / "two.toml").write_text('validation-prompt = ["x, y", "z"]\nnum-validation-images = 3\n')
    c = build_config(base, str(tmp_path / "two.toml"))
    assert c.validation_prompt == ["x, y", "z"] and validation.seeds(c) == [0, 1, 2]


def test_the_cli_repeats_the_flag(model, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    out = tmp_path / "o"
    result = CliRunner().invoke(app, [
        "train", "--arch", "sd15", "--model", str(model), "--data", str(example_data()), "--output", str(out),
        "--max-steps", "1", "--resolution", "32", "--num-threads", "1", "--report-to", "none",
        "--validation-prompt", "a red circle, on white", "--validation-prompt", "a blue square",
        "--validation-steps", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "lorakit_config.json").read_text())["validation_prompt"] == PROMPTS
    assert sorted(p.name for p in (out / "samples").glob("step-000001-*.png")) == [
        "step-000001-0.png", "step-000001-1.png", "step-000001-grid.png"]


@pytest.mark.parametrize("flag", ["validation_every", "validation_epochs"])
def test_a_schedule_without_a_prompt_is_one_line(model, tmp_path, flag):
    from lorakit.config import validate

    with pytest.raises(LorakitError, match=f"--{flag.replace('_', '-')} writes sample images of --validation-prompt"):
        validate(tiny_config("sd15", model, example_data(), tmp_path / "o", **{flag: 2}))
