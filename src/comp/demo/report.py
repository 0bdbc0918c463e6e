"""Figures and the markdown report of ``comp demo`` and ``comp study``.

Figures are drawn with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot
state, so a user's backend and open figures are never touched. Only this module imports
matplotlib, and nothing imports this module at ``import comp`` time.

Every figure function is pure (inputs -> one PNG at ``path``; returns the path) and refuses
bad input with an error naming the figure and the series. Inputs with seeds are given as
``series = {name: (means, stds)}``, one value per group; ``stds`` is None for a single seed,
a mean of None marks a value not measured (drawn as "n/a", never dropped silently).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from comp.demo.common import mean_std

Series = Mapping[str, tuple[Sequence[float | None], Sequence[float] | None]]
CHANCE_STYLE = {"color": "0.25", "linestyle": "--", "linewidth": 1.2}
DPI = 100


# ----------------------------------------------------------------------------- helpers


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats printed with 3 decimals, None as "-"."""
    def cell(v: object) -> str:
        text = "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _plain(text: object) -> str:
    """Text matplotlib draws as written: ``$`` would start mathtext, control characters
    (byte-level tokens) would draw as missing glyphs."""
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(text))
    return (text or "''").replace("$", r"\$")


def _figure(size: tuple[float, float], nrows: int = 1, ncols: int = 1, **subplot_kw):
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _checked_series(path: Path | str, series: Series, n: int, what: str) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """``series`` as float arrays (None -> nan), each checked to hold ``n`` finite values."""
    if not series:
        raise ValueError(f"{path}: no series to plot")
    out = []
    for name, (means, stds) in series.items():
        if len(means) != n or (stds is not None and len(stds) != n):
            raise ValueError(f"{path}: series {name!r} needs one mean (and std) per {what} ({n}), got "
                             f"{len(means)} means and {'no' if stds is None else len(stds)} stds")
        m = np.array([math.nan if v is None else float(v) for v in means])
        s = None if stds is None else np.array([float(v) for v in stds])
        given = [float(v) for v in means if v is not None] + ([] if s is None else list(s))
        if not all(math.isfinite(v) for v in given) or (s is not None and (s < 0).any()):
            raise ValueError(f"{path}: series {name!r} has a non-finite mean or a negative/non-finite std: "
                             f"means {list(means)}, stds {None if stds is None else list(stds)}")
        out.append((str(name), m, s))
    return out


def _chance_line(ax, path: Path | str, chance: float | Sequence[float] | None, x: np.ndarray,
                 half: float, label: str = "chance") -> None:
    """A dashed chance level: one across the axes (a float) or one per group (a list)."""
    if chance is None:
        return
    if isinstance(chance, (int, float)):
        ax.axhline(float(chance), label=label, **CHANCE_STYLE)
        return
    if len(chance) != len(x):
        raise ValueError(f"{path}: chance needs one value per group ({len(x)}), got {len(chance)}")
    ax.hlines([float(c) for c in chance], x - half, x + half, label=label, **CHANCE_STYLE)


def _spread_note(checked) -> str | None:
    return "mean ± 1 std over seeds" if any(s is not None for _, _, s in checked) else None


# ----------------------------------------------------------------------------- figures


