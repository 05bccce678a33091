"""Experiment tracking through Accelerate's trackers (TensorBoard, Weights & Biases).

``--report-to`` picks them (default: TensorBoard when it is installed); the packages are
extras (``pip install lorakit[tensorboard]``, ``lorakit[wandb]``) and a missing one is one
error line before any model loads. Per optimizer step a run logs the raw and smoothed loss,
each parameter group's learning rate (the one the step used), the gradient norm before
clipping, steps/s and samples/s, the epoch and any metrics a mode reports (e.g. the two
parts of a prior-preservation loss); sample images as images when they are written; the
run's config as hyper-parameters. Only the main process logs.

TensorBoard writes to ``--logging-dir`` (default ``OUTPUT/logs``) / ``--run-name`` (default
the output folder's name); inside ``--output`` every file a tracker creates is recorded in the
manifest, so ``--overwrite`` removes it with the rest of the run. Event files are appended as
the run goes (that is their format), not published by a rename.
"""

from __future__ import annotations

import logging
import time
from importlib.util import find_spec
from pathlib import Path

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

TRACKERS = ("tensorboard", "wandb")
#: What each tracker needs importable (torch.utils.tensorboard needs the tensorboard package).
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def installed(name: str) -> bool:
    return find_spec(_PACKAGES[name]) is not None


def chosen(config) -> list[str]:
    """The trackers of ``--report-to``; one line when a chosen one is not installed."""
    report = config.report_to
    if report is None:
        return ["tensorboard"] if installed("tensorboard") else []
    if report == "none":
        return []
    if report == "all":
        names = [n for n in TRACKERS if installed(n)]
        if not names:
            raise LorakitError("--report-to all found no tracker installed; pip install lorakit[tensorboard] "
                               "(or lorakit[wandb]), or pass --report-to none.")
        return names
    if not installed(report):
        raise LorakitError(f"--report-to {report} needs the {_PACKAGES[report]} package; "
                           f"pip install lorakit[{report}], or pass --report-to none.")
    return [report]


def logging_dir(config) -> Path:
    return Path(config.logging_dir or Path(config.output) / "logs").expanduser()


def run_name(config) -> str:
    return config.run_name or Path(config.output).expanduser().resolve().name or "lorakit"


def make_trackers(config) -> list:
    """Accelerate tracker objects for ``Accelerator(log_with=...)`` (nothing is written yet)."""
    names = chosen(config)
    if not names:
        return []
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    if "tensorboard" in names:
        trackers.append(TensorBoardTracker(run_name(config), logging_dir(config)))
    if "wandb" in names:
        folder = logging_dir(config)
        folder.mkdir(parents=True, exist_ok=True)
        trackers.append(WandBTracker("lorakit", name=run_name(config), dir=str(folder)))
    return trackers


def hyperparameters(config) -> dict:
    """The run's config as the scalar values trackers accept (lists comma-joined, None as "none")."""
    out = {}
    for key, value in sorted(config.to_dict().items()):
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif value is None:
            value = "none"
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)
        out[key] = value
    return out


class RunTracker:
    """What one run reports to its trackers; does nothing without any (or off the main process)."""

    def __init__(self, accelerator, config, output_dir: Path, optimizer, examples_per_step: int):
        from lorakit.progress import Smoother

        self.accelerator, self.config, self.output_dir = accelerator, config, Path(output_dir)
        self.optimizer, self.examples_per_step = optimizer, examples_per_step
        self.active = bool(getattr(accelerator, "log_with", None)) and accelerator.is_main_process
        self.smooth = Smoother()
        self._lrs: dict = {}
        self._t0 = 0.0

    def start(self) -> None:
        if not self.active:
            return
        before = self._files()
        try:
            self.accelerator.init_trackers(run_name(self.config), config=hyperparameters(self.config))
        except LorakitError:
            raise
        except Exception as exc:  # e.g. wandb online without a login
            names = ", ".join(t.name for t in self.accelerator.trackers) or self.config.report_to
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LorakitError(f"--report-to {names} could not start: {first}; for wandb run `wandb login` "
                               "or set WANDB_MODE=offline, or pass --report-to none.") from None
        self._record(before)
        self._before = before

    def before_step(self) -> None:
        """Note the learning rates the coming step uses, and when it began."""
        if self.active:
            groups = self.optimizer.param_groups
            self._lrs = {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(groups)}
            self._t0 = time.perf_counter()

    def after_step(self, step: int, loss: float, metrics: dict, grad_norm, epoch: int) -> None:
        if not self.active:
            return
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        values = {"train/loss": float(loss), "train/loss_smoothed": float(self.smooth.add(loss)),
                  "train/epoch": epoch, "train/steps_per_second": 1.0 / seconds,
                  "train/samples_per_second": self.examples_per_step / seconds}
        if grad_norm is not None:  # None: the update was skipped (non-finite loss or gradients)
            values["train/grad_norm"] = float(grad_norm)
        values.update({f"train/lr/{name}": lr for name, lr in self._lrs.items()})
        values.update({f"train/{k}": float(v) for k, v in (metrics or {}).items()})
        self.accelerator.log(values, step=step)

    def log_samples(self, step: int, folder: Path) -> None:
        """The sample images written for ``step`` (``samples/step-<step>-<k>.png``), as images."""
        if not self.active:
            return
        import numpy as np
        from PIL import Image

        from lorakit import outputs

        # only lorakit's own files: a user's file of the same name is left unwritten, so not logged
        ours = set(outputs.recorded(self.output_dir) or ())
        from lorakit.validation import IMAGE

        # each prompt x seed image (not the grid), in their order
        paths = sorted((p for p in Path(folder).glob(f"step-{step:06d}-*.png")
                        if IMAGE.match(p.name) and f"{Path(folder).name}/{p.name}" in ours),
                       key=lambda p: int(IMAGE.match(p.name).group(2)))
        if not paths:
            return
        images = [Image.open(p).convert("RGB") for p in paths]
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": np.stack([np.asarray(i) for i in images])}, step=step,
                                   dataformats="NHWC")
                tracker.writer.flush()
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"validation": images}, step=step)

    def finish(self) -> None:
        if not self.active or not self.accelerator.trackers:
            return
        # not accelerator.end_training(): it also destroys the process group, which the run
        # still needs (the final files are written after the trackers close)
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
        self._record(self._before)

    # -- the manifest: files a tracker creates inside --output are the run's
    def _files(self) -> set:
        folder = logging_dir(self.config)
        if not _inside(folder, self.output_dir) or not folder.is_dir():
            return set()
        return set(folder.rglob("*")) | {folder}

    def _record(self, before: set) -> None:
        from lorakit import outputs

        folder = logging_dir(self.config)
        if not _inside(folder, self.output_dir):
            return
        new = self._files() - before
        root = self.output_dir.resolve()
        parents = {p for path in new for p in path.parents if _inside(p, root) and p.resolve() != root}
        created = new | (parents - before if before else parents)
        # files, then folders deepest first: --overwrite removes a folder once it is empty
        ordered = sorted(created, key=lambda p: (p.is_dir() and not p.is_symlink(), -len(p.parts), str(p)))
        # (the entry itself unresolved: wandb links files outside, e.g. its debug log)
        rel = [str(p.parent.resolve().relative_to(root) / p.name) for p in ordered]
        if rel:
            outputs.record(self.output_dir, *rel)


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False
