"""The image encoder's folder: ``config.json`` (what it means) and safetensors weights.

Where the encoder comes from: ``--vae DIR_OR_HUB_ID`` (the arch's image encoder, see
docs/archs/wuerstchen.md), else ``MODEL/image_encoder/``. Weights are read from
safetensors only; a pickle is never opened (:mod:`.convert` turns the published ``.pt``
into a folder). Importing this module stays free of torch: :mod:`.effnet` is imported
when an encoder is built.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import LorakitError

ENCODER_SUBFOLDER = "image_encoder"
ENCODER_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
CONVERT_COMMAND = "python -m lorakit_plugins.wuerstchen convert-encoder"

#: EfficientNetV2-S feature stages, as torchvision builds ``efficientnet_v2_s().features[1:7]``:
#: (block, expand ratio, kernel, stride, input channels, output channels, layers).
EFFICIENTNET_V2_S = (
    ("fused", 1, 3, 1, 24, 24, 2),
    ("fused", 4, 3, 2, 24, 48, 4),
    ("fused", 4, 3, 2, 48, 64, 4),
    ("mbconv", 4, 3, 2, 64, 128, 6),
    ("mbconv", 6, 3, 1, 128, 160, 9),
    ("mbconv", 6, 3, 2, 160, 256, 15),
)
ENCODER_DEFAULTS = {"c_latent": 16, "c_cond": 1280, "effnet": "efficientnet_v2_s"}


def encoder_config(**overrides) -> dict:
    """The image encoder's ``config.json``; defaults are stage B's EfficientNetV2-S encoder.

    ``stages`` (a list of ``[block, expand, kernel, stride, in, out, layers]``) replaces the
    EfficientNetV2-S table for reduced test models; ``c_cond`` is the backbone's output width.
    """
    config = {"_class_name": "EfficientNetEncoder", **ENCODER_DEFAULTS}
    config.update(overrides)
    return config


def stages_of(config: dict, where: str) -> list[tuple]:
    """The feature stages a config describes, checked (one-line error naming ``where``)."""
    stages = config.get("stages")
    if stages is None:
        if config.get("effnet", "efficientnet_v2_s") != "efficientnet_v2_s":
            raise LorakitError(
                f"{where}: effnet '{config.get('effnet')}' is not supported; Wuerstchen v2 uses efficientnet_v2_s."
            )
        return [tuple(s) for s in EFFICIENTNET_V2_S]
    try:
        parsed = [(str(k), int(e), int(kk), int(s), int(i), int(o), int(n)) for k, e, kk, s, i, o, n in stages]
    except (TypeError, ValueError):
        raise LorakitError(
            f"{where}: 'stages' must be lists of [block, expand, kernel, stride, in, out, layers]."
        ) from None
    if not parsed or any(k not in ("fused", "mbconv") for k, *_ in parsed):
        raise LorakitError(f"{where}: 'stages' needs at least one stage of block type 'fused' or 'mbconv'.")
    return parsed


def new_encoder(config: dict | None = None, where: str = "image encoder config"):
    """An :class:`.effnet.EfficientNetEncoder` with fresh weights (imports torch)."""
    from .effnet import EfficientNetEncoder

    return EfficientNetEncoder(config, where=where)


def find_image_encoder(model_path, override: str | None = None) -> Path:
    """Where the encoder lives: ``override`` (``--vae``: folder or hub id), else ``MODEL/image_encoder``."""
    if override:
        from lorakit.models import resolve_model

        root = resolve_model(override)
        folder = root / ENCODER_SUBFOLDER if (root / ENCODER_SUBFOLDER).is_dir() else root
        if not (folder / "config.json").is_file():
            raise LorakitError(
                f"--vae {override} is not a Wuerstchen image encoder folder (no config.json); pass a folder "
                f"written by `{CONVERT_COMMAND}`."
            )
        return folder
    folder = Path(model_path) / ENCODER_SUBFOLDER
    if not (folder / "config.json").is_file():
        raise LorakitError(
            f"--model {model_path} has no {ENCODER_SUBFOLDER}/ (stage B's EfficientNet image encoder); convert "
            f"model_v2_stage_b.pt with `{CONVERT_COMMAND} SRC DIR` and pass "
            f"--vae DIR (or write DIR to {folder})."
        )
    return folder


def load_image_encoder(folder):
    """Build the encoder from ``folder/config.json`` and load its safetensors weights (never a pickle)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LorakitError(f"image encoder {folder}: config.json is unreadable ({exc}); rewrite it.") from None
    weights = next((folder / n for n in ENCODER_WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" (found {', '.join(pickles)}: lorakit never unpickles weights)" if pickles else ""
        raise LorakitError(
            f"image encoder {folder} has no {ENCODER_WEIGHT_NAMES[0]}{found}; convert it with "
            f"`{CONVERT_COMMAND} SRC DIR`."
        )
    encoder = new_encoder(config, where=f"image encoder {folder}")
    load_encoder_state(encoder, load_file(str(weights)), str(weights))
    return encoder.eval().requires_grad_(False)


def load_encoder_state(encoder, state: dict, where: str) -> None:
    """Load ``state`` strictly, or say in one line how it differs from the encoder's own."""
    expected = encoder.state_dict()
    # Checkpoints saved without BatchNorm's step counters still describe the same model.
    state = dict(state)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = (
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} with other shapes (e.g. {wrong[:2]})"
        )
        raise LorakitError(f"{where} does not fit the encoder its config describes: {detail}; check config.json.")
    encoder.load_state_dict(state, strict=True)


def save_image_encoder(encoder, folder) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (what :func:`load_image_encoder` reads)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(folder / ENCODER_WEIGHT_NAMES[0]))
    (folder / "config.json").write_text(json.dumps(encoder.config, indent=2, sort_keys=True))
    return folder
