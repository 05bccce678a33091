"""An offline T5 tokenizer and a tiny T5 encoder config, for tiny models whose pipelines take T5.

No installed package ships T5's sentencepiece file, so tiny models use a character-level
Unigram vocabulary built with the ``tokenizers`` library: ``<pad>`` (0), ``</s>`` (1),
``<unk>`` (2), the word-start marker ``▁`` and the printable ASCII characters, each a
piece of its own (T5's layout: pad, eos, unk first; no sentinel ids). Text encoders paired
with it take ``vocab_size=len(tokenizer)`` (what :func:`tiny_t5_config` uses by default),
``pad_token_id=0``, ``eos_token_id=1``. Nothing here imports torch.
"""

from __future__ import annotations

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
#: Printable ASCII characters, one vocabulary piece each; anything else is <unk>.
CHARACTERS = [chr(c) for c in range(33, 127)]


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """``(piece, log-probability)`` pairs of the character-level Unigram vocabulary."""
    pieces = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), ("▁", -2.0)]
    return pieces + [(c, -3.0) for c in CHARACTERS]


def tiny_t5_vocab_size() -> int:
    return len(tiny_t5_vocab())


def tiny_t5_tokenizer(max_length: int = 512):
    """A ``T5TokenizerFast`` that needs no download (round-trips through save/from_pretrained)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=tiny_t5_vocab(), extra_ids=0, model_max_length=max_length,
                           eos_token=EOS, unk_token=UNK, pad_token=PAD)


def tiny_t5_config(d_model: int = 32, layers: int = 2, heads: int = 4, vocab_size: int | None = None):
    """A ``T5Config`` for a tiny ``T5EncoderModel`` that fits :func:`tiny_t5_tokenizer`
    (gated-GELU feed-forward, as T5 v1.1, the family of the T5-XXL text encoders pipelines use)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size or tiny_t5_vocab_size(),
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_model * 2,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
