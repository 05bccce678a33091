"""The ``lorakit`` command. Thin: parse, validate, call a plain function, report.

Nothing here imports torch at module level, so ``lorakit --help`` and
``lorakit list-archs`` stay fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from lorakit.errors import LorakitError

app = typer.Typer(
    help="Train LoRA adapters for text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 1):
    from rich.console import Console
    from rich.markup import escape

    # the message is the user's own text (paths, prompts): no markup, no :emoji: codes
    Console(stderr=True, highlight=False, soft_wrap=True, emoji=False).print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _quiet_libraries():
    for var, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(var, value)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (a test runner or notebook may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging():
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("lorakit")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _main_process() -> bool:
    """Whether this is the launch's first process (the launchers set RANK; a plain run has none)."""
    return os.environ.get("RANK", "0") in ("", "0")


def _run(fn):
    """Call ``fn``; a user's mistake becomes one line and exit 1; Ctrl-C (SIGINT) exit 130 and
    SIGTERM exit 143, each with the command that resumes the run."""
    try:
        return fn()
    except LorakitError as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        from lorakit.progress import resume_hint

        code = getattr(exc, "exit_code", 130)
        if getattr(exc, "agreed", False) and not _main_process():
            raise typer.Exit(code)  # every process stopped after the same step: the main one says so, once
        note = getattr(exc, "lorakit_note", None) or getattr(exc, "summary", "interrupted")
        _fail(f"{note}; {resume_hint()}.", code=code)


#: Flags of diffusers' and kohya's training scripts that lorakit spells differently.
FOREIGN_FLAGS = {
    "--pretrained_model_name_or_path": "--model",
    "--pretrained_vae_model_name_or_path": "--vae",
    "--train_data_dir": "--data",
    "--dataset_name": "--data",
    "--instance_data_dir": "--instance-data",
    "--class_data_dir": "--class-data",
    "--output_dir": "--output",
    "--max_train_steps": "--max-steps",
    "--num_train_epochs": "--epochs",
    "--max_train_epochs": "--epochs",
    "--train_batch_size": "--batch-size",
    "--gradient_accumulation_steps": "--gradient-accumulation",
    "--resume_from_checkpoint": "--resume",
    "--checkpointing_steps": "--checkpoint-every",
    "--checkpoints_total_limit": "--checkpoints-limit",
    "--dataloader_num_workers": "--num-workers",
    "--network_dim": "--rank",
    "--network_alpha": "--alpha",
    "--text_encoder_lr": "--text-encoder-lr",
}
#: Flags users bring from other tools for what lorakit does not offer yet: say so plainly.
NOT_YET: dict = {}  # (the Hub flags exist now: --push-to-hub, --hub-model-id)


class _HintingCommand(TyperCommand):
    """A usage mistake (bad value, missing option, extra argument, unknown flag) is one error
    line with exit status 2; a diffusers/kohya spelling of a flag gets lorakit's name."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            if not any(k.__name__ == "UsageError" for k in type(exc).__mro__):
                raise
            name = getattr(exc, "option_name", None)
            if type(exc).__name__ != "NoSuchOption" or not name:
                text = " ".join(exc.format_message().split())
                _fail(f"{text.rstrip('.')}; see `lorakit {ctx.info_name} --help`.", code=2)
            known = {flag for p in self.params for flag in (*p.opts, *getattr(p, "secondary_opts", ()))}
            dashed = "--" + name.lstrip("-").replace("_", "-")
            if name in NOT_YET:
                _fail(f"{name}: {NOT_YET[name]}.", 2)
            hint = FOREIGN_FLAGS.get(name) or (dashed if dashed in known else None)
            if hint:
                _fail(f"{name} is not a lorakit flag (that is another tool's spelling); use {hint}.", 2)
            close = getattr(exc, "possibilities", None) or []
            guess = f"; did you mean {' or '.join(sorted(close)[:3])}?" if close else "."
            _fail(f"no such option {name}{guess} See `lorakit {ctx.info_name} --help`.", 2)


@app.command("list-archs", cls=_HintingCommand)
def list_archs_cmd(json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List installed architectures (and whether each plugin loads)."""
    from lorakit.plugins import list_archs, mode_entries

    rows = _run(list_archs)
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lorakit architectures")
    for col in ("id", "description", "provided by", "status"):
        table.add_column(col)
    for r in rows:
        status = "[green]ok[/]" if r["status"] == "ok" else f"[red]broken[/]: {r['error']}"
        table.add_row(r["id"], r["description"], f"{r['distribution']} {r['version']}", status)
    Console().print(table)
    modes = mode_entries()
    if modes:
        Console().print("modes: " + ", ".join(modes))


@app.command(cls=_HintingCommand)
def tiny(
    arch: str = typer.Argument(..., help="Arch id, see `lorakit list-archs`."),
    directory: Path = typer.Argument(..., help="Folder to write the model to (new or empty)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    single_file: bool = typer.Option(False, "--single-file", help="Also write it as one original-layout "
                                     "checkpoint, DIRECTORY/model.safetensors (the folder is its --model-config)."),
):
    """Write a tiny randomly initialised model (diffusers layout) for demos, tests and bug reports."""
    _quiet_libraries()
    from lorakit.tiny import make_tiny_model, make_tiny_single_file

    if single_file:
        file = _run(lambda: make_tiny_single_file(arch, directory, seed))
        typer.echo(f"wrote a tiny {arch} model to {file.parent} and as one file to {file} "
                   f"(train it with --model {file} --model-config {file.parent})")
        return
    path = _run(lambda: make_tiny_model(arch, directory, seed))
    typer.echo(f"wrote a tiny {arch} model to {path}")


