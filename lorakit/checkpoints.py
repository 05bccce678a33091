"""The output folder: final LoRA, resumable ``checkpoint-N/`` folders, run config, model card.

A checkpoint holds everything needed to continue bit-for-bit: the LoRA weights (fp32,
safetensors), optimizer and LR-scheduler state (``torch.load(weights_only=True)``, never
plain unpickling), the RNG states and the step. Each checkpoint also carries a
``pytorch_lora_weights.safetensors`` usable on its own. Checkpoints are written to a
temporary folder and renamed, so an interrupted save never becomes the "latest".
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RUN_CONFIG = "lorakit_config.json"
#: Where the model card goes when --output already has a README.md that lorakit did not write.
CARD_FALLBACK = "lorakit_model_card.md"
STATE_FILE = "training_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Config fields that must match for a resume to continue the same run.
RESUME_MUST_MATCH = (
    "arch",
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "train_text_encoder",
    "batch_size",
    "gradient_accumulation",
    "seed",
    "resolution",
    "buckets",
    "mixed_precision",
    "init_lora_weights",
    "modes",
    "instance_prompt",
    "class_prompt",
    "repeats",
)


def list_checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _earlier_run_artifacts(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    names = [output_dir / WEIGHT_NAME, output_dir / RUN_CONFIG, output_dir / "samples", output_dir / CARD_FALLBACK]
    card = output_dir / "README.md"
    if _is_lorakit_card(card):
        names.append(card)
    return [p for p in names if p.exists()] + list_checkpoints(output_dir)


def _is_lorakit_card(path: Path) -> bool:
    return path.is_file() and "trained with lorakit" in path.read_text(errors="replace")


def _newer_checkpoints(output_dir: Path, checkpoint: Path) -> list[Path]:
    """Checkpoints in ``output_dir`` later than ``checkpoint`` when that one belongs to it."""
    if checkpoint.expanduser().resolve().parent != output_dir.resolve():
        return []
    match = CHECKPOINT_RE.match(checkpoint.name)
    if not match:
        return []
    return [c for c in list_checkpoints(output_dir) if _step_of(c) > int(match.group(1))]


def _resumes_from_elsewhere(output_dir: Path, resume: str) -> bool:
    """``--resume`` names a checkpoint outside ``--output`` (a run to continue into a new folder)."""
    return resume != "latest" and Path(resume).expanduser().resolve().parent != output_dir.resolve()


def check_output_dir(output_dir: Path, config) -> Path | None:
    """Decide what a run may do with ``--output``, touching nothing; return the checkpoint to
    resume from, if any.

    An output folder holding an earlier run is refused unless ``--resume`` (continue it)
    or ``--overwrite`` (replace lorakit's own files in it, see :func:`clear_earlier_run`).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise LorakitError(f"--output {output_dir} is a file; pass a folder.")
    resume = config.resume
    if resume:
        if resume == "latest":
            found = list_checkpoints(output_dir)
            if found:
                return found[-1]
            if _earlier_run_artifacts(output_dir):
                raise LorakitError(
                    f"--resume latest: {output_dir} holds a finished or checkpoint-less run; "
                    "raise --max-steps with --resume pointing at a checkpoint, or use --overwrite."
                )
            log.info("--resume latest: no checkpoint in %s yet, starting from step 0", output_dir)
            return None
        path = Path(resume).expanduser()
        if not (path / STATE_FILE).is_file():
            raise LorakitError(
                f"--resume {resume} is not a lorakit checkpoint folder (no {STATE_FILE}); pass checkpoint-N or 'latest'."
            )
        newer = _newer_checkpoints(output_dir, path)
        if newer and not config.overwrite:
            # later checkpoints of this run would be pruned or picked as "latest" by mistake
            raise LorakitError(
                f"--output {output_dir} holds {newer[-1].name}, newer than --resume {path.name}; pass "
                "--overwrite to remove the newer checkpoints, or resume into another --output."
            )
        earlier = _earlier_run_artifacts(output_dir)
        if _resumes_from_elsewhere(output_dir, resume) and earlier and not config.overwrite:
            # continuing a run from elsewhere would write over the other run held in --output
            raise LorakitError(
                f"--output {output_dir} holds another run ({earlier[0].name}) than --resume {resume}; "
                "choose an empty --output, or pass --overwrite to replace that run's files."
            )
        return path
    earlier = _earlier_run_artifacts(output_dir)
    if earlier and not config.overwrite:
        raise LorakitError(
            f"--output {output_dir} holds an earlier run ({earlier[0].name}); pass --resume latest to "
            "continue it, --overwrite to replace it, or choose another --output."
        )
    return None


def clear_earlier_run(output_dir: Path, config) -> None:
    """With ``--overwrite`` (and no resume of this folder's own run), remove lorakit's own files
    of an earlier run.

    Called only once the new run has loaded its model and data, so a run that fails on a
    bad input never costs the user the earlier one. Files lorakit did not write stay.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.overwrite and config.resume and config.resume != "latest":
        for newer in _newer_checkpoints(output_dir, Path(config.resume).expanduser()):
            shutil.rmtree(newer)
            log.info("--overwrite: removed %s (newer than the resumed checkpoint)", newer.name)
    if not config.overwrite or (config.resume and not _resumes_from_elsewhere(output_dir, config.resume)):
        return
    earlier = _earlier_run_artifacts(output_dir)
    for p in earlier:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if earlier:
        log.info("--overwrite: removed the earlier run's files from %s", output_dir)


def write_run_config(output_dir: Path, config) -> None:
    (output_dir / RUN_CONFIG).write_text(config.to_json())


def write_lora(trainer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    trainer.pm.hook.save_lora(
        components=trainer.components, lora_layers=trainer.lora_layers(), output_dir=folder, weight_name=WEIGHT_NAME
    )
    path = folder / WEIGHT_NAME
    if not path.is_file():
        raise RuntimeError(f"arch plugin '{trainer.config.arch}' save_lora did not write {path}")
    return path


def _fingerprint(config) -> dict:
    data = config.to_dict()
    return {k: data.get(k) for k in RESUME_MUST_MATCH}


def save(trainer, output_dir: Path, step: int, limit: int | None, process_rng=None) -> Path:
    """Write ``checkpoint-<step>``. ``process_rng``: every process's ``(generator, torch)``
    RNG states when there are several (only the main process writes)."""
    import torch
    from safetensors.torch import save_file

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_lora(trainer, tmp)
    params = {}
    for name in trainer.lora_configs:
        for pname, p in trainer.components[name].named_parameters():
            if "lora_" in pname:
                params[f"{name}/{pname}"] = p.detach().to("cpu").contiguous()
    save_file(params, str(tmp / "lora_params.safetensors"))
    torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(trainer.lr_scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"generator": trainer.generator.get_state(), "torch": torch.get_rng_state()}
    for rank, (generator_state, torch_state) in enumerate(process_rng or []):
        if rank:
            rng[f"generator.{rank}"], rng[f"torch.{rank}"] = generator_state, torch_state
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng_state.safetensors"))
    scaler = getattr(trainer.accelerator, "scaler", None)
    state = {
        "global_step": step,
        "num_processes": trainer.accelerator.num_processes,
        "config": _fingerprint(trainer.config),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    # Swap in the new folder before deleting an old one of the same step: a crash in
    # between leaves one complete checkpoint, never none.
    aside = output_dir / f".checkpoint-{step}.old"
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        final.rename(aside)
    tmp.rename(final)
    if aside.exists():
        shutil.rmtree(aside)
    if limit:
        # Only checkpoints older than the one just written count against the limit; the
        # new one is never pruned.
        older = [c for c in list_checkpoints(output_dir) if _step_of(c) < step]
        for old in older[: max(0, len(older) - (limit - 1))]:
            shutil.rmtree(old)
            log.info("removed %s (--checkpoints-limit %d)", old.name, limit)
    return final


def _step_of(path: Path) -> int:
    return int(CHECKPOINT_RE.match(path.name).group(1))


def load(path: Path, trainer) -> dict:
    """Restore a checkpoint into a set-up trainer; refuse one from a different run."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    saved, now = state.get("config", {}), _fingerprint(trainer.config)
    different = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != now[k]]
    if different:
        details = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in different)
        raise LorakitError(f"--resume {path} comes from a different run ({details}); use the same settings or --overwrite.")
    params = load_file(str(path / "lora_params.safetensors"))
    for name in trainer.lora_configs:
        module = trainer.components[name]
        named = dict(module.named_parameters())
        for pname, p in named.items():
            if "lora_" in pname:
                key = f"{name}/{pname}"
                if key not in params:
                    raise LorakitError(f"--resume {path} lacks LoRA weight {key}; it belongs to another setup.")
                with torch.no_grad():
                    p.copy_(params[key].to(p.device, p.dtype))
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    trainer.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
    rng = load_file(str(path / "rng_state.safetensors"))
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    saved_world = state.get("num_processes", world)
    if saved_world != world and rank == 0:
        log.warning(
            "%s was written by %d process(es), this run has %d: the data order and noise differ "
            "from the interrupted run from here on", path, saved_world, world,
        )
    suffix = f".{rank}" if rank else ""
    if f"generator{suffix}" not in rng:
        suffix = ""  # no state saved for this process: continue from the main process's
    trainer.generator.set_state(rng[f"generator{suffix}"])
    torch.set_rng_state(rng[f"torch{suffix}"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def write_model_card(output_dir: Path, config, info, steps: int) -> None:
    targets = ", ".join(config.target_modules) if config.target_modules else "arch defaults"
    text = f"""---
library_name: diffusers
tags: [lora, text-to-image, lorakit]
---
# LoRA trained with lorakit

- arch: `{config.arch}` ({info.description})
- base model: `{config.model}`
- rank {config.rank}, alpha {config.lora_alpha:g}, targets: {targets}
- text-encoder LoRA: {"yes" if config.train_text_encoder else "no"}
- steps: {steps}, batch size {config.batch_size} x accumulation {config.gradient_accumulation}, lr {config.learning_rate:g}

Weights: `{WEIGHT_NAME}` (diffusers format with adapter metadata). Load it with
`lorakit generate --arch {config.arch} --model {config.model} --lora {WEIGHT_NAME} --prompt "..."`
or, where the pipeline supports it, `pipeline.load_lora_weights(folder, weight_name="{WEIGHT_NAME}")`.
"""
    card = output_dir / "README.md"
    if card.exists() and not _is_lorakit_card(card):  # the user's own README stays as it is
        card = output_dir / CARD_FALLBACK
        log.info("%s/README.md is not a lorakit model card; wrote the card to %s", output_dir, card.name)
    card.write_text(text)
