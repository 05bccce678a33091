"""The run's loss history and its picture for the model card (``loss_curve.png``).

The per-step losses are kept in ``lorakit_losses.json`` (written at each checkpoint and at
the end, recorded in the manifest), so a resumed run's curve starts at step 1, not at the
resume: the steps before the resume come from that file, the rest from this session. Steps
whose loss was not saved (a Ctrl-C checkpoint between two regular ones) are gaps. Drawn
with PIL: no plotting library needed.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from lorakit.outputs import _one_line_when_disk_full

HISTORY = "lorakit_losses.json"
PICTURE = "loss_curve.png"


def history(output_dir: Path, step: int, session: list) -> list:
    """Loss of every step 1..``step``: the saved ones before this session (the session's
    ``session`` losses end at ``step``), None where none was saved."""
    start = step - len(session)
    earlier = []
    try:
        earlier = json.loads((Path(output_dir) / HISTORY).read_text())["losses"][:start]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    earlier = [v if isinstance(v, (int, float)) else None for v in earlier]
    return earlier + [None] * (start - len(earlier)) + [float(v) for v in session]


def record(trainer, picture: bool = False) -> None:
    """Save the run's loss history (at a checkpoint), and at the end draw its curve."""
    losses = history(trainer.output_dir, trainer.global_step, trainer.losses)
    save(trainer.output_dir, losses)
    if picture:
        write_picture(trainer.output_dir, losses)


@_one_line_when_disk_full("the loss history")
def save(output_dir: Path, losses: list) -> None:
    from lorakit import fsutil, outputs

    data = json.dumps({"losses": [v if v is None or math.isfinite(v) else None for v in losses]}).encode()
    fsutil.replace_file(outputs._claim(Path(output_dir), HISTORY), data)


@_one_line_when_disk_full("the loss curve")
def write_picture(output_dir: Path, losses: list) -> Path | None:
    """``loss_curve.png`` of ``losses`` (None: no finite loss to draw)."""
    from lorakit import fsutil, outputs

    image = draw(losses)
    if image is None:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = outputs._claim(Path(output_dir), PICTURE)
    fsutil.replace_file(path, buffer.getvalue())
    return path


def smoothed(losses: list, weight: float = 0.9) -> list:
    """Exponential moving average (bias-corrected, as TensorBoard's smoothing), over gaps."""
    out, average, n = [], 0.0, 0
    for v in losses:
        if v is None or not math.isfinite(v):
            out.append(None)
            continue
        n += 1
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** n))
    return out


def draw(losses: list, size=(720, 400)):
    """A PIL image: the raw loss per step (light) and its smoothed curve (dark), with axes."""
    from PIL import Image, ImageDraw

    finite = [(i + 1, v) for i, v in enumerate(losses) if v is not None and math.isfinite(v)]
    if not finite:
        return None
    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    low, high = min(v for _, v in finite), max(v for _, v in finite)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    steps = max(len(losses), 2)
    x = lambda s: left + (s - 1) / (steps - 1) * (width - left - right)  # noqa: E731
    y = lambda v: top + (high - v) / (high - low) * (height - top - bottom)  # noqa: E731
    image = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(image)
    pen.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for values, colour, line in ((losses, (160, 190, 230), 1), (smoothed(losses), (20, 70, 160), 2)):
        points = []
        for i, v in enumerate(values):
            if v is None or not math.isfinite(v):
                _polyline(pen, points, colour, line)
                points = []
                continue
            points.append((x(i + 1), y(v)))
        _polyline(pen, points, colour, line)
    pen.text((left, 8), "training loss (light: per step, dark: smoothed)", fill=(0, 0, 0))
    pen.text((4, top - 6), f"{high:.4g}", fill=(0, 0, 0))
    pen.text((4, height - bottom - 6), f"{low:.4g}", fill=(0, 0, 0))
    pen.text((left, height - bottom + 8), "step 1", fill=(0, 0, 0))
    pen.text((width - right - 70, height - bottom + 8), f"step {len(losses)}", fill=(0, 0, 0))
    return image


def _polyline(pen, points, colour, line):
    if len(points) == 1:
        px, py = points[0]
        pen.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=colour)
    elif points:
        pen.line(points, fill=colour, width=line)
