"""lorakit: train LoRA adapters for text-to-image diffusion models.

The Python API mirrors the CLI: ``lorakit.train(TrainConfig(...))``. Importing lorakit
does not import torch; that happens when a run starts.
"""

from lorakit.config import TrainConfig
from lorakit.errors import LorakitError

__version__ = "0.1.0"
__all__ = ["TrainConfig", "LorakitError", "train", "generate", "__version__"]


def train(config, progress=None):
    """Train a LoRA (see :func:`lorakit.training.train`)."""
    from lorakit.training import train as _train

    return _train(config, progress=progress)


def generate(*args, **kwargs):
    """Generate images with LoRAs (see :func:`lorakit.inference.generate`)."""
    from lorakit.inference import generate as _generate

    return _generate(*args, **kwargs)
