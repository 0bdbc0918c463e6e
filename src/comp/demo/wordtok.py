"""A word-level tokenizer for toyworld text, in the Qwen2 tokenizer's Hugging Face layout.

Words are single tokens, so colour, shape, position and number words each have one id and
the alignment prototypes (vocabulary rows) read as words; digits are split one by one, so a
number reads digit by digit and the digit probe's classes are tokens. Spaces are kept as the
Metaspace marker ``▁`` glued to the next word (``"▁red"``), which makes encoding lossless up to
the spaces around a newline and keeps one id per word wherever a word follows a space or
starts a text run (a word right after punctuation, ``"apple`` in quotes, gets a second id).
The Qwen chat and vision special tokens follow the trained words, as in Qwen2.5's vocabulary.
"""
from __future__ import annotations

from collections.abc import Iterable

from comp.models.tiny import QWEN_SPECIAL_TOKENS

UNK = "<unk>"
SPACE = "\u2581"  # Metaspace's marker


def _pre_tokenizer():
    """Newlines alone, spaces as ``▁`` prefixes (every run starts with one), then punctuation
    and each digit isolated."""
    from tokenizers import pre_tokenizers as pt

    return pt.Sequence([pt.Split("\n", behavior="isolated"),
                        pt.Metaspace(SPACE, prepend_scheme="always", split=True),
                        pt.Punctuation(behavior="isolated"),
                        pt.Digits(individual_digits=True)])


def _decoder():
    """``▁`` back to spaces, joined; the marker a newline and the word after it carry is
    dropped, and so is the one every run starts with."""
    from tokenizers import decoders as dc

    return dc.Sequence([dc.Replace(SPACE, " "), dc.Fuse(), dc.Replace(" \n ", "\n"),
                        dc.Strip(" ", 1, 0)])


def train_word_tokenizer(texts: Iterable[str], *, min_frequency: int = 1):
    """A ``PreTrainedTokenizerFast`` (WordLevel over ``texts``) with the Qwen specials, the
    CoMP chat template, ``<|im_end|>`` as eos and ``<|endoftext|>`` as pad, like Qwen2.5."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from comp.tokens import CHAT_TEMPLATE_PATH

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = _decoder()
    trainer = trainers.WordLevelTrainer(min_frequency=min_frequency, show_progress=False,
                                        special_tokens=[UNK])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=UNK, model_max_length=32768, clean_up_tokenization_spaces=False,
        split_special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE_PATH.read_text()
    return fast
