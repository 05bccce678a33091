"""Training objectives an arch picks by name (``ArchInfo.objective``): each is a module of
plain tensor functions plus the options it adds to a run.

- ``ddpm``: noise / v-prediction over a discrete DDPM schedule (:mod:`lorakit.objectives.ddpm`).
- ``flow``: rectified flow / flow matching as SD3, FLUX and Sana train (:mod:`lorakit.objectives.flow`).
- ``custom``: the arch computes its own loss and declares any options itself.

Nothing here imports torch (``--help`` and ``list-archs`` read these declarations); the
functions import it when called.
"""

from __future__ import annotations

from lorakit.errors import LorakitError
from lorakit.objectives.ddpm import DDPM_OPTIONS
from lorakit.objectives.flow import FLOW_OPTIONS

#: Options each objective adds to a run, by objective name.
OPTIONS = {"ddpm": DDPM_OPTIONS, "flow": FLOW_OPTIONS, "custom": ()}


def options_for(objective: str) -> tuple:
    """The options a run of an arch with this objective accepts on top of the core's."""
    try:
        return OPTIONS[objective]
    except (KeyError, TypeError):
        known = ", ".join(sorted(OPTIONS))
        raise LorakitError(f"unknown objective '{objective}'; known objectives: {known}.") from None


__all__ = ["OPTIONS", "options_for"]
