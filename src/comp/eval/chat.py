"""``comp chat MODEL --image PATH --prompt TEXT``: talk to a saved CoMP-MM about images.

With ``--prompt`` one answer is streamed to stdout; without it a REPL reads prompts from
stdin and keeps the conversation (``/image PATH`` attaches an image to the next prompt,
``/reset`` starts over, ``/exit`` or end of input quits). The whole history is re-encoded
each turn, images in the order they were attached, with the CoMP chat template (the reference
prompt format with its default system turn; ``--prompt_format inplace`` leaves it out).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image
from transformers import TextStreamer

from comp.cliargs import ArgumentParser, apply_threads, float_in, positive_int

from comp.data.image import ImageLoadError, load_image
from comp.data.processor import CompProcessor
from comp.data.prompts import DEFAULT_PROMPT_FORMAT, PROMPT_FORMAT_HELP, PROMPT_FORMATS
from comp.errors import UserError
from comp.eval.features import default_device
from comp.hub import resolve_model_dir
from comp.models.kinds import load_comp_mm
from comp.models.mllm import CompForConditionalGeneration
from comp.tokens import stop_ids

EMPTY_TURN = "(the model ended its turn without text)"


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                    temperature=self.temperature or 1.0, top_p=self.top_p)


def load_chat_model(model_dir: str | Path, device: str | None = None, *,
                    prompt_format: str = DEFAULT_PROMPT_FORMAT,
                    **image_kwargs) -> tuple[CompForConditionalGeneration, CompProcessor]:
    """A saved CoMP-MM (model + processor) on ``device`` (None: CUDA when available)."""
    model_dir = resolve_model_dir(model_dir)
    model = load_comp_mm(model_dir).to(device or default_device()).eval()
    return model, CompProcessor.from_pretrained(model_dir, prompt_format=prompt_format, **image_kwargs)


@dataclass
class Conversation:
    """Messages in the processor's format plus the images they refer to, in order."""

    messages: list[dict] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)

    def add_user(self, text: str, images: list[Image.Image] = ()) -> None:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.images += list(images)

    def add_assistant(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def drop_last_user(self) -> None:
        """Take back the last user turn and its images (a prompt that was refused)."""
        last = self.messages.pop()
        n = sum(item.get("type") == "image" for item in last["content"]) if isinstance(last["content"], list) else 0
        if n:
            del self.images[-n:]

    def drop_oldest_exchange(self) -> None:
        """Remove the first user turn (and its images) and the assistant turn after it."""
        first = self.messages.pop(0)
        if isinstance(first["content"], list):
            n = sum(item.get("type") == "image" for item in first["content"])
            del self.images[:n]
        if self.messages and self.messages[0]["role"] == "assistant":
            self.messages.pop(0)


def attach_image(processor: CompProcessor, path: str | Path) -> Image.Image:
    """Load an image for the conversation, refusing (ImageLoadError) what the processor
    cannot take, so a bad ``/image`` never reaches generation."""
    image = load_image(path)
    try:
        processor.image_processor.resized_size(image.height, image.width)
    except ValueError as err:
        raise ImageLoadError(f"cannot use image {str(path)!r}: {err}") from None
    return image


def context_length(model) -> int:
    return int(model.config.text_config.max_position_embeddings)


def fit_to_context(model, processor: CompProcessor, conversation: Conversation,
                   settings: GenerationSettings) -> dict:
    """The prompt's inputs, within the model's context. Truncation rule: the oldest exchanges
    (a user turn with its images, and the answer to it) are dropped, with a warning, until
    prompt + ``max_new_tokens`` fit; a newest prompt that does not fit alone is refused."""
    limit = context_length(model)
    dropped = 0
    while True:
        inputs = processor.encode_messages([conversation.messages], images=conversation.images or None)
        length = int(inputs["input_ids"].shape[1])
        if length + settings.max_new_tokens <= limit:
            break
        if len(conversation.messages) <= 1:
            raise ValueError(f"the prompt has {length} tokens, and with --max_new_tokens "
                             f"{settings.max_new_tokens} it exceeds the model's context of {limit} "
                             "tokens; shorten it, attach fewer or smaller images, or lower "
                             "--max_new_tokens")
        conversation.drop_oldest_exchange()
        dropped += 1
    if dropped:
        print(f"comp chat: warning: the conversation exceeded the model's context of {limit} "
              f"tokens; dropped the {dropped} oldest exchange(s)", file=sys.stderr)
    return inputs


@torch.no_grad()
def reply(model: CompForConditionalGeneration, processor: CompProcessor, conversation: Conversation,
          settings: GenerationSettings, streamer=None) -> str:
    """Generate the assistant's next turn (streamed to ``streamer`` as tokens arrive, after
    transformers puts the prompt, see ``answer_streamer``); see ``fit_to_context`` for prompts
    longer than the model's context. Sampling draws from torch's global generator."""
    inputs = fit_to_context(model, processor, conversation, settings)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    ids = model.generate(**inputs, eos_token_id=stop_ids(processor.tokenizer), streamer=streamer,
                         **settings.kwargs())
    answer = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if not answer.strip():
        print(EMPTY_TURN, file=sys.stderr)
    return answer


def answer_streamer(processor: CompProcessor) -> TextStreamer:
    """Prints the answer as it grows (transformers streams the prompt first: skipped)."""
    return TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)


