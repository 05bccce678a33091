"""Compatibility names: the output folder's policy and files now live in
:mod:`lorakit.outputs`, checkpoints in :mod:`lorakit.state`. Import from there."""

from lorakit.outputs import (  # noqa: F401
    CARD_FALLBACK,
    RUN_CONFIG,
    WEIGHT_NAME,
    check_output_dir,
    clear_earlier_run,
    write_model_card,
    write_run_config,
)
from lorakit.state import (  # noqa: F401
    CHECKPOINT_RE,
    STATE_FILE,
    TrainState,
    fingerprint,
    list_checkpoints,
)
