"""lmms-eval model ``comp``: a saved CoMP-MM directory evaluated by lmms-eval (>= 0.7), unforked.

lmms-eval finds external models through the entry-point group ``lmms_eval.models``; the
project declares ``comp = "comp.eval.lmms_plugin:manifest"`` there (pyproject.toml), so after
``pip install -e .[eval]``::

    python -m lmms_eval --model comp --model_args pretrained=DIR --tasks ai2d,chartqa

``import comp`` never imports this module (lmms-eval is an optional extra).

Requests are answered with the CoMP chat template in one of comp.data.prompts' formats
(``prompt_format=reference``, default: the reference's evaluation format; or ``inplace``).
generate_until is batched (left-padded prompts, grouped by generation settings, greedy
unless the task's gen_kwargs ask for sampling, cut at the task's ``until`` strings);
loglikelihood scores the continuation after the assistant prompt, one request at a time,
and returns its negative log-likelihood (lmms-eval's multiple_choice takes the argmin).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from comp.data.image import load_image, to_rgb
from comp.data.processor import CompProcessor
from comp.data.prompts import DEFAULT_PROMPT_FORMAT, check_prompt_format, user_content
from comp.eval.features import default_device
from comp.hub import resolve_model_dir
from comp.models.kinds import load_comp_mm
from comp.models.vision.model import set_pos_order
from comp.tokens import stop_ids

DEFAULT_MAX_NEW_TOKENS = 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def manifest():
    """The entry point lmms-eval loads: model id ``comp`` -> ``CompLMMS``. (Imported here:
    lmms_eval.models reads the entry points while it is itself being imported.)"""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="comp", simple_class_path=f"{__name__}.CompLMMS")


# ----------------------------------------------------------------------------- pure helpers


def generation_settings(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """A task's gen_kwargs -> (kwargs of CompForConditionalGeneration.generate, until strings).
    Greedy unless ``do_sample`` or a positive ``temperature`` asks for sampling; generation
    always stops at the end of the assistant turn, ``until`` cuts the text further."""
    kw = dict(gen_kwargs)
    until = kw.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    temperature = float(kw.get("temperature") or 0.0)
    do_sample = bool(kw.get("do_sample", False)) or temperature > 0
    top_p = kw.get("top_p")
    settings = {"max_new_tokens": int(kw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                "do_sample": do_sample, "temperature": temperature if do_sample and temperature > 0 else 1.0,
                "top_p": float(top_p) if top_p is not None else 1.0}
    return settings, [u for u in until if u]


def cut_at(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = min([text.index(u) for u in until if u in text], default=len(text))
    return text[:end]


def batches_by_settings(contexts: list[str], gen_kwargs: list[dict], batch_size: int) -> list[list[int]]:
    """Request indices grouped by identical gen_kwargs, longest context first inside a
    group (little padding; memory errors surface on the first batch), cut into batches."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, kw in enumerate(gen_kwargs):
        groups[json.dumps(kw, sort_keys=True, default=str)].append(i)
    out: list[list[int]] = []
    for idx in groups.values():
        idx.sort(key=lambda i: -len(contexts[i]))
        out += [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    return out


def as_images(visuals) -> list[Image.Image]:
    """A doc_to_visual result (None, an image, a path, or a possibly nested list of them)."""
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [im for v in visuals for im in as_images(v)]
    if isinstance(visuals, Image.Image):
        return [to_rgb(visuals)]
    if isinstance(visuals, (str, os.PathLike)):
        return [load_image(visuals)]
    raise TypeError(f"the comp model reads images (PIL or file paths); the task gave a "
                    f"{type(visuals).__name__}, e.g. video or audio, which CoMP-MM does not take")


# ----------------------------------------------------------------------------- the model


class CompLMMS(lmms):
    """lmms-eval wrapper of a saved CoMP-MM directory (model + processor)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1,
                 dtype: str = "float32", max_num_vistoken: int | None = None,
                 system_prompt: str | None = None, max_batch_size: int | None = None,
                 prompt_format: str = DEFAULT_PROMPT_FORMAT, pos_order: str | None = None, **kwargs) -> None:
        """``batch_size`` "auto" means 1; ``max_batch_size`` (passed on by lmms-eval's
        --max_batch_size) has no use here, as batches have a fixed size."""
        super().__init__()
        if kwargs:
            raise ValueError(f"comp model: unknown model_args {sorted(kwargs)}; known: pretrained, device, "
                             "batch_size, dtype, max_num_vistoken, system_prompt, prompt_format, pos_order")
        try:
            check_prompt_format(prompt_format)
        except ValueError as err:
            raise ValueError(f"comp model: {err}") from None
        if dtype not in DTYPES:
            raise ValueError(f"comp model: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        path = resolve_model_dir(pretrained)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"comp model: {path} has no config.json; pretrained= must be a saved "
                                    "CoMP-MM directory (model.save_pretrained + processor.save_pretrained)")
        self._device = torch.device(device or default_device())
        image_kwargs = {} if max_num_vistoken is None else {"max_num_vistoken": int(max_num_vistoken)}
        self.processor = CompProcessor.from_pretrained(path, prompt_format=prompt_format, **image_kwargs)
        model = load_comp_mm(path, dtype=DTYPES[dtype])  # kind checked, no tensor left random
        if pos_order is not None:  # e.g. raster for a reference-trained encoder
            set_pos_order(model.visual, pos_order)
        self.model = model.to(self._device).eval()
        self.batch_size_per_gpu = int(batch_size) if str(batch_size) != "auto" else 1
        self.system_prompt = system_prompt
        self.stop_ids = stop_ids(self.processor.tokenizer)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _messages(self, context: str, num_images: int) -> list[dict]:
        messages = [{"role": "user", "content": user_content(context, num_images, self.processor.prompt_format)}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _doc_images(self, doc_to_visual, doc_id, task, split) -> list[Image.Image]:
        if doc_to_visual is None:  # a text-only task
            return []
        return as_images(doc_to_visual(self.task_dict[task][split][doc_id]))

    def _encode(self, conversations: list[list[dict]], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Generation prompts; benchmark text stays plain text (see CompProcessor.encode_messages)."""
        inputs = self.processor.encode_messages(conversations, images=images or None, padding_side="left")
        return {k: v.to(self._device) for k, v in inputs.items()}

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [r.args for r in requests]
        contexts = [a[0] for a in args]
        gen_kwargs = [a[1] or {} for a in args]
        results: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=self.rank != 0, desc="comp: generating")
        for batch in batches_by_settings(contexts, gen_kwargs, self.batch_size):
            settings, until = generation_settings(gen_kwargs[batch[0]])
            conversations, images = [], []
            for i in batch:
                _, _, doc_to_visual, doc_id, task, split = args[i]
                doc_images = self._doc_images(doc_to_visual, doc_id, task, split)
                conversations.append(self._messages(contexts[i], len(doc_images)))
                images += doc_images
            inputs = self._encode(conversations, images)
            ids = self.model.generate(**inputs, eos_token_id=self.stop_ids, **settings)
            new_ids = ids[:, inputs["input_ids"].shape[1]:]
            for i, text in zip(batch, self.processor.batch_decode(new_ids, skip_special_tokens=True)):
                results[i] = cut_at(text, until).strip()
                self.cache_hook.add_partial("generate_until", (contexts[i], gen_kwargs[i]), results[i])
            bar.update(len(batch))
        bar.close()
        return results

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(-log p(continuation | user turn with the context and images), whether greedy
        decoding gives exactly the continuation's tokens) per request.

        Two lmms-eval 0.7.3 conventions shape the result. Its multiple_choice scoring picks
        the *argmin* of the first numbers (it reads them as losses, as its own LLaVA model
        returns), so the log-likelihood, summed over the continuation's tokens, is negated.
        And its evaluator passes every response through ``unwrap_generation_output``, which
        turns a bare (float, bool) tuple into its string; a GenerationResult's ``text`` is
        handed on as it is, so each pair travels in one."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="comp: scoring"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else str(target(self.task_dict[task][split][doc_id]))
            images = self._doc_images(doc_to_visual, doc_id, task, split)
            inputs = self._encode([self._messages(context, len(images))], images)
            cont_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if cont_ids.shape[1] == 0:
                raise ValueError(f"comp model: empty continuation for doc {doc_id} of task {task!r}")
            cont_1C = cont_ids.to(self._device)
            input_ids = torch.cat([inputs["input_ids"], cont_1C], 1)
            logits = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                pixel_values=inputs.get("pixel_values"),
                                image_grid_thw=inputs.get("image_grid_thw")).logits
            logp_CV = logits[0, -cont_1C.shape[1] - 1:-1].float().log_softmax(-1)
            logprob = float(logp_CV.gather(-1, cont_1C[0, :, None]).sum())
            greedy = bool((logp_CV.argmax(-1) == cont_1C[0]).all())
            results.append(GenerationResult(text=(-logprob, greedy)))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (-logprob, greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("comp model: multi-round generation is not supported; use tasks "
                                  "whose output_type is generate_until or multiple_choice/loglikelihood")
