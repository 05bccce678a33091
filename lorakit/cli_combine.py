"""``lorakit merge`` and ``lorakit fuse``: thin commands over :mod:`lorakit.merge` and
:mod:`lorakit.fuse`; :mod:`lorakit.cli` registers them (they live here: cli.py is long)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def merge(
    loras: List[Path] = typer.Argument(..., help="LoRAs to merge: .safetensors files (any format lorakit reads) or training output folders."),
    output: Path = typer.Option(..., "--output", help="The merged .safetensors file to write (lorakit/diffusers format)."),
    arch: str = typer.Option(..., "--arch", help="Architecture the LoRAs were trained for."),
    weights: Optional[str] = typer.Option(None, "--weights", help="One weight per LoRA, comma-separated (e.g. 0.7,0.3) \\[1 each]."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Truncate each merged layer to this rank by SVD and report the error \\[exact: ranks add up]."),
    model: str = typer.Option("", "--model", help="Base model (hub id or folder); needed to read kohya files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
):
    """Merge LoRAs into one whose effect is their weighted sum."""
    from lorakit.cli import _quiet_libraries, _run

    _quiet_libraries()

    def go():
        from lorakit.merge import merge as merge_loras
        from lorakit.merge import parse_weights

        return merge_loras(arch, loras, output, parse_weights(weights, len(loras)), rank=rank, model=model or None,
                           overwrite=overwrite)

    typer.echo(_run(go).summary())


def fuse(
    arch: str = typer.Option(..., "--arch", help="Architecture id."),
    model: str = typer.Option(..., "--model", help="Base model: hub id, local folder, or single-file checkpoint (with --model-config offline)."),
    lora: List[str] = typer.Option(..., "--lora", help="LoRA file or output folder, optionally PATH:SCALE; repeatable."),
    output: Path = typer.Option(..., "--output", help="Folder for the fused diffusers model, or FILE.safetensors for one single-file checkpoint (A1111, ComfyUI)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model lorakit fused at --output earlier."),
    model_config: Optional[str] = typer.Option(None, "--model-config", help="With a single-file --model: diffusers "
                                               "folder or hub id supplying its configs (needed offline)."),
):
    """Write the base model with LoRAs fused into its weights."""
    from lorakit.cli import _quiet_libraries, _run

    _quiet_libraries()

    def go():
        from lorakit.fuse import fuse as fuse_loras
        from lorakit.inference import parse_lora_spec

        return fuse_loras(arch, model, [parse_lora_spec(s) for s in lora], output, overwrite=overwrite,
                          model_config=model_config)

    typer.echo(f"wrote {_run(go)}")

