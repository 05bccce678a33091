"""Which checkpoint a resume may trust, and the leftovers of a killed save.

A checkpoint is trusted only when every file matches the checksums sealed into it
(:data:`lorakit.state.CHECKSUMS`); one written before checksums existed is trusted when its
files are present and load. ``--resume latest`` falls back from a damaged newest checkpoint to
the newest intact one, saying what was damaged; with none intact it refuses in one line.

(The output folder's policy and files live in :mod:`lorakit.outputs`, the checkpoint's
contents in :mod:`lorakit.state`; the names below are kept for older imports.)
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from lorakit import fsutil
from lorakit.errors import LorakitError
from lorakit.outputs import (  # noqa: F401
    CARD_FALLBACK,
    RUN_CONFIG,
    WEIGHT_NAME,
    check_output_dir,
    clear_earlier_run,
    disk_full,
    record,
    write_model_card,
    write_run_config,
)
from lorakit.state import (  # noqa: F401
    CHECKPOINT_RE,
    CHECKSUMS,
    PARAMS_FILE,
    RNG_FILE,
    STATE_FILE,
    TrainState,
    fingerprint,
    list_checkpoints,
)

log = logging.getLogger("lorakit")

#: every file a checkpoint must hold
REQUIRED = (PARAMS_FILE, "optimizer.pt", "scheduler.pt", RNG_FILE, STATE_FILE, WEIGHT_NAME)
_STRAY = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old)$")


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (None: intact, as far as can be checked)."""
    problems = fsutil.seal_problems(path, CHECKSUMS)
    if problems is None:
        problems = [f"{CHECKSUMS} is missing"] if _says_sealed(path) else _unsealed_problems(path)
    problems += [f"{name} is missing" for name in REQUIRED
                 if not (path / name).is_file() and f"{name} is missing" not in problems]
    return "; ".join(problems) or None


def _says_sealed(path: Path) -> bool:
    try:
        return "checksums" in json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError, TypeError):
        return False


def _unsealed_problems(path: Path) -> list[str]:
    """A checkpoint from before checksums: its files must be there, non-empty, and the adapter
    file (which a resume does not read) must load; the rest is proven by loading it."""
    problems = []
    for name in REQUIRED:
        p = path / name
        if p.is_file() and p.stat().st_size == 0:
            problems.append(f"{name} is empty")
    if (path / WEIGHT_NAME).is_file() and f"{WEIGHT_NAME} is empty" not in problems:
        try:
            from safetensors.torch import load_file

            load_file(str(path / WEIGHT_NAME))
        except Exception as exc:  # safetensors raises its own error types
            problems.append(f"{WEIGHT_NAME} does not load ({_first_line(exc)})")
    return problems


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def resume_run(state, config, output_dir: Path, resume_from: Path) -> Path:
    """Restore ``state`` from ``--resume``: for ``latest`` the newest intact checkpoint."""
    if config.resume == "latest":
        return resume(state, list_checkpoints(output_dir, complete=False)[::-1], output_dir, explicit=False)
    return resume(state, [resume_from], output_dir, explicit=True)


def resume(state, candidates: list[Path], output_dir: Path, explicit: bool) -> Path:
    """Load the newest intact checkpoint of ``candidates`` (newest first) into ``state``;
    warn about each damaged one skipped; refuse in one line when none is intact."""
    skipped = []
    for path in candidates:
        problem = damage(path)
        if problem is None:
            try:
                state.load(path)
            except LorakitError:  # another run's checkpoint: not damage, and no fallback
                raise
            except Exception as exc:  # torch / safetensors / json on a damaged unsealed file
                problem = f"it does not load ({_first_line(exc)})"
        if problem is None:
            if skipped:
                log.warning("resuming from %s, the newest intact checkpoint", path.name)
            return path
        skipped.append(f"{path.name}: {problem}")
        if not explicit:
            log.warning("%s is damaged (%s); falling back to an older checkpoint", path.name, problem)
    if explicit:
        raise LorakitError(f"--resume {candidates[0]} is damaged ({skipped[0].split(': ', 1)[1]}); "
                           "resume from another checkpoint, or start over with --overwrite.")
    raise LorakitError(
        f"--resume latest: no intact checkpoint in {output_dir} ({'; '.join(skipped)}); "
        "remove the damaged checkpoint folders to start from step 0, or start over with --overwrite."
    )


