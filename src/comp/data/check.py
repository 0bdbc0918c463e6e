"""``comp data check``: scan a mixture (or one JSON/JSONL file) and report what training would see.

Every record is inspected as the dataset would use it, without decoding pixels: images are
opened for their header size only (EXIF orientation honoured; visual tokens = the
processor's smart_resize rule for that size), refused when over the pixel limit from that
header alone, checked for a JPEG end-of-image marker / PNG IEND chunk near the file's end
(truncated files) and with PIL's cheap ``verify`` (headers and PNG checksums; ``--decode``
decodes fully). Only regular files are images, as in training. With ``--tokenizer`` every sample is
also tokenised, giving text/sequence lengths, samples over ``--model_max_length`` and the
``too_long`` / ``no_supervised_tokens`` skips. Records are scanned in parallel over index
ranges. Exit status 1 when any error class is non-empty.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from comp.data.conversation import encode_conversation, load_tokenizer
from comp.data.dataset import Source, image_source, locate_image
from comp.data.index import JSONSyntaxError
from comp.data.mixture import MixtureError, load_mixture
from comp.data.prompts import prompt_messages
from comp.data.records import SkipSample

CHUNK_RECORDS = 2000
MAX_EXAMPLES = 5
LENGTH_CAP = 4  # sequence lengths are counted up to 4 x model_max_length
HIST_EDGES = [0, 16, 64, 256, 1024, 2048, 4096, 8192, 16384]
_WORKER: dict = {}


# -- parallel scanning, shared with ``comp data prior`` --------------------------------------

def _init_worker(job) -> None:
    job.setup()
    _WORKER["job"] = job


def _run_task(task: tuple[int, int, int]):
    k, lo, hi = task
    return hi - lo, _WORKER["job"].run(k, lo, hi)


def scan_parallel(job, sizes: list[int], workers: int, desc: str) -> Iterator:
    """Yield ``job.run(k, lo, hi)`` over index ranges of every dataset, with a progress bar.

    ``job`` has ``setup()`` (per process) and ``run(dataset, lo, hi)``; workers are forked."""
    tasks = [(k, lo, min(lo + CHUNK_RECORDS, n)) for k, n in enumerate(sizes)
             for lo in range(0, n, CHUNK_RECORDS)]
    with tqdm(total=sum(sizes), desc=desc, unit="rec", file=sys.stderr, dynamic_ncols=True) as bar:
        if workers <= 1:
            job.setup()
            results = map(lambda t: (t[2] - t[1], job.run(*t)), tasks)
            pool = None
        else:
            pool = mp.get_context("fork").Pool(workers, _init_worker, (job,))
            results = pool.imap_unordered(_run_task, tasks)
        try:
            for n, result in results:
                bar.update(n)
                yield result
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()


# -- the tally ----------------------------------------------------------------------------

def _histogram() -> np.ndarray:
    return np.zeros(len(HIST_EDGES), dtype=np.int64)


def bucket(value: int) -> int:
    return int(np.searchsorted(HIST_EDGES, value, side="right")) - 1


def histogram_dict(counts: np.ndarray) -> dict[str, int]:
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(HIST_EDGES, HIST_EDGES[1:])] + [f">={HIST_EDGES[-1]}"]
    return {label: int(c) for label, c in zip(labels, counts)}


@dataclass
class Tally:
    records: Counter = field(default_factory=Counter)  # per dataset
    images: Counter = field(default_factory=Counter)
    text_only: Counter = field(default_factory=Counter)
    visual_tokens: np.ndarray = field(default_factory=_histogram)  # per image
    text_tokens: np.ndarray = field(default_factory=_histogram)  # per sample, without image tokens
    sequence_tokens: np.ndarray = field(default_factory=_histogram)  # per sample
    over_max_length: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> [where: detail]

    def error(self, reason: str, where: str) -> None:
        self.errors[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(where)

    def merge(self, other: "Tally") -> None:
        for name in ("records", "images", "text_only", "errors"):
            getattr(self, name).update(getattr(other, name))
        self.visual_tokens += other.visual_tokens
        self.text_tokens += other.text_tokens
        self.sequence_tokens += other.sequence_tokens
        self.over_max_length += other.over_max_length
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[:MAX_EXAMPLES - len(mine)])


@dataclass
class CheckJob:
    sources: list[Source]
    processor_kwargs: dict
    tokenizer_dir: str | None
    model_max_length: int
    decode: bool = False

    def setup(self) -> None:
        from comp.data.image import CompImageProcessor

        self.processor = CompImageProcessor(**self.processor_kwargs)
        self.tokenizer = None
        if self.tokenizer_dir:
            self.tokenizer = load_tokenizer(self.tokenizer_dir)

    def run(self, k: int, lo: int, hi: int) -> Tally:
        tally = Tally()
        source = self.sources[k]
        for r in source.selected[lo:hi].tolist():
            tally.records[k] += 1
            rid = None
            try:
                record = source.record(r)
                rid = record.id
                self._inspect(source, record, k, tally)
            except SkipSample as e:
                tally.error(e.reason, f"{source.where(r, rid or e.record_id)}: {e.detail}")
        return tally

    def _image_tokens(self, location) -> int:
        """Visual tokens of one image, refusing it for the reasons training would: missing,
        not a regular file, an unreadable archive member, over the pixel limit (from the
        header: never decoded), truncated (end marker, cheap), corrupt (``verify``, or a full
        decode with ``--decode``)."""
        from PIL import Image

        from comp.data.image import (DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, decode, image_size,
                                     truncation_problem)

        source = image_source(location)
        try:
            height, width = image_size(source)
        except ImageLoadError as e:
            raise SkipSample("undecodable_image", f"{location}: {e}") from None
        if height * width > DEFAULT_MAX_IMAGE_PIXELS:  # load_image refuses it likewise
            raise SkipSample("undecodable_image", f"{location}: {width}x{height} pixels is above the "
                             f"limit of {DEFAULT_MAX_IMAGE_PIXELS:,}")
        try:
            if self.decode:
                decode(source)
            else:
                with Image.open(source) as im:
                    problem = truncation_problem(source, im.format)
                    if problem:
                        raise ImageLoadError(problem)
                    im.verify()
        except Exception as e:  # PIL raises many types for corrupt files
            raise SkipSample("undecodable_image", f"{location}: {type(e).__name__}: {e}") from None
        try:
            return self.processor.num_visual_tokens(height, width)
        except ValueError as e:
            raise SkipSample("unprocessable_image", f"{location}: {e}") from None

    def _inspect(self, source: Source, record, k: int, tally: Tally) -> None:
        counts = [self._image_tokens(locate_image(source.spec.image_root, p)) for p in record.images]
        if self.tokenizer is not None:
            messages = prompt_messages(record.messages)  # the default (reference) training format
            # Counted up to LENGTH_CAP x model_max_length: a 10 MB record is not tokenised whole
            # (whatever a cut there refuses, the cut at model_max_length refuses too).
            ids_L, _ = encode_conversation(self.tokenizer, messages, counts,
                                           max_length=LENGTH_CAP * self.model_max_length)
            if len(ids_L) > self.model_max_length:
                tally.over_max_length += 1
                encode_conversation(self.tokenizer, messages, counts,
                                    max_length=self.model_max_length)  # raises if it must skip
            tally.sequence_tokens[bucket(len(ids_L))] += 1
            tally.text_tokens[bucket(len(ids_L) - sum(counts))] += 1
        tally.images[k] += len(counts)
        for n in counts:
            tally.visual_tokens[bucket(n)] += 1
        if not counts:
            tally.text_only[k] += 1


# -- the command ---------------------------------------------------------------------------

def check(data: str, *, image_folder: str | None = None, data_root: str | None = None,
          processor_kwargs: dict | None = None, tokenizer_dir: str | None = None,
          model_max_length: int = 4096, workers: int = 1, decode: bool = False, seed: int = 0) -> dict:
    """Scan everything and return the summary (a JSON-ready dict)."""
    specs = load_mixture(data, data_root=data_root, image_folder=image_folder)
    tally = Tally()
    sources: list[Source | None] = []
    for k, spec in enumerate(specs):
        try:
            sources.append(Source(spec, k, seed))
        except (JSONSyntaxError, FileNotFoundError) as e:
            sources.append(None)
            tally.error("json_syntax" if isinstance(e, JSONSyntaxError) else "missing_data_file", str(e))
    job = CheckJob([s for s in sources if s is not None], processor_kwargs or {}, tokenizer_dir,
                   model_max_length, decode)
    readable = [k for k, s in enumerate(sources) if s is not None]
    for part in scan_parallel(job, [len(s.selected) for s in job.sources], workers, "check"):
        part.records = Counter({readable[k]: n for k, n in part.records.items()})
        part.images = Counter({readable[k]: n for k, n in part.images.items()})
        part.text_only = Counter({readable[k]: n for k, n in part.text_only.items()})
        tally.merge(part)
    return {
        "datasets": [{"json_path": str(spec.json_path), "source": spec.source,
                      "records": tally.records[k], "images": tally.images[k],
                      "text_only": tally.text_only[k]} for k, spec in enumerate(specs)],
        "records": sum(tally.records.values()),
        "images": sum(tally.images.values()),
        "text_only": sum(tally.text_only.values()),
        "visual_tokens_per_image": histogram_dict(tally.visual_tokens),
        "text_tokens_per_sample": histogram_dict(tally.text_tokens) if tokenizer_dir else None,
        "sequence_tokens_per_sample": histogram_dict(tally.sequence_tokens) if tokenizer_dir else None,
        "model_max_length": model_max_length if tokenizer_dir else None,
        "over_model_max_length": tally.over_max_length if tokenizer_dir else None,
        "errors": {reason: {"count": n, "examples": tally.examples[reason]}
                   for reason, n in tally.errors.most_common()},
        "num_errors": sum(tally.errors.values()),
    }


def format_summary(s: dict) -> str:
    lines = []
    for d in s["datasets"]:
        lines.append(f"{d['json_path']}: {d['records']} records, {d['images']} images, "
                     f"{d['text_only']} text-only")
    lines.append(f"total: {s['records']} records, {s['images']} images, {s['text_only']} text-only")
    for key in ("visual_tokens_per_image", "text_tokens_per_sample", "sequence_tokens_per_sample"):
        if s[key] is None:
            lines.append(f"{key}: (give --tokenizer)")
            continue
        lines.append(f"{key}:")
        lines += [f"  {label:>12}: {n}" for label, n in s[key].items() if n]
    if s["model_max_length"] is not None:
        lines.append(f"samples over model_max_length {s['model_max_length']}: "
                     f"{s['over_model_max_length']} (truncated at the end of text unless too_long)")
    lines.append(f"errors: {s['num_errors']}")
    for reason, e in s["errors"].items():
        lines.append(f"  {reason}: {e['count']}")
        lines += [f"    e.g. {ex}" for ex in e["examples"]]
    return "\n".join(lines)


def build_parser():
    from comp.cliargs import ArgumentParser

    p = ArgumentParser(prog="comp data check", description=__doc__.splitlines()[0])
    p.add_argument("data", help="mixture YAML, or one LLaVA .json / .jsonl file")
    p.add_argument("--image_folder", help="image root for datasets without their own image_folder")
    p.add_argument("--data_root", help="base of relative json_path (default: the YAML's directory)")
    p.add_argument("--max_num_vistoken", type=int, help="pixel budget per image in merged tokens, as in training")
    p.add_argument("--min_num_vistoken", type=int, help="lower pixel budget in merged tokens, as in training")
    p.add_argument("--force_resize", type=int, help="resize to N x N first, as in training")
    p.add_argument("--model_max_length", type=int, default=4096, help="sequence limit to count samples over")
    p.add_argument("--tokenizer", help="tokenizer directory or Hub id: enables text-token statistics")
    p.add_argument("--workers", type=int, default=1, help="parallel scanning processes")
    p.add_switch("--decode", default=False, help="decode every image fully (slower)")
    p.add_switch("--json", default=False, help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    processor_kwargs = {k: v for k, v in (("max_num_vistoken", args.max_num_vistoken),
                                           ("min_num_vistoken", args.min_num_vistoken),
                                           ("force_resize", args.force_resize)) if v is not None}
    try:
        summary = check(args.data, image_folder=args.image_folder, data_root=args.data_root,
                        processor_kwargs=processor_kwargs, tokenizer_dir=args.tokenizer,
                        model_max_length=args.model_max_length, workers=args.workers,
                        decode=args.decode)
    except MixtureError as e:
        print(f"comp data check: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 1 if summary["num_errors"] else 0