def loss_curves(histories: Mapping[str, Sequence[Mapping]], path: str | Path, *,
                window: int | None = None) -> Path:
    """lm_loss and align_loss (two panels) of the training stages in a row: per logged step
    (thin) and its trailing mean over ``window`` steps (thick; default a tenth of the longest
    stage), one colour per stage, dotted lines where a stage starts."""
    if not histories or not any(histories.values()):
        raise ValueError(f"{path}: no stage has logged steps")
    for stage, history in histories.items():
        for i, entry in enumerate(history):
            if "step" not in entry or "lm_loss" not in entry:
                raise ValueError(f"{path}: stage {stage!r}, log entry {i} lacks 'step' or 'lm_loss': {dict(entry)}")
    window = window or max(1, max(len(h) for h in histories.values()) // 10)
    fig, axes = _figure((9, 6.5), 2, 1, sharex=True)
    panels = {"lm_loss": (axes[0, 0], "lm_loss (nats / answer token)"),
              "align_loss": (axes[1, 0], "align_loss (nats)")}
    offset, drawn = 0, set()
    for i, (stage, history) in enumerate(histories.items()):
        for key, (ax, _) in panels.items():
            logged = [h for h in history if key in h]
            if not logged:
                continue
            drawn.add(key)
            xs = [offset + h["step"] for h in logged]
            ys = [float(h[key]) for h in logged]
            ax.plot(xs, ys, color=f"C{i}", alpha=0.3, linewidth=0.8)
            ax.plot(xs, moving_average(ys, window), color=f"C{i}", linewidth=2.2, label=_plain(stage))
        if offset:
            for ax, _ in panels.values():
                ax.axvline(offset + 0.5, color="0.6", linestyle=":", linewidth=1)
        offset += max((h["step"] for h in history), default=0)
    for key, (ax, ylabel) in panels.items():
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if key in drawn:
            ax.legend(title=f"thin: per step, thick: mean of last {window}", fontsize=8, title_fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no stage logged {key}", transform=ax.transAxes, ha="center", va="center")
    axes[0, 0].set_title("training losses, stages in a row")
    axes[1, 0].set_xlabel("optimizer step")
    return _save(fig, path)


def bars_with_errors(groups: Sequence[str], series: Series, path: str | Path, *,
                     chance: float | Sequence[float] | None = None, ylabel: str, title: str,
                     ylim: tuple[float, float] | None = None) -> Path:
    """Grouped bars, one bar per series in each group, with ±1 std error bars over seeds and a
    dashed chance level (one for all groups, or one per group)."""
    checked = _checked_series(path, series, len(groups), "group")
    fig, ((ax,),) = _figure((max(6.0, 1.1 + 0.45 * len(groups) * len(checked)), 4.5))
    x = np.arange(len(groups), dtype=float)
    width = 0.8 / len(checked)
    for j, (name, m, s) in enumerate(checked):
        pos = x - 0.4 + width * (j + 0.5)
        measured = ~np.isnan(m)
        ax.bar(pos, np.where(measured, m, 0.0), width * 0.95, color=f"C{j}", label=_plain(name))
        if s is not None:
            ax.errorbar(pos[measured], m[measured], yerr=s[measured], fmt="none", ecolor="black",
                        capsize=3, linewidth=1)
        for p in pos[~measured]:
            ax.annotate("n/a", (p, 0.0), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8)
    _chance_line(ax, path, chance, x, 0.45)
    long = max(len(g) for g in groups) > 12 if groups else False
    ax.set_xticks(x, [_plain(g) for g in groups], rotation=20 if long else 0, ha="right" if long else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(_plain(title))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title=_spread_note(checked), fontsize=8, title_fontsize=8)
    return _save(fig, path)


def accuracy_vs_resolution(resolutions: Sequence[str], series: Series, path: str | Path, *,
                           chance: float | Sequence[float] | None = None,
                           ylabel: str = "top-1 accuracy", title: str = "accuracy vs evaluation resolution",
                           ylim: tuple[float, float] | None = (0.0, 1.0)) -> Path:
    """One line per series over the evaluation resolutions (categories in the given order),
    ±1 std error bars over seeds, a dashed chance level; a mean of None leaves a gap."""
    checked = _checked_series(path, series, len(resolutions), "resolution")
    fig, ((ax,),) = _figure((7.5, 4.5))
    x = np.arange(len(resolutions), dtype=float)
    for j, (name, m, s) in enumerate(checked):
        ax.errorbar(x, m, yerr=s, marker="o", capsize=3, color=f"C{j}", label=_plain(name))
    _chance_line(ax, path, chance, x, 0.3)
    ax.set_xticks(x, [_plain(r) for r in resolutions])
    ax.set_xlim(-0.5, len(resolutions) - 0.5)
    ax.set_xlabel("evaluation resolution")
    ax.set_ylabel(ylabel)
    ax.set_title(_plain(title))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(title=_spread_note(checked), fontsize=8, title_fontsize=8)
    return _save(fig, path)


def prototype_words(rows: Sequence[tuple[str, Sequence[tuple[str, float]]]], path: str | Path, *,
                    title: str = "top words of p_v", uniform: float | None = None) -> Path:
    """One small horizontal bar chart per image or class: its most probable words under
    p_v = softmax(F_v W^T / T), most probable on top; ``uniform`` (1/K) as a dashed line."""
    if not rows:
        raise ValueError(f"{path}: no rows to plot")
    for label, words in rows:
        if not words or not all(math.isfinite(p) and 0.0 <= p <= 1.0 for _, p in words):
            raise ValueError(f"{path}: row {label!r} needs (word, probability in [0, 1]) pairs, got {list(words)}")
    ncols = min(3, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    k = max(len(words) for _, words in rows)
    fig, axes = _figure((3.6 * ncols, (0.3 * k + 1.2) * nrows), nrows, ncols)
    top = max(p for _, words in rows for _, p in words)
    for i, ax in enumerate(axes.flat):
        if i >= len(rows):
            ax.set_axis_off()
            continue
        label, words = rows[i]
        y = k - 1 - np.arange(len(words))  # most probable on top, one bar height for all panels
        ax.barh(y, [p for _, p in words], color="C0")
        ax.set_yticks(y, [_plain(w) for w, _ in words])
        ax.set_ylim(-0.5, k - 0.5)
        ax.set_xlim(0, top * 1.15)
        if uniform is not None:
            ax.axvline(uniform, label="uniform 1/K", **CHANCE_STYLE)
            if i == 0:
                ax.legend(fontsize=7, loc="lower right")
        ax.set_title(_plain(label), fontsize=9)
        ax.set_xlabel("p_v (probability)", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(_plain(title))
    return _save(fig, path)


def study_bars(cells: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *,
               metrics: Sequence[str] | None = None, chance: float | Sequence[float] | None = None,
               ylabel: str = "accuracy", title: str = "ablations") -> Path:
    """Grouped bars of a study: a group per metric, a bar per variant (mean ± std over its
    seeds); a cell not computed yet is drawn as "n/a"."""
    metrics = list(metrics) if metrics is not None else _study_metrics(cells)
    series = {}
    for variant, row in cells.items():
        stats = [mean_std(row[m]) if row.get(m) else (None, 0.0) for m in metrics]
        series[variant] = ([s[0] for s in stats], [s[1] for s in stats])
    return bars_with_errors(metrics, series, path, chance=chance, ylabel=ylabel, title=title)


# ----------------------------------------------------------------------------- markdown


def _study_metrics(cells: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    return list(dict.fromkeys(m for row in cells.values() for m in row))


def study_table_markdown(cells: Mapping[str, Mapping[str, Sequence[float]]], *,
                         metrics: Sequence[str] | None = None, reference: str | None = None) -> str:
    """Variants x metrics, "mean ± std" over each cell's per-seed values, the seed count, and
    with ``reference`` (the full recipe) each mean's difference to the reference's; a cell not
    computed yet shows "-"."""
    metrics = list(metrics) if metrics is not None else _study_metrics(cells)
    if reference is not None and reference not in cells:
        raise ValueError(f"study table: reference variant {reference!r} is not among {list(cells)}")
    ref = {m: mean_std(cells[reference][m])[0] for m in metrics
           if reference is not None and cells[reference].get(m)}
    rows = []
    for variant, row in cells.items():
        seeds = sorted({len(row[m]) for m in metrics if row.get(m)})
        line = [variant, "/".join(map(str, seeds)) or "0"]
        for m in metrics:
            if not row.get(m):
                line.append("-")
                continue
            mean, std = mean_std(row[m])
            text = f"{mean:.3f} ± {std:.3f}"
            if m in ref and variant != reference:
                text += f" ({mean - ref[m]:+.3f})"
            line.append(text)
        rows.append(line)
    table = markdown_table(["variant", "seeds", *metrics], rows)
    if ref:
        table += f"\n\nIn brackets: difference of the mean to {reference}'s."
    return table


VERDICTS = {True: "supported", False: "not supported", "supported": "supported",
            "not supported": "not supported"}
SUMMARY_KEYS = ("claim", "metric", "before", "after", "chance", "spread")


def _number(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def summary_markdown(rows: Sequence[Mapping], *, rule: str | None = None) -> str:
    """The report's leading table (claim, metric, before, after, chance, spread, verdict)
    and one plain sentence per claim saying whether this run supports it.

    The verdict is the caller's, from a rule fixed before the run (``rule``, printed when
    given): ``verdict`` True/False or "supported"/"not supported", or ``supported`` True/False.
    ``chance`` and ``spread`` (the uncertainty the rule used, e.g. std over seeds) may be None;
    an optional ``note`` says what was tried or why."""
    table, sentences = [], []
    for i, row in enumerate(rows):
        missing = [k for k in SUMMARY_KEYS if k not in row] + (
            [] if "verdict" in row or "supported" in row else ["verdict (or supported)"])
        if missing:
            raise ValueError(f"summary row {i} ({row.get('claim', '?')!r}) lacks {missing}")
        given = row["verdict"] if "verdict" in row else row["supported"]
        if given not in VERDICTS:
            raise ValueError(f"summary row {i} ({row['claim']!r}): verdict must be True/False or "
                             f"'supported'/'not supported', got {given!r}")
        verdict = VERDICTS[given]
        spread = "-" if row["spread"] is None else f"± {row['spread']:.3f}"
        table.append([row["claim"], row["metric"], _number(row["before"]), _number(row["after"]),
                      _number(row["chance"]), spread, verdict])
        does = "supports" if verdict == "supported" else "does not support"
        spread_text = "no spread measured" if row["spread"] is None else f"spread {spread}"
        sentence = (f"- This run {does} the claim \"{row['claim']}\": {row['metric']} "
                    f"{_number(row['before'])} before, {_number(row['after'])} after "
                    f"(chance {_number(row['chance'])}, {spread_text}).")
        if row.get("note"):
            sentence += f" {row['note']}"
        sentences.append(sentence)
    header = ["claim", "metric", "before", "after", "chance", "spread", "verdict"]
    lead = [f"Verdict rule, fixed before the run: {rule}.", ""] if rule else []
    return "\n".join([*lead, markdown_table(header, table), "", *sentences])


# ----------------------------------------------------------------------------- report.md
# ``results`` is comp demo's results.json (comp.demo.pipeline.run_pipeline plus summary rows
# and timings): seed, plan, image_size, toy_quality, histories, probes, word_space, qa.

SETTINGS = ("fixed", "native", "native 2x")


def _probe(probes: Sequence[dict], attribute: str, encoder: str, setting: str) -> dict | None:
    return next((p for p in probes if (p["attribute"], p["encoder"], p["setting"]) == (attribute, encoder, setting)),
                None)


def _stat(row: dict | None, head: str) -> tuple[float | None, float]:
    """(mean, std over probe seeds) of a probe row's head; (None, 0) where it was not run."""
    if row is None or row.get(head) is None:
        return None, 0.0
    return row[head]["mean"], row[head]["std"]


def _heads(probes: Sequence[dict]) -> list[str]:
    return [h for h in ("linear", "attentive") if any(p.get(h) is not None for p in probes)]


def loss_section(results: dict, figures: Path) -> list[str]:
    histories = results["histories"]
    loss_curves(histories, figures / "loss.png")
    rows = []
    for name, history in histories.items():
        k = max(1, len(history) // 10)
        align = [h["align_loss"] for h in history if "align_loss" in h]
        rows.append([name, len(history), _mean([h["lm_loss"] for h in history[:k]]),
                     _mean([h["lm_loss"] for h in history[-k:]]),
                     _mean(align[:k]), _mean(align[-k:])])
    return ["## Training losses per stage", "",
            "The script's four steps in a row, each from the previous one's checkpoint; means over the "
            "first and last 10% of each stage's logged steps.", "",
            markdown_table(["stage", "logged steps", "lm_loss first", "lm_loss last", "align_loss first",
                            "align_loss last"], rows), "",
            "![training losses](figures/loss.png)", ""]


def health_section(results: dict) -> list[str]:
    health = results["health"]
    rows = [[name, f"{h['norm_ratio']:.1f}", f"{h['image_specific']:.2f}", f"{h['image_cos']:.3f}"]
            for name, h in health.items()]
    cos_images = next(iter(health.values()))["cos_images"]
    return ["## Merged visual tokens per stage", "",
            "On the first held-out QA images: the tokens' mean norm over the LLM's mean word-embedding norm, "
            "and their image-specific share (mean distance to the one vector common to all tokens, over "
            "their mean norm). A share near 0 means the merger emits nearly the same tokens for every "
            "image: after RMSNorm the LLM can no longer tell images apart. Image cos: the mean cosine "
            f"between distinct images' F_v (the alignment loss's image feature) over {cos_images} retrieval "
            "images; near 1 every image offers the same word distribution (the word space has collapsed).", "",
            markdown_table(["model", "norm / word norm", "image-specific share", "image cos"], rows), ""]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def probe_section(results: dict, figures: Path) -> list[str]:
    probes = results["probes"]
    attributes = list(dict.fromkeys(p["attribute"] for p in probes))
    encoders = list(dict.fromkeys(p["encoder"] for p in probes))
    heads = _heads(probes)
    seeds = results["plan"]["probe_seeds"]
    lines = ["## Probes on frozen encoder features", "",
             f"Original toy SigLIP against the CoMP-VFM, same protocol for both: a linear head on "
             f"mean-pooled tokens and an attentive head on all tokens (for "
             f"{', '.join(results['plan']['attentive_attributes'])} only: a few tokens hold the label), "
             f"{seeds} probe seeds, bars = mean ± 1 std over them, dashed = chance. *fixed*: every image "
             f"{results['image_size']} x {results['image_size']} (train and val); *native*: native size; "
             "*native 2x*: the val scenes rendered at twice the size, classified by the native-trained probe; "
             "*large, fixed* (digits and words): large glyphs at the fixed size, i.e. whether the encoder reads "
             "at all (the other settings ask about small glyphs in large scenes).", ""]
    for setting in SETTINGS:
        series = {f"{e}, {h}": tuple(map(list, zip(*[_stat(_probe(probes, a, e, setting), h) for a in attributes])))
                  for e in encoders for h in heads}
        name = f"probe_{setting.replace(' ', '-')}.png"
        bars_with_errors(attributes, series, figures / name,
                         chance=[_probe(probes, a, encoders[0], setting)["chance"] for a in attributes],
                         ylabel="top-1 accuracy (val)", title=f"probes at {setting} resolution", ylim=(0.0, 1.0))
        lines += [f"![probes, {setting}](figures/{name})", ""]
    lines += ["### Accuracy vs resolution", ""]
    for attribute in attributes:
        series = {f"{e}, {h}": tuple(map(list, zip(*[_stat(_probe(probes, attribute, e, s), h) for s in SETTINGS])))
                  for e in encoders for h in heads
                  if any(_stat(_probe(probes, attribute, e, s), h)[0] is not None for s in SETTINGS)}
        name = f"resolution_{attribute}.png"
        accuracy_vs_resolution(list(SETTINGS), series, figures / name,
                               chance=_probe(probes, attribute, encoders[0], "native")["chance"],
                               ylabel="top-1 accuracy (val)", title=f"{attribute}: accuracy vs evaluation resolution")
        lines += [f"![{attribute} vs resolution](figures/{name})", ""]

    def cell(row: dict, head: str) -> str:
        mean, std = _stat(row, head)
        return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"

    lines += [markdown_table(["attribute", "encoder", "setting", "patches / image", *heads, "chance"],
                             [[p["attribute"], p["encoder"], p["setting"], f"{p['patches_per_image']:.0f}",
                               *[cell(p, h) for h in heads], p["chance"]] for p in probes]), ""]
    return lines


def word_space_section(results: dict, figures: Path) -> list[str]:
    words = results["word_space"]
    models = list(words)
    attributes = list(words[models[0]]["zero_shot"])
    bars_with_errors(attributes, {m: ([words[m]["zero_shot"][a]["top1"] for a in attributes], None) for m in models},
                     figures / "zero_shot.png", chance=[words[models[0]]["zero_shot"][a]["chance"] for a in attributes],
                     ylabel="top-1 accuracy (val)", title="zero-shot through the class words' prototypes, one seed",
                     ylim=(0.0, 1.0))
    after = words[models[-1]]["retrieval"]
    panel = [(f"{m}: {ex['caption'][:40]}", [tuple(wp) for wp in ex["image_word_probs"]])
             for m in models for ex in words[m]["retrieval"]["examples"]]
    prototype_words(panel, figures / "prototype_words.png",
                    title="top words of p_v = softmax(F_v W^T / T) per image", uniform=None)
    return ["## Word space (before Stage I, after Stage II-b)", "",
            "Zero-shot: each val image's class is the class word whose prototype row scores highest "
            "under p_v; retrieval: captions ranked per image through the prototypes (sum_k p_t log p_v). "
            "Image cos / caption cos: the mean cosine between distinct images' F_v / captions' F_t "
            "(1: every image, or every caption, has the same word distribution to offer).", "",
            markdown_table(["model", *[f"zero-shot {a}" for a in attributes], "retrieval R@1", "R@5", "images",
                            "image cos", "caption cos"],
                           [[m, *[words[m]["zero_shot"][a]["top1"] for a in attributes],
                             words[m]["retrieval"]["prototypes"]["R@1"], words[m]["retrieval"]["prototypes"]["R@5"],
                             words[m]["retrieval"]["images"], words[m]["retrieval"].get("image_cos"),
                             words[m]["retrieval"].get("caption_cos")] for m in models]), "",
            f"Retrieval chance: R@1 = {1 / after['images']:.3f}, R@5 = {min(1.0, 5 / after['images']):.3f}.", "",
            "![zero-shot](figures/zero_shot.png)", "",
            "![prototype words](figures/prototype_words.png)", ""]


def dense_section(results: dict, figures: Path) -> list[str]:
    dense = results["dense"]
    encoders = list(dict.fromkeys(d["encoder"] for d in dense))
    settings = list(dict.fromkeys(d["setting"] for d in dense))
    pick = {(d["encoder"], d["setting"]): d for d in dense}
    first = dense[0]
    bars_with_errors(settings, {e: ([pick[e, s]["miou"]["mean"] for s in settings],
                                    [pick[e, s]["miou"]["std"] for s in settings]) for e in encoders},
                     figures / "dense.png", ylabel="mIoU (val)", ylim=(0.0, 1.0),
                     title="linear segmentation probe on frozen patch tokens")
    return ["## Dense probe (segmentation)", "",
            f"A linear head on every frozen patch token, logits upsampled to the label map "
            f"(`comp probe --task segmentation`'s head, loss and mIoU; one fixed learning rate), "
            f"{first['classes']} classes, {first['n_train']} train / {first['n_val']} val images of toyworld's "
            f"seg split, {results['plan']['probe_seeds']} head seeds (mean ± std); *fixed*: every image "
            f"{results['image_size']} x {results['image_size']}; *native 2x*: val rendered at twice the size, "
            "scored with the native head. Sampling se: from 5 disjoint folds of the val images.", "",
            markdown_table(["encoder", "setting", "tokens / image", "mIoU", "sampling se", "pixel acc"],
                           [[d["encoder"], d["setting"], f"{d['tokens_per_image']:.0f}",
                             f"{d['miou']['mean']:.3f} ± {d['miou']['std']:.3f}", f"{d['miou_se']:.3f}",
                             f"{d['pixel_acc']['mean']:.3f}"] for d in dense]), "",
            "![dense probe](figures/dense.png)", ""]


def random_words_floor(captions: dict) -> str:
    """The F_t floor (comp.demo.claims.caption_diversity) where the run measured it."""
    floor = captions.get("text_feature_cos_random_words")
    return "" if floor is None else (f" (random texts of the captions' own words, as long: {floor:.3f}, the "
                                     f"floor this LLM's features allow)")


def captions_section(results: dict) -> list[str]:
    c = results["captions"]
    t = c["targets"]
    return ["### How much the captions differ", "",
            f"The alignment loss's targets come from the captions' text features F_t: captions that all "
            f"read alike give every image the same target. Mean pairwise cosine over {c['captions']} "
            f"retrieval captions: F_t {c['text_feature_cos']:.3f}{random_words_floor(c)}, mean word embedding "
            f"{c['word_embedding_cos']:.3f}, bag of words {c['bag_of_words_cos']:.3f} (1: all the same); "
            f"{c['tokens_per_caption']:.1f} tokens per caption; most common words: "
            f"{', '.join(c['top_words'])}.", "",
            f"What the alignment loss makes of them (its own targets p_t, the run's word prior): they peak on "
            f"{t['distinct_argmax']} distinct words (commonest: "
            f"{', '.join(f'{w.strip() or repr(w)} {n}' for w, n in t['top_targets'])}), on a class word (colour, shape, "
            f"digit or word) for {t['content_share']:.1%} of the captions, with mean top probability "
            f"{t['max_p']:.2f}; mean pairwise cosine of the p_t {t['target_cos']:.2f}. The LLM's last hidden "
            f"states' mean cosine with the next token's prototype: {t['next_token_cos']:.2f}; with the current "
            f"token's: {t['current_token_cos']:.2f} (where the first is larger, a caption's pooled states name "
            "what would come next more than what the caption says).", ""]


def qa_section(results: dict, figures: Path) -> list[str]:
    qa = results["qa"]
    variants = list(qa)
    types = list(qa[variants[0]]["by_type"])
    groups = ["all", *types]
    n = qa[variants[0]]["n"]
    majority = [sum(t["majority"] * t["n"] for t in qa[variants[0]]["by_type"].values()) / max(1, n),
                *[qa[variants[0]]["by_type"][t]["majority"] for t in types]]
    bars_with_errors(groups, {v: ([qa[v]["accuracy"], *[qa[v]["by_type"][t]["accuracy"] for t in types]], None)
                              for v in variants},
                     figures / "qa.png", chance=majority, ylabel="exact match", ylim=(0.0, 1.0),
                     title="CoMP-MM after Stage III by question type and resolution (dashed: majority answer)")
    bars_with_errors(variants, {side: ([qa[v]["image_use"][f"nll_{side}"] for v in variants],
                                       [qa[v]["image_use"]["difference_se"] for v in variants])
                                for side in ("right", "wrong")},
                     figures / "image_use.png", ylabel="answer NLL (nats / token)",
                     title="answer NLL with the right image vs another record's image (error bar: se of the difference)")
    return ["## CoMP-MM after Stage III", "",
            f"Exact match on {n} held-out questions by type and resolution; the dashed line is the "
            "majority answer of each type (what a model that ignores its images reaches).", "",
            markdown_table(["resolution", "all", *types],
                           [[v, qa[v]["accuracy"], *[qa[v]["by_type"][t]["accuracy"] for t in types]] for v in variants]),
            "", "![QA](figures/qa.png)", "",
            "### Image use", "",
            "Answer NLL with each question's own image and with another record's image (same prompt "
            "and answer); a model that reads its images is clearly worse with the wrong one.", "",
            markdown_table(["resolution", "NLL right", "NLL wrong", "wrong - right", "se", "right better"],
                           [[v, u["nll_right"], u["nll_wrong"], u["difference"], u["difference_se"], u["right_better"]]
                            for v, u in ((v, qa[v]["image_use"]) for v in variants)]), "",
            "![image use](figures/image_use.png)", ""]


def write_report(out: str | Path, results: dict, *, rule: str) -> Path:
    """``out/report.md`` (the summary table first, under the verdict ``rule``) and its PNGs
    under ``out/figures``."""
    out = Path(out)
    figures = out / "figures"
    q = results["toy_quality"]
    timings = results["timings"]
    reading = (f" The reading toy (`--toy reading`): zero-shot digits in large type "
               f"{q['siglip']['digit_large_accuracy']:.3f} (chance {q['siglip']['digit_large_chance']:.3f})."
               if results["plan"].get("toys") == "reading" else "")
    lines = ["# comp demo: the SigLIP recipe on toy-pretrained originals", "",
             "## Summary", "", summary_markdown(results["summary"], rule=rule), "",
             "## Setup", "",
             f"Seed {results['seed']}; {results['plan']['steps']} optimizer steps per recipe step "
             f"({results['plan']['steps'] * results['plan']['stage3_steps_scale']} in Stage III); toy "
             f"SigLIP at {results['image_size']} px. Toy originals: SigLIP zero-shot colour "
             f"{q['siglip']['colour_accuracy']:.3f} (chance {q['siglip']['colour_chance']:.3f}), shape "
             f"{q['siglip']['shape_accuracy']:.3f} (chance {q['siglip']['shape_chance']:.3f}); LM held-out "
             f"perplexity {q['lm']['perplexity']:.2f} (unigram {q['lm']['unigram_perplexity']:.2f}).{reading}", "",
             *loss_section(results, figures), *health_section(results), *probe_section(results, figures),
             *dense_section(results, figures), *word_space_section(results, figures), *captions_section(results),
             *qa_section(results, figures),
             "## Timings", "",
             markdown_table(["phase", "seconds"], [*[[k, f"{v:.0f}"] for k, v in timings.items()],
                                                   ["total", f"{sum(timings.values()):.0f}"]]), ""]
    path = out / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
