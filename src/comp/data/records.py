"""LLaVA records -> chat messages, and the skip reasons of bad samples.

A record is ``{"id", "image": str | [str] | absent, "conversations": [...]}`` with turns
``{"from": "human"|"gpt"|"system", "value"}`` or ``{"role": "user"|"assistant"|"system",
"content"}``. Messages come out in the Hugging Face chat format the chat template renders:
``{"role", "content": [{"type": "image"} | {"type": "text", "text"}]}``.

``<image>`` placeholders mark where each image goes; their count must equal the number of
images (else ``placeholder_mismatch``). A record with images and no placeholder gets all its
images before the text of its first user turn, as the reference does. ``parse_record`` keeps
each image where its placeholder stands and the text around it verbatim (the "inplace" layout);
``comp.data.prompts`` turns them into the messages the model is trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}

# Why a sample was skipped. Every bad sample gets exactly one of these.
SKIP_REASONS = {
    "malformed_record": "the record is not valid JSON or lacks/misshapes 'conversations' or 'image'",
    "placeholder_mismatch": "the number of <image> placeholders differs from the number of images",
    "missing_image": "an image file (or archive member) does not exist",
    "bad_member": "an archive member cannot be read: bad CRC, bad offset, truncated or damaged archive",
    "bad_image_path": "an image path is no regular file (directory, pipe, socket, device) or a "
                      "name the file system refuses (e.g. a component over 255 bytes)",
    "undecodable_image": "an image file exists but cannot be decoded, is truncated, or is over "
                         "the pixel limit",
    "unprocessable_image": "the image processor refuses the image (e.g. aspect ratio over 200)",
    "path_escape": "an image path resolves outside the image root",
    "too_long": "model_max_length would cut an image span (truncation only cuts trailing text)",
    "no_supervised_tokens": "no assistant token is left after truncation",
}


class SkipSample(Exception):
    """A bad sample: ``reason`` is a key of SKIP_REASONS, ``detail`` says what to fix."""

    def __init__(self, reason: str, detail: str, record_id: str | None = None):
        assert reason in SKIP_REASONS, reason
        self.reason, self.detail, self.record_id = reason, detail, record_id
        super().__init__(f"{reason}: {detail}")


@dataclass
class Record:
    id: str
    images: list[str]
    messages: list[dict]

    @property
    def has_image(self) -> bool:
        return bool(self.images)


def _malformed(detail: str) -> SkipSample:
    return SkipSample("malformed_record", detail)


def _split_placeholders(text: str) -> list[dict]:
    parts: list[dict] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _images_of(obj: dict) -> list[str]:
    image = obj.get("image")
    if image is None:
        return []
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise _malformed(f"'image' must be a path or a list of paths, got {image!r:.80}")
    for k, p in enumerate(images):
        _check_encodable(p, f"image path {k}")
        if "\0" in p:
            raise _malformed(f"image path {k} holds a NUL character")
    return images


def _turn(turn, k: int) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise _malformed(f"conversations[{k}] is not an object")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if role not in ROLES:
        raise _malformed(f"conversations[{k}] has role {role!r}; expected human/gpt/system "
                         "(or user/assistant/system)")
    if not isinstance(text, str):
        raise _malformed(f"conversations[{k}] text must be a string, got {type(text).__name__}")
    _check_encodable(text, f"conversations[{k}] text")
    return ROLES[role], text


def _check_encodable(text: str, what: str) -> None:
    """JSON may hold lone surrogates (``"\\ud800"``), which no tokenizer or file system takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _malformed(f"{what} holds {text[e.start:e.end]!r} at character {e.start}, which is "
                         "not valid Unicode (a lone surrogate?); fix the JSON text") from None


def parse_record(obj, position: int) -> Record:
    """Normalise one parsed JSON record; raises SkipSample for a bad one."""
    if not isinstance(obj, dict):
        raise _malformed(f"record is a {type(obj).__name__}, not an object")
    rid = str(obj.get("id", position)).encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        return _parse(obj, rid)
    except SkipSample as e:
        e.record_id = rid
        raise


def _parse(obj: dict, rid: str) -> Record:
    images = _images_of(obj)
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _malformed("'conversations' must be a non-empty list")
    messages = [{"role": role, "content": _split_placeholders(text)}
                for role, text in (_turn(t, k) for k, t in enumerate(turns))]
    n_slots = sum(p["type"] == "image" for m in messages for p in m["content"])
    if any(p["type"] == "image" for m in messages if m["role"] == "assistant" for p in m["content"]):
        raise _malformed("an assistant turn contains <image>")
    if n_slots == 0 and images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise _malformed("the record has images but no user turn to put them in")
        first_user["content"][:0] = [{"type": "image"} for _ in images]
    elif n_slots != len(images):
        raise SkipSample("placeholder_mismatch",
                         f"{n_slots} <image> placeholder(s) for {len(images)} image(s)")
    return Record(rid, images, messages)


def assistant_texts(record: Record) -> list[str]:
    """The supervised answers: the text of every assistant turn."""
    return ["".join(p["text"] for p in m["content"] if p["type"] == "text")
            for m in record.messages if m["role"] == "assistant"]

