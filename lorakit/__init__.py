"""lorakit: train LoRA adapters for text-to-image diffusion models.

The Python API mirrors the CLI: ``lorakit.train(TrainConfig(...))``. What a plugin author
needs is importable from here: ``hookimpl``, ``ArchInfo``, the ``Arch`` and
``DiffusersArch`` base classes and ``Option``. Importing lorakit does not import torch;
that happens when a run starts.
"""

from lorakit.arch import ArchInfo
from lorakit.archbase import Arch, DiffusersArch
from lorakit.config import TrainConfig
from lorakit.errors import LorakitError, PluginError
from lorakit.hookspecs import hookimpl
from lorakit.options import Option

__version__ = "0.1.0"
__all__ = [
    "Arch",
    "ArchInfo",
    "DiffusersArch",
    "LorakitError",
    "Option",
    "PluginError",
    "TrainConfig",
    "generate",
    "hookimpl",
    "train",
    "__version__",
]


def train(config, progress=None):
    """Train a LoRA (see :func:`lorakit.training.train`)."""
    from lorakit.training import train as _train

    return _train(config, progress=progress)


def generate(*args, **kwargs):
    """Generate images with LoRAs (see :func:`lorakit.inference.generate`)."""
    from lorakit.inference import generate as _generate

    return _generate(*args, **kwargs)
