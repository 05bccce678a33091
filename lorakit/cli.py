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

from lorakit.errors import LorakitError

app = typer.Typer(
    help="Train LoRA adapters for text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 1):
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}")
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


def _setup_logging():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("lorakit")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _run(fn):
    """Call ``fn``; a user's mistake becomes one line and exit 1, Ctrl-C exit 130."""
    try:
        return fn()
    except LorakitError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; continue later with --resume latest.", code=130)


@app.command("list-archs")
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


@app.command()
def tiny(
    arch: str = typer.Argument(..., help="Arch id, see `lorakit list-archs`."),
    directory: Path = typer.Argument(..., help="Folder to write the model to (new or empty)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
):
    """Write a tiny randomly initialised model (diffusers layout) for demos, tests and bug reports."""
    _quiet_libraries()
    from lorakit.tiny import make_tiny_model

    path = _run(lambda: make_tiny_model(arch, directory, seed))
    typer.echo(f"wrote a tiny {arch} model to {path}")


@app.command()
def train(
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture id (see `lorakit list-archs`)."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id or local diffusers model folder."),
    data: Optional[str] = typer.Option(None, "--data", help="Image folder (metadata.jsonl or .txt captions) or dataset."),
    output: Optional[Path] = typer.Option(None, "--output", help="Folder for the LoRA, checkpoints and config."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Replacement image encoder (the VAE or the arch's equivalent), hub id or folder; see docs/archs."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML or YAML file of options; flags win."),
    caption_column: Optional[str] = typer.Option(None, help="Caption column of metadata.jsonl / dataset [text]."),
    image_column: Optional[str] = typer.Option(None, help="Image column of a dataset [image]."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank [4]."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha [= rank]."),
    lora_dropout: Optional[float] = typer.Option(None, help="Dropout on the LoRA path [0]."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated layer names for the denoiser's LoRA."),
    train_text_encoder: Optional[bool] = typer.Option(None, "--train-text-encoder", help="Also train text-encoder LoRA."),
    text_encoder_lr: Optional[float] = typer.Option(None, help="Learning rate of text-encoder LoRA [= --learning-rate]."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Learning rate [1e-4]."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps to train [1000]."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per micro-batch per device [1]."),
    gradient_accumulation: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step [1]."),
    resolution: Optional[int] = typer.Option(None, help="Training size in pixels: the square side, or with --buckets the target area's side [the model's native]."),
    center_crop: Optional[bool] = typer.Option(None, "--center-crop/--random-crop", help="Crop position [center]."),
    random_flip: Optional[bool] = typer.Option(None, "--random-flip", help="Flip images left-right at random."),
    buckets: Optional[bool] = typer.Option(None, "--buckets", help="Aspect-ratio buckets: train near each image's own shape, not square."),
    caption_dropout: Optional[float] = typer.Option(None, help="Probability of training on an empty caption [0]."),
    seed: Optional[int] = typer.Option(None, help="Seed for everything random [0]."),
    mixed_precision: Optional[str] = typer.Option(None, help="no | fp16 | bf16 [no]. LoRA weights stay fp32."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing", help="Trade compute for memory."),
    lr_scheduler: Optional[str] = typer.Option(None, help="constant | constant_with_warmup | linear | cosine | ... [constant]."),
    lr_warmup_steps: Optional[int] = typer.Option(None, help="Warm-up steps of the LR schedule [0]."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Clip gradients to this norm; 0 disables [1.0]."),
    snr_gamma: Optional[float] = typer.Option(None, help="Min-SNR loss weighting gamma (5.0 is common) [off]."),
    noise_offset: Optional[float] = typer.Option(None, help="Noise offset (0.05-0.1 helps dark/bright images) [0]."),
    prediction_type: Optional[str] = typer.Option(None, help="epsilon | v_prediction [the model's]."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Save checkpoint-N every N steps."),
    checkpoints_limit: Optional[int] = typer.Option(None, help="Keep only the newest N checkpoints."),
    resume: Optional[str] = typer.Option(None, help="'latest' or a checkpoint folder to continue from."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an earlier run in --output."),
    no_cache: Optional[bool] = typer.Option(None, "--no-cache", help="Encode images and captions every step."),
    validation_prompt: Optional[str] = typer.Option(None, help="Prompt for sample images during training."),
    validation_every: Optional[int] = typer.Option(None, help="Write sample images every N steps."),
    num_threads: Optional[int] = typer.Option(None, help="CPU threads for torch [torch's default]."),
    dreambooth: Optional[bool] = typer.Option(None, "--dreambooth", help="DreamBooth with prior preservation."),
    instance_data: Optional[str] = typer.Option(None, help="DreamBooth: folder of subject images."),
    instance_prompt: Optional[str] = typer.Option(None, help="DreamBooth: prompt naming the subject."),
    class_data: Optional[str] = typer.Option(None, help="DreamBooth: folder of class images (generated if short)."),
    class_prompt: Optional[str] = typer.Option(None, help="DreamBooth: prompt of the class."),
    num_class_images: Optional[int] = typer.Option(None, help="DreamBooth: class images wanted [100]."),
    prior_loss_weight: Optional[float] = typer.Option(None, help="DreamBooth: weight of the prior loss [1.0]."),
    repeats: Optional[int] = typer.Option(None, help="DreamBooth: repeats of each instance image [1]."),
):
    """Train a LoRA."""
    _quiet_libraries()
    _setup_logging()
    from lorakit.config import build_config

    values = dict(
        arch=arch,
        model=model,
        data=data,
        output=str(output) if output else None,
        vae=vae,
        caption_column=caption_column,
        image_column=image_column,
        rank=rank,
        alpha=alpha,
        dropout=lora_dropout,
        target_modules=target_modules,
        train_text_encoder=train_text_encoder,
        text_encoder_lr=text_encoder_lr,
        learning_rate=learning_rate,
        max_steps=max_steps,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
        resolution=resolution,
        center_crop=center_crop,
        random_flip=random_flip,
        buckets=buckets,
        caption_dropout=caption_dropout,
        seed=seed,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        lr_scheduler=lr_scheduler,
        lr_warmup_steps=lr_warmup_steps,
        max_grad_norm=max_grad_norm,
        snr_gamma=snr_gamma,
        noise_offset=noise_offset,
        prediction_type=prediction_type,
        checkpoint_every=checkpoint_every,
        checkpoints_limit=checkpoints_limit,
        resume=resume,
        overwrite=overwrite,
        cache=False if no_cache else None,
        validation_prompt=validation_prompt,
        validation_every=validation_every,
        num_threads=num_threads,
        modes=["dreambooth"] if dreambooth else None,
        instance_data=instance_data,
        instance_prompt=instance_prompt,
        class_data=class_data,
        class_prompt=class_prompt,
        num_class_images=num_class_images,
        prior_loss_weight=prior_loss_weight,
        repeats=repeats,
    )

    def go():
        config = build_config(values, str(config_file) if config_file else None)
        from lorakit.plugins import arch_entries

        if config.arch not in arch_entries():
            raise LorakitError(
                f"unknown arch '{config.arch}'. Known archs: {', '.join(arch_entries()) or 'none'}. "
                "See `lorakit list-archs`."
            )
        from lorakit.progress import make_progress
        from lorakit.training import train as run_training

        return run_training(config, progress=make_progress())

    result = _run(go)
    typer.echo(f"saved {result.weights} ({result.global_step} steps)")


@app.command()
def generate(
    arch: str = typer.Option(..., "--arch", help="Architecture id."),
    model: str = typer.Option(..., "--model", help="Base model: hub id or local folder."),
    prompt: List[str] = typer.Option(..., "--prompt", help="Prompt (repeat for several images)."),
    lora: List[str] = typer.Option([], "--lora", help="LoRA file or output folder, optionally PATH:SCALE; repeatable."),
    output: Path = typer.Option(Path("lorakit-image.png"), "--output", help="Image path (index added for several)."),
    steps: int = typer.Option(25, help="Inference steps."),
    resolution: Optional[int] = typer.Option(None, help="Image size [the model's native]."),
    seed: int = typer.Option(0, help="Seed."),
    guidance_scale: Optional[float] = typer.Option(None, help="Classifier-free guidance scale [pipeline default]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing image files."),
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
        images = run_generate(arch, model, prompt, specs, steps=steps, resolution=resolution, seed=seed, guidance_scale=guidance_scale)
        for image, target in zip(images, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
        return targets

    for t in _run(go):
        typer.echo(f"wrote {t}")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="lorakit LoRA: a .safetensors file or a training output folder."),
    target: Path = typer.Argument(..., help="The .safetensors file to write."),
    arch: str = typer.Option(..., "--arch", help="Architecture the LoRA was trained for."),
    to: str = typer.Option(..., "--to", help="Target format: kohya (A1111, ComfyUI, kohya's sd-scripts)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
):
    """Convert a lorakit LoRA to another tool's format (kohya-style keys)."""
    _quiet_libraries()

    def go():
        if to != "kohya":
            raise LorakitError(f"--to {to} is not a known format; the only one is kohya.")
        from lorakit.convert import convert_to_kohya

        return convert_to_kohya(arch, source, target, overwrite=overwrite)

    typer.echo(f"wrote {_run(go)}")


def main():
    app()


if __name__ == "__main__":
    main()