def save_checkpoint(state, output_dir: Path, write_lora, limit) -> Path:
    """``state.save`` recorded in the manifest; a full disk is one line saying what to do."""
    name = f"checkpoint-{state.global_step}"
    try:
        record(output_dir, name)
        return state.save(output_dir, write_lora, limit)
    except Exception as exc:
        if not fsutil.is_disk_full(exc):
            raise
        earlier = list_checkpoints(output_dir)
        need = fsutil.tree_size(earlier[-1]) if earlier else state.estimated_size()
        raise disk_full(output_dir, need, name) from None


def save_on_stop(trainer, stop) -> None:
    """Ctrl-C / SIGTERM: keep the work done. The optimizer and weights are those of the last
    finished step; every draw is derived from the step, so resuming is exact. Several
    processes that agreed to stop after this step (``stop.agreed``) save it together:
    :func:`save_together`."""
    t = trainer
    t.optimizer.zero_grad(set_to_none=True)
    if t.progress is not None and t.accelerator.is_main_process:
        t.progress.finish()
    step, saved = t.global_step, t.output_dir / f"checkpoint-{t.global_step}"
    agreed = bool(getattr(stop, "agreed", False))
    if agreed and t.accelerator.num_processes > 1:
        saved = save_together(t) if step else None
    elif step and not saved.is_dir() and t.stepper.rewind_to_finished_step() and t.accelerator.is_main_process:
        saved = save_checkpoint(t.state, t.output_dir, t._write_lora, t.config.checkpoints_limit)
    elif not saved.is_dir():
        saved = None
    if step and saved is not None:
        stop.lorakit_note = f"{getattr(stop, 'summary', 'interrupted')} at step {step}; saved {saved.name}"
        if t.accelerator.is_main_process:
            log.warning("stopped at step %d; saved %s", step, saved)


def save_together(trainer) -> Path | None:
    """Every process stops after the same finished step and holds the same LoRA weights
    (checked here) and optimizer state (the same update of the same reduced gradients); the
    main process saves the checkpoint while the others wait,
    then every process learns whether it was saved (one collective each, at the stop only).
    Returns the checkpoint, or None where the main process could not save it (it raises)."""
    import torch

    from lorakit.state import check_processes_agree

    t, accelerator = trainer, trainer.accelerator
    check_processes_agree(accelerator, t.params)
    path, failure = t.output_dir / f"checkpoint-{t.global_step}", None
    if accelerator.is_main_process and not path.is_dir():
        try:
            path = save_checkpoint(t.state, t.output_dir, t._write_lora, t.config.checkpoints_limit)
        except Exception as exc:  # raised below, once the others are no longer waiting for the save
            failure = exc
    saved = torch.tensor([0.0 if failure else 1.0], device=accelerator.device)
    everywhere = accelerator.reduce(saved, reduction="sum")  # the others wait here for the save
    if failure is not None:
        raise failure
    return path if int(everywhere.item()) == accelerator.num_processes else None


def remove_strays(output_dir: Path) -> None:
    """Undo what a kill during a save left: a half-written ``.checkpoint-N.tmp`` goes; a
    ``.checkpoint-N.old`` (moved aside while its replacement was renamed in) comes back when the
    replacement is missing, else goes; lorakit's temporary files go."""
    if not output_dir.is_dir():
        return
    for p in output_dir.iterdir():
        match = _STRAY.match(p.name)
        if match and p.is_dir():
            final = output_dir / f"checkpoint-{match.group(1)}"
            if match.group(2) == "old" and not final.exists():
                p.rename(final)
                log.info("restored %s (a save was interrupted)", final.name)
                continue
            fsutil.remove_tree(p)
            log.info("removed %s (left by an interrupted save)", p.name)
    for p in list(output_dir.glob(f".*{fsutil.TMP_SUFFIX}")) + list(output_dir.glob(f"samples/.*{fsutil.TMP_SUFFIX}")):
        fsutil.remove_tree(p)
