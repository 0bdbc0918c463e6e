"""The prompt formats: the one definition of how a conversation's images, ``<image>`` markers
and system turn become the messages the chat template renders. Training (MixtureDataset,
``comp data check/show``), CompProcessor (chat, generation) and the lmms-eval plugin all
read them from here, so a format means the same thing everywhere.

- "reference" (default): the reference's conversion for Qwen2-VL's chat template, as it
  trained and evaluated. A conversation without a system turn gets ``DEFAULT_SYSTEM_PROMPT``
  (the chat template's own default system turn); every turn's images move to its start.
  Training records (``prompt_messages``): a leading assistant turn is dropped and each
  ``<image>`` placeholder is removed together with one newline right after it. Evaluation
  contexts (``user_content``): the markers are removed, the text around them kept verbatim,
  as the reference's lmms-eval model does.
- "inplace": no system turn is added; images stay where their ``<image>`` stands
  (``parse_record``'s messages unchanged; an evaluation context whose marker count differs
  from its image count gets its images first).
"""
from __future__ import annotations

from typing import Literal, get_args

from comp.data.records import IMAGE_PLACEHOLDER

PromptFormat = Literal["reference", "inplace"]
PROMPT_FORMATS: tuple[str, ...] = get_args(PromptFormat)
DEFAULT_PROMPT_FORMAT: PromptFormat = "reference"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # also in chat_template.jinja (a test checks)
PROMPT_FORMAT_HELP = ("reference: Qwen2-VL's chat format as the reference trained and evaluated (default "
                      "system turn, each turn's images first); inplace: images where their <image> stands, "
                      "no system turn")


def check_prompt_format(prompt_format: str) -> str:
    """``prompt_format`` if it names a format, else the ValueError naming the choices."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    return prompt_format


def adds_default_system(prompt_format: str) -> bool:
    """Whether the format gives a conversation without a system turn the default one (the
    chat template's ``default_system``)."""
    return check_prompt_format(prompt_format) == "reference"


def system_message(text: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def with_default_system(messages: list[dict], prompt_format: str) -> list[dict]:
    """``messages`` with the default system turn first where the format adds it."""
    if adds_default_system(prompt_format) and messages and messages[0]["role"] != "system":
        return [system_message(), *messages]
    return messages


def reference_turn(message: dict) -> dict:
    """One turn in the reference layout: its images first, then its text without the
    placeholders (an image's placeholder took the newline right after it along)."""
    images, texts, after_image = [], [], False
    for part in message["content"]:
        if part["type"] == "image":
            images.append(part)
            after_image = True
            continue
        text = part["text"][1:] if after_image and part["text"].startswith("\n") else part["text"]
        texts.append(text)
        after_image = False
    text = "".join(texts)
    return {"role": message["role"],
            "content": images + ([{"type": "text", "text": text}] if text else [])}


def prompt_messages(messages: list[dict], prompt_format: str = DEFAULT_PROMPT_FORMAT) -> list[dict]:
    """A parsed record's messages as the chat template renders them for training."""
    if check_prompt_format(prompt_format) == "inplace":
        return messages
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    if turns and turns[0]["role"] == "assistant":  # the reference starts at a human turn
        turns = turns[1:]
    return (system or [system_message()]) + [reference_turn(m) for m in turns]


def user_content(context: str, num_images: int, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> list[dict]:
    """The user turn of an evaluation context holding ``num_images`` images. "reference": all
    images first, the markers removed from the text. "inplace": images at the context's
    ``<image>`` markers when there is one marker per image, else all images first; remaining
    markers are dropped."""
    parts = context.split(IMAGE_PLACEHOLDER)
    if check_prompt_format(prompt_format) == "inplace" and num_images and len(parts) - 1 == num_images:
        content: list[dict] = []
        for i, text in enumerate(parts):
            if i:
                content.append({"type": "image"})
            if text.strip():
                content.append({"type": "text", "text": text})
        return content
    return [{"type": "image"}] * num_images + [{"type": "text", "text": "".join(parts)}]
