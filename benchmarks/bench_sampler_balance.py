"""Token balance of the length-grouped sampler across ranks, 8 ranks x 2 accumulation steps.

A distributed loader deals the sampler's global order in per-device batches round-robin:
batch k goes to rank k mod R, micro-step (k div R) mod GA. For every optimizer step this
prints, averaged over steps, max/mean over ranks of
- the tokens a rank processes in the step (all its micro-batches), and
- the tokens of each micro-batch (one per rank at the same micro-step),
for three ways to call the sampler:
- "previous": batch = per-device x GA, world = ranks (this project before the fix),
- "reference": batch = per-device, world = ranks x GA (the reference's call of LLaVA's
  grouping functions),
- "ours": ``ModalityLengthGroupedSampler(..., world_size=R, grad_accum_steps=GA)``.
Lengths: a Stage II-like mix, 85% image samples (native-resolution visual tokens up to a
3000-token budget plus 30-600 text tokens) and 15% text-only samples (log-normal, 30-4000).
"""
from __future__ import annotations

import argparse

import numpy as np

from comp.data.sampler import ModalityLengthGroupedSampler, modality_length_grouped_indices


def stage2_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Signed lengths: positive with an image, negative text-only."""
    rng = np.random.default_rng(seed)
    image = rng.random(n) < 0.85
    visual = rng.integers(64, 3001, n)
    text = rng.integers(30, 601, n)
    text_only = np.clip(rng.lognormal(5.5, 1.0, n), 30, 4000).astype(np.int64)
    return np.where(image, visual + text, -text_only)


def balance(order: list[int], lengths_N: np.ndarray, per_device: int, ranks: int, accum: int):
    """(mean over steps of max/mean tokens per rank, mean over micro-steps of max/mean per micro-batch)."""
    tokens = np.abs(lengths_N)[np.asarray(order)]
    step = per_device * ranks * accum
    per_rank, per_micro = [], []
    for start in range(0, len(tokens) - step + 1, step):
        batches_KB = tokens[start:start + step].reshape(accum * ranks, per_device).sum(1)
        micro_GR = batches_KB.reshape(accum, ranks)  # batch k: micro-step k // R, rank k % R
        rank_R = micro_GR.sum(0)
        per_rank.append(rank_R.max() / rank_R.mean())
        per_micro += list(micro_GR.max(1) / micro_GR.mean(1))
    return float(np.mean(per_rank)), float(np.mean(per_micro))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--per_device", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    R, GA, b = args.ranks, args.accum, args.per_device
    lengths_N = stage2_lengths(b * R * GA * args.steps, args.seed)
    orders = {
        "previous": list(ModalityLengthGroupedSampler(lengths_N, b * GA, world_size=R, seed=args.seed)),
        "reference": modality_length_grouped_indices(lengths_N, b, R * GA, np.random.default_rng(args.seed)),
        "ours": list(ModalityLengthGroupedSampler(lengths_N, b, world_size=R, grad_accum_steps=GA,
                                                  seed=args.seed)),
    }
    print(f"{R} ranks x GA {GA}, per-device batch {b}, {len(lengths_N)} samples "
          f"({int((lengths_N > 0).mean() * 100)}% with image), {args.steps} steps")
    print(f"{'call':<10}{'max/mean tokens per rank':>26}{'per micro-batch':>18}")
    results = {name: balance(order, lengths_N, b, R, GA) for name, order in orders.items()}
    for name, (rank, micro) in results.items():
        print(f"{name:<10}{rank:>26.3f}{micro:>18.3f}")
    ref_rank, ref_micro = results["reference"]
    for name in ("previous", "ours"):
        rank, micro = results[name]
        print(f"{name} / reference: per rank {rank / ref_rank:.3f}, per micro-batch {micro / ref_micro:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
