"""``comp data prior``: the alignment loss's word-frequency prior.

Counts the tokens of every assistant answer of a mixture over the whole vocabulary
(``len(tokenizer)``) and writes them with ``torch.save`` as a plain Python list of ints, the
kind of file the reference's ``--word_dist_path`` takes (``torch.load(path,
weights_only=True)``). Answers are tokenised as plain text, as training does; malformed records are
skipped and counted.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from comp.data.check import scan_parallel
from comp.data.conversation import encode_plain_text, load_tokenizer
from comp.data.dataset import Source
from comp.data.mixture import load_mixture
from comp.data.records import SkipSample, assistant_texts


@dataclass
class PriorJob:
    sources: list[Source]
    tokenizer_dir: str

    def setup(self) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_dir)

    def run(self, k: int, lo: int, hi: int) -> tuple[np.ndarray, int]:
        texts, bad = [], 0
        source = self.sources[k]
        for r in source.selected[lo:hi].tolist():
            try:
                texts += assistant_texts(source.record(r))
            except SkipSample:
                bad += 1
        counts_V = np.zeros(len(self.tokenizer), dtype=np.int64)
        if texts:
            ids = encode_plain_text(self.tokenizer, texts)["input_ids"]
            flat = np.fromiter((t for row in ids for t in row), dtype=np.int64)
            counts_V += np.bincount(flat, minlength=len(counts_V))[:len(counts_V)]
        return counts_V, bad


def word_prior(data: str, tokenizer_dir: str, *, data_root: str | None = None, workers: int = 1,
               seed: int = 0) -> tuple[list[int], int]:
    """(token counts over the vocabulary, number of malformed records skipped)."""
    specs = load_mixture(data, data_root=data_root)
    job = PriorJob([Source(spec, k, seed) for k, spec in enumerate(specs)], tokenizer_dir)
    total_V, bad = None, 0
    for counts_V, n_bad in scan_parallel(job, [len(s.selected) for s in job.sources], workers, "prior"):
        total_V = counts_V if total_V is None else total_V + counts_V
        bad += n_bad
    if total_V is None:
        job.setup()
        total_V = np.zeros(len(job.tokenizer), dtype=np.int64)
    return total_V.tolist(), bad


def build_parser():
    from comp.cliargs import ArgumentParser

    p = ArgumentParser(prog="comp data prior", description=__doc__.splitlines()[0])
    p.add_argument("data", help="mixture YAML, or one LLaVA .json / .jsonl file")
    p.add_argument("--tokenizer", required=True, help="the LLM's tokenizer: directory or Hub id")
    p.add_out("output file (e.g. word_dist.pth)")
    p.add_argument("--data_root", help="base of relative json_path (default: the YAML's directory)")
    p.add_argument("--workers", type=int, default=1, help="parallel tokenizing processes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from comp.files import atomic_output, refuse_output_over_input

    refuse_output_over_input(args.out, [args.data, args.tokenizer])
    counts, bad = word_prior(args.data, args.tokenizer, data_root=args.data_root, workers=args.workers)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:  # a full disk leaves no 0-byte prior behind
        torch.save(counts, tmp)

    print(f"wrote {args.out}: {len(counts)} token counts, {sum(counts)} tokens, "
          f"{sum(c > 0 for c in counts)} ids seen" + (f"; {bad} malformed records skipped" if bad else ""),
          file=sys.stderr)
    return 0
