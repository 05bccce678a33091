"""diffusers' text-to-image LoRA guide, as its users run it: epochs, experiment tracking,
the launcher's precision, and the guide's Naruto command translated to lorakit flags.

All on the tiny SD1.5 and the bundled 12 captioned images (3 steps per epoch at batch 4).
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit import tracking
from lorakit.errors import LorakitError
from lorakit.progress import PlainProgress
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

#: docs/usage.md's translation of the guide's command, run here on tiny stand-ins ($MODEL etc.).
GUIDE = Path(__file__).parents[1] / "docs" / "usage.md"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("workflow") / "model")


def config(model, output, **overrides):
    values = dict(max_steps=None, batch_size=4, report_to="none")
    values.update(overrides)
    return tiny_config("sd15", model, example_data(), output, **values)


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


# ---------------------------------------------------------------------------- epochs


def test_epochs_train_every_batch_of_each_epoch_and_show_the_epoch(model, tmp_path):
    out = io.StringIO()
    trainer = Trainer(config(model, tmp_path / "o", epochs=3), progress=PlainProgress(out, every=1)).setup()
    result = trainer.run()
    assert result.global_step == 9 and trainer.config.max_steps == 9  # 12 images / batch 4 = 3 steps an epoch
    lines = out.getvalue().splitlines()
    assert "epoch 1/3 step 3/9" in "\n".join(lines) and "epoch 2/3 step 4/9" in "\n".join(lines)
    assert any(line.startswith("epoch 3/3 step 9/9") for line in lines)
    saved = json.loads((tmp_path / "o" / "lorakit_config.json").read_text())
    assert saved["epochs"] == 3 and saved["max_steps"] == 9


@pytest.mark.parametrize("given, steps", [
    (dict(epochs=3, max_steps=5), 5),        # --max-steps first
    (dict(epochs=1, max_steps=100), 3),      # --epochs first
    (dict(epochs=2, gradient_accumulation=2), 3),  # 6 micro-batches / 2, rounded up
    (dict(), 1000),                          # neither: today's default
])
def test_the_first_limit_reached_ends_the_run(model, tmp_path, given, steps):
    trainer = Trainer(config(model, tmp_path / "o", **given))
    trainer.setup()
    assert trainer.config.max_steps == steps
    trainer.guard.close()


def test_one_epoch_then_resume_to_three_equals_three_straight(model, tmp_path):
    straight = Trainer(config(model, tmp_path / "a", epochs=3)).setup().run()
    Trainer(config(model, tmp_path / "b", epochs=1, checkpoint_every=3)).setup().run()
    resumed = Trainer(config(model, tmp_path / "b", epochs=3, resume="latest")).setup().run()
    assert resumed.global_step == straight.global_step == 9
    a, b = load_file(str(straight.weights)), load_file(str(resumed.weights))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- tracking


def test_tensorboard_gets_every_step_the_config_and_samples(model, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "o"
    result = Trainer(config(model, out, epochs=2, report_to="tensorboard", max_grad_norm=0.05, run_name="tb",
                            validation_prompt="a red circle", validation_every=3)).setup().run()
    logged = events(out / "logs" / "tb")
    steps = list(range(1, 7))
    scalars = {tag: {e.step: e.value for e in logged.Scalars(tag)} for tag in logged.Tags()["scalars"]}
    for tag in ("train/loss", "train/loss_smoothed", "train/lr/unet", "train/grad_norm", "train/epoch",
                "train/steps_per_second", "train/samples_per_second"):
        assert sorted(scalars[tag]) == steps, tag
    assert [round(scalars["train/loss"][s], 5) for s in steps] == [round(x, 5) for x in result.losses]
    assert scalars["train/lr/unet"][1] == pytest.approx(1e-3)
    assert [scalars["train/epoch"][s] for s in steps] == [1, 1, 1, 2, 2, 2]
    assert min(scalars["train/grad_norm"].values()) > 0.05  # the norm before clipping to 0.05
    assert [e.step for e in logged.Images("validation")] == [0, 3, 6]  # 0: the base model, before training
    hparams = yaml.safe_load(next((out / "logs" / "tb").glob("*/hparams.yml")).read_text())
    assert hparams["epochs"] == 2 and hparams["learning_rate"] == 1e-3 and hparams["mixed_precision"] == "no"
    # every file the tracker wrote is the run's: --overwrite takes them away with it
    manifest = json.loads((out / "lorakit_manifest.json").read_text())["paths"]
    written = [str(p.relative_to(out)) for p in (out / "logs").rglob("*")]
    assert set(written) <= set(manifest)
    Trainer(config(model, out, max_steps=1, report_to="none", overwrite=True)).setup().run()
    assert not list((out / "logs").rglob("events.out.tfevents.*"))


def test_a_users_file_with_a_sample_name_is_not_logged(model, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "o"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "step-000003-0.png").write_bytes((example_data() / "red.png").read_bytes())
    Trainer(config(model, out, max_steps=6, report_to="tensorboard", run_name="tb",
                   validation_prompt="a red circle", validation_every=3)).setup().run()
    assert [e.step for e in events(out / "logs" / "tb").Images("validation")] == [0, 6]


def test_default_is_tensorboard_when_installed_else_none(model, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    c = tiny_config("sd15", model, example_data(), tmp_path / "o")  # no --report-to
    assert c.report_to is None and tracking.chosen(c) == ["tensorboard"]
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    assert tracking.chosen(c) == []


@pytest.mark.parametrize("report", ["tensorboard", "wandb", "all"])
def test_a_missing_tracker_package_is_one_line_before_the_model_loads(model, tmp_path, monkeypatch, report):
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    trainer = Trainer(config(model, tmp_path / "o", max_steps=1, report_to=report))
    with pytest.raises(LorakitError, match=r"pip install lorakit\[(tensorboard|wandb)\]") as caught:
        trainer.setup()
    assert "\n" not in str(caught.value) and not hasattr(trainer, "components")


def test_dreambooth_losses_are_tracked(tmp_path, lorakit_tiny_model):
    pytest.importorskip("tensorboard")
    from tests.test_dreambooth import _class_folder, _db_config, _instance_folder

    instance = _instance_folder(tmp_path)
    classes = _class_folder(tmp_path, ["green.png", "yellow_circle.png"])
    out = tmp_path / "db"
    Trainer(_db_config(lorakit_tiny_model("sd15"), out, instance, class_data=str(classes), num_class_images=2,
                       batch_size=2, max_steps=2, report_to="tensorboard")).setup().run()
    tags = events(out / "logs" / "db").Tags()["scalars"]
    assert {"train/instance_loss", "train/prior_loss", "train/loss"} <= set(tags)


def test_wandb_offline(model, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "o"
    Trainer(config(model, out, max_steps=2, report_to="wandb", run_name="w")).setup().run()
    runs = list((out / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


# ---------------------------------------------------------------------------- precision


def test_the_launchers_precision_is_used_when_no_flag_is_given(model, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    trainer = Trainer(config(model, tmp_path / "o", max_steps=1)).setup()
    unet = trainer.components["unet"]
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if "lora_" not in n)
    assert trainer.params and all(p.dtype == torch.float32 for p in trainer.params)
    assert trainer.config.mixed_precision == "bf16"
    trainer.run()
    assert json.loads((tmp_path / "o" / "lorakit_config.json").read_text())["mixed_precision"] == "bf16"


def test_a_flag_that_contradicts_the_launcher_is_one_line(model, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(LorakitError, match="--mixed-precision no conflicts with accelerate's bf16"):
        Trainer(config(model, tmp_path / "o", max_steps=1, mixed_precision="no")).setup()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch` with no precision: the flag wins
    trainer = Trainer(config(model, tmp_path / "p", max_steps=1, mixed_precision="bf16")).setup()
    assert trainer.config.mixed_precision == "bf16"
    trainer.guard.close()


# ---------------------------------------------------------------------------- the guide's command


def guide_command() -> list[str]:
    """The ``lorakit train`` command of docs/usage.md's "Following diffusers' LoRA guide"."""
    text = GUIDE.read_text().split("## Following diffusers' LoRA guide", 1)[1]
    block = text.split("```bash", 2)[2].split("```", 1)[0]  # the second block: lorakit's translation
    command = " ".join(line.rstrip("\\").strip() for line in block.splitlines() if not line.startswith("#"))
    args = shlex.split(command)
    return args[args.index("train") + 1:]


