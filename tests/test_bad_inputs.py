"""Every bad input and bad option tried, through the real CLI: each ends in exactly one
``error:`` line and a non-zero exit, never a traceback.

:data:`ROWS` is the table; docs/errors.md is generated from it
(``python tests/test_bad_inputs.py > docs/errors.md``) and a test keeps the two equal.
A row marked ``open`` does not meet the rule yet: its test is an ``xfail(strict=True)``
naming the file and fix it needs, so it turns into a failure (to be promoted) once fixed.

Paths in the expected lines are written as ``{tmp}`` (the row's own folder), ``{shared}``
(the module's tiny models and LoRAs) and ``{examples}`` (lorakit's bundled images).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


@dataclass(frozen=True)
class Row:
    #: short id (the test id)
    id: str
    #: what was tried, as the table says it
    input: str
    #: ``argv(ctx)`` -> the command line
    argv: object
    #: the one line the user sees (exact, paths as placeholders); for an open row, what happens today
    sees: str
    #: exit code
    code: int = 1
    #: for an open row: "file: what to fix"
    open: str | None = None
    #: for an open row: what its one line must name once fixed
    needs: tuple = ()

    @property
    def command(self) -> str:
        return self.input.split(" ", 1)[0]


class Ctx:
    """What a row's command line may refer to: shared tiny models and LoRAs, the bundled
    images, and the row's own folder (``tmp``) to make bad files in."""

    def __init__(self, shared: dict, tmp: Path):
        self.shared, self.tmp = shared, tmp
        self.model, self.examples = shared["sd15"], shared["examples"]
        self.out = tmp / "out"

    def train(self, *extra, data=None, model=None, out=None):
        pick = lambda given, default: default if given is None else given  # noqa: E731
        return ["train", "--arch", "sd15", "--model", pick(model, self.model), "--data", pick(data, self.examples),
                "--output", pick(out, self.out), "--max-steps", "1", "--resolution", "32", "--num-threads", "1", *extra]

    def generate(self, *extra, model=None):
        return ["generate", "--arch", "sd15", "--model", model or self.model, "--prompt", "a red circle",
                "--steps", "1", "--resolution", "32", "--output", self.tmp / "img.png", *extra]

    def file(self, name: str, content: bytes | str = b"") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def data(self, rows=None, images=None) -> Path:
        """A copy of the bundled images; ``rows`` replaces metadata.jsonl (lines: str or dict)."""
        folder = self.tmp / "data"
        shutil.copytree(self.examples, folder)
        if rows is not None:
            lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows]
            blob = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n"
            (folder / "metadata.jsonl").write_bytes(blob)
        for name, content in (images or {}).items():
            (folder / name).write_bytes(content)
        return folder

    def first_image(self) -> str:
        return json.loads((self.examples / "metadata.jsonl").read_text().splitlines()[0])["file_name"]

    def toml(self, text: str) -> Path:
        return self.file("run.toml", text)


def _earlier_run(ctx: Ctx) -> Path:
    out = ctx.tmp / "earlier"
    shutil.copytree(ctx.shared["run"], out)
    return out


def _checkpointed_run(ctx: Ctx, *extra) -> Path:
    """A run with its checkpoint-1 (trained with ``extra``), for resume rows."""
    out = ctx.tmp / "ck"
    result = invoke(ctx.train("--checkpoint-every", "1", *extra, out=out))
    assert result.exit_code == 0, result.output
    return out


def _sdxl_folder(ctx: Ctx) -> Path:
    folder = ctx.folder("sdxl")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


def _not_an_image_folder(ctx: Ctx) -> Path:
    folder = ctx.folder("junk")
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "b.jpg").write_bytes(b"")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.jpg", "text": "y"}\n')
    return folder


_USAGE = "cli.py: turn click's usage errors (bad value, missing option, extra argument) into one `error:` line, exit 2"

