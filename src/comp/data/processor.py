"""CompProcessor: the LLM tokenizer + CompImageProcessor + the Qwen2-VL-style chat template.

A prompt holds one ``<|vision_start|><|image_pad|><|vision_end|>`` per image; the processor
expands each ``<|image_pad|>`` to the image's merged token count (h/2 * w/2 of its patch grid),
so the model can drop the merged features into those positions.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

from comp.data.collator import pad_rows
from comp.data.conversation import encode_prompt
from comp.data.image import CompImageProcessor
from comp.data.prompts import adds_default_system, check_prompt_format, with_default_system
from comp.hub import resolve_model_dir
from comp.tokens import CHAT_TEMPLATE_PATH, IMAGE_PAD, ensure_vision_tokens

# Keywords transformers' AutoProcessor adds to a processor's from_pretrained that CoMP's loader
# resolves itself (comp.hub) or does not need.
_AUTO_ONLY_KWARGS = ("trust_remote_code", "_from_auto", "code_revision", "use_fast", "backend")


class CompProcessor(ProcessorMixin):
    """Tokenizer + image processor for CoMP-MM prompts.

    The tokenizer always gets the CoMP chat template (Qwen2-VL's rendering, image items as
    ``<|vision_start|><|image_pad|><|vision_end|>``): an LLM's own template (e.g.
    Qwen2.5-Instruct's) knows no image items, and training and inference must render prompts
    identically. ``prompt_format``: one of comp.data.prompts' formats ("reference", the
    default, adds Qwen2-VL's default system turn when the messages have none; "inplace" none).

    A transformers ``ProcessorMixin`` (``AutoProcessor``, ``Trainer(processing_class=...)``).
    A saved directory keeps the layout of transformers' Qwen2-VL processors that CoMP-VFM
    export and the encoder loaders read: tokenizer files, ``chat_template.jinja``, the image
    processor's own ``preprocessor_config.json`` and a ``processor_config.json`` naming the class.
    """

    def __init__(self, tokenizer, image_processor: CompImageProcessor, *, prompt_format: str = "reference"):
        prompt_format = check_prompt_format(prompt_format)
        ensure_vision_tokens(tokenizer)
        template = CHAT_TEMPLATE_PATH.read_text()
        tokenizer.chat_template = template
        super().__init__(tokenizer, image_processor, chat_template=template)
        self.prompt_format = prompt_format
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    @classmethod
    def from_components(cls, llm_dir: str | Path, vision_dir: str | Path, *,
                        prompt_format: str = "reference", **image_kwargs) -> CompProcessor:
        """Tokenizer of a Qwen2/Qwen2.5 checkpoint + the encoder's image preprocessing
        (directories or Hub ids ``org/name[@rev]``, see ``comp.hub``)."""
        return cls(AutoTokenizer.from_pretrained(resolve_model_dir(llm_dir)),
                   CompImageProcessor.from_pretrained(vision_dir, **image_kwargs),
                   prompt_format=prompt_format)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, prompt_format: str = "reference",
                        revision: str | None = None, **image_kwargs) -> CompProcessor:
        """The processor saved in a CoMP-MM directory (tokenizer + preprocessor config); also
        what ``AutoProcessor.from_pretrained`` calls. The prompt format is chosen here, not
        stored: a training run's format is a data setting (``comp train --prompt_format``)."""
        for key in _AUTO_ONLY_KWARGS:
            image_kwargs.pop(key, None)
        directory = resolve_model_dir(directory, revision)
        return cls.from_components(directory, directory, prompt_format=prompt_format, **image_kwargs)

    def to_dict(self) -> dict:
        """``processor_config.json``: the class name only. The image processor keeps its own
        file (one source for the CoMP-VFM export, the encoder loaders and AutoImageProcessor)
        and the prompt format is a loading choice (see ``from_pretrained``)."""
        return {k: v for k, v in super().to_dict().items() if k not in ("image_processor", "prompt_format")}

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs) -> list[str]:
        """transformers' processor files + ``preprocessor_config.json``; returns the written configs."""
        if push_to_hub:
            raise ValueError("CompProcessor.save_pretrained does not upload; save, then upload the "
                             "directory (`hf upload`)")
        return self.image_processor.save_pretrained(save_directory) + super().save_pretrained(save_directory)

    @property
    def merge_size(self) -> int:
        return self.image_processor.merge_size

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            tokenize: bool = False):
        """Render messages whose content is a string or a list of ``{"type": "image"}`` /
        ``{"type": "text", "text": ...}`` items (one image pad per image, unexpanded), with the
        default system turn where the prompt format adds it."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
            default_system=adds_default_system(self.prompt_format))

    def expand_image_pads(self, text: str, tokens_per_image: list[int]) -> str:
        """Replace the i-th ``<|image_pad|>`` by ``tokens_per_image[i]`` pads."""
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 != len(tokens_per_image):
            raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_PAD} placeholders but "
                             f"{len(tokens_per_image)} images were given; use one per image")
        out = [parts[0]]
        for n, rest in zip(tokens_per_image, parts[1:]):
            out += [IMAGE_PAD * n, rest]
        return "".join(out)

    def __call__(self, text: str | list[str], images=None, *, padding_side: str = "left",
                 return_tensors: str = "pt") -> BatchFeature:
        """Tokenise prompts (images in prompt order across the batch), expanding image pads.
        Left padding by default, as generation needs."""
        texts = [text] if isinstance(text, str) else list(text)
        data: dict = {}
        tokens_per_image: list[int] = []
        if images is not None and not (isinstance(images, list) and not images):
            vision = self.image_processor(images, return_tensors="pt")
            data.update(vision)
            m2 = self.merge_size ** 2
            tokens_per_image = (vision["image_grid_thw"].prod(-1) // m2).tolist()
        expanded, start = [], 0
        for t in texts:
            count = t.count(IMAGE_PAD)
            expanded.append(self.expand_image_pads(t, tokens_per_image[start:start + count]))
            start += count
        if start != len(tokens_per_image):
            raise ValueError(f"{len(tokens_per_image)} images were given but the prompts hold "
                             f"{start} {IMAGE_PAD} placeholders")
        enc = self.tokenizer(expanded, add_special_tokens=False)
        data.update(pad_rows(enc["input_ids"], self.tokenizer.pad_token_id, "input_ids",
                             "attention_mask", side=padding_side))
        return BatchFeature(data, tensor_type=return_tensors)

    def encode_messages(self, conversations: list[list[dict]], images=None, *,
                        padding_side: str = "left", return_tensors: str = "pt") -> BatchFeature:
        """Generation prompts of message lists (images in message order across the batch):
        the ids ``self(self.apply_chat_template(m, add_generation_prompt=True), images)``
        gives, except that message text stays plain text. A special-token string a user
        types or a benchmark question holds (``<|im_end|>``, ``<|image_pad|>``) never becomes
        a control token, as in training (comp.data.conversation)."""
        rows = [self._template_messages(m) for m in conversations]
        data: dict = {}
        tokens_per_image: list[int] = []
        if images is not None and not (isinstance(images, list) and not images):
            vision = self.image_processor(images, return_tensors="pt")
            data.update(vision)
            tokens_per_image = (vision["image_grid_thw"].prod(-1) // self.merge_size ** 2).tolist()
        ids, start = [], 0
        for messages in rows:
            count = sum(p["type"] == "image" for m in messages for p in m["content"])
            ids.append(encode_prompt(self.tokenizer, messages, tokens_per_image[start:start + count]))
            start += count
        if start != len(tokens_per_image):
            raise ValueError(f"{len(tokens_per_image)} images were given but the messages hold "
                             f"{start} image items")
        data.update(pad_rows(ids, self.tokenizer.pad_token_id, "input_ids", "attention_mask",
                             side=padding_side))
        return BatchFeature(data, tensor_type=return_tensors)

    def _template_messages(self, messages: list[dict]) -> list[dict]:
        """Messages as the chat template sees them: content as items, the default system
        turn first where the prompt format adds it."""
        out = []
        for m in messages:
            content = m["content"]
            items = [{"type": "text", "text": content}] if isinstance(content, str) else []
            for part in [] if isinstance(content, str) else content:
                if part.get("type") == "image" or "image" in part:
                    items.append({"type": "image"})
                elif part.get("type") == "text":
                    items.append({"type": "text", "text": part["text"]})
            out.append({"role": m["role"], "content": items})
        return with_default_system(out, self.prompt_format)
