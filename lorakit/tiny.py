"""Building blocks for tiny offline models (``lorakit tiny``): shared by arch plugins.

No installed package ships CLIP tokenizer files, so tiny models use a byte-level CLIP
vocabulary: the 256 byte characters, the same with ``</w>``, plus start/end tokens
(514 tokens, no merges). Text encoders paired with it need ``vocab_size=514``,
``bos_token_id=512`` and ``eos/pad_token_id=513``.
"""

from __future__ import annotations

TINY_VOCAB_SIZE = 514
TINY_BOS = 512
TINY_EOS = 513


def _byte_characters() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_clip_vocab() -> dict[str, int]:
    chars = _byte_characters()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_clip_vocab(), merges=[], model_max_length=max_length, pad_token=pad_token)


def tiny_clip_text_config(hidden_size: int = 32, projection_dim: int = 32, layers: int = 2, heads: int = 4, max_length: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        bos_token_id=TINY_BOS,
        eos_token_id=TINY_EOS,
        pad_token_id=TINY_EOS,
        max_position_embeddings=max_length,
        projection_dim=projection_dim,
    )


def tiny_vae(cls, **overrides):
    """A few-KB ``AutoencoderKL`` that downsamples by 8 like SD's (``cls`` passed in so this
    module imports no diffusers)."""
    values = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    values.update(overrides)
    return cls(**values)


def check_tokenizer_matches(tokenizer, text_encoder, where: str) -> None:
    """Refuse a tokenizer that does not fit its text encoder.

    With HF_HUB_OFFLINE=1 and nothing cached, transformers can "load" a tokenizer with a
    2-token vocabulary instead of failing; training on it would silently learn nothing.
    """
    from lorakit.errors import LorakitError

    vocab = len(tokenizer)
    expected = getattr(text_encoder.config, "vocab_size", None)
    if expected is not None and (vocab > expected or vocab < min(expected, 256)):
        raise LorakitError(
            f"{where}: tokenizer has {vocab} tokens but the text encoder expects {expected}; "
            "the model folder is incomplete, re-download it."
        )


def make_tiny_model(arch: str, path, seed: int = 0):
    """Write a tiny random model of ``arch`` to ``path`` (refuses a non-empty folder)."""
    from pathlib import Path

    from lorakit.errors import LorakitError, PluginError
    from lorakit.plugins import get_plugin_manager

    from lorakit.models import read_model_index

    path = Path(path).expanduser()
    pm = get_plugin_manager(arch)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        index = read_model_index(path) if path.is_dir() else {}
        if index.get("_lorakit_tiny") == arch:
            return path  # written by an earlier `lorakit tiny`: keep it (re-running a quick start)
        raise LorakitError(f"{path} already exists and is not empty; choose a new folder for the tiny model.")
    if not pm.hook.write_tiny_model.get_hookimpls():
        raise PluginError(f"arch '{arch}' cannot write a tiny model (no write_tiny_model hook).")
    path.mkdir(parents=True, exist_ok=True)
    pm.hook.write_tiny_model(path=path, seed=seed)
    _mark_tiny(path, arch)
    return path


#: Name of the single-file checkpoint ``lorakit tiny --single-file`` writes inside the model folder.
SINGLE_FILE_NAME = "model.safetensors"


def make_tiny_single_file(arch: str, path, seed: int = 0):
    """A tiny model of ``arch`` at ``path`` (the diffusers folder, which serves as its
    ``--model-config``) plus the same weights as one original-layout checkpoint,
    ``path/model.safetensors``; returns the file."""
    from lorakit.errors import LorakitError
    from lorakit.ldm import write_single_file
    from lorakit.plugins import arch_info

    layout = arch_info(arch).single_file_layout
    if not layout:
        raise LorakitError(f"--arch {arch} has no single-file layout; `lorakit tiny {arch}` without --single-file "
                           "writes its diffusers folder.")
    folder = make_tiny_model(arch, path, seed)
    file = folder / SINGLE_FILE_NAME
    if not file.is_file():
        write_single_file(folder, layout, file)
    return file


def _mark_tiny(path, arch: str) -> None:
    """Record in model_index.json that this folder is a lorakit tiny model (diffusers ignores
    keys starting with an underscore)."""
    import json

    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    index["_lorakit_tiny"] = arch
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