ROWS = [
    # ----------------------------------------------------------------- train: numbers
    Row("rank-zero", "train --rank 0", lambda c: c.train("--rank", "0"),
        "error: --rank must be a positive integer, got 0."),
    Row("rank-negative", "train --rank -3", lambda c: c.train("--rank", "-3"),
        "error: --rank must be a positive integer, got -3."),
    Row("rank-text", "train --rank abc", lambda c: c.train("--rank", "abc"),
        "error: Invalid value for '--rank': Input should be a valid integer, unable to parse string as an integer; see `lorakit train --help`.", code=2),
    Row("rank-fraction", "train --rank 2.5", lambda c: c.train("--rank", "2.5"),
        "error: Invalid value for '--rank': Input should be a valid integer, unable to parse string as an integer; see `lorakit train --help`.", code=2),
    Row("lr-nan", "train --learning-rate nan", lambda c: c.train("--learning-rate", "nan"), 'error: --learning-rate must be a finite number, got nan.'),
    Row("lr-inf", "train --learning-rate inf", lambda c: c.train("--learning-rate", "inf"), 'error: --learning-rate must be a finite number, got inf.'),
    Row("lr-negative", "train --learning-rate -1", lambda c: c.train("--learning-rate", "-1"), 'error: --learning-rate must be positive, got -1.'),
    Row("lr-zero", "train --learning-rate 0", lambda c: c.train("--learning-rate", "0"), 'error: --learning-rate must be positive, got 0.'),
    Row("lr-past-float32", "train --learning-rate 1e39", lambda c: c.train("--learning-rate", "1e39"), "error: --learning-rate 1e+39 is beyond float32's range for AdamW (lr / (1 - --adam-beta1) must stay under 3.4e+38); use a learning rate such as 1e-4."),
    Row("lr-absurd", "train --learning-rate 1e30 --max-steps 20 (finite, then NaN loss)",
        lambda c: c.train("--learning-rate", "1e30", "--max-steps", "20"), 'error: loss was not finite for 5 steps in a row (last at step 6); lower --learning-rate, use --mixed-precision bf16 or no, or an fp16-safe VAE.'),
    Row("lr-text", "train --learning-rate fast", lambda c: c.train("--learning-rate", "fast"),
        "error: Invalid value for '--learning-rate' / '--lr': Input should be a valid number, unable to parse string as a number; see `lorakit train --help`.", code=2),
    Row("max-steps-zero", "train --max-steps 0", lambda c: c.train("--max-steps", "0"), 'error: --max-steps must be a positive integer, got 0.'),
    Row("batch-size-zero", "train --batch-size 0", lambda c: c.train("--batch-size", "0"), 'error: --batch-size must be a positive integer, got 0.'),
    Row("accumulation-zero", "train --gradient-accumulation 0", lambda c: c.train("--gradient-accumulation", "0"), 'error: --gradient-accumulation must be a positive integer, got 0.'),
    Row("resolution-zero", "train --resolution 0", lambda c: c.train("--resolution", "0"), 'error: --resolution must be >= 8, got 0.'),
    Row("resolution-odd", "train --resolution 33", lambda c: c.train("--resolution", "33"), 'error: --resolution must be a multiple of 8 for --arch sd15, got 33.'),
    Row("caption-dropout-one", "train --caption-dropout 1", lambda c: c.train("--caption-dropout", "1"), 'error: --caption-dropout must be >= 0 and < 1, got 1.'),
    Row("lora-dropout-negative", "train --lora-dropout -0.1", lambda c: c.train("--lora-dropout", "-0.1"), 'error: --lora-dropout must be >= 0 and < 1, got -0.1.'),
    Row("alpha-zero", "train --alpha 0", lambda c: c.train("--alpha", "0"), 'error: --alpha must be positive, got 0.'),
    Row("beta1-one", "train --adam-beta1 1", lambda c: c.train("--adam-beta1", "1"), 'error: --adam-beta1 must be >= 0 and < 1, got 1.'),
    Row("epsilon-zero", "train --adam-epsilon 0", lambda c: c.train("--adam-epsilon", "0"), 'error: --adam-epsilon must be positive, got 0.'),
    Row("grad-norm-negative", "train --max-grad-norm -1", lambda c: c.train("--max-grad-norm", "-1"), 'error: --max-grad-norm must be >= 0, got -1.'),
    Row("warmup-negative", "train --lr-warmup-steps -1", lambda c: c.train("--lr-warmup-steps", "-1"), 'error: --lr-warmup-steps must be >= 0, got -1.'),
    Row("workers-negative", "train --num-workers -1", lambda c: c.train("--num-workers", "-1"), 'error: --num-workers must be >= 0, got -1.'),
    Row("threads-zero", "train --num-threads 0", lambda c: c.train("--num-threads", "0"), 'error: --num-threads must be a positive integer, got 0.'),
    Row("checkpoints-limit-zero", "train --checkpoints-limit 0", lambda c: c.train("--checkpoints-limit", "0"), 'error: --checkpoints-limit must be a positive integer, got 0.'),
    Row("checkpoint-every-zero", "train --checkpoint-every 0", lambda c: c.train("--checkpoint-every", "0"), 'error: --checkpoint-every must be a positive integer, got 0.'),
    Row("seed-huge", "train --seed 2**70", lambda c: c.train("--seed", str(2**70)),
        'error: --seed must be >= 0 and <= 4.29497e+09, got 1.18059e+21.'),
    Row("te-lr-zero", "train --text-encoder-lr 0 --train-text-encoder",
        lambda c: c.train("--text-encoder-lr", "0", "--train-text-encoder"), 'error: --text-encoder-lr must be positive, got 0.'),
    # ----------------------------------------------------------------- train: choices and names
    Row("scheduler-unknown", "train --lr-scheduler bogus", lambda c: c.train("--lr-scheduler", "bogus"), "error: --lr-scheduler must be one of constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, got 'bogus'."),
    Row("precision-unknown", "train --mixed-precision fp8", lambda c: c.train("--mixed-precision", "fp8"), "error: --mixed-precision must be one of no, fp16, bf16, got 'fp8'."),
    Row("precision-fp16-cpu", "train --mixed-precision fp16 (on a CPU)",
        lambda c: c.train("--mixed-precision", "fp16"), 'error: --mixed-precision fp16 needs a GPU (on CPU it does nothing); use bf16 or no.'),
    Row("init-unknown", "train --init-lora-weights pissa", lambda c: c.train("--init-lora-weights", "pissa"), "error: --init-lora-weights must be one of gaussian, default, got 'pissa'."),
    Row("targets-empty", "train --target-modules ''", lambda c: c.train("--target-modules", ""), 'error: --target-modules is empty; give a comma-separated list such as to_q,to_k,to_v,to_out.0.'),
    Row("targets-typo", "train --target-modules to_q,to_kk", lambda c: c.train("--target-modules", "to_q,to_kk"), "error: --target-modules to_kk match no layer of 'unet'; pick names such as to_k, to_v, conv_in, linear_1, linear_2, proj_in."),
    Row("targets-block", "train --target-modules attn1 (a block, not a layer)",
        lambda c: c.train("--target-modules", "attn1"), "error: --target-modules attn1 names Attention blocks of 'unet', not layers; LoRA goes on the Linear or Conv layers inside, such as to_q, to_k, to_v, to_out.0."),
    Row("unknown-flag", "train --rnak 4", lambda c: c.train("--rnak", "4"),
        'error: no such option --rnak; did you mean --lr or --rank or --run-name? See `lorakit train --help`.', code=2),
    Row("foreign-flag", "train --pretrained_model_name_or_path x", lambda c: c.train("--pretrained_model_name_or_path", "x"),
        "error: --pretrained_model_name_or_path is not a lorakit flag (that is another tool's spelling); use --model.", code=2),
    Row("arch-unknown", "train --arch sd99", lambda c: c.train("--arch", "sd99"), "error: unknown arch 'sd99'. Known archs: flux, kandinsky22, kandinsky22-prior, sd15, sd3, sdxl, wuerstchen. See `lorakit list-archs`."),
    Row("arch-empty", "train --arch ''", lambda c: c.train("--arch", ""), 'error: no --arch given; choose one from `lorakit list-archs`.'),
    Row("arch-missing", "train (no --arch)", lambda c: ["train", "--model", c.model, "--output", c.out], 'error: no --arch given; choose one from `lorakit list-archs`.'),
    Row("other-arch-option", "train --arch sd15 --t5-max-length 128 (an option of flux/sd3)",
        lambda c: c.train("--t5-max-length", "128"), 'error: --t5-max-length does not apply to --arch sd15 (it is an option of --arch flux); drop it.'),
    Row("objective-option", "train --arch sd15 --flow-shift 3 (a flow-matching option)",
        lambda c: c.train("--flow-shift", "3"), 'error: --flow-shift does not apply to --arch sd15 (it is an option of the flow objective (--arch flux, sd3)); drop it.'),
    Row("mode-option-without-mode", "train --instance-prompt 'a sks dog' (without --dreambooth)",
        lambda c: c.train("--instance-prompt", "a sks dog"), 'error: --instance-prompt does not apply to --arch sd15 (it is an option of mode dreambooth (--dreambooth)); drop it.'),
    Row("mode-conflict", "train --dreambooth --buckets ...",
        lambda c: ["train", "--arch", "sd15", "--model", c.model, "--output", c.out, "--dreambooth", "--buckets",
                   "--instance-data", c.examples, "--instance-prompt", "a sks thing", "--class-prompt", "a thing"], "error: --buckets needs one image per example, but this run's examples group 2 (e.g. a mode's image pairs); drop --buckets."),
    Row("mode-data-conflict", "train --dreambooth --data ... (DreamBooth takes --instance-data)",
        lambda c: c.train("--dreambooth", "--instance-data", c.examples, "--instance-prompt", "a sks thing",
                          "--class-prompt", "a thing"), 'error: --data is not used with --dreambooth; pass the subject images as --instance-data (and class images, if you have them, as --class-data).'),
    Row("te-without-encoder", "train --arch kandinsky22-prior --train-text-encoder",
        lambda c: c.train("--arch", "kandinsky22-prior", "--train-text-encoder"), 'error: --arch kandinsky22-prior does not support --train-text-encoder; drop it.'),
    # ----------------------------------------------------------------- train: paths
    Row("model-missing", "train --model (no such folder)", lambda c: c.train(model=c.tmp / "nope"), 'error: --model {tmp}/nope does not exist; pass a local diffusers model folder or a hub id.'),
    Row("model-empty", "train --model ''", lambda c: c.train(model=""), 'error: no --model given; pass a hub id or a local diffusers model folder.'),
    Row("model-ckpt", "train --model model.ckpt (a single-file pickle)",
        lambda c: c.train(model=c.file("model.ckpt", b"PK\x03\x04 pickle")), 'error: --model {tmp}/model.ckpt is a pickle checkpoint (.ckpt), which lorakit never loads (unpickling can run code); convert it to .safetensors (e.g. a safetensors export of the same model) and pass that.'),
    Row("model-not-safetensors", "train --model model.safetensors (not safetensors inside)",
        lambda c: c.train(model=c.file("model.safetensors", "hello")), 'error: --model {tmp}/model.safetensors is not a safetensors file; pass a .safetensors checkpoint, a diffusers folder or a hub id.'),
    Row("model-folder-of-ckpt", "train --model folder holding only model.ckpt",
        lambda c: (c.file("weights/model.ckpt", b"x"), c.train(model=c.tmp / "weights"))[1], 'error: --model {tmp}/weights is not a diffusers model that --arch sd15 can train (no model_index.json; expected StableDiffusionPipeline); pass a diffusers-format folder or hub id.'),
    Row("model-wrong-arch", "train --arch sd15 --model (an SDXL model)", lambda c: c.train(model=_sdxl_folder(c)), 'error: --model {tmp}/sdxl is a StableDiffusionXLPipeline model, which --arch sd15 cannot train; use --arch sdxl.'),
    Row("model-damaged", "train --model (unet weights deleted)",
        lambda c: c.train(model=_damaged_model(c)), 'error: --model {tmp}/broken could not be loaded: Error no file named diffusion_pytorch_model.bin found in directory {tmp}/broken.; re-download it.'),
    Row("data-missing", "train --data (no such folder)", lambda c: c.train(data=c.tmp / "nope"), 'error: --data {tmp}/nope does not exist; pass an image folder or a dataset.'),
    Row("data-is-a-file", "train --data picture.png (a file)", lambda c: c.train(data=c.file("picture.png", b"x")), 'error: --data {tmp}/picture.png is a file, not a folder of images or a dataset.'),
    Row("data-empty-folder", "train --data (an empty folder)", lambda c: c.train(data=c.folder("empty")), 'error: --data {tmp}/empty holds no images (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp); add images or point --data at the right folder.'),
    Row("data-all-corrupt", "train --data (every image truncated or empty)", lambda c: c.train(data=_not_an_image_folder(c)), 'error: none of the 2 images could be read (first: {tmp}/junk/a.png); check the files.'),
    Row("metadata-bad-json", "train --data (metadata.jsonl line is not JSON)",
        lambda c: c.train(data=c.data(rows=['{"file_name": "x.png", "text": '])), 'error: {tmp}/data/metadata.jsonl line 1 is not valid JSON (Expecting value); fix that line.'),
    Row("metadata-no-file-name", "train --data (metadata.jsonl entry without file_name)",
        lambda c: c.train(data=c.data(rows=[{"text": "a"}])), "error: {tmp}/data/metadata.jsonl has no 'file_name' column; each line needs the image's file_name."),
    Row("metadata-missing-image", "train --data (metadata.jsonl names a missing image)",
        lambda c: c.train(data=c.data(rows=[{"file_name": "gone.png", "text": "a"}])), 'error: {tmp}/data/metadata.jsonl line 1 names gone.png, which is not in {tmp}/data.'),
    Row("metadata-caption-number", "train --data (metadata.jsonl caption is a number)",
        lambda c: c.train(data=c.data(rows=[{"file_name": c.first_image(), "text": 3}])), 'error: {tmp}/data/metadata.jsonl line 1: caption \'text\' is 3, not text; write it as a JSON string ("" for no caption) or a list of strings.'),
    Row("metadata-not-utf8", "train --data (metadata.jsonl with non-UTF-8 bytes)",
        lambda c: c.train(data=c.data(rows=[json.dumps({"file_name": c.first_image(), "text": "x"}).encode()[:-2]
                                            + b"\xff\xfe\"}"])), 'error: {tmp}/data/metadata.jsonl line 1 is not UTF-8 (byte 0xff); save the file as UTF-8.'),
    Row("metadata-outside", "train --data (metadata.jsonl file_name ../../(x16)/etc/passwd)",
        lambda c: c.train(data=c.data(rows=[{"file_name": "../" * 16 + "etc/passwd", "text": "x"}])), "error: {tmp}/data/metadata.jsonl line 1: '../../../../../../../../../../../../../../../../etc/passwd' resolves to /etc/passwd, outside the dataset folder {tmp}/data; training images must be inside it: copy the file into the folder and name it relative to it."),
    Row("caption-column-missing", "train --caption-column description", lambda c: c.train("--caption-column", "description"),
        "error: {examples}/metadata.jsonl has no caption column 'description' (columns: file_name, text); pass one of those with --caption-column."),
    Row("vae-missing", "train --vae (no such folder)", lambda c: c.train("--vae", c.tmp / "novae"),
        'error: --vae {tmp}/novae does not exist; pass a local diffusers model folder or a hub id.'),
    Row("vae-not-a-vae", "train --vae (the model's unet folder)", lambda c: c.train("--vae", c.model / "unet"), 'error: --vae {shared}/sd15/unet is a UNet2DConditionModel model, not an AutoencoderKL; pass an AutoencoderKL folder or hub id.'),
    Row("output-is-a-file", "train --output notes.txt (a file)", lambda c: c.train(out=c.file("notes.txt", "mine")), 'error: --output {tmp}/notes.txt is a file; pass a folder.'),
    Row("output-under-a-file", "train --output notes.txt/run (unwritable: its parent is a file)", lambda c: c.train(out=c.file("notes.txt", "mine") / "run"),
        'error: --output {tmp}/notes.txt/run: {tmp}/notes.txt is a file, so the folder cannot be made; pick another path.'),
    Row("output-earlier-run", "train --output (holds an earlier run, no --resume/--overwrite)",
        lambda c: c.train(out=_earlier_run(c)), 'error: --output {tmp}/earlier holds an earlier run (lorakit_config.json); pass --resume latest to continue it, --overwrite to replace it, or choose another --output.'),
    Row("resume-finished", "train --resume latest (a finished run without checkpoints)",
        lambda c: c.train("--resume", "latest", out=_earlier_run(c)), 'error: --resume latest: {tmp}/earlier holds a finished or checkpoint-less run; raise --max-steps with --resume pointing at a checkpoint, or use --overwrite.'),
    Row("resume-not-checkpoint", "train --resume (a folder that is not a checkpoint)",
        lambda c: c.train("--resume", c.folder("ckpt")), "error: --resume {tmp}/ckpt is not a lorakit checkpoint folder (no training_state.json); pass checkpoint-N or 'latest'."),
    Row("config-missing", "train --config run.toml (missing)", lambda c: c.train("--config", c.tmp / "run.toml"), 'error: config file {tmp}/run.toml does not exist; check the --config path.'),
    Row("config-extension", "train --config run.ini", lambda c: c.train("--config", c.file("run.ini", "rank=4")), 'error: config file {tmp}/run.ini must end in .toml, .yaml, .yml or .json.'),
    Row("config-unparsable", "train --config (broken TOML)", lambda c: c.train("--config", c.toml("rank = = 4")), 'error: config file {tmp}/run.toml could not be parsed: Invalid value (at line 1, column 8)'),
    Row("config-unknown-key", "train --config (key rnak)", lambda c: c.train("--config", c.toml("rnak = 4")), "error: config file {tmp}/run.toml: unknown option 'rnak'. See `lorakit train --help`."),
    Row("config-wrong-type", "train --config (rank = \"abc\")", lambda c: c.train("--config", c.toml('rank = "abc"')), "error: config file {tmp}/run.toml: 'rank' must be a whole number, got 'abc'."),
    Row("config-not-a-table", "train --config run.yaml (a list)",
        lambda c: c.train("--config", c.file("run.yaml", "- rank\n- 4\n")), 'error: config file {tmp}/run.yaml must hold a table of options, not list.'),
    Row("config-nan", "train --config (learning-rate = nan)", lambda c: c.train("--config", c.toml("learning-rate = nan")), 'error: --learning-rate must be a finite number, got nan.'),
    # ----------------------------------------------------------------- generate
    Row("generate-missing-model", "generate --arch sd15 (no --model)", lambda c: ["generate", "--arch", "sd15", "--prompt", "x"],
        "error: Missing option '--model'; see `lorakit generate --help`.", code=2),
    Row("generate-steps-zero", "generate --steps 0", lambda c: c.generate("--steps", "0"),
        'error: --steps must be at least 1, got 0.'),
    Row("generate-steps-negative", "generate --steps -5", lambda c: c.generate("--steps", "-5"),
        'error: --steps must be at least 1, got -5.'),
    Row("generate-resolution-zero", "generate --resolution 0", lambda c: c.generate("--resolution", "0"),
        'error: --resolution must be a positive multiple of 8 for --arch sd15, got 0.'),
    Row("generate-resolution-odd", "generate --resolution 33", lambda c: c.generate("--resolution", "33"),
        'error: --resolution must be a positive multiple of 8 for --arch sd15, got 33.'),
    Row("generate-guidance-nan", "generate --guidance-scale nan", lambda c: c.generate("--guidance-scale", "nan"),
        'error: --guidance-scale must be a finite number, got nan.'),
    Row("generate-arch-unknown", "generate --arch sd99", lambda c: c.generate("--arch", "sd99"), "error: unknown arch 'sd99'. Known archs: flux, kandinsky22, kandinsky22-prior, sd15, sd3, sdxl, wuerstchen. See `lorakit list-archs`."),
    Row("generate-model-missing", "generate --model (no such folder)", lambda c: c.generate(model=c.tmp / "nope"), 'error: --model {tmp}/nope does not exist; pass a local diffusers model folder or a hub id.'),
    Row("generate-wrong-arch", "generate --arch sd15 --model (an SDXL model)", lambda c: c.generate(model=_sdxl_folder(c)), 'error: --model {tmp}/sdxl lacks the subfolder(s) unet, vae, text_encoder, tokenizer, scheduler of a diffusers StableDiffusionPipeline; pass a complete diffusers-format model.'),
    Row("generate-lora-missing", "generate --lora x.safetensors (missing)",
        lambda c: c.generate("--lora", c.tmp / "x.safetensors"), 'error: --lora {tmp}/x.safetensors does not exist; pass a .safetensors file or a training output folder.'),
    Row("generate-lora-not-safetensors", "generate --lora lora.safetensors (not safetensors inside)", lambda c: c.generate("--lora", c.file("lora.safetensors", "hello")),
        'error: --lora {tmp}/lora.safetensors is not a readable safetensors file (Error while deserializing header: header too small); pass an intact LoRA file.'),
    Row("generate-lora-ckpt", "generate --lora lora.ckpt", lambda c: c.generate("--lora", c.file("lora.ckpt", b"x")), 'error: --lora {tmp}/lora.ckpt is not a .safetensors file; lorakit never unpickles weight files.'),
    Row("generate-lora-bad-scale", "generate --lora PATH:abc", lambda c: c.generate("--lora", f"{c.shared['lora']}:abc"),
        "error: --lora {shared}/run/pytorch_lora_weights.safetensors:abc: the scale 'abc' is not a number; write PATH:0.8 or PATH:0.8:0.5."),
    Row("generate-lora-nan-scale", "generate --lora PATH:nan", lambda c: c.generate("--lora", f"{c.shared['lora']}:nan"),
        'error: --lora {shared}/run/pytorch_lora_weights.safetensors:nan: the scale must be a finite number, got nan.'),
    Row("generate-lora-empty-folder", "generate --lora (a folder without a LoRA)",
        lambda c: c.generate("--lora", c.folder("nolora")), 'error: --lora {tmp}/nolora holds no pytorch_lora_weights.safetensors; pass the file itself.'),
    Row("generate-lora-other-arch", "generate --arch sd15 --lora (an SDXL LoRA)", lambda c: c.generate("--lora", c.shared["sdxl_lora"]),
        'error: --lora {shared}/sdxl-run/pytorch_lora_weights.safetensors does not fit --arch sd15 with --model {shared}/sd15 (unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k: no such layer in the model); it is a LoRA for --arch sdxl.'),
    Row("generate-output-not-image", "generate --output out.txt", lambda c: c.generate("--output", c.tmp / "out.txt"), 'error: --output {tmp}/out.txt has no image file extension PIL can write; use .png or .jpg.'),
    Row("generate-output-exists", "generate --output (exists, no --overwrite)",
        lambda c: c.generate("--output", c.file("img.png", b"mine")), 'error: {tmp}/img.png exists; pass --overwrite or another --output.'),
    Row("generate-output-under-a-file", "generate --output notes.txt/img.png (parent is a file)", lambda c: c.generate("--output", c.file("notes.txt", "mine") / "img.png"),
        'error: --output {tmp}/notes.txt/img.png: {tmp}/notes.txt is a file, so the image cannot go there; pick another path.'),
    # ----------------------------------------------------------------- convert
    Row("convert-format", "convert --to onnx", lambda c: ["convert", c.shared["lora"], c.tmp / "k.safetensors", "--arch", "sd15", "--to", "onnx"],
        'error: --to onnx is not a known format; pick one of: lorakit, kohya, diffusers-example, peft (diffusers = lorakit).'),
    Row("convert-source-missing", "convert (missing source)",
        lambda c: ["convert", c.tmp / "nope.safetensors", c.tmp / "k.safetensors", "--arch", "sd15", "--to", "kohya"], 'error: LoRA {tmp}/nope.safetensors does not exist; pass a .safetensors file or a training output folder.'),
    Row("convert-source-not-safetensors", "convert (source is not safetensors)", lambda c: ["convert", c.file("x.safetensors", "hello"), c.tmp / "k.safetensors", "--arch", "sd15", "--to", "kohya"],
        'error: LoRA {tmp}/x.safetensors is not a readable safetensors file (Error while deserializing header: header too small); pass an intact LoRA file.'),
    Row("convert-source-ckpt", "convert lora.ckpt",
        lambda c: ["convert", c.file("lora.ckpt", b"x"), c.tmp / "k.safetensors", "--arch", "sd15", "--to", "kohya"], 'error: LoRA {tmp}/lora.ckpt is not a .safetensors file; lorakit never unpickles weight files.'),
    Row("convert-target-exists", "convert (target exists, no --overwrite)",
        lambda c: ["convert", c.shared["lora"], c.file("k.safetensors", b"mine"), "--arch", "sd15", "--to", "kohya"], 'error: {tmp}/k.safetensors exists; pass --overwrite or another output path.'),
    Row("convert-target-not-safetensors", "convert ... k.bin",
        lambda c: ["convert", c.shared["lora"], c.tmp / "k.bin", "--arch", "sd15", "--to", "kohya"], 'error: {tmp}/k.bin must end in .safetensors; lorakit writes LoRA files as safetensors only.'),
    Row("convert-wrong-arch", "convert --arch sdxl (an SD1.5 LoRA)", lambda c: ["convert", c.shared["lora"], c.tmp / "k.safetensors", "--arch", "sdxl", "--to", "kohya"],
        'error: LoRA {shared}/run/pytorch_lora_weights.safetensors was trained with --arch sd15 (its lorakit_config.json says so); convert it with --arch sd15.'),
    Row("convert-arch-unknown", "convert --arch sd99",
        lambda c: ["convert", c.shared["lora"], c.tmp / "k.safetensors", "--arch", "sd99", "--to", "kohya"], "error: unknown arch 'sd99'. Known archs: flux, kandinsky22, kandinsky22-prior, sd15, sd3, sdxl, wuerstchen. See `lorakit list-archs`."),
    Row("convert-already-kohya", "convert (source already kohya format)", lambda c: ["convert", c.shared["kohya"], c.tmp / "k.safetensors", "--arch", "sd15", "--to", "kohya"],
        'error: {shared}/kohya.safetensors is already in kohya format; pass --to diffusers (or another format).'),
    # ----------------------------------------------------------------- LoRA formats: --save-format, --init-lora, any format in generate/convert
    Row("save-format-no-kohya-layout", "train --arch kandinsky22 --save-format kohya",
        lambda c: _with_arch(c.train("--save-format", "kohya"), "kandinsky22"),
        'error: --save-format kohya: --arch kandinsky22 has no kohya layout (A1111/ComfyUI do not load it); use --save-format diffusers.'),
    Row("save-format-unknown", "train --save-format ckpt", lambda c: c.train("--save-format", "ckpt"),
        "error: --save-format must be one of diffusers, kohya, both, got 'ckpt'."),
    Row("save-format-users-file", "train (OUTPUT/<folder>.safetensors is the user's file)",
        lambda c: c.train(out=c.file("mine/mine.safetensors", b"the user's").parent),
        "error: --output {tmp}/mine holds mine.safetensors, which lorakit did not write (the final LoRA goes there); move it away or choose another --output."),
    Row("init-lora-missing", "train --init-lora (no such file)", lambda c: c.train("--init-lora", c.tmp / "nope.safetensors"),
        'error: --init-lora {tmp}/nope.safetensors does not exist; pass a .safetensors file or a training output folder.'),
    Row("init-lora-rank-conflict", "train --init-lora (rank 4) --rank 8", lambda c: c.train("--init-lora", c.shared["kohya"], "--rank", "8"),
        'error: --rank 8 conflicts with --init-lora {shared}/kohya.safetensors (rank 4); drop --rank, the file decides it.'),
    Row("init-lora-targets-conflict", "train --init-lora --target-modules to_q", lambda c: c.train("--init-lora", c.shared["kohya"], "--target-modules", "to_q"),
        'error: --target-modules to_q names other layers than --init-lora {shared}/kohya.safetensors has LoRA on (e.g. unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k); drop --target-modules, the file decides them.'),
    Row("init-lora-other-arch", "train --init-lora (an SDXL LoRA)", lambda c: c.train("--init-lora", c.shared["sdxl_lora"]),
        "error: --init-lora {shared}/sdxl-run/pytorch_lora_weights.safetensors does not fit --arch sd15 with --model {shared}/sd15 (unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k: no such layer in the model); it is a LoRA for --arch sdxl."),
    Row("generate-lora-kohya-other-arch", "generate --arch sd15 --lora (an SDXL kohya file)",
        lambda c: c.generate("--lora", c.shared["sdxl_lora"].parent / "sdxl-run.safetensors"),
        "error: --lora {shared}/sdxl-run/sdxl-run.safetensors does not fit --arch sd15 with --model {shared}/sd15 (32 of 32 kohya layers for unet match no layer of --model's unet (e.g. lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_k)); it is a LoRA for --arch sdxl."),
    Row("generate-lora-tew-no-text-encoder", "generate --arch kandinsky22 --lora PATH:1:0.5",
        lambda c: _with_arch(c.generate("--lora", f"{c.shared['lora']}:1:0.5"), "kandinsky22"),
        "error: --lora {shared}/run/pytorch_lora_weights.safetensors:1:0.5: --arch kandinsky22 has no text-encoder LoRA, so there is no second strength; write {shared}/run/pytorch_lora_weights.safetensors:1."),
    Row("convert-unknown-format", "convert (a safetensors file that is no LoRA)",
        lambda c: ["convert", _single_file(c, "model.safetensors", ["model.weight"]), c.tmp / "k.safetensors", "--arch", "sd15", "--to", "kohya"],
        "error: LoRA {tmp}/model.safetensors: no LoRA format lorakit knows (first key: model.weight); it reads lorakit/diffusers, kohya/A1111/ComfyUI, diffusers-example and PEFT files."),
    Row("convert-peft-two-models", "convert --to peft (UNet and text-encoder LoRA)",
        lambda c: ["convert", c.shared["kohya_te"], c.tmp / "p" / "adapter_model.safetensors", "--arch", "sd15", "--to", "peft", "--model", c.shared["sd15"]],
        "error: a PEFT file holds one model's LoRA, and this one has LoRA for text_encoder, unet; write it as lorakit, kohya or diffusers-example instead."),
    # ----------------------------------------------------------------- tiny, list-archs
    Row("tiny-arch-unknown", "tiny sd99 DIR", lambda c: ["tiny", "sd99", c.tmp / "m"], "error: unknown arch 'sd99'. Known archs: flux, kandinsky22, kandinsky22-prior, sd15, sd3, sdxl, wuerstchen. See `lorakit list-archs`."),
    Row("tiny-not-empty", "tiny sd15 DIR (not empty)",
        lambda c: (c.file("m/keep.txt", "mine"), ["tiny", "sd15", c.tmp / "m"])[1], 'error: {tmp}/m already exists and is not empty; choose a new folder for the tiny model.'),
    Row("tiny-is-a-file", "tiny sd15 FILE", lambda c: ["tiny", "sd15", c.file("m.txt", "mine")], 'error: {tmp}/m.txt already exists and is not empty; choose a new folder for the tiny model.'),
    Row("tiny-seed-text", "tiny sd15 DIR --seed abc", lambda c: ["tiny", "sd15", c.tmp / "m", "--seed", "abc"],
        "error: Invalid value for '--seed': Input should be a valid integer, unable to parse string as an integer; see `lorakit tiny --help`.", code=2),
    Row("list-archs-extra", "list-archs extra", lambda c: ["list-archs", "extra"],
        'error: Got unexpected extra argument(s) (extra); see `lorakit list-archs --help`.', code=2),
    Row("list-archs-unknown-flag", "list-archs --jsn", lambda c: ["list-archs", "--jsn"],
        'error: no such option --jsn; did you mean --json? See `lorakit list-archs --help`.', code=2),
    Row("epochs-zero", "train --epochs 0", lambda c: c.train("--epochs", "0"), 'error: --epochs must be a positive integer, got 0.'),
    Row("report-to-unknown", "train --report-to mlflow", lambda c: c.train("--report-to", "mlflow"),
        'error: --report-to must be one of tensorboard, wandb, all, none, got \'mlflow\'.'),
    # ----------------------------------------------------------------- the guide's workflow: Hub, validation, optimisers
    Row("hub-offline", "train --push-to-hub (HF_HUB_OFFLINE=1)", lambda c: c.train("--push-to-hub"),
        'error: --push-to-hub cannot reach the Hub: HF_HUB_OFFLINE is set; unset it, or drop --push-to-hub and upload later with `hf upload`.'),
    Row("hub-id-without-push", "train --hub-model-id me/x", lambda c: c.train("--hub-model-id", "me/x"),
        'error: --hub-model-id needs --push-to-hub; add --push-to-hub or drop --hub-model-id.'),
    Row("hub-id-bad", "train --push-to-hub --hub-model-id a/b/c", lambda c: c.train("--push-to-hub", "--hub-model-id", "a/b/c"),
        "error: --hub-model-id 'a/b/c' is not a repo id; use USER/NAME (or NAME for your own account)."),
    Row("hub-checkpoints-none", "train --push-to-hub --push-checkpoints (no --checkpoint-every)",
        lambda c: c.train("--push-to-hub", "--push-checkpoints"),
        'error: --push-checkpoints uploads checkpoints, but no --checkpoint-every is set; add --checkpoint-every N or drop --push-checkpoints.'),
    Row("hub-script-spelling", "train --push_to_hub", lambda c: c.train("--push_to_hub"),
        "error: --push_to_hub is not a lorakit flag (that is another tool's spelling); use --push-to-hub.", code=2),
    Row("validation-every-no-prompt", "train --validation-every 2 (no --validation-prompt)", lambda c: c.train("--validation-every", "2"),
        'error: --validation-every writes sample images of --validation-prompt, but none is given; add --validation-prompt "..." or drop --validation-every.'),
    Row("validation-images-zero", "train --num-validation-images 0", lambda c: c.train("--num-validation-images", "0"),
        'error: --num-validation-images must be a positive integer, got 0.'),
    Row("optimizer-unknown", "train --optimizer sgd", lambda c: c.train("--optimizer", "sgd"),
        "error: --optimizer must be one of adamw, adamw8bit, prodigy, adafactor, got 'sgd'."),
    Row("max-train-samples-zero", "train --max-train-samples 0", lambda c: c.train("--max-train-samples", "0"),
        'error: --max-train-samples must be a positive integer, got 0.'),
    # ----------------------------------------------------------------- single-file models, --model-config, --revision, --variant
    Row("single-file-unknown-keys", "train --model x.safetensors (keys of no arch)",
        lambda c: c.train(model=_single_file(c, "x.safetensors", ["foo.weight"])), 'error: --model {tmp}/x.safetensors holds no checkpoint lorakit recognises (its keys match none of the archs that take single files: sd15, sdxl); pass a diffusers model folder or hub id.'),
    Row("single-file-is-a-lora", "train --model lora.safetensors (the run's LoRA, not a base model)",
        lambda c: c.train(model=c.shared["lora"]), 'error: --model {shared}/run/pytorch_lora_weights.safetensors is a LoRA, not a base model; pass the base model as --model (a LoRA goes to --lora of lorakit generate).'),
    Row("single-file-wrong-arch", "train --arch sd15 --model sdxl.safetensors (an SDXL checkpoint)",
        lambda c: c.train(model=_single_file(c, "sdxl.safetensors", _SDXL_KEYS)), 'error: --model {tmp}/sdxl.safetensors is a single-file sdxl checkpoint, which --arch sd15 cannot train; use --arch sdxl.'),
    Row("single-file-arch-without", "train --arch flux --model x.safetensors (flux takes no single files)",
        lambda c: _with_arch(c.train(model=_single_file(c, "x.safetensors", ["foo.weight"])), "flux"), 'error: --arch flux does not load single-file checkpoints (archs that do: sd15, sdxl); pass a diffusers model folder or hub id.'),
    Row("single-file-offline-no-config", "train --model sd15.safetensors (HF_HUB_OFFLINE=1, no --model-config)",
        lambda c: c.train(model=_single_file(c, "sd15.safetensors", _SD15_KEYS)), 'error: --model {tmp}/sd15.safetensors is a single file and HF_HUB_OFFLINE is set: its configs and tokenizers cannot be fetched; pass --model-config with a local diffusers folder (or cached hub id) of an --arch sd15 model.'),
    Row("model-config-not-a-model", "train --model sd15.safetensors --model-config (an empty folder)",
        lambda c: c.train("--model-config", c.folder("cfg"), model=_single_file(c, "sd15.safetensors", _SD15_KEYS)), 'error: --model-config {tmp}/cfg holds no model_index.json; pass the diffusers folder or hub id of the model sd15.safetensors was made from.'),
    Row("model-config-other-arch", "train --model sd15.safetensors --model-config (an SDXL folder)",
        lambda c: c.train("--model-config", _sdxl_folder(c), model=_single_file(c, "sd15.safetensors", _SD15_KEYS)), 'error: --model-config {tmp}/sdxl is a StableDiffusionXLPipeline model, not one --arch sd15 trains; pass the config of the sd15 model sd15.safetensors was made from.'),
    Row("single-file-incomplete", "train --model sd15.safetensors (SD1.5 keys but not its weights) --model-config DIR",
        lambda c: c.train("--model-config", c.model, model=_single_file(c, "sd15.safetensors", _SD15_KEYS)), "error: --model {tmp}/sd15.safetensors could not be read with --model-config {shared}/sd15 (Failed to load CLIPTextModel. Weights for this component appear to be missing in the checkpoint.); pass the --model-config of the model this checkpoint was made from."),
    Row("model-config-with-folder", "train --model (a folder) --model-config X", lambda c: c.train("--model-config", c.model),
        'error: --model-config applies to single-file checkpoints; --model {shared}/sd15 is a folder.'),
    Row("revision-local", "train --revision main (a local --model)", lambda c: c.train("--revision", "main"),
        'error: --revision applies to hub ids; --model {shared}/sd15 is a local path.'),
    Row("variant-missing", "train --variant fp16 (the folder has no fp16 files)", lambda c: c.train("--variant", "fp16"),
        'error: --variant fp16: {shared}/sd15 holds no *.fp16.safetensors weights; drop --variant or pass the variant the model has (e.g. fp16).'),
    Row("vae-ckpt", "train --vae vae.ckpt (a pickle)", lambda c: c.train("--vae", c.file("vae.ckpt", b"x")),
        'error: --vae {tmp}/vae.ckpt is a pickle checkpoint (.ckpt), which lorakit never loads (unpickling can run code); convert it to .safetensors (e.g. a safetensors export of the same model) and pass that.'),
    Row("generate-single-file-no-config", "generate --model sd15.safetensors (HF_HUB_OFFLINE=1, no --model-config)",
        lambda c: c.generate(model=_single_file(c, "sd15.safetensors", _SD15_KEYS)), 'error: --model {tmp}/sd15.safetensors is a single file and HF_HUB_OFFLINE is set: its configs and tokenizers cannot be fetched; pass --model-config with a local diffusers folder (or cached hub id) of an --arch sd15 model.'),
    Row("tiny-single-file-unsupported", "tiny flux DIR --single-file", lambda c: ["tiny", "flux", c.tmp / "m", "--single-file"],
        'error: --arch flux has no single-file layout; `lorakit tiny flux` without --single-file writes its diffusers folder.'),
    # ----------------------------------------------------------------- train: the persistent encoding cache
    Row("cache-dir-file", "train --cache-dir FILE", lambda c: c.train("--cache-dir", c.file("cache.bin", b"x")),
        'error: --cache-dir {tmp}/cache.bin is a file, not a folder; pass a writable folder with --cache-dir or use --no-disk-cache.'),
    Row("cache-dir-under-file", "train --cache-dir FILE/sub", lambda c: c.train("--cache-dir", c.file("cache.bin", b"x") / "sub"),
        'error: --cache-dir {tmp}/cache.bin/sub lies under {tmp}/cache.bin, which is a file; pass a writable folder with --cache-dir or use --no-disk-cache.'),
    # ----------------------------------------------------------------- merge and fuse (lorakit/merge.py, lorakit/fuse.py)
    Row("merge-weights-count", "merge A B --weights 0.7", lambda c: _merge(c, "--weights", "0.7"),
        'error: --weights 0.7 gives 1 weights for 2 LoRAs; give one per LoRA.'),
    Row("merge-weights-text", "merge A B --weights 0.7;0.3", lambda c: _merge(c, "--weights", "0.7;0.3"),
        'error: --weights 0.7;0.3: write one number per LoRA, separated by commas (e.g. 0.7,0.3).'),
    Row("merge-weights-nan", "merge A B --weights 0.7,nan", lambda c: _merge(c, "--weights", "0.7,nan"),
        'error: --weights 0.7,nan: every weight must be a finite number.'),
    Row("merge-rank-zero", "merge A B --rank 0", lambda c: _merge(c, "--rank", "0"), 'error: --rank must be at least 1, got 0.'),
    Row("merge-output-exists", "merge A B --output (exists, no --overwrite)", lambda c: _merge(c, out=c.file("m.safetensors", b"mine")),
        'error: --output {tmp}/m.safetensors exists; pass --overwrite or another --output.'),
    Row("merge-output-not-safetensors", "merge A B --output m.bin", lambda c: _merge(c, out=c.tmp / "m.bin"),
        'error: --output {tmp}/m.bin must end in .safetensors; lorakit writes LoRA files as safetensors only.'),
    Row("merge-missing-input", "merge A (missing) B", lambda c: _merge(c, loras=[c.tmp / "nope.safetensors", c.shared["lora"]]),
        'error: LoRA {tmp}/nope.safetensors does not exist; pass a .safetensors file or a training output folder.'),
    Row("merge-other-arch", "merge --arch sd15 (an SD1.5 and an SDXL LoRA)", lambda c: _merge(c, loras=[c.shared["lora"], c.shared["sdxl_lora"]]),
        'error: LoRA {shared}/sdxl-run/pytorch_lora_weights.safetensors was trained with --arch sdxl (its lorakit_config.json says so), not sd15; merge LoRAs of one arch.'),
    Row("merge-kohya-without-model", "merge (a kohya file, no --model)", lambda c: _merge(c, loras=[c.shared["kohya"], c.shared["lora"]]),
        'error: {shared}/kohya.safetensors is a kohya file; reading its layer names needs the base model: pass --model (hub id or folder).'),
    Row("fuse-output-not-empty", "fuse --output DIR (holds the user's file)", lambda c: _fuse(c, out=_users_folder(c)),
        'error: --output {tmp}/out is not empty; pass --overwrite to replace a model lorakit fused there, or choose another --output.'),
    Row("fuse-output-foreign-overwrite", "fuse --output DIR --overwrite (holds the user's file)", lambda c: _fuse(c, "--overwrite", out=_users_folder(c)),
        'error: --output {tmp}/out holds notes.txt, which lorakit did not write; move it away or choose another --output.'),
    Row("fuse-output-file-exists", "fuse --output m.safetensors (exists, no --overwrite)", lambda c: _fuse(c, out=c.file("m.safetensors", b"mine")),
        'error: --output {tmp}/m.safetensors exists; pass --overwrite or another --output.'),
    Row("fuse-single-file-unsupported", "fuse --arch flux --output m.safetensors", lambda c: _with_arch(_fuse(c, out=c.tmp / "m.safetensors"), "flux"),
        'error: --arch flux has no single-file checkpoint layout; pass a folder as --output.'),
    Row("fuse-lora-missing", "fuse --lora (missing)", lambda c: _fuse(c, lora=c.tmp / "nope.safetensors"),
        'error: --lora {tmp}/nope.safetensors does not exist; pass a .safetensors file or a training output folder.'),
    Row("fuse-lora-other-arch", "fuse --arch sd15 --lora (an SDXL LoRA)", lambda c: _fuse(c, lora=c.shared["sdxl_lora"]),
        'error: --lora {shared}/sdxl-run/pytorch_lora_weights.safetensors does not fit --arch sd15 with --model {shared}/sd15 (unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k: no such layer in the model); it is a LoRA for --arch sdxl.'),
    # process-count invariance (tests/test_invariance.py): a resume may change the process count, not the global batch
    Row("resume-other-global-batch", "train --resume latest --batch-size 1 (its checkpoint: --batch-size 2, 1 process)",
        lambda c: c.train("--resume", "latest", "--batch-size", "1", out=_checkpointed_run(c, "--batch-size", "2")),
        'error: --resume {tmp}/ck/checkpoint-1 was trained with a global batch of 2 (--batch-size 2 x 1 process(es)), this run\'s is 1 (--batch-size 1 x 1); use --batch-size 2.'),
    # the encoding cache finished for users (lorakit cache info/prune) and a restart from step 0 on another process count
    Row("restart-other-global-batch", "train --resume latest --batch-size 2 (an earlier run: --batch-size 1, 1 process, no checkpoint yet)",
        lambda c: c.train("--resume", "latest", "--batch-size", "2", out=_stopped_run(c)),
        'error: --resume latest: {tmp}/stopped holds a run with a global batch of 1 (--batch-size 1 x 1 process(es)) and no checkpoint yet, this run\'s is 2 (--batch-size 2 x 1); use --batch-size 1, or --overwrite to replace it.'),
    Row("cache-prune-bad-age", "cache prune --older-than 3x", lambda c: ["cache", "prune", "--cache-dir", _a_cache(c), "--older-than", "3x"],
        "error: --older-than 3x: expected a number and a unit s, m, h, d or w, such as 30d or 12h."),
    Row("cache-prune-bad-size", "cache prune --max-size 20XB", lambda c: ["cache", "prune", "--cache-dir", _a_cache(c), "--max-size", "20XB"],
        "error: --max-size 20XB: expected a size such as 500MB, 20GB or 1.5TiB."),
    Row("cache-prune-nothing-asked", "cache prune (neither --older-than nor --max-size)", lambda c: ["cache", "prune", "--cache-dir", _a_cache(c)],
        "error: lorakit cache prune: say what to remove with --older-than (e.g. 30d) and/or --max-size (e.g. 20GB)."),
    Row("cache-not-a-cache", "cache info --cache-dir (a folder that is not a lorakit cache)", lambda c: ["cache", "info", "--cache-dir", c.folder("photos")],
        "error: --cache-dir {tmp}/photos is not a lorakit encoding cache (it has no v1/ folder of shards); pass the folder given to lorakit train --cache-dir."),
    Row("cache-missing", "cache info --cache-dir (missing)", lambda c: ["cache", "info", "--cache-dir", c.tmp / "nope"],
        "error: --cache-dir {tmp}/nope does not exist; pass the folder given to lorakit train --cache-dir."),
    Row("cache-is-a-file", "cache prune --cache-dir (a file) --older-than 30d", lambda c: ["cache", "prune", "--cache-dir", c.file("f"), "--older-than", "30d"],
        "error: --cache-dir {tmp}/f is a file, not a folder; pass the folder given to lorakit train --cache-dir."),
    Row("cache-layout-folder", "cache prune --cache-dir (the v1 folder inside a cache) --older-than 30d",
        lambda c: ["cache", "prune", "--cache-dir", _a_cache(c, shard=True) / "v1", "--older-than", "30d"],
        "error: --cache-dir {tmp}/cache/v1 is the v1 folder inside a cache; pass its parent {tmp}/cache."),
    # the frozen base sharded across processes (lorakit/sharding.py, tests/test_sharding.py); refused before the model loads
    Row("shard-one-process", "train --shard-frozen (one process)", lambda c: c.train("--shard-frozen"),
        "error: --shard-frozen shards the frozen model across processes, but this run has one; launch 2 or more (accelerate launch --num_processes N) or drop it."),
    Row("shard-with-samples", "train --shard-frozen --validation-prompt cat", lambda c: c.train("--shard-frozen", "--validation-prompt", "cat"),
        "error: --validation-prompt cannot be used with --shard-frozen: sample images are made by the main process alone, and every process must join each forward of a sharded model; drop --validation-prompt and run `lorakit generate` with the saved LoRA."),
]


