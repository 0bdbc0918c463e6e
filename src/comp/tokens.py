"""The token protocol every layer shares: Qwen's chat and vision special tokens, the label
that masks a position out of the loss, the chat template, and the id lookups built on them.

It is the ground floor (see docs/architecture.md): models and data both import it, it imports
nothing of CoMP. A prompt holds, per image, ``<|vision_start|><|image_pad|>...<|vision_end|>``
with the pad repeated once per merged visual token; a turn is
``<|im_start|>{role}\\n{content}<|im_end|>\\n``.
"""
from __future__ import annotations

from pathlib import Path

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

IGNORE_INDEX = -100  # label of a position without loss (prompts, images, padding)
CHAT_SPECIALS = (IM_START, IM_END, VISION_START, IMAGE_PAD, VISION_END)
# Qwen2.5's vision specials in their order of the real vocabulary (ids 151652..151656).
VISION_TOKENS = (VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>")
CHAT_TEMPLATE_PATH = Path(__file__).resolve().parent / "chat_template.jinja"

# CompConfig field -> special token.
CONFIG_TOKEN_FIELDS = {"image_token_id": IMAGE_PAD, "vision_start_token_id": VISION_START,
                       "vision_end_token_id": VISION_END}


def image_span(num_tokens: int) -> str:
    """The text of one image whose ``<|image_pad|>`` is already expanded to its token count."""
    return VISION_START + IMAGE_PAD * num_tokens + VISION_END


def ensure_vision_tokens(tokenizer) -> list[str]:
    """Append the Qwen vision special tokens a tokenizer lacks, after its existing ids.
    Returns the tokens added (a model must resize its embeddings to ``len(tokenizer)``)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in VISION_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of the chat specials; a tokenizer without them is told how to get them."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_SPECIALS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"the tokenizer lacks {', '.join(missing)}: add them as special tokens "
                         "(tokenizer.add_special_tokens) and resize the LLM embeddings")
    return ids


def config_token_ids(tokenizer) -> dict[str, int]:
    """The vision special-token ids of a tokenizer, as CompConfig fields."""
    return {field: tokenizer.convert_tokens_to_ids(tok) for field, tok in CONFIG_TOKEN_FIELDS.items()}


def stop_ids(tokenizer) -> list[int]:
    """End of an assistant turn: ``<|im_end|>``, and the tokenizer's end-of-text."""
    ids = {tokenizer.convert_tokens_to_ids(IM_END)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)
