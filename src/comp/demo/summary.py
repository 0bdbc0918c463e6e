"""The demo's summary: one row per claim (claim, metric, before, after, chance, spread) with a
verdict from a rule fixed before the run (never tuned to its result); comp.demo.report
renders them first in report.md.

Rule: a claim is supported when its effect exceeds ``Z`` times its uncertainty. The
uncertainty combines, in quadrature, the probe-seed std of each side (where there is one) and
the sampling standard error of each accuracy on its n evaluation items (binomial); for image
use it is the standard error of the per-question NLL difference.
"""
from __future__ import annotations

import math

from comp.demo.common import binomial_se

Z = 2.0
FINE_DETAIL = "digit"  # the fine-detail probe of claim (a)
PROBE_HEAD = "attentive"  # no mean over the digit's few tokens
RULE = (f"supported when the effect exceeds {Z:g} x its uncertainty (quadrature sum of probe-seed "
        "std and binomial standard error of each side; for image use, the standard error of the "
        "per-question NLL difference)")


def _row(claim: str, metric: str, before: float, after: float, chance: float | None, spread: float) -> dict:
    effect = after - before
    return {"claim": claim, "metric": metric, "before": before, "after": after, "chance": chance,
            "spread": spread, "effect": effect, "supported": bool(effect > Z * spread)}


def probe_row(probes: list[dict], setting: str, attribute: str = FINE_DETAIL, head: str = PROBE_HEAD) -> dict:
    pick = {r["encoder"]: r for r in probes if r["attribute"] == attribute and r["setting"] == setting}
    b, a = pick["original"], pick["CoMP-VFM"]
    sb, sa = b[head], a[head]
    spread = math.sqrt(sb["std"] ** 2 + sa["std"] ** 2 + binomial_se(sb["mean"], b["n_val"]) ** 2
                       + binomial_se(sa["mean"], a["n_val"]) ** 2)
    return _row(f"(a) CoMP-VFM over the original, {setting}", f"{attribute} {head} probe top-1",
                sb["mean"], sa["mean"], b["chance"], spread)


def zero_shot_row(words: dict) -> dict:
    """Mean over the zero-shot attributes of top-1 through the class words' prototypes."""
    def mean_and_var(side: str) -> tuple[float, float, float]:
        parts = words[side]["zero_shot"].values()
        accs = [p["top1"] for p in parts]
        var = sum(binomial_se(p["top1"], p["n"]) ** 2 for p in parts) / len(accs) ** 2
        return sum(accs) / len(accs), var, sum(p["chance"] for p in parts) / len(accs)

    (b, vb, chance), (a, va, _) = mean_and_var("before"), mean_and_var("after")
    names = "/".join(words["before"]["zero_shot"])
    return _row("(b) word-space alignment after Stage I+II", f"zero-shot {names} top-1 via prototypes (mean)",
                b, a, chance, math.sqrt(vb + va))


def qa_row(qa: dict, variant: str = "native") -> dict:
    """Exact match after Stage III against the majority answer of each question type (what a
    model that ignores images reaches), question-weighted."""
    r = qa[variant]
    n = r["n"]
    majority = sum(t["majority"] * t["n"] for t in r["by_type"].values()) / max(1, n)
    row = _row(f"(c) CoMP-MM answers held-out questions ({variant})", "exact match vs majority baseline",
               majority, r["accuracy"], majority, binomial_se(r["accuracy"], n))
    return row


def image_use_row(qa: dict, variant: str = "native") -> dict:
    u = qa[variant]["image_use"]
    return _row(f"(d) CoMP-MM uses its images ({variant})", "answer NLL (nats/token): wrong image vs right",
                u["nll_right"], u["nll_wrong"], None, u["difference_se"])


def summary_rows(results: dict) -> list[dict]:
    return [probe_row(results["probes"], "native"), probe_row(results["probes"], "native 2x"),
            zero_shot_row(results["word_space"]), qa_row(results["qa"]), image_use_row(results["qa"])]
