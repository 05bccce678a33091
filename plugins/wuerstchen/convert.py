"""``python -m lorakit_plugins.wuerstchen convert-encoder SRC DST``: the published stage-B
checkpoint (a torch pickle) -> an image encoder folder in safetensors.

The ``.pt`` is read with ``torch.load(weights_only=True)``, which refuses any Python object
besides tensors and plain containers before it runs. Importing this module stays free of torch.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError

from .encoder_io import load_encoder_state, new_encoder, save_image_encoder

PROG = "python -m lorakit_plugins.wuerstchen"


def _torch_load_tensors_only(path: Path):
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorakitError(
            f"{path} holds Python objects besides tensors and lorakit never unpickles them ({first}); "
            "export its effnet_state_dict as safetensors instead."
        ) from None


def convert_encoder_checkpoint(src, dst, config: dict | None = None) -> Path:
    """Turn the published stage-B checkpoint (or a bare encoder state dict) into an encoder folder.

    ``src``: a ``.safetensors`` file, or a torch file read with ``torch.load(weights_only=True)``
    (e.g. ``model_v2_stage_b.pt`` from ``dome272/wuerstchen``, whose ``effnet_state_dict``
    is taken). ``dst``: the folder to write (``config.json`` + safetensors), for ``--vae DST``
    or ``MODEL/image_encoder``.
    """
    src = Path(src).expanduser()
    if not src.is_file():
        raise LorakitError(
            f"{src} does not exist; pass the stage-B checkpoint (model_v2_stage_b.pt) or a .safetensors file."
        )
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(src))
    else:
        state = _torch_load_tensors_only(src)
    if isinstance(state, dict) and "effnet_state_dict" in state:
        state = state["effnet_state_dict"]
    if not isinstance(state, dict) or not state:
        raise LorakitError(f"{src} holds no encoder state dict (expected 'effnet_state_dict' or backbone.* keys).")
    prefixes = ("module.", "_orig_mod.")
    state = {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in state.items()}
    encoder = new_encoder(config, where=f"{src}")
    load_encoder_state(encoder, state, str(src))
    return save_image_encoder(encoder, dst)


def main(argv=None) -> int:
    """``python -m lorakit_plugins.wuerstchen convert-encoder SRC DST``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=PROG)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert-encoder", help="stage-B checkpoint -> image encoder folder (safetensors)")
    convert.add_argument("src", help="model_v2_stage_b.pt (read with weights_only=True) or a .safetensors file")
    convert.add_argument("dst", help="folder to write, e.g. MODEL/image_encoder")
    args = parser.parse_args(argv)
    try:
        out = convert_encoder_checkpoint(args.src, args.dst)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
