"""Chat messages -> ``input_ids`` and ``labels`` in the Qwen2 chat format of the chat template.

Rendered text, per message: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; an image item is
``<|vision_start|><|image_pad|><|vision_end|>`` with the pad repeated once per LLM token of
that image (after the 2x2 merge). The messages come from ``comp.data.prompts.prompt_messages``
(the prompt format: system turn, image places); this module renders what it is given.

Tokenisation is per text run between the specials this module writes, batched, through
``encode_plain_text``: that is how a Hugging Face tokenizer splits the full rendered string
(specials first, then each run), so the ids equal ``tokenizer(rendered_text)`` for record text
without special-token strings; a special-token string inside record text (a literal
``<|image_pad|>``) stays plain text and never becomes a control token.
Labels: -100 everywhere except the assistant answers and their ``<|im_end|>``. A token is
supervised when its first character belongs to an answer (a token straddling the
``assistant\\n`` header and an answer that starts with a newline stays masked).

Truncation rule: a sequence longer than ``max_length`` loses its trailing tokens, only if
every image span ends within ``max_length``; otherwise the sample is skipped as ``too_long``.
A sample left with no supervised token is skipped as ``no_supervised_tokens``.
"""
from __future__ import annotations

import torch

from comp.data.records import SkipSample
from comp.tokens import (IGNORE_INDEX, IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START,
                         ensure_vision_tokens, image_span, special_ids)


def load_tokenizer(directory):
    """An LLM tokenizer with the Qwen vision specials appended when it lacks them."""
    from transformers import AutoTokenizer

    from comp.hub import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(directory))
    ensure_vision_tokens(tokenizer)
    return tokenizer


def text_char_cap(tokenizer, max_length: int) -> int:
    """Characters of text that can matter for the first ``max_length`` tokens: every token
    covers at most the vocabulary's longest token string, so text past ``max_length`` times
    that is cut before tokenising (a 10 MB record costs what a long sample costs)."""
    longest = getattr(tokenizer, "_comp_longest_token", None)
    if longest is None:
        longest = max(map(len, tokenizer.get_vocab()), default=1)
        tokenizer._comp_longest_token = longest
    return max_length * longest


def _capped(pieces, cap: int):
    """``pieces`` with the text cut after ``cap`` characters (specials and images kept, so an
    image span past the limit is still seen)."""
    left = cap
    for piece in pieces:
        if piece[0] == "text":
            text = piece[1][:left]
            left -= len(text)
            piece = ("text", text, *piece[2:])
        yield piece


def encode_plain_text(tokenizer, texts: str | list[str], *, offsets: bool = False):
    """Token ids of record text, special-token strings in it split as plain text. The one
    place data text is tokenised (conversations, alignment text, word prior)."""
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                     return_offsets_mapping=offsets)


def render_text(messages: list[dict], answer_marks: tuple[str, str] = ("", "")) -> str:
    """The chat-template string (one ``<|image_pad|>`` per image), for checks and logs; each
    answer with its ``<|im_end|>`` (the supervised text) between ``answer_marks``."""
    out = []
    for m in messages:
        body = "".join(image_span(1) if p["type"] == "image" else p["text"] for p in m["content"])
        if m["role"] == "assistant":
            body = f"{answer_marks[0]}{body}{IM_END}{answer_marks[1]}"
        else:
            body += IM_END
        out.append(f"{IM_START}{m['role']}\n{body}\n")
    return "".join(out)


def _pieces(messages: list[dict], image_token_counts: list[int], ids: dict[str, int], *,
            add_generation_prompt: bool = False):
    """Yield ("special", id, supervised), ("image", n) or ("text", str, supervised) in order."""
    n_slots = sum(p["type"] == "image" for m in messages for p in m["content"])
    if n_slots != len(image_token_counts):
        raise ValueError(f"{n_slots} image items but {len(image_token_counts)} token counts")
    images = iter(image_token_counts)
    for m in messages:
        answer = m["role"] == "assistant"
        yield "special", ids[IM_START], False
        yield "text", f"{m['role']}\n", False
        for p in m["content"]:
            if p["type"] == "image":
                yield "image", next(images)
            else:
                yield "text", p["text"], answer
        yield "special", ids[IM_END], answer
        yield "text", "\n", False
    if add_generation_prompt:
        yield "special", ids[IM_START], False
        yield "text", "assistant\n", False


def _encode_pieces(tokenizer, pieces, ids: dict[str, int]) -> tuple[list[int], list[bool], int]:
    """(token ids, supervised flag per token, end of the last image span) of ``_pieces``."""
    # Group into runs: maximal text stretches between specials, as the tokenizer splits them.
    layout: list[tuple] = []  # ("run", k) | ("ids", [id...], supervised, is_image)
    runs: list[list[tuple[str, bool]]] = []
    for piece in pieces:
        if piece[0] == "text":
            if not layout or layout[-1][0] != "run":
                layout.append(("run", len(runs)))
                runs.append([])
            runs[layout[-1][1]].append(piece[1:])
        elif piece[0] == "special":
            layout.append(("ids", [piece[1]], piece[2], False))
        else:
            layout.append(("ids", [ids[VISION_START]] + [ids[IMAGE_PAD]] * piece[1]
                           + [ids[VISION_END]], False, True))
    enc = encode_plain_text(tokenizer, ["".join(t for t, _ in run) for run in runs], offsets=True)
    input_ids: list[int] = []
    supervised: list[bool] = []
    image_end = 0  # position just after the last image span
    for item in layout:
        if item[0] == "ids":
            input_ids += item[1]
            supervised += [item[2]] * len(item[1])
            if item[3]:
                image_end = len(input_ids)
            continue
        k = item[1]
        bounds, flags, at = [], [], 0
        for text, sup in runs[k]:
            at += len(text)
            bounds.append(at)
            flags.append(sup)
        frag = 0
        for tok, (start, _) in zip(enc["input_ids"][k], enc["offset_mapping"][k]):
            while frag < len(bounds) - 1 and start >= bounds[frag]:
                frag += 1
            input_ids.append(tok)
            supervised.append(flags[frag])
    return input_ids, supervised, image_end


def encode_prompt(tokenizer, messages: list[dict], image_token_counts: list[int], *,
                  add_generation_prompt: bool = True) -> list[int]:
    """Ids of a prompt (inference): the rendering of ``encode_conversation``, message text
    as plain text, and ``<|im_start|>assistant\n`` after it when asked."""
    ids = special_ids(tokenizer)
    pieces = _pieces(messages, image_token_counts, ids, add_generation_prompt=add_generation_prompt)
    return _encode_pieces(tokenizer, pieces, ids)[0]


def encode_conversation(tokenizer, messages: list[dict], image_token_counts: list[int], *,
                        max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [L], labels [L]) int64; raises SkipSample (too_long, no_supervised_tokens).
    Text past ``text_char_cap`` is never tokenised (it lies past ``max_length`` tokens)."""
    ids = special_ids(tokenizer)
    pieces = _capped(_pieces(messages, image_token_counts, ids), text_char_cap(tokenizer, max_length))
    input_ids, supervised, image_end = _encode_pieces(tokenizer, pieces, ids)

    labels = [t if sup else IGNORE_INDEX for t, sup in zip(input_ids, supervised)]
    truncated = len(input_ids) > max_length
    if truncated:
        if image_end > max_length:
            raise SkipSample("too_long", f"{len(input_ids)} tokens, an image span ends at token "
                             f"{image_end} > model_max_length {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        raise SkipSample("no_supervised_tokens", f"no assistant answer within the first {max_length} "
                         "tokens" if truncated else "the record has no assistant answer")
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
