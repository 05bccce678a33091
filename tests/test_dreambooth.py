"""DreamBooth prior preservation (mode ``dreambooth``) on tiny models.

What a user would notice: the prior term really is in the loss (weight 0 == a plain run,
weight > 0 differs, both parts are reported), class images are reused / generated /
resumed without touching the user's files, resume is exact, the LoRA loads in diffusers,
and mistakes end in one clear line.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.testing import assert_same_lora, example_data, tiny_config
from lorakit.training import Trainer

INSTANCE_PROMPT = "a photo of sks shape"
CLASS_PROMPT = "a photo of a shape"
GEN_STEPS = 2  # class-image inference steps: enough to exercise the pipeline


def _instance_folder(root: Path, names=("red.png", "red_circle.png", "blue.png", "blue_circle.png")) -> Path:
    """Subject images, plus a metadata.jsonl captioning them with the instance prompt (in
    file order) so the same folder can feed a plain ``--data`` run."""
    folder = root / "instance"
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(example_data() / name, folder / name)
    rows = [json.dumps({"file_name": n, "text": INSTANCE_PROMPT}) for n in sorted(names)]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _class_folder(root: Path, names) -> Path:
    folder = root / "class"
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(example_data() / name, folder / name)
    return folder


def _db_config(model, output, instance, arch="sd15", **overrides):
    values = dict(
        modes=["dreambooth"],
        instance_data=str(instance),
        instance_prompt=INSTANCE_PROMPT,
        class_prompt=CLASS_PROMPT,
        class_generation_steps=GEN_STEPS,
    )
    values.update(overrides)
    return tiny_config(arch, model, None, output, **values)


class Recorder:
    """A progress object that keeps what the training loop reports."""

    def __init__(self):
        self.updates = []

    def start(self, total, completed=0):
        pass

    def update(self, step, loss, lr, metrics=None):
        self.updates.append((step, loss, dict(metrics or {})))

    def note(self, text):
        pass

    def finish(self):
        pass


def _weights(result) -> dict:
    return load_file(str(result.weights))


# ---------------------------------------------------------------------- the loss


def test_prior_weight_zero_is_a_plain_run_and_positive_weight_adds_the_prior(tmp_path, lorakit_tiny_model):
    model = lorakit_tiny_model("sd15")
    instance = _instance_folder(tmp_path)
    class_dir = _class_folder(tmp_path, ["green.png", "yellow_circle.png", "purple.png"])
    # LoRA dropout draws from the global RNG: the class half must not disturb the instance half's draws.
    common = dict(batch_size=2, max_steps=4, dropout=0.1)

    plain_trainer = Trainer(tiny_config("sd15", model, instance, tmp_path / "plain", **common)).setup()
    plain = plain_trainer.run()

    runs = {}
    for weight in (0.0, 1.0):
        progress = Recorder()
        config = _db_config(
            model, tmp_path / f"db{weight}", instance, class_data=str(class_dir), num_class_images=3,
            prior_loss_weight=weight, **common,
        )
        trainer = Trainer(config, progress=progress).setup()
        # 4 instance images, 3 class images -> 4 examples of [instance, class], like the plain run's 4
        assert len(trainer.dataset) == 4 and trainer.dataset.group_size == 2
        runs[weight] = (trainer.run(), progress)
        if weight == 0.0:
            zero_trainer = trainer

    plain_w = _weights(plain)
    zero_w, one_w = _weights(runs[0.0][0]), _weights(runs[1.0][0])
    assert plain_w.keys() == zero_w.keys() == one_w.keys()
    for key in plain_w:
        assert torch.equal(plain_w[key], zero_w[key]), f"weight 0 differs from the plain run at {key}"
    assert any(not torch.equal(plain_w[k], one_w[k]) for k in plain_w), "the prior term changed nothing"
    # an unpaired (plain) dataset evaluated in dreambooth mode gets the arch's plain loss
    assert zero_trainer.eval_loss(plain_trainer.dataset, repeats=1) == plain_trainer.eval_loss(repeats=1)

    for weight, (result, progress) in runs.items():
        assert len(progress.updates) == 4
        for (step, loss, metrics), plain_loss in zip(progress.updates, plain.losses):
            assert set(metrics) >= {"instance_loss", "prior_loss"}
            assert metrics["prior_loss"] > 0
            assert loss == pytest.approx(metrics["instance_loss"] + weight * metrics["prior_loss"], rel=1e-5)
            if weight == 0.0:
                # the instance half is the plain run, step by step
                assert metrics["instance_loss"] == pytest.approx(plain_loss, rel=1e-6)


def test_resume_is_exact_and_repeats_grow_the_epoch(tmp_path, lorakit_tiny_model):
    model = lorakit_tiny_model("sd15")
    instance = _instance_folder(tmp_path, names=("red.png", "blue_circle.png"))
    class_dir = _class_folder(tmp_path, ["green.png", "yellow.png", "purple_circle.png"])
    common = dict(
        class_data=str(class_dir), num_class_images=3, repeats=2, batch_size=2, max_steps=4, dropout=0.1,
        random_flip=True, prior_loss_weight=0.5,
    )
    straight = Trainer(_db_config(model, tmp_path / "a", instance, checkpoint_every=2, **common)).setup()
    assert len(straight.dataset) == 4  # 2 instance images x 2 repeats vs 3 class images
    straight = straight.run()

    resumed = _db_config(model, tmp_path / "b", instance, resume=str(tmp_path / "a" / "checkpoint-2"), **common)
    resumed = Trainer(resumed).setup().run()
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"resumed run differs at {key}"


# ---------------------------------------------------------------------- class images


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _patch_generate(monkeypatch, calls, fail_on_call=None):
    """Count the prompts the arch is asked to render; optionally die (like Ctrl-C) on one call."""
    import lorakit_plugins.sd15 as sd15

    real = sd15.SD15.generate_images

    @functools.wraps(real)  # keeps pluggy's hookimpl marker
    def generate_images(self, pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale):
        calls.append(len(prompts))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt
        return real(self, pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale)

    monkeypatch.setattr(sd15.SD15, "generate_images", generate_images)


def test_class_images_are_reused_generated_and_resumed(tmp_path, lorakit_tiny_model, monkeypatch):
    import lorakit_plugins.dreambooth as dreambooth

    model = lorakit_tiny_model("sd15")
    instance = _instance_folder(tmp_path, names=("red.png", "blue.png"))
    # Two images of the user's; one happens to be named like a generated one and must survive.
    class_dir = _class_folder(tmp_path, ["green.png"])
    shutil.copy(example_data() / "yellow.png", class_dir / "lorakit-class-00001.png")
    users = _files(class_dir)
    instance_before = _files(instance)

    import lorakit_plugins.dreambooth.class_images as class_images

    monkeypatch.setattr(class_images, "GENERATION_BATCH", 2)
    calls = []
    _patch_generate(monkeypatch, calls, fail_on_call=2)
    config = _db_config(model, tmp_path / "out", instance, class_data=str(class_dir), num_class_images=6)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config).setup()
    after_interrupt = _files(class_dir)
    made_first = sorted(set(after_interrupt) - set(users))
    assert made_first == ["lorakit-class-00000.png", "lorakit-class-00000.txt",
                          "lorakit-class-00002.png", "lorakit-class-00002.txt"]
    assert not [n for n in after_interrupt if n.startswith(".")], "a partial file was left behind"

    monkeypatch.undo()
    calls = []
    _patch_generate(monkeypatch, calls)
    trainer = Trainer(config).setup()
    assert calls == [2], "the rerun must generate only the 2 missing images"
    final = _files(class_dir)
    pngs = sorted(n for n in final if n.endswith(".png"))
    assert len(pngs) == 6
    assert {n: final[n] for n in users} == users, "a user's class image was changed"
    assert {n: final[n] for n in made_first} == {n: after_interrupt[n] for n in made_first}
    generated = sorted(set(pngs) - set(users))
    assert generated == [f"lorakit-class-0000{i}.png" for i in (0, 2, 3, 4)]
    for name in generated:
        assert final[name.replace(".png", ".txt")].decode().strip() == CLASS_PROMPT
        from PIL import Image

        with Image.open(class_dir / name) as img:
            assert img.size == (32, 32)
            assert json.loads(img.text["lorakit"])["prompt"] == CLASS_PROMPT
    assert _files(instance) == instance_before, "the instance folder was written to"

    # all 6 class images are trained on, each with the class prompt; instances with theirs
    samples = trainer.dataset.samples()
    class_samples = [s for s in samples if s.extras["prior"] == 1]
    assert len(class_samples) == 6 and {s.caption for s in class_samples} == {CLASS_PROMPT}
    assert {s.caption for s in samples if s.extras["prior"] == 0} == {INSTANCE_PROMPT}

    # A resumed generation makes the same images an uninterrupted one does (per-image seeds).
    fresh = _class_folder(tmp_path / "again", ["green.png"])
    shutil.copy(example_data() / "yellow.png", fresh / "lorakit-class-00001.png")
    monkeypatch.undo()
    again = _db_config(model, tmp_path / "out2", instance, class_data=str(fresh), num_class_images=6)
    Trainer(again).setup()
    for name in generated:
        assert (fresh / name).read_bytes() == final[name], f"{name} differs from the resumed generation"


def test_sd15_dreambooth_lora_loads_in_diffusers(tmp_path, lorakit_tiny_model):
    from diffusers import StableDiffusionPipeline

    model = lorakit_tiny_model("sd15")
    instance = tmp_path / "subject"  # a plain folder: no captions at all
    instance.mkdir()
    for name in ("red.png", "red_circle.png", "orange.png"):
        shutil.copy(example_data() / name, instance / name)
    output = tmp_path / "out"
    config = _db_config(
        model, output, instance, num_class_images=4, train_text_encoder=True, max_steps=3, batch_size=2
    )
    trainer = Trainer(config).setup()
    result = trainer.run()

    generated = sorted((output / "class_images").glob("*.png"))
    assert len(generated) == 4, "class images go to OUTPUT/class_images by default"
    assert sorted(p.name for p in instance.iterdir()) == ["orange.png", "red.png", "red_circle.png"]

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(result.output_dir), weight_name=result.weights.name)
    assert_same_lora(trainer.components["unet"], pipe.unet)
    assert_same_lora(trainer.components["text_encoder"], pipe.text_encoder)


def test_sdxl_dreambooth_lora_loads_in_diffusers(tmp_path, lorakit_tiny_model):
    from lorakit.plugins import arch_entries

    if "sdxl" not in arch_entries():  # installed but broken must fail, not skip
        pytest.skip("the sdxl arch plugin is not installed")
    from diffusers import StableDiffusionXLPipeline

    model = lorakit_tiny_model("sdxl")
    instance = _instance_folder(tmp_path, names=("red.png", "red_circle.png"))
    config = tiny_config(
        "sdxl", model, None, tmp_path / "out", modes=["dreambooth"], instance_data=str(instance),
        instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT, class_generation_steps=GEN_STEPS,
        num_class_images=2, max_steps=2, batch_size=2, train_text_encoder=True,
    )
    progress = Recorder()
    trainer = Trainer(config, progress=progress).setup()
    result = trainer.run()
    assert len(list((tmp_path / "out" / "class_images").glob("*.png"))) == 2
    assert {"instance_loss", "prior_loss"} <= set(progress.updates[-1][2])

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(result.output_dir), weight_name=result.weights.name)
    assert_same_lora(trainer.components["unet"], pipe.unet)
    for name in trainer.trained_text_encoders:
        assert_same_lora(trainer.components[name], getattr(pipe, name))


# ---------------------------------------------------------------------- mistakes


def _cli(args):
    from typer.testing import CliRunner

    from lorakit.cli import app

    result = CliRunner().invoke(app, ["train", *map(str, args)])
    return result.exit_code, result.output


def test_cli_mistakes_end_in_one_clear_line(tmp_path, lorakit_tiny_model):
    model = lorakit_tiny_model("sd15")
    instance = _instance_folder(tmp_path, names=("red.png",))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    base = ["--arch", "sd15", "--model", model, "--resolution", "32", "--max-steps", "1", "--dreambooth"]
    full = ["--instance-data", instance, "--instance-prompt", INSTANCE_PROMPT, "--class-prompt", CLASS_PROMPT]

    def without(flag):
        i = full.index(flag)
        return full[:i] + full[i + 2 :]

    cases = [
        (without("--instance-data"), "--instance-data"),
        (without("--instance-prompt"), "--instance-prompt"),
        (without("--class-prompt"), "--class-prompt"),
        (["--instance-data", empty, *without("--instance-data")], "holds no images"),
        (["--instance-data", tmp_path / "nope", *without("--instance-data")], "does not exist"),
        ([*full, "--class-data", instance], "class image folder"),
        ([*full, "--data", instance], "--data is not used with --dreambooth"),
    ]
    for n, (args, expected) in enumerate(cases):
        code, output = _cli([*base, "--output", tmp_path / f"out{n}", *args])
        assert code == 1, output
        assert expected in output and "Traceback" not in output, output
        assert len(output.strip().splitlines()) == 1, output
    assert sorted(p.name for p in instance.iterdir()) == ["metadata.jsonl", "red.png"]


def test_arch_that_cannot_generate_says_so(tmp_path, lorakit_tiny_model):
    import lorakit_plugins.sd15 as sd15

    from lorakit import Arch, DiffusersArch
    from lorakit.plugins import register, unregister

    class NoPipeline(Arch):
        """An arch with every training hook of sd15 but no inference pipeline."""

        info = sd15.SD15.info
        pipeline_cls = DiffusersArch.pipeline_cls
        save_lora = DiffusersArch.save_lora
        load_components = sd15.SD15.load_components
        encode_images = sd15.SD15.encode_images
        encode_prompt = sd15.SD15.encode_prompt
        compute_loss = sd15.SD15.compute_loss

    register("nopipe", NoPipeline)
    try:
        model = lorakit_tiny_model("sd15")
        instance = _instance_folder(tmp_path, names=("red.png",))
        class_dir = _class_folder(tmp_path, ["green.png"])
        config = _db_config(model, tmp_path / "out", instance, arch="nopipe", class_data=str(class_dir),
                            num_class_images=3)
        from lorakit.errors import LorakitError

        with pytest.raises(LorakitError) as err:
            Trainer(config).setup()
        message = str(err.value)
        assert "--arch nopipe" in message and "build_pipeline" in message and "--class-data" in message
        assert "1 found" in message

        # given enough class images, the same arch trains fine
        config = _db_config(model, tmp_path / "out2", instance, arch="nopipe", class_data=str(class_dir),
                            num_class_images=1, max_steps=1)
        assert Trainer(config).setup().run().weights.is_file()
    finally:
        unregister("nopipe")


def test_buckets_are_refused_with_a_clear_line(tmp_path, lorakit_tiny_model):
    from lorakit.errors import LorakitError
    from lorakit.testing import example_data, tiny_config
    from lorakit.training import Trainer

    import shutil

    shutil.copytree(example_data(), tmp_path / "class")
    config = tiny_config(
        "sd15", lorakit_tiny_model("sd15"), None, tmp_path / "out", modes=["dreambooth"], buckets=True,
        instance_data=str(example_data()), instance_prompt="a photo of sks shape",
        class_prompt="a photo of a shape", class_data=str(tmp_path / "class"), num_class_images=2,
    )
    with pytest.raises(LorakitError, match="--buckets needs one image per example.*drop --buckets"):
        Trainer(config).setup()
