"""A word-per-token tokenizer for toyworld text, in the Qwen2 tokenizer's own format.

Qwen2's byte-level BPE (its NFC normaliser, pre-tokenisation regex and ByteLevel decoder)
trained on toyworld text until no pair is left to merge, so every word seen in training is
one token: colour, shape, position and number words each have one id (``"Ġred"`` after a
space, ``"red"`` at a run's start) and the alignment prototypes (vocabulary rows) read as
words; Qwen's regex isolates digits, so a number reads digit by digit and the digit probe's
classes are tokens. Decoding is lossless (byte level).

Why BPE and not a ``WordLevel`` model: transformers 5 loads any ``model_type: qwen2``
checkpoint's tokenizer as ``Qwen2Tokenizer``, which rebuilds a byte-level BPE from the saved
vocabulary and merges whatever ``tokenizer_class`` says; a tokenizer in that format is
therefore the only one the recipe's ``AutoTokenizer`` path reloads unchanged.
The Qwen chat and vision special tokens follow the trained tokens, as in Qwen2.5's vocabulary.
"""
from __future__ import annotations

from collections.abc import Iterable

from comp.models.tiny import qwen_bpe_tokenizer

# Above any toyworld vocabulary: the trainer stops when no pair is left, not at this size.
MAX_VOCAB = 1 << 20


def train_word_tokenizer(texts: Iterable[str]):
    """A Qwen2-format tokenizer (byte-level BPE merged to whole words over ``texts``) with the
    Qwen specials, the CoMP chat template, ``<|im_end|>`` as eos and ``<|endoftext|>`` as pad
    and no unknown token, like Qwen2.5."""
    return qwen_bpe_tokenizer(texts, MAX_VOCAB, nfc=True)
