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
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (std 0 for one seed)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


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
# ``results`` is the demo's results.json: seed, steps, train_tokens, probe_steps, timings
# {phase: s}, histories {step: [log entries]}, encoder_change, probes [rows],
# retrieval {model: {...}}; optionally summary [rows of summary_markdown], put first.

SECTIONS = ("## 1. Loss curves", "## 2. Linear probe on frozen encoder features",
            "## 3. Image-text retrieval through the alignment prototypes",
            "## 4. Resolutions not seen in training")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _by(rows: Sequence[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def loss_section(results: dict, figures: Path) -> list[str]:
    histories = results["histories"]
    loss_curves(histories, figures / "loss.png", window=max(1, results["steps"] // 10))
    rows = []
    for name, history in histories.items():
        k = max(1, len(history) // 10)
        first, last = history[:k], history[-k:]
        rows.append([name, len(history),
                     _mean([h["lm_loss"] for h in first]), _mean([h["lm_loss"] for h in last]),
                     _mean([h["align_loss"] for h in first if "align_loss" in h]),
                     _mean([h["align_loss"] for h in last if "align_loss" in h]),
                     f"{results['timings'].get(name, 0.0):.0f}"])
    return [
        SECTIONS[0], "",
        ("The four steps of `scripts/comp/comp_1b_siglip.sh` in its smoke scaling (batch 2 per step, "
         f"<= {results['train_tokens']} visual tokens per image, force_resize 384 -> 48 and 1024 -> 128, "
         "the reference learning rates), each starting from the previous step's checkpoint. "
         "Stage III trains without the alignment loss. Means over the first and last 10% of steps:"), "",
        markdown_table(["step", "steps", "lm_loss first", "lm_loss last", "align_loss first",
                        "align_loss last", "seconds"], rows), "",
        "![losses](figures/loss.png)", ""]


def probe_section(results: dict, figures: Path) -> list[str]:
    probes = results["probes"]
    encoders = list(dict.fromkeys(r["encoder"] for r in probes))
    at_train = _by(probes, setting="train-res")
    reference = _by(at_train, encoder=encoders[0])
    series = {f"{e}, {how}": ([r[key] for r in _by(at_train, encoder=e)], None)
              for e in encoders for how, key in (("linear", "linear"), ("k-NN", "knn"))}
    bars_with_errors([r["attribute"] for r in reference], series, figures / "probe.png",
                     chance=[r["chance"] for r in reference], ylabel="top-1 accuracy (val split)",
                     title="probes on frozen features at the training resolution, one seed", ylim=(0.0, 1.0))
    tokens = results["train_tokens"]
    return [
        SECTIONS[1], "",
        ("The original tiny SigLIP against the exported CoMP-VFM, same protocol: mean-pooled "
         "encoder tokens, standardised with train statistics, a linear classifier (full-batch AdamW, "
         f"lr 0.1, {results['probe_steps']} steps); k-NN (cosine, k = 20) alongside. Images at the "
         f"training budget (<= {tokens} merged tokens = {4 * tokens} patches per image), val split. "
         f"Training moved the encoder's weights by {100 * results['encoder_change']:.1f}% "
         "(relative L2 norm of the change)."), "",
        markdown_table(["attribute", "encoder", "linear top-1", "k-NN top-1", "chance", "train / val images"],
                       [[r["attribute"], r["encoder"], r["linear"], r["knn"], r["chance"],
                         f"{r['n_train']} / {r['n_val']}"] for r in at_train]), "",
        "![probe](figures/probe.png)", ""]


def retrieval_section(results: dict, figures: Path) -> list[str]:
    models = results["retrieval"]
    names = list(models)
    n = next(iter(models.values()))["images"]
    metrics = [(how, k) for how in ("prototypes", "features") for k in ("R@1", "R@5")]
    bars_with_errors([f"{how} {k}" for how, k in metrics],
                     {m: ([models[m][how][k] for how, k in metrics], None) for m in names},
                     figures / "retrieval.png", chance=[min(1.0, int(k[2:]) / n) for _, k in metrics],
                     ylabel="recall (image -> caption)", title=f"image -> caption recall, {n} pairs, one seed",
                     ylim=(0.0, 1.0))
    before, after = names[0], "after stage2b"
    examples = [[e["caption"], " · ".join(e["image_words"]),
                 " · ".join(models[after]["examples"][i]["image_words"]),
                 " · ".join(models[after]["examples"][i]["caption_words"])]
                for i, e in enumerate(models[before]["examples"])]
    return [
        SECTIONS[2], "",
        (f"{n} toyworld retrieval images with one caption each. Images go through encoder + merger "
         f"(<= {results['train_tokens']} merged tokens, native aspect) and are mean-pooled (F_v); "
         "captions go through the LLM's text pass, masked mean of the last hidden states (F_t). Both "
         "are scored against the L2-normalised word embeddings (the prototypes) as the alignment "
         "loss does: p_v = softmax(F_v W^T / embed_temp), p_t = the prior-sharpened Sinkhorn target. "
         "*prototypes*: captions ranked for each image by sum_k p_t log p_v; *features*: by "
         "cos(F_v, F_t). Ties count against the match. *after stage2b* is the model after Stage I+II. "
         "The cos columns are mean pairwise cosines between images' F_v and between captions' F_t: "
         "when every image's F_v points the same way, every image ranks the captions alike and "
         "recall@k falls to exactly k / n, whatever the captions."), "",
        markdown_table(["model", "prototypes R@1", "prototypes R@5", "features R@1", "features R@5",
                        "F_v cos", "F_t cos"],
                       [[m, r["prototypes"]["R@1"], r["prototypes"]["R@5"], r["features"]["R@1"],
                         r["features"]["R@5"], f"{r['image_cos']:.4f}", f"{r['caption_cos']:.4f}"]
                        for m, r in models.items()]), "",
        f"Chance: R@1 = {1 / n:.3f}, R@5 = {min(1.0, 5 / n):.3f}.", "",
        "![retrieval](figures/retrieval.png)", "",
        f"Top words of p_v (images) {before} and {after}, and of p_t (captions) {after}:", "",
        markdown_table(["caption", f"image, {before}", f"image, {after}", f"caption, {after}"], examples), ""]


def resolution_section(results: dict, figures: Path) -> list[str]:
    probes = results["probes"]
    encoders = list(dict.fromkeys(r["encoder"] for r in probes))
    settings = list(dict.fromkeys(r["setting"] for r in probes))
    links = []
    for attribute in dict.fromkeys(r["attribute"] for r in probes):
        rows = _by(probes, attribute=attribute)
        series = {e: ([next((r["linear"] for r in _by(rows, encoder=e, setting=s)), None) for s in settings], None)
                  for e in encoders}
        name = f"resolution_{attribute}.png"
        accuracy_vs_resolution(settings, series, figures / name, chance=rows[0]["chance"],
                               ylabel="linear probe top-1 (val)",
                               title=f"{attribute}: linear probe by evaluation resolution, one seed")
        links += [f"![resolution, {attribute}](figures/{name})", ""]
    return [
        SECTIONS[3], "",
        (f"No training image had more than {4 * results['train_tokens']} patches. *native*: the val "
         "images at their own size; *native 2x*: `val_hires`, the val scenes re-rendered at twice "
         "the size, classified by the probe trained on native-size train images."), "",
        markdown_table(["attribute", "setting", "encoder", "patches / image", "linear top-1",
                        "k-NN top-1", "chance"],
                       [[r["attribute"], r["setting"], r["encoder"], f"{r['patches_per_image']:.0f}",
                         r["linear"], r["knn"], r["chance"]] for r in probes]), "",
        *links]


def summary(results: dict) -> list[str]:
    """What moved, in numbers: start and end of the losses, before/after of each evaluation."""
    histories = results["histories"]
    names = list(histories)
    edge = max(1, results["steps"] // 10)

    def mean_of(name: str, key: str, last: bool) -> float:
        part = histories[name][-edge:] if last else histories[name][:edge]
        return sum(h[key] for h in part) / len(part)

    aligned = [n for n in names if "align_loss" in histories[n][0]]
    lines = [f"- lm_loss: {mean_of(names[0], 'lm_loss', False):.3f} at the start of {names[0]}, "
             + ", ".join(f"{mean_of(n, 'lm_loss', True):.3f} at the end of {n}" for n in names) + "."]
    if aligned:
        lines.append(f"- align_loss: {mean_of(aligned[0], 'align_loss', False):.3f} at the start of "
                     f"{aligned[0]}, {mean_of(aligned[-1], 'align_loss', True):.3f} at the end of {aligned[-1]}.")
    probes = results["probes"]
    encoders = list(dict.fromkeys(r["encoder"] for r in probes))
    for row in _by(probes, encoder=encoders[0]):
        after = _by(probes, encoder=encoders[-1], attribute=row["attribute"], setting=row["setting"])[0]
        lines.append(f"- linear probe, {row['attribute']} ({row['setting']}): {row['linear']:.3f} -> "
                     f"{after['linear']:.3f} (chance {row['chance']:.3f}).")
    models = results["retrieval"]
    first, stage2 = models[next(iter(models))], models.get("after stage2b")
    if stage2 is not None:
        lines.append(f"- retrieval through the prototypes, R@5: {first['prototypes']['R@5']:.3f} -> "
                     f"{stage2['prototypes']['R@5']:.3f} after Stage I+II (chance {min(1.0, 5 / first['images']):.3f}).")
    return lines


def write_report(out: str | Path, results: dict) -> Path:
    """``out/report.md`` and its PNGs under ``out/figures``."""
    out = Path(out)
    figures = out / "figures"
    timings = results["timings"]
    lead = ["## Summary", "", summary_markdown(results["summary"]), ""] if results.get("summary") else []
    lines = [
        "# CoMP demo: the SigLIP recipe on tiny models", "",
        (f"Seed {results['seed']}, {results['steps']} optimizer steps per training step, "
         f"{sum(timings.values()):.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})."), "",
        *lead,
        ("The models are tiny and random (SigLIP: 2 layers of width 32; Qwen2: 2 layers of width 64 "
         "with a toy vocabulary), trained for minutes on a CPU with the reference learning rates. "
         "Expect small effects and read every number against chance. Means over the first or "
         "last 10% of a step's logged steps; before -> after = original SigLIP -> CoMP-VFM, or the "
         "MLLM before Stage I -> after Stage II-b:"), "",
        *summary(results), "",
        *loss_section(results, figures), *probe_section(results, figures),
        *retrieval_section(results, figures), *resolution_section(results, figures)]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
