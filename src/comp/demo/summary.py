"""The demo's summary: one row per claim (claim, metric, before, after, chance, spread) with a
verdict from a rule fixed before the run (never tuned to its result); comp.demo.report
renders them first in report.md.

Rule: a claim is supported when its effect exceeds ``Z`` times its uncertainty. The
uncertainty combines, in quadrature, the probe-seed std of each side (where there is one) and
the sampling standard error of each accuracy on its n evaluation items (binomial; for mIoU,
from disjoint folds of the val images); for image use it is the standard error of the
per-question NLL difference.
"""
from __future__ import annotations

import math

from comp.demo.common import binomial_se

Z = 2.0
FINE_DETAIL = "digit"  # the fine-detail probe of claim (a)
READING = ("digit", "word")  # the probes on small glyphs in large scenes
PROBE_HEAD = "attentive"  # no mean over the digit's few tokens
RULE = (f"supported when the effect exceeds {Z:g} x its uncertainty (quadrature sum of probe-seed "
        "std and sampling standard error of each side: binomial for accuracy, over val-image folds for "
        "mIoU; for image use, the standard error of the per-question NLL difference)")


def _row(claim: str, metric: str, before: float, after: float, chance: float | None, spread: float) -> dict:
    effect = after - before
    return {"claim": claim, "metric": metric, "before": before, "after": after, "chance": chance,
            "spread": spread, "effect": effect, "supported": bool(effect > Z * spread)}


def probe_row(probes: list[dict], attribute: str, before: str, after: str, head: str = PROBE_HEAD) -> dict:
    """The original at setting ``before`` against the CoMP-VFM at ``after``."""
    b = _pick(probes, "original", before, attribute)
    a = _pick(probes, "CoMP-VFM", after, attribute)
    sb, sa = b[head], a[head]
    spread = math.sqrt(sb["std"] ** 2 + sa["std"] ** 2 + binomial_se(sb["mean"], b["n_val"]) ** 2
                       + binomial_se(sa["mean"], a["n_val"]) ** 2)
    return _row(_claim_a(before, after), f"{attribute} {head} probe top-1", sb["mean"], sa["mean"], b["chance"],
                spread)


def dense_row(dense: list[dict], before: str, after: str) -> dict:
    """Segmentation mIoU, the original at ``before`` against the CoMP-VFM at ``after``; the
    uncertainty adds each side's head-seed std and val-sampling error (miou_se)."""
    b, a = _pick(dense, "original", before), _pick(dense, "CoMP-VFM", after)
    spread = math.sqrt(b["miou"]["std"] ** 2 + a["miou"]["std"] ** 2 + b["miou_se"] ** 2 + a["miou_se"] ** 2)
    return _row(_claim_a(before, after), "segmentation mIoU (linear, frozen patch tokens)", b["miou"]["mean"],
                a["miou"]["mean"], None, spread)


def _pick(rows: list[dict], encoder: str, setting: str, attribute: str | None = None) -> dict:
    return next(r for r in rows if r["encoder"] == encoder and r["setting"] == setting
                and (attribute is None or r["attribute"] == attribute))


def _claim_a(before: str, after: str) -> str:
    if before == after:
        return f"(a) CoMP-VFM over the original, both at {after}"
    return f"(a) CoMP-VFM at {after} over the original at {before}"


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


def reading_note(probes: list[dict], attribute: str, head: str = PROBE_HEAD) -> str | None:
    """Where the original does not read even large glyphs at its fixed size (its "large,
    fixed" probe within Z binomial standard errors of chance), a reading row measures no
    resolution effect: the note says so. None where it reads, or was not probed."""
    large = [r for r in probes if (r["attribute"], r["encoder"], r["setting"]) == (attribute, "original", "large, fixed")]
    if not large or large[0][head] is None:
        return None
    r = large[0]
    acc = r[head]["mean"]
    if acc - r["chance"] > Z * math.sqrt(r[head]["std"] ** 2 + binomial_se(acc, r["n_val"]) ** 2):
        return None
    return (f"The original does not read {attribute}s even in large type at its fixed size ({head} probe "
            f"{acc:.3f}, chance {r['chance']:.3f}): this row cannot show what resolution adds.")


def same_size_note(rows: list[dict], setting: str, value, attribute: str | None = None) -> str | None:
    """Where a row sets the CoMP-VFM at ``setting`` against the original at its fixed size, both
    at ``setting``: how much of the effect is the size alone and how much CoMP's training.
    ``value``: a row -> its number. None where either was not measured at ``setting``."""
    try:
        o, c = _pick(rows, "original", setting, attribute), _pick(rows, "CoMP-VFM", setting, attribute)
    except StopIteration:
        return None
    return (f"Both at {setting} size: original {value(o):.3f}, CoMP-VFM {value(c):.3f} (CoMP's training "
            f"beyond the size: {value(c) - value(o):+.3f}).")


def _join(*notes: str | None) -> str | None:
    return " ".join(n for n in notes if n) or None


def collapse_note(results: dict) -> str | None:
    """What the word-space row's inputs looked like: the image features' spread after
    Stage II-b and where the alignment loss's targets peak (comp.demo.claims.alignment_targets)."""
    health = results.get("health", {}).get("stage2b")
    targets = results.get("captions", {}).get("targets")
    parts = []
    if health is not None:
        parts.append(f"image cos after Stage II-b {health['image_cos']:.2f} (before Stage I "
                     f"{results['health']['before']['image_cos']:.2f})")
    if targets is not None:
        parts.append(f"the loss's targets for the captions peak on {targets['distinct_argmax']} distinct words, "
                     f"a class word for {targets['content_share']:.1%} of them")
    return ("Measured: " + "; ".join(parts) + ".") if parts else None


def summary_rows(results: dict) -> list[dict]:
    """Claim (a) asks whether native-resolution training lets the encoder use detail its
    fixed-size original cannot: the CoMP-VFM at native size against the original at its fixed
    size (how each is meant to be used), and both at 2x native (detail beyond training).
    Notes (measured, never a verdict): whether the original reads at all; both encoders at
    native size, where a row compares them at different sizes; what the word-space row's
    inputs looked like."""
    probes, dense = results["probes"], results["dense"]
    reading = [probe_row(probes, attribute, "fixed", "native") for attribute in READING]
    for row, attribute in zip(reading, READING):
        row["note"] = _join(reading_note(probes, attribute),
                            same_size_note(probes, "native", lambda r: r[PROBE_HEAD]["mean"], attribute))
    reading.append(probe_row(probes, FINE_DETAIL, "native 2x", "native 2x"))
    reading[-1]["note"] = reading_note(probes, FINE_DETAIL)
    dense_native = dense_row(dense, "fixed", "native")
    dense_native["note"] = same_size_note(dense, "native", lambda r: r["miou"]["mean"])
    words = zero_shot_row(results["word_space"])
    words["note"] = collapse_note(results)
    return [*reading, dense_native, dense_row(dense, "native 2x", "native 2x"),
            words, qa_row(results["qa"]), image_use_row(results["qa"])]