def repl(model, processor, settings: GenerationSettings, images: list[Image.Image],
         stdin: TextIO) -> int:
    """Read prompts until end of input; ``images`` go with the first prompt."""
    conversation, pending = Conversation(), list(images)
    while True:
        print(">>> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            conversation, pending = Conversation(), []
            continue
        if text == "/image" or text.startswith("/image "):
            try:
                pending.append(attach_image(processor, text[len("/image"):].strip()))
            except (ImageLoadError, ValueError, OSError) as err:
                print(f"comp chat: {err}; the conversation goes on without it", file=sys.stderr)
            continue
        conversation.add_user(text, pending)
        pending = []
        try:
            answer = reply(model, processor, conversation, settings, answer_streamer(processor))
        except ValueError as err:  # a prompt the context cannot hold: refuse it, keep the rest
            conversation.drop_last_user()
            print(f"comp chat: {err}", file=sys.stderr)
            continue
        conversation.add_assistant(answer)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="comp chat",
        description="Chat with a saved CoMP-MM about images; streams the answer. Without --prompt:\n"
                    "an interactive session reading prompts from stdin (/image PATH, /reset, /exit).")
    parser.add_argument("model", help="CoMP-MM: directory or Hub id (a `comp train` output_dir, not an "
                                      "encoder; encoders go to encode/probe)")
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="image for the (first) prompt; repeat for several")
    parser.add_argument("--prompt", default=None, help="one question; omit for interactive mode")
    parser.add_argument("--max_new_tokens", type=positive_int, default=512, help="answer length limit")
    parser.add_argument("--temperature", type=float_in(0), default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float_in(0, 1, low_open=True), default=1.0,
                        help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--max_num_vistoken", type=int, default=None,
                        help="pixel budget per image in merged tokens; default: the saved processor's")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0; default: CUDA when available")
    parser.add_argument("--prompt_format", choices=PROMPT_FORMATS, default=DEFAULT_PROMPT_FORMAT,
                        help=PROMPT_FORMAT_HELP)
    parser.add_threads()
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is None and (sys.stdin is None or sys.stdin.closed):
        raise UserError("no prompt and no input to read prompts from (stdin is closed)", None,
                        "pass --prompt TEXT, or run it with a terminal or a pipe on stdin")
    apply_threads(args.threads)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    image_kwargs = {} if args.max_num_vistoken is None else {"max_num_vistoken": args.max_num_vistoken}
    try:
        model, processor = load_chat_model(args.model, args.device, prompt_format=args.prompt_format,
                                           **image_kwargs)
        images = [attach_image(processor, p) for p in args.image]
    except (ImageLoadError, FileNotFoundError, ValueError, OSError) as err:
        print(f"comp chat: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)  # generate() samples from the global generator
    if args.prompt is None:
        return repl(model, processor, settings, images, sys.stdin)
    conversation = Conversation()
    conversation.add_user(args.prompt, images)
    try:
        reply(model, processor, conversation, settings, answer_streamer(processor))
    except ValueError as err:
        print(f"comp chat: {err}", file=sys.stderr)
        return 2
    return 0
