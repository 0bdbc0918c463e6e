"""``comp data show DATA [--index N ...] [--tokenizer DIR]``: records as the model sees them.

For each sample index of the mixture (default 0) it prints the file and record, then the
rendered training text in the chosen prompt format with every image span as
``<|vision_start|><|image_pad|>xN<|vision_end|>`` and every supervised span between
``SUPERVISED_OPEN`` and ``SUPERVISED_CLOSE``, then token counts. With ``--tokenizer`` the
text is the decoded ``input_ids`` of the sample exactly as the dataset builds it (images
opened, image pads expanded per image, truncation applied) and the marks come from its
``labels``; the image-token counts need the encoder's preprocessing, read from ``--vision``
or from the tokenizer directory when it is a CoMP-MM (else the default processor's).
Without ``--tokenizer`` the text is the chat template's (one pad per image) and the marks
are the answers with their ``<|im_end|>``. A sample the dataset would skip shows its reason.
"""
from __future__ import annotations

import sys
from pathlib import Path

from comp.data.conversation import load_tokenizer, render_text
from comp.data.dataset import MixtureDataset, Skipped
from comp.data.image import DEFAULT_MAX_NUM_VISTOKEN
from comp.data.mixture import MixtureError, load_mixture
from comp.data.prompts import DEFAULT_PROMPT_FORMAT, PROMPT_FORMAT_HELP, PROMPT_FORMATS, prompt_messages
from comp.data.records import SkipSample
from comp.tokens import IGNORE_INDEX, IMAGE_PAD

SUPERVISED_OPEN, SUPERVISED_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧


def marked_template_text(messages: list[dict]) -> str:
    """The chat-template text (one pad per image) with each answer + ``<|im_end|>`` marked."""
    return render_text(messages, (SUPERVISED_OPEN, SUPERVISED_CLOSE))


def marked_token_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    """Decoded ids, supervised runs marked, each run of image pads shown as ``<|image_pad|>xN``."""
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    out, run, state = [], [], None  # state: "image" | True (supervised) | False

    def flush():
        if not run:
            return
        if state == "image":
            out.append(f"{IMAGE_PAD}x{len(run)}")
        else:
            text = tokenizer.decode(run)
            out.append(f"{SUPERVISED_OPEN}{text}{SUPERVISED_CLOSE}" if state else text)
        run.clear()

    for t, label in zip(ids, labels):
        kind = "image" if t == pad else label != IGNORE_INDEX
        if kind != state:
            flush()
            state = kind
        run.append(t)
    flush()
    return "".join(out)


def show_sample(dataset: MixtureDataset, i: int, *, tokenized: bool) -> str:
    source, r = dataset.locate(i)
    lines = [f"== sample {i}: {source.where(r)}"]
    try:
        record = source.record(r)
    except SkipSample as e:
        return "\n".join(lines + [f"skipped: {e.reason}: {e.detail}"])
    lines[0] = f"== sample {i}: {source.where(r, record.id)}"
    messages = prompt_messages(record.messages, dataset.prompt_format)
    if not tokenized:
        lines.append(marked_template_text(messages).rstrip("\n"))
        lines.append(f"({len(record.images)} image(s); pass --tokenizer for token counts)")
        return "\n".join(lines)
    sample = dataset[i]
    if isinstance(sample, Skipped):
        lines.append(marked_template_text(messages).rstrip("\n"))
        lines.append(f"skipped: {sample.reason}: {sample.detail}")
        return "\n".join(lines)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    pad = dataset.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    n_image = sum(t == pad for t in ids)
    n_sup = sum(label != IGNORE_INDEX for label in labels)
    lines.append(marked_token_text(dataset.tokenizer, ids, labels))
    lines.append(f"tokens: {len(ids)} (text {len(ids) - n_image}, image {n_image} in "
                 f"{len(record.images)} image(s), supervised {n_sup})")
    return "\n".join(lines)


def build_parser():
    from comp.cliargs import ArgumentParser

    p = ArgumentParser(prog="comp data show", description=__doc__.splitlines()[0])
    p.add_argument("data", help="mixture YAML, or one LLaVA .json / .jsonl file")
    p.add_argument("--index", type=int, action="append", help="sample index in the mixture (repeatable; default 0)")
    p.add_argument("--tokenizer", help="tokenizer (an LLM or a CoMP-MM), directory or Hub id: exact ids, "
                                       "labels and counts")
    p.add_argument("--vision", help="encoder (directory or Hub id) whose preprocessing counts the image tokens")
    p.add_argument("--prompt_format", choices=PROMPT_FORMATS, default=DEFAULT_PROMPT_FORMAT,
                   help=PROMPT_FORMAT_HELP)
    p.add_argument("--image_folder", help="image root for datasets without their own image_folder")
    p.add_argument("--data_root", help="base of relative json_path (default: the YAML's directory)")
    p.add_argument("--max_num_vistoken", type=int, default=DEFAULT_MAX_NUM_VISTOKEN, help="pixel budget per image in merged tokens")
    p.add_argument("--model_max_length", type=int, default=4096, help="longest token sequence of a sample")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    tokenizer = image_processor = None
    try:
        specs = load_mixture(args.data, data_root=args.data_root, image_folder=args.image_folder)
        if args.tokenizer:
            from comp.data.image import CompImageProcessor

            tokenizer = load_tokenizer(args.tokenizer)
            vision = args.vision or args.tokenizer
            kwargs = {"max_num_vistoken": args.max_num_vistoken}
            image_processor = (CompImageProcessor.from_pretrained(vision, **kwargs)
                               if (Path(vision) / "preprocessor_config.json").exists()
                               else CompImageProcessor(**kwargs))
        dataset = MixtureDataset(specs, tokenizer, image_processor, model_max_length=args.model_max_length,
                                 prompt_format=args.prompt_format)
    except (MixtureError, FileNotFoundError, ValueError, OSError) as e:
        print(f"comp data show: {e}", file=sys.stderr)
        return 2
    print(f"supervised spans between {SUPERVISED_OPEN} and {SUPERVISED_CLOSE}; prompt format "
          f"{args.prompt_format}; {len(dataset)} samples")
    for i in args.index or [0]:
        if not 0 <= i < len(dataset):
            print(f"comp data show: --index {i} is out of range (the mixture has {len(dataset)} samples)",
                  file=sys.stderr)
            return 2
        print(show_sample(dataset, i, tokenized=tokenizer is not None))
    return 0
