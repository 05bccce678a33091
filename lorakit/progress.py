"""Training progress for people: a rich bar on a terminal, plain log lines otherwise.

The loop calls ``start / update / note / finish``; only the main process gets a
progress object. Counted work before training (filling the encoding cache) goes through
``with progress.task(label, total) as t: t.advance(n)``: a second bar on a terminal, a line
every ~10% otherwise (a progress object without ``task`` gets those lines through ``note``). The loss shown is an exponential moving average (raw per-step loss
of diffusion training is too noisy to read). A progress object with an ``epoch_of``
attribute gets from the loop a function ``step -> (epoch, epochs)``, and shows the epoch.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from pathlib import Path


class Smoother:
    """Exponential moving average of the loss (what the progress line and trackers show)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.value, self.n = beta, None, 0

    def add(self, x: float) -> float:
        self.n += 1
        self.value = x if self.value is None else self.beta * self.value + (1 - self.beta) * x
        return self.value


class PlainProgress:
    """One log line every ``every`` steps (and at the end): for CI logs and pipes."""

    def __init__(self, stream=None, every: int | None = None):
        self.stream = stream or sys.stdout
        self.every = every
        self.smooth = Smoother()
        self.epoch_of = None

    def start(self, total: int, completed: int = 0):
        self.total, self.first, self.t0 = total, completed, time.perf_counter()
        self.every = self.every or max(1, total // 20)

    def update(self, step: int, loss: float, lr: float, metrics: dict | None = None):
        smoothed = self.smooth.add(loss)
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        extra = "".join(f" {k}={v:.4f}" for k, v in (metrics or {}).items())
        print(
            f"{_epoch_text(self.epoch_of, step, ' ')}step {step}/{self.total} loss={smoothed:.4f} lr={lr:.2e}{extra} {rate:.2f} it/s eta {eta:.0f}s",
            file=self.stream,
            flush=True,
        )

    def note(self, text: str):
        print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def task(self, label: str, total: int, unit: str = "entries"):
        """Counted work: one line every ~10% of ``total`` (no bar redraws in a log)."""
        yield TaskLines(self.note, label, total, unit)

    def finish(self):
        pass


class TaskLines:
    """``advance(n)`` as work is done; ``say``s ``label: done/total unit (rate/s, eta)``
    each time another ~10% is done, and once at the end."""

    def __init__(self, say, label: str, total: int, unit: str = "entries"):
        self.say, self.label, self.total, self.unit = say, label, total, unit
        self.done = self.shown = 0
        self.every, self.t0 = max(1, -(-total // 10)), time.perf_counter()  # at most 10 lines

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done - self.shown < self.every and not (self.done >= self.total > self.shown):
            return
        self.shown = self.done
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", eta {(self.total - self.done) / rate:.0f}s" if rate > 0 and self.done < self.total else ""
        self.say(f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s{eta})")


class RichProgress:
    """A rich progress bar with loss, lr, it/s and ETA; refreshes a few times a second."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console()
        self.smooth = Smoother()
        self.epoch_of = None

    def start(self, total: int, completed: int = 0):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train{task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}{task.fields[extra]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=4,
        )
        self.progress.start()
        self.first, self.t0 = completed, time.perf_counter()
        self.task = self.progress.add_task(
            "train", total=total, completed=completed, loss="-", lr="-", extra="", rate="",
            epoch=_epoch_text(self.epoch_of, max(completed, 1), prefix=" "),
        )

    def update(self, step: int, loss: float, lr: float, metrics: dict | None = None):
        smoothed = self.smooth.add(loss)
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        extra = "".join(f"  {k} {v:.4f}" for k, v in (metrics or {}).items())
        self.progress.update(
            self.task, completed=step, loss=f"{smoothed:.4f}", lr=f"{lr:.2e}", extra=extra, rate=f"{rate:.2f} it/s",
            epoch=_epoch_text(self.epoch_of, step, prefix=" "),
        )

    def note(self, text: str):
        target = getattr(self, "progress", None)
        (target.console if target else self.console).print(text)

    @contextlib.contextmanager
    def task(self, label: str, total: int, unit: str = "entries"):
        """Counted work before training: its own bar (done / total, rate, elapsed, ETA), left on
        screen when done; notes meanwhile print above it."""
        from rich.markup import escape
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn(f"[bold]{escape(label)}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(escape(unit).replace("{", "{{").replace("}", "}}") + "  {task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=4,
        )
        with bar:
            yield _RichTask(bar, bar.add_task(label, total=total, rate=""))

    def finish(self):
        self.progress.stop()


class _RichTask:
    """What :meth:`RichProgress.task` yields: ``advance(n)`` moves its bar."""

    def __init__(self, bar, task_id):
        self.bar, self.id, self.done, self.t0 = bar, task_id, 0, time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.t0
        rate = f"{self.done / elapsed:.1f}/s" if elapsed > 0 else ""
        self.bar.update(self.id, completed=self.done, rate=rate)


def _epoch_text(epoch_of, step: int, suffix: str = "", prefix: str = "") -> str:
    """``"epoch 2/3"`` for the step (with ``prefix``/``suffix``), or "" when epochs are unknown."""
    if epoch_of is None:
        return ""
    epoch, epochs = epoch_of(step)
    return f"{prefix}epoch {epoch}/{epochs}{suffix}"


def make_progress():
    """Rich on an interactive terminal, plain lines otherwise."""
    if sys.stdout.isatty():
        return RichProgress()
    return PlainProgress()


def resume_hint(argv=None) -> str:
    """How to continue a stopped run: this process's own ``train`` command with ``--resume
    latest`` when it is known (run from the command line), else the rule."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] != "train" or Path(argv[0]).name not in ("lorakit", "cli.py", "__main__.py"):
        return "continue with the same command plus --resume latest"
    args, skip = [], False
    for arg in argv[2:]:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            args.append(arg)
    return "continue with: " + shlex.join(["lorakit", "train", *args, "--resume", "latest"])
