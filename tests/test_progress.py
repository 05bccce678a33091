"""What a user sees while the encoding cache fills: a bar that reaches the number of entries
to encode (on a terminal), a line every ~10% in a log (never bar redraws), and the same lines
through ``note`` for a progress object that has no ``task``."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from lorakit.progress import PlainProgress, RichProgress, TaskLines
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer


def entries_of_examples() -> int:
    lines = (example_data() / "metadata.jsonl").read_text().splitlines()
    return len(lines) + len({json.loads(line)["text"] for line in lines})  # images, then captions


class Recording:
    """A progress object that records what the loop and the cache fill asked it to show."""

    def __init__(self, with_task: bool = True):
        self.calls: list = []
        if not with_task:
            self.task = None

    def start(self, total, completed=0):
        self.calls.append(("start", total))

    def update(self, step, loss, lr, metrics=None):
        self.calls.append(("update", step))

    def note(self, text):
        self.calls.append(("note", text))

    def finish(self):
        self.calls.append(("finish",))

    @contextlib.contextmanager
    def task(self, label, total, unit="entries"):
        self.calls.append(("task", label, total))
        counter = TaskCounter()
        yield counter
        self.calls.append(("task done", counter.done))


class TaskCounter:
    def __init__(self):
        self.done = 0

    def advance(self, n=1):
        self.done += n


@pytest.fixture
def model(lorakit_tiny_model):
    return lorakit_tiny_model("sd15")


def setup_run(model, out, progress, **overrides):
    trainer = Trainer(tiny_config("sd15", model, example_data(), out, max_steps=1, batch_size=2, **overrides),
                      progress=progress).setup()
    trainer.guard.close()
    return trainer


def test_the_cache_fill_bar_reaches_the_number_of_entries_to_encode(model, tmp_path):
    progress = Recording()
    trainer = setup_run(model, tmp_path / "a", progress)
    total = entries_of_examples()
    tasks = [c for c in progress.calls if c[0].startswith("task")]
    assert tasks == [("task", "caching", total), ("task done", total)]
    assert sum(trainer.cache.encoded.values()) == total
    assert any(c[0] == "note" and f"{total} entries to encode" in c[1] for c in progress.calls)

    again = Recording()
    setup_run(model, tmp_path / "b", again)  # everything on disk: no bar, a note saying so
    assert not [c for c in again.calls if c[0].startswith("task")]
    assert any(c[0] == "note" and "0 entries to encode" in c[1] for c in again.calls)


def test_a_progress_object_without_task_gets_the_lines_through_note(model, tmp_path):
    progress = Recording(with_task=False)
    setup_run(model, tmp_path / "a", progress)
    total = entries_of_examples()
    lines = [c[1] for c in progress.calls if c[0] == "note" and c[1].startswith("caching:")]
    assert lines and lines[-1].startswith(f"caching: {total}/{total} entries of this process (")


def test_without_a_progress_object_the_lines_go_to_the_log(model, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lorakit"):
        setup_run(model, tmp_path / "a", None)
    total = entries_of_examples()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("caching:")]
    assert 1 <= len(lines) <= 10 and lines[-1].startswith(f"caching: {total}/{total} entries of this process (")


def test_a_log_gets_a_line_every_tenth_and_no_redraws(model, tmp_path):
    stream = io.StringIO()
    Trainer(tiny_config("sd15", model, example_data(), tmp_path / "a", max_steps=1, batch_size=2),
            progress=PlainProgress(stream)).setup().run()
    text = stream.getvalue()
    total = entries_of_examples()
    lines = [line for line in text.splitlines() if line.startswith("caching:")]
    assert lines[-1].startswith(f"caching: {total}/{total} entries (") and len(lines) <= 11
    done = [int(re.match(r"caching: (\d+)/", line).group(1)) for line in lines]
    assert done == sorted(done) and "\r" not in text and "\x1b" not in text


def test_lines_come_every_tenth_and_at_the_end():
    said = []
    lines = TaskLines(said.append, "caching", 95)
    for _ in range(95):
        lines.advance(1)
    assert len(said) == 10 and said[0].startswith("caching: 10/95 entries (") and "eta" in said[0]
    assert said[-1].startswith("caching: 95/95 entries (") and "eta" not in said[-1]


def test_the_terminal_bar_shows_done_of_total_and_notes_print_above_it():
    from rich.console import Console

    screen = io.StringIO()
    progress = RichProgress(Console(file=screen, force_terminal=True, width=120, color_system=None))
    with progress.task("caching (this process's share, 1 of 2)", 24) as bar:
        for _ in range(3):
            bar.advance(8)
        progress.note("a note while caching")
    text = screen.getvalue()
    assert "24/24" in text and "caching (this process's share, 1 of 2)" in text and "a note while caching" in text