def naruto_parquet(root: Path) -> Path:
    """A local stand-in for lambdalabs/naruto-blip-captions: parquet with ``image`` and ``text``."""
    import datasets

    rows = [json.loads(line) for line in (example_data() / "metadata.jsonl").read_text().splitlines()]
    images = [{"bytes": (example_data() / r["file_name"]).read_bytes(), "path": None} for r in rows]
    table = datasets.Dataset.from_dict({"image": images, "text": [r["text"] for r in rows]},
                                       features=datasets.Features(image=datasets.Image(), text=datasets.Value("string")))
    folder = root / "naruto-blip-captions" / "data"
    folder.mkdir(parents=True)
    table.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    return folder.parent


def test_the_guides_naruto_command_runs_offline_and_logs_to_tensorboard(model, tmp_path):
    pytest.importorskip("tensorboard")
    from typer.testing import CliRunner

    from lorakit.cli import app

    stand_ins = {"$MODEL_NAME": str(model), "$DATASET_NAME": str(naruto_parquet(tmp_path)),
                 "$OUTPUT_DIR": str(tmp_path / "naruto")}
    args = [stand_ins.get(a, a) for a in guide_command()]
    # tiny sizes and a short run instead of 512 px and 15000 steps; the rest as the guide has it
    small = {"--resolution": "32", "--gradient-accumulation": "1", "--batch-size": "4", "--num-workers": "0",
             "--num-validation-images": "2"}
    for i, arg in enumerate(args):
        if arg in small:
            args[i + 1] = small[arg]
    drop = {"--max-steps", "--report-to", "--checkpoint-every", "--validation-every", "--hub-model-id"}
    args = [a for a in args if a != "--push-to-hub"]  # offline: no Hub (tests/test_hub.py covers it)
    keep = [a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop)]
    keep += ["--report-to", "tensorboard", "--epochs", "2", "--validation-every", "3", "--num-threads", "1"]
    result = CliRunner().invoke(app, ["train", *keep])
    assert result.exit_code == 0, result.output
    logged = events(tmp_path / "naruto" / "logs" / "naruto")
    for tag in ("train/loss", "train/lr/unet", "train/grad_norm"):
        assert [e.step for e in logged.Scalars(tag)] == [1, 2, 3, 4, 5, 6], tag
    assert [e.step for e in logged.Images("validation")] == [0, 3, 6]  # 0: the base model, before training
    samples = sorted(p.name for p in (tmp_path / "naruto" / "samples").glob("step-*.png"))
    # the guide's prompt, two seeds, at each check (step 0, each of the 2 epochs' ends)
    assert samples == [f"step-{s:06d}-{k}.png" for s in (0, 3, 6) for k in ("0", "1", "grid")]
    shutil.rmtree(tmp_path / "naruto-blip-captions")
