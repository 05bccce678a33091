"""The output folder: what a run may do with ``--output``, and what it writes there (final
LoRA, run config, model card, sample images, checkpoints).

Files lorakit did not write are never touched: every path a run writes is recorded in
``lorakit_manifest.json`` (before it is written), ``--overwrite`` removes only recorded paths,
and a recorded name is never written over a file that is not lorakit's. Every file is
published by an atomic rename once complete (see :mod:`lorakit.fsutil`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from lorakit import fsutil
from lorakit.errors import LorakitError
from lorakit.state import CHECKPOINT_RE, STATE_FILE, fingerprint, global_batch_fix, list_checkpoints, step_of

log = logging.getLogger("lorakit")

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RUN_CONFIG = "lorakit_config.json"
MANIFEST = "lorakit_manifest.json"
#: Where the model card goes when --output already has a README.md that lorakit did not write.
CARD_FALLBACK = "lorakit_model_card.md"
_CARD_START = "---\nlibrary_name: diffusers\ntags: [lora, text-to-image, lorakit]\n---\n# LoRA trained with lorakit\n"
_SAMPLE = re.compile(r"^samples/step-\d{6}-\d+\.png$")
_FINAL_TMP = f".lorakit-final{fsutil.TMP_SUFFIX}"


# ---------------------------------------------------------------------------- what lorakit wrote
def recorded(output_dir: Path) -> list[str] | None:
    """The paths (relative) lorakit recorded writing in ``output_dir``; None without a manifest."""
    try:
        paths = json.loads((output_dir / MANIFEST).read_text())["paths"]
        return [p for p in paths if isinstance(p, str)]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        log.warning("%s/%s is unreadable; only lorakit's own file names count as its files", output_dir, MANIFEST)
        return None


def _legacy_artifacts(output_dir: Path) -> list[str]:
    """A folder written before manifests: lorakit's files by their names, when the folder holds
    a lorakit run at all (its run config or a checkpoint)."""
    checkpoints = [p.name for p in list_checkpoints(output_dir)]
    if not (output_dir / RUN_CONFIG).is_file() and not checkpoints:
        return []
    names = [n for n in (WEIGHT_NAME, RUN_CONFIG, CARD_FALLBACK) if (output_dir / n).is_file()]
    if _is_lorakit_card(output_dir / "README.md"):
        names.append("README.md")
    if (output_dir / "samples").is_dir():
        names += sorted(f"samples/{p.name}" for p in (output_dir / "samples").iterdir() if _SAMPLE.match(f"samples/{p.name}"))
    return names + checkpoints


def _ours(output_dir: Path) -> list[str]:
    paths = recorded(output_dir)
    return _legacy_artifacts(output_dir) if paths is None else paths


def record(output_dir: Path, *paths: str) -> None:
    """Add ``paths`` to the manifest (a folder from before manifests first adopts its
    lorakit-named files)."""
    known = _ours(output_dir)
    new = [p for p in paths if p not in known]
    if new or not (output_dir / MANIFEST).is_file():
        data = json.dumps({"paths": known + new}, indent=1).encode()
        fsutil.replace_file(output_dir / MANIFEST, data)


def _claim(output_dir: Path, name: str) -> Path:
    """``output_dir / name``, recorded as lorakit's; refused when a file of someone else's is there."""
    path = output_dir / name
    if (path.exists() or path.is_symlink()) and name not in _ours(output_dir):
        raise LorakitError(f"--output {output_dir} holds {name}, which lorakit did not write; "
                           "move it away or choose another --output.")
    record(output_dir, name)
    return path


def _earlier_run_artifacts(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return [output_dir / p for p in _ours(output_dir) if (output_dir / p).exists()]


def _is_lorakit_card(path: Path) -> bool:
    return path.is_file() and path.read_text(errors="replace").startswith(_CARD_START)


# ---------------------------------------------------------------------------- what a run may do
def _newer_checkpoints(output_dir: Path, checkpoint: Path) -> list[Path]:
    """Checkpoints in ``output_dir`` later than ``checkpoint`` when that one belongs to it."""
    if checkpoint.expanduser().resolve().parent != output_dir.resolve():
        return []
    match = CHECKPOINT_RE.match(checkpoint.name)
    if not match:
        return []
    return [c for c in list_checkpoints(output_dir) if step_of(c) > int(match.group(1))]


def _resumes_from_elsewhere(output_dir: Path, resume: str) -> bool:
    """``--resume`` names a checkpoint outside ``--output`` (a run to continue into a new folder)."""
    return resume != "latest" and Path(resume).expanduser().resolve().parent != output_dir.resolve()


def _refuse_foreign_files(output_dir: Path) -> None:
    ours = _ours(output_dir)
    for name in (WEIGHT_NAME, RUN_CONFIG):
        if (output_dir / name).exists() and name not in ours:
            raise LorakitError(f"--output {output_dir} holds {name}, which lorakit did not write; "
                               "move it away or choose another --output.")


def check_output_path(output_dir: Path) -> None:
    """Refuse an ``--output`` that is a file or lies under one, before anything is loaded."""
    if output_dir.exists() and not output_dir.is_dir():
        raise LorakitError(f"--output {output_dir} is a file; pass a folder.")
    blocked = next((p for p in output_dir.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise LorakitError(f"--output {output_dir}: {blocked} is a file, so the folder cannot be made; pick another path.")


def check_output_dir(output_dir: Path, config) -> Path | None:
    """Decide what a run may do with ``--output``, touching nothing; return the checkpoint to
    resume from (for ``--resume latest`` the newest, damaged or not), if any.

    An output folder holding an earlier run is refused unless ``--resume`` (continue it)
    or ``--overwrite`` (replace lorakit's own files in it, see :func:`clear_earlier_run`).
    """
    check_output_path(output_dir)
    _refuse_foreign_files(output_dir)
    resume = config.resume
    if not resume:
        earlier = _earlier_run_artifacts(output_dir)
        if earlier and not config.overwrite:
            raise LorakitError(
                f"--output {output_dir} holds an earlier run ({earlier[0].name}); pass --resume latest to "
                "continue it, --overwrite to replace it, or choose another --output."
            )
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir, complete=False)
        if found:
            return found[-1]
        _start_latest_from_zero(output_dir, config)
        return None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file() and not (path / "lorakit_checksums.json").is_file():
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


def _start_latest_from_zero(output_dir: Path, config) -> None:
    """``--resume latest`` before the first checkpoint: the same run starts again from step 0
    (a job script may always pass it); another run's settings are refused, naming them."""
    earlier = _earlier_run_artifacts(output_dir)
    if not earlier or config.overwrite:
        _main_log("--resume latest: no checkpoint in %s yet; starting from step 0", output_dir)
        return
    try:
        saved = json.loads((output_dir / RUN_CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        saved = None
    from lorakit.saveformat import kohya_file_name

    finished = any((output_dir / name).exists() for name in (WEIGHT_NAME, kohya_file_name(output_dir)))
    if not isinstance(saved, dict) or finished:
        raise LorakitError(
            f"--resume latest: {output_dir} holds a finished or checkpoint-less run; "
            "raise --max-steps with --resume pointing at a checkpoint, or use --overwrite."
        )
    now = json.loads(json.dumps(fingerprint(config)))
    per_process = isinstance(saved.get("num_processes"), int) and "batch_size" in saved and "batch_size" in now
    different = [k for k in now if k in saved and saved[k] != now[k] and not (per_process and k == "batch_size")]
    if different:
        details = ", ".join(f"{k}: saved {saved[k]!r} vs now {now[k]!r}" for k in different)
        raise LorakitError(f"--resume latest: {output_dir} holds a run with other settings ({details}) and no "
                           "checkpoint yet; use the same settings, --overwrite to replace it, or another --output.")
    if per_process:
        _check_global_batch(output_dir, saved, config.batch_size, process_count())
    _main_log("--resume latest: %s has this run's settings but no checkpoint yet; starting from step 0", output_dir)


def _check_global_batch(output_dir: Path, saved: dict, per: int, n: int) -> None:
    """The rule of a resume from a checkpoint (:meth:`lorakit.state.TrainState.load`) for a run
    that has none yet: the process count may change, the global batch (``--batch-size`` x
    processes) not, since the data order and every draw depend on the global batch only."""
    was_per, was_n = saved["batch_size"], saved["num_processes"]
    was = was_per * was_n
    fix = global_batch_fix(was_per, was_n, per, n)
    if fix is None:
        if was_n != n:
            _main_log("--resume latest: %s was started by %d process(es), this run has %d: the same global batch "
                      "of %d, the same training", output_dir, was_n, n, was)
        return
    raise LorakitError(
        f"--resume latest: {output_dir} holds a run with a global batch of {was} (--batch-size {was_per} x {was_n} "
        f"process(es)) and no checkpoint yet, this run's is {per * n} (--batch-size {per} x {n}); {fix}, "
        "or --overwrite to replace it."
    )


def _main_log(*args) -> None:
    """An info line from the run's main process only (every process decides the same)."""
    import sys

    state = sys.modules.get("accelerate.state")
    main = state is None or not state.is_initialized() or state.AcceleratorState().process_index == 0
    (log.info if main else log.debug)(*args)


def process_count() -> int:
    """The number of processes of this run: accelerate's, once the run's Accelerator exists
    (the launcher's world), else 1."""
    import sys

    state = sys.modules.get("accelerate.state")
    if state is None or not state.is_initialized():
        return 1
    return state.AcceleratorState().num_processes


def clear_earlier_run(output_dir: Path, config) -> None:
    """With ``--overwrite`` (and no resume of this folder's own run), remove lorakit's own files
    of an earlier run: only paths it recorded writing (or, in a folder from before manifests,
    its own file names).

    Called only once the new run has loaded its model and data, so a run that fails on a
    bad input never costs the user the earlier one. Files lorakit did not write stay.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.overwrite and config.resume and config.resume != "latest":
        for newer in _newer_checkpoints(output_dir, Path(config.resume).expanduser()):
            shutil.rmtree(newer)
            log.info("--overwrite: removed %s (newer than the resumed checkpoint)", newer.name)
    resuming_here = config.resume and not _resumes_from_elsewhere(output_dir, config.resume)
    if config.resume == "latest" and not list_checkpoints(output_dir, complete=False):
        resuming_here = False  # nothing to resume: a fresh start, like a run without --resume
    if not config.overwrite or resuming_here:
        return
    earlier = _earlier_run_artifacts(output_dir)
    for p in earlier:  # folders other than checkpoints go only once empty: they may hold the user's files
        if not p.is_dir() or CHECKPOINT_RE.match(p.name):
            fsutil.remove_tree(p)
    for p in earlier:
        if p.is_dir() and not CHECKPOINT_RE.match(p.name) and not any(p.iterdir()):
            p.rmdir()
    samples = output_dir / "samples"
    if samples.is_dir() and not any(samples.iterdir()) and any(p.parent == samples for p in earlier):
        samples.rmdir()
    (output_dir / MANIFEST).unlink(missing_ok=True)
    if earlier:
        log.info("--overwrite: removed the earlier run's files from %s", output_dir)


# ---------------------------------------------------------------------------- what a run writes
def _one_line_when_disk_full(what: str):
    """A full disk while writing ``what`` ends in one line, not a traceback."""
    import functools

    def wrap(write):
        @functools.wraps(write)
        def written(output_dir, *args, **kwargs):
            try:
                return write(output_dir, *args, **kwargs)
            except OSError as exc:
                if not fsutil.is_disk_full(exc):
                    raise
                raise disk_full(Path(output_dir), None, what) from None
        return written
    return wrap


@_one_line_when_disk_full("the run config")
def write_run_config(output_dir: Path, config) -> None:
    """Every setting of the run, plus the process count it ran on (``num_processes``: a restart
    before the first checkpoint may change it when the global batch stays the same)."""
    data = {**config.to_dict(), "num_processes": process_count()}
    fsutil.replace_file(_claim(output_dir, RUN_CONFIG), json.dumps(data, indent=2, sort_keys=True).encode())


def write_lora(pm, components, lora_layers: dict, folder: Path, arch: str) -> Path:
    """The adapter file, written by the arch's ``save_lora`` hook."""
    folder.mkdir(parents=True, exist_ok=True)
    pm.hook.save_lora(components=components, lora_layers=lora_layers, output_dir=folder, weight_name=WEIGHT_NAME)
    path = folder / WEIGHT_NAME
    if not path.is_file():
        raise RuntimeError(f"arch plugin '{arch}' save_lora did not write {path}")
    return path


def write_final_lora(write, output_dir: Path, need: int | None = None) -> Path:
    """The run's adapter: ``write(folder)`` fills a temporary folder, whose files are fsynced and
    renamed into ``output_dir`` once all are complete (a full disk publishes nothing)."""
    tmp = output_dir / _FINAL_TMP
    fsutil.remove_tree(tmp)
    try:
        write(tmp)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in names:
            fsutil.fsync_file(tmp / name)
            _claim(output_dir, name)
        for name in names:
            fsutil.publish(tmp / name, output_dir / name)
    except BaseException as exc:
        need = max(need or 0, fsutil.tree_size(tmp) if tmp.exists() else 0) or None
        fsutil.remove_tree(tmp)
        if fsutil.is_disk_full(exc):
            raise disk_full(output_dir, need, f"the final LoRA ({WEIGHT_NAME})") from None
        raise
    fsutil.remove_tree(tmp)
    return output_dir / WEIGHT_NAME


def disk_full(output_dir: Path, need: int | None, what: str) -> LorakitError:
    earlier = list_checkpoints(output_dir)
    since = f"continues from {earlier[-1].name}" if earlier else "starts again from step 0"
    return LorakitError(
        f"disk full writing {what} to {output_dir} (it needs about {fsutil.human_size(need)}, "
        f"{fsutil.human_size(fsutil.free_space(output_dir))} free); free some space, then run the same command "
        f"with --resume latest ({since}; earlier checkpoints are intact)."
    )


# sample images: lorakit.validation


@_one_line_when_disk_full("the model card")
def write_model_card(output_dir: Path, config, info, steps: int, pm=None) -> None:
    from lorakit.card import model_card

    text = model_card(config, info, steps, pm=pm, output_dir=output_dir)
    name = "README.md"
    card = output_dir / name
    if (card.exists() or card.is_symlink()) and name not in _ours(output_dir):  # the user's README stays
        name = CARD_FALLBACK
        log.info("%s/README.md is not a lorakit model card; wrote the card to %s", output_dir, name)
    fsutil.replace_file(_claim(output_dir, name), text.encode())
