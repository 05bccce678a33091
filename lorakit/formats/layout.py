"""What a base model folder says about its components, without loading any weights.

``component_config`` reads ``<model>/<component>/config.json``; ``component_layers`` builds
the component from that config on torch's meta device (no memory, ~1 s for a full-size UNet)
and lists its Linear and Conv2d layers -- the layers kohya's, A1111's and ComfyUI's LoRA
loaders patch. Classes come from the folder's ``model_index.json``, so no arch is named here.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.models import read_model_index


def component_config(model_dir: Path, component: str) -> dict | None:
    file = Path(model_dir) / component / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{file} is not valid JSON ({exc.msg}); re-download the model.") from None


def component_layers(model_dir: Path, component: str) -> list[str]:
    """Module paths of the component's ``torch.nn.Linear`` and ``torch.nn.Conv2d`` layers."""
    import torch

    module = component_module(model_dir, component)
    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@functools.lru_cache(maxsize=16)
def _built(model_dir: str, component: str, stamp: float):
    import torch

    model_dir = Path(model_dir)
    entry = read_model_index(model_dir).get(component)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or component_config(model_dir, component) is None:
        raise LorakitError(f"--model {model_dir} has no component '{component}' (model_index.json and {component}/config.json).")
    library, class_name = entry
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise LorakitError(f"--model {model_dir}: {component} is a {library}.{class_name}, which is not installed.") from None
    with torch.device("meta"):
        if library == "transformers":
            config = cls.config_class.from_pretrained(model_dir / component)
            return cls(config)
        return cls.from_config(cls.load_config(model_dir / component))


def component_module(model_dir: Path, component: str):
    """The component built from its config on torch's meta device (no weights, no memory)."""
    file = Path(model_dir) / component / "config.json"
    stamp = file.stat().st_mtime if file.is_file() else 0.0
    return _built(str(Path(model_dir).resolve()), component, stamp)