def _a_cache(ctx: Ctx, shard: bool = False) -> Path:
    """An encoding cache folder (its v1/ layout folder; with ``shard``, one lorakit-named shard in it)."""
    ctx.folder("cache/v1")
    if shard:
        ctx.file("cache/v1/shard-host-1-0-0123456789ab.safetensors", b"")
    return ctx.tmp / "cache"


def _stopped_run(ctx: Ctx) -> Path:
    """The shared finished run as if stopped before its first checkpoint: run config, no final file."""
    out = ctx.tmp / "stopped"
    shutil.copytree(ctx.shared["run"], out)
    (out / "pytorch_lora_weights.safetensors").unlink()
    return out


# merge and fuse: command lines over the shared SD1.5 LoRA and model
def _merge(ctx: Ctx, *extra, loras=None, out=None) -> list:
    loras = loras or [ctx.shared["lora"], ctx.shared["lora"]]
    return ["merge", *loras, "--arch", "sd15", "--output", out or ctx.tmp / "m.safetensors", *extra]


def _fuse(ctx: Ctx, *extra, lora=None, out=None) -> list:
    return ["fuse", "--arch", "sd15", "--model", ctx.model, "--lora", lora or ctx.shared["lora"], "--output",
            out or ctx.tmp / "fused", *extra]