from lorakit.cli_train import _LazyTrain, _mode_flags, _train_parameters, train  # noqa: E402,F401

_train_command = _LazyTrain()
app.command("train", cls=_HintingCommand)(_train_command)


@app.command(cls=_HintingCommand)
def generate(
    arch: str = typer.Option(..., "--arch", help="Architecture id."),
    model: str = typer.Option(..., "--model", help="Base model: hub id, local folder or single .safetensors file."),
    prompt: List[str] = typer.Option(..., "--prompt", help="Prompt (repeat for several images)."),
    lora: List[str] = typer.Option([], "--lora", help="LoRA file (lorakit/diffusers, kohya/A1111/ComfyUI, diffusers-example, PEFT) or output folder; PATH:W sets its strength, PATH:W:TEW a separate text-encoder strength; repeatable."),
    output: Path = typer.Option(Path("lorakit-image.png"), "--output", help="Image path (index added for several)."),
    steps: int = typer.Option(25, help="Inference steps."),
    resolution: Optional[int] = typer.Option(None, help="Image size [the model's native]."),
    seed: int = typer.Option(0, help="Seed."),
    guidance_scale: Optional[float] = typer.Option(None, help="Classifier-free guidance scale [pipeline default]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing image files."),
    model_config: Optional[str] = typer.Option(None, "--model-config", help="With a single-file --model: diffusers "
                                               "folder or hub id supplying its configs (needed offline)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit of a hub --model."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Weight variant of --model (e.g. fp16)."),
):
    """Generate images with a base model and one or several LoRAs."""
    _quiet_libraries()
    from lorakit.inference import generate as run_generate
    from lorakit.inference import parse_lora_spec

    def go():
        from PIL import Image

        if output.suffix.lower() not in Image.registered_extensions():
            raise LorakitError(f"--output {output} has no image file extension PIL can write; use .png or .jpg.")
        specs = [parse_lora_spec(s) for s in lora]
        targets = [output] if len(prompt) == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(prompt))]
        existing = [t for t in targets if t.exists()]
        if existing and not overwrite:
            raise LorakitError(f"{existing[0]} exists; pass --overwrite or another --output.")
        blocked = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise LorakitError(f"--output {output}: {blocked} is a file, so the image cannot go there; pick another path.")
        images = run_generate(arch, model, prompt, specs, steps=steps, resolution=resolution, seed=seed, guidance_scale=guidance_scale,
                              model_config=model_config, revision=revision, variant=variant)
        for image, target in zip(images, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
        return targets

    for t in _run(go):
        typer.echo(f"wrote {t}")


@app.command(cls=_HintingCommand)
def convert(
    source: Path = typer.Argument(..., help="LoRA to convert: a .safetensors file (lorakit/diffusers, kohya/A1111/ComfyUI, diffusers-example or PEFT; the format is read from its keys) or a training output folder."),
    target: Path = typer.Argument(..., help="The .safetensors file to write."),
    arch: str = typer.Option(..., "--arch", help="Architecture the LoRA was trained for."),
    to: str = typer.Option(..., "--to", help="Target format: kohya (A1111, ComfyUI, kohya's sd-scripts), diffusers (lorakit's own; also --to lorakit), diffusers-example (no header; alpha folded into the weights) or peft (one model's LoRA; adapter_config.json beside it)."),
    model: str = typer.Option("", "--model", help="Base model (hub id or folder) whose layer names the file uses; needed to read a kohya file, and for archs whose kohya names follow the model's config; tells a PEFT file's component (default: the training run's model)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
):
    """Convert a LoRA between lorakit's (diffusers), kohya's (A1111, ComfyUI), diffusers-example and PEFT formats."""
    _quiet_libraries()

    def go():
        from lorakit.convert import convert as convert_lora

        return convert_lora(arch, source, target, to, model=model or None, overwrite=overwrite)

    typer.echo(f"wrote {_run(go)}")



from lorakit.cli_combine import fuse as _fuse_command  # noqa: E402
from lorakit.cli_combine import merge as _merge_command  # noqa: E402

app.command("merge", cls=_HintingCommand)(_merge_command)
app.command("fuse", cls=_HintingCommand)(_fuse_command)

cache_app = typer.Typer(help="Inspect and prune the encoding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
_CACHE_DIR = typer.Option(None, "--cache-dir", help="The cache folder (as given to lorakit train) "
                          "\\[default: $LORAKIT_CACHE_DIR/encodings, else ~/.cache/lorakit/encodings].")


@cache_app.command("info", cls=_HintingCommand)
def cache_info(cache_dir: Optional[str] = _CACHE_DIR):
    """Show the encoding cache: folder, shards, entries, size on disk, oldest and newest use."""
    from lorakit.cachetools import info

    typer.echo(_run(lambda: info(cache_dir)))


@cache_app.command("prune", cls=_HintingCommand)
def cache_prune(
    cache_dir: Optional[str] = _CACHE_DIR,
    older_than: Optional[str] = typer.Option(None, "--older-than", help="Remove shards no run used for this long "
                                             "(e.g. 30d, 12h; units s, m, h, d, w)."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Then remove the least recently used shards "
                                           "until the cache is at most this size (e.g. 20GB, 500MB, 1.5TiB)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
):
    """Remove whole shards of the encoding cache, least recently used first; a run using them re-encodes."""
    from lorakit.cachetools import prune

    typer.echo(_run(lambda: prune(cache_dir, older_than, max_size, dry_run)))


def main():
    # Building `train`'s flags loads every plugin's declarations: skip that for other commands.
    _train_command.light = sys.argv[1:2] != ["train"]
    app()


if __name__ == "__main__":
    main()
