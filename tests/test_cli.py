"""The command line: user mistakes end in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.testing import example_data

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("cli") / "model")


def train_args(model, data, output, *extra):
    return ("train", "--arch", "sd15", "--model", model, "--data", data, "--output", output,
            "--max-steps", "2", "--resolution", "32", "--num-threads", "2", *extra)


def test_missing_data_path(sd15, tmp_path):
    r = run(*train_args(sd15, tmp_path / "nope", tmp_path / "out"))
    assert_one_line_error(r, "does not exist", "--data")


def test_folder_without_images(sd15, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("hi")
    r = run(*train_args(sd15, tmp_path / "empty", tmp_path / "out"))
    assert_one_line_error(r, "no images")


def test_bad_images_are_skipped_by_name(sd15, lorakit_image_folder, tmp_path):
    (lorakit_image_folder / "zero.png").write_bytes(b"")
    (lorakit_image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = (lorakit_image_folder / "metadata.jsonl").read_text().splitlines()
    rows += [json.dumps({"file_name": "zero.png", "text": "x"}), json.dumps({"file_name": "broken.png", "text": "y"})]
    (lorakit_image_folder / "metadata.jsonl").write_text("\n".join(rows))
    r = run(*train_args(sd15, lorakit_image_folder, tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert "zero.png" in r.stderr and "broken.png" in r.stderr
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_missing_caption_column(sd15, lorakit_image_folder, tmp_path):
    r = run(*train_args(sd15, lorakit_image_folder, tmp_path / "out", "--caption-column", "description"))
    assert_one_line_error(r, "description", "--caption-column", "text")


def test_sidecar_captions_need_a_caption_per_image(sd15, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(folder / "a.png")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(folder / "b.png")
    (folder / "a.txt").write_text("a thing")
    r = run(*train_args(sd15, folder, tmp_path / "out"))
    assert_one_line_error(r, "b.png", "b.txt")


def test_model_that_is_not_a_diffusers_model(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.ckpt").write_bytes(b"x")
    r = run(*train_args(folder, example_data(), tmp_path / "out"))
    assert_one_line_error(r, "not a diffusers model", "--arch sd15")


def test_sd15_pointed_at_an_sdxl_model(tmp_path):
    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    r = run(*train_args(folder, example_data(), tmp_path / "out"))
    line = assert_one_line_error(r, "StableDiffusionXLPipeline", "--arch sd15")
    from lorakit.plugins import arch_entries

    if "sdxl" in arch_entries():
        assert "use --arch sdxl" in line


def test_unknown_arch_lists_the_known_ones(tmp_path):
    r = run("train", "--arch", "sd99", "--model", tmp_path, "--data", example_data(), "--output", tmp_path / "o")
    assert_one_line_error(r, "unknown arch 'sd99'", "sd15")


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_rank_must_be_positive(sd15, tmp_path, rank):
    r = run(*train_args(sd15, example_data(), tmp_path / "out", "--rank", rank))
    assert_one_line_error(r, "--rank must be a positive integer")


def test_output_holding_an_earlier_run(sd15, tmp_path):
    out = tmp_path / "out"
    assert run(*train_args(sd15, example_data(), out, "--checkpoint-every", "1")).exit_code == 0
    before = (out / "pytorch_lora_weights.safetensors").read_bytes()
    r = run(*train_args(sd15, example_data(), out))
    assert_one_line_error(r, "earlier run", "--resume latest", "--overwrite")
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == before  # untouched

    r = run(*train_args(sd15, example_data(), out, "--resume", "latest", "--max-steps", "3"))
    assert r.exit_code == 0, r.output
    # --overwrite with a bad input fails before anything of the earlier run is removed
    r = run(*train_args(sd15, tmp_path / "missing", out, "--overwrite"))
    assert_one_line_error(r, "does not exist")
    assert (out / "checkpoint-1").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
    r = run(*train_args(sd15, example_data(), out, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert not (out / "checkpoint-1").exists()


def test_config_file_with_cli_override(sd15, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'arch = "sd15"\nmodel = "{sd15}"\ndata = "{example_data()}"\nrank = 2\nmax-steps = 1\nresolution = 32\n')
    r = run("train", "--config", cfg, "--output", tmp_path / "out", "--rank", "3")
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "out" / "lorakit_config.json").read_text())
    assert saved["rank"] == 3 and saved["max_steps"] == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: sd15\nrnak: 4\n")
    assert_one_line_error(run("train", "--config", bad, "--output", tmp_path / "o2"), "unknown option 'rnak'")


def test_real_process_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit.cli", "train", "--arch", "nope", "--model", str(tmp_path),
         "--data", str(example_data()), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "unknown arch 'nope'" in proc.stderr


def test_list_archs_is_fast_and_never_imports_torch():
    code = (
        "import sys, time\n"
        "from typer.testing import CliRunner\n"
        "from lorakit.cli import app\n"
        "r = CliRunner().invoke(app, ['list-archs', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(r.stdout)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    by_id = {r["id"]: r for r in rows}
    assert by_id["sd15"]["status"] == "ok" and by_id["sd15"]["distribution"] == "lorakit"
    print(f"list-archs subprocess: {elapsed:.2f}s")


def test_tiny_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = run("tiny", "sd15", tmp_path)
    assert_one_line_error(r, "not empty")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_generate_with_two_loras(sd15, tmp_path):
    for name in ("a", "b"):
        assert run(*train_args(sd15, example_data(), tmp_path / name)).exit_code == 0
    r = run("generate", "--arch", "sd15", "--model", sd15, "--prompt", "a red circle",
            "--lora", f"{tmp_path / 'a'}:0.7", "--lora", tmp_path / "b" / "pytorch_lora_weights.safetensors",
            "--steps", "2", "--resolution", "32", "--output", tmp_path / "img.png")
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(tmp_path / "img.png").size == (32, 32)
    r = run("generate", "--arch", "sd15", "--model", sd15, "--prompt", "x", "--lora", tmp_path / "a" / "x.bin",
            "--output", tmp_path / "img2.png")
    assert_one_line_error(r, "does not exist")


def test_every_cli_option_is_in_the_reference():
    """docs/cli.md is what the declarations generate: no option missing, none stale."""
    from lorakit.clidocs import render

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert text == render(), "docs/cli.md is out of date: python -m lorakit.clidocs > docs/cli.md"
    for flag in ("--learning-rate", "--snr-gamma", "--instance-prompt", "--dreambooth", "--config", "--lora"):
        assert f"`{flag}`" in text


def test_damaged_model_folder(sd15, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd15, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    r = run(*train_args(broken, example_data(), tmp_path / "out"))
    assert_one_line_error(r, "could not be loaded", "re-download")


def test_users_own_files_in_output_are_never_overwritten(sd15, tmp_path):
    """A README.md that lorakit did not write stays (the card goes beside it), and a run
    continued from another folder's checkpoint does not write over the run held in --output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    assert run(*train_args(sd15, example_data(), out, "--checkpoint-every", "1")).exit_code == 0
    assert (out / "README.md").read_text() == "my notes\n"
    assert "trained with lorakit" in (out / "lorakit_model_card.md").read_text()

    other = tmp_path / "other"
    assert run(*train_args(sd15, example_data(), other, "--max-steps", "1")).exit_code == 0
    before = (other / "pytorch_lora_weights.safetensors").read_bytes()
    r = run(*train_args(sd15, example_data(), other, "--resume", out / "checkpoint-1"))
    assert_one_line_error(r, "holds another run", "--overwrite")
    assert (other / "pytorch_lora_weights.safetensors").read_bytes() == before
    # into an empty folder it continues; with --overwrite the other run's files are replaced
    assert run(*train_args(sd15, example_data(), tmp_path / "new", "--resume", out / "checkpoint-1")).exit_code == 0
    r = run(*train_args(sd15, example_data(), other, "--resume", out / "checkpoint-1", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert (other / "pytorch_lora_weights.safetensors").read_bytes() != before


@pytest.mark.parametrize("line, needle", [('rank = "abc"', "'rank' must be a whole number"),
                                          ("max-steps = 2.5", "'max-steps' must be a whole number"),
                                          ("random-flip = 1", "'random-flip' must be true or false"),
                                          ("target-modules = 3", "'target-modules' must be a list")])
def test_config_file_value_of_the_wrong_type(sd15, tmp_path, line, needle):
    cfg = tmp_path / "run.toml"
    cfg.write_text(line + "\n")
    r = run(*train_args(sd15, example_data(), tmp_path / "out", "--config", cfg))
    assert_one_line_error(r, needle)


def test_generate_refuses_an_output_that_is_not_an_image_file(sd15, tmp_path):
    r = run("generate", "--arch", "sd15", "--model", sd15, "--prompt", "x", "--output", tmp_path / "out.txt")
    assert_one_line_error(r, "--output", ".png")


@pytest.mark.parametrize(
    "flag, fix",
    [
        ("--pretrained_model_name_or_path", "use --model"),
        ("--train_data_dir", "use --data"),
        ("--num_train_epochs", "use --epochs"),
        ("--resume_from_checkpoint", "use --resume"),
        ("--learning_rate", "use --learning-rate"),
        ("--network_dim", "use --rank"),
        ("--report_to", "use --report-to"),
        ("--resolutio", "--resolution"),
    ],
)
def test_other_tools_flags_get_lorakits_name(flag, fix):
    assert_one_line_error(run("train", flag, "x"), flag, fix, code=2)  # a usage error: click's status 2