def _users_folder(ctx: Ctx) -> Path:
    ctx.file("out/notes.txt", "mine")
    return ctx.tmp / "out"


# single-file models: checkpoints with the keys that decide the arch (tiny tensors; refused before loading)
_SD15_KEYS = ["model.diffusion_model.out.0.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
_SDXL_KEYS = ["model.diffusion_model.out.0.weight", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
              "conditioner.embedders.1.model.positional_embedding"]


def _single_file(ctx: Ctx, name: str, keys) -> Path:
    import torch
    from safetensors.torch import save_file

    path = ctx.tmp / name
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def _with_arch(argv: list, arch: str) -> list:
    argv = list(argv)
    argv[argv.index("--arch") + 1] = arch
    return argv


def _damaged_model(ctx: Ctx) -> Path:
    broken = ctx.tmp / "broken"
    shutil.copytree(ctx.model, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    return broken


# ---------------------------------------------------------------------------- the docs table


def render() -> str:
    """docs/errors.md, generated from :data:`ROWS`."""
    head = (
        "# Bad inputs and what lorakit says\n\n"
        "Every bad input and option tried so far, through the real command line. Each ends in one\n"
        "`error:` line naming what to fix and a non-zero exit, never a Python traceback; rows marked\n"
        "*open* do not yet, and say which file needs which fix. Paths are shown as `{tmp}` (the\n"
        "folder the input was made in), `{shared}` (tiny models and LoRAs) and `{examples}`\n"
        "(lorakit's bundled images).\n\n"
        "Generated from `tests/test_bad_inputs.py` (`python tests/test_bad_inputs.py > docs/errors.md`);\n"
        "its test runs every row and fails when this page and the table differ.\n\n"
        f"{len(ROWS)} rows: {sum(r.open is None for r in ROWS)} pass, {sum(r.open is not None for r in ROWS)} open.\n\n"
        "| # | input | what the user sees | exit | status |\n"
        "|---|---|---|---|---|\n"
    )

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    body = []
    for i, r in enumerate(ROWS, 1):
        status = "ok" if r.open is None else f"open: {r.open}"
        body.append(f"| {i} | `{cell(r.input)}` | {cell(r.sees)} | {r.code} | {cell(status)} |")
    return head + "\n".join(body) + "\n"


def test_docs_table_is_the_test_table():
    assert DOC.read_text() == render(), "docs/errors.md is out of date: python tests/test_bad_inputs.py > docs/errors.md"
    assert len(ROWS) >= 40 and len({r.id for r in ROWS}) == len(ROWS)


# ---------------------------------------------------------------------------- running a row


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return make_shared(tmp_path_factory)


def make_shared(tmp_path_factory) -> dict:
    """Tiny SD1.5 and SDXL LoRAs (a kohya copy of the SD1.5 one) and a finished SD1.5 run."""
    from safetensors.torch import load_file, save_file

    from lorakit.testing import example_data
    from lorakit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("bad-inputs")
    made = {"examples": example_data(), "root": root}
    made["sd15"] = make_tiny_model("sd15", root / "sd15")
    run = root / "run"
    r = invoke(["train", "--arch", "sd15", "--model", made["sd15"], "--data", made["examples"], "--output", run,
                "--max-steps", "1", "--resolution", "32", "--num-threads", "1"])
    assert r.exit_code == 0, r.output
    made["run"], made["lora"] = run, run / "pytorch_lora_weights.safetensors"
    r = invoke(["convert", made["lora"], root / "kohya.safetensors", "--arch", "sd15", "--to", "kohya"])
    assert r.exit_code == 0, r.output
    made["kohya"] = root / "kohya.safetensors"
    r = invoke(["train", "--arch", "sd15", "--model", made["sd15"], "--data", made["examples"], "--output", root / "te-run",
                "--max-steps", "1", "--resolution", "32", "--num-threads", "1", "--train-text-encoder"])  # LoRA formats rows
    assert r.exit_code == 0, r.output
    made["kohya_te"] = root / "te-run" / "te-run.safetensors"
    sdxl_model = make_tiny_model("sdxl", root / "sdxl")
    r = invoke(["train", "--arch", "sdxl", "--model", sdxl_model, "--data", made["examples"], "--output", root / "sdxl-run",
                "--max-steps", "1", "--resolution", "32", "--num-threads", "1"])
    assert r.exit_code == 0, r.output
    made["sdxl_lora"] = root / "sdxl-run" / "pytorch_lora_weights.safetensors"
    assert load_file(str(made["lora"])) and save_file  # both readable
    return made


def invoke(argv):
    """The real CLI in-process. lorakit's log handler keeps the stderr of the invocation that
    added it (CliRunner closes it afterwards), so each invocation starts without one."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    logging.getLogger("lorakit").handlers.clear()
    return CliRunner().invoke(app, [str(a) for a in argv])


def normalise(text: str, ctx: Ctx) -> str:
    for path, name in sorted(((str(ctx.tmp), "{tmp}"), (str(ctx.shared["root"]), "{shared}"),
                              (str(ctx.examples), "{examples}")), key=lambda p: -len(p[0])):
        text = text.replace(path, name)
    return text


def outcome(row: Row, ctx: Ctx):
    """``(exit code, error lines, whole output)`` of the row's command."""
    result = invoke(row.argv(ctx))
    output = result.output + ("" if result.exception is None or isinstance(result.exception, SystemExit)
                              else f"\nTraceback (exception escaped): {type(result.exception).__name__}: {result.exception}")
    stderr = result.stderr
    lines = [normalise(line, ctx) for line in stderr.splitlines() if line.strip().startswith("error:")]
    return result.exit_code, lines, normalise(output, ctx), [l for l in stderr.splitlines() if l.strip()]


def _params():
    for row in ROWS:
        marks = [pytest.mark.xfail(strict=True, reason=row.open)] if row.open else []
        yield pytest.param(row, id=row.id, marks=marks)


@pytest.mark.parametrize("row", _params())
def test_bad_input_ends_in_one_line(row, shared, tmp_path):
    """One ``error:`` line (other stderr lines are log lines and libraries' progress bars), no
    traceback, a non-zero exit; an ``ok`` row's line and exit code exactly as the table says."""
    ctx = Ctx(shared, tmp_path)
    code, errors, output, stderr_lines = outcome(row, ctx)
    assert "Traceback" not in output, output[-2000:]
    assert code != 0, output[-2000:]
    assert len(errors) == 1, stderr_lines
    if row.open is None:
        assert errors[0] == row.sees, f"{row.id}: saw\n{errors[0]}\nexpected\n{row.sees}"
        assert code == row.code
    else:
        for needle in row.needs:
            assert needle in errors[0], errors[0]


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:  # what each row shows today (for writing the table)
        import tempfile

        sys.path.insert(0, str(Path(__file__).parent))
        from lorakit.testing import example_data

        class _Factory:
            def mktemp(self, name):
                return Path(tempfile.mkdtemp(prefix=name))

        made = make_shared(_Factory())
        for row in ROWS:
            ctx = Ctx(made, Path(tempfile.mkdtemp(prefix=row.id)))
            try:
                code, errors, output, lines = outcome(row, ctx)
            except Exception as exc:  # noqa: BLE001
                code, errors, output, lines = "EXC", [], repr(exc), []
            print(json.dumps({"id": row.id, "code": code, "errors": errors,
                              "other": [normalise(l, ctx) for l in lines if not l.startswith("error:")][:8],
                              "tb": "Traceback" in output, "tail": output[-300:] if "Traceback" in output else ""}))
    else:
        sys.stdout.write(render())
