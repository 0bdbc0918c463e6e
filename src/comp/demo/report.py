"""Figures and the markdown report of ``comp demo``, drawn with Pillow alone (no plotting
dependency): line charts for loss curves, grouped bar charts for before/after numbers.

Charts map data to pixels through ``Axes``: ``x_px(x)`` / ``y_px(y)``; the plot area is
``box`` = (left, top, right, bottom) in pixels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75))
GRID = (225, 225, 225)
INK = (40, 40, 40)
SIZE = (820, 420)
MARGIN = (70, 44, 24, 58)  # left, top, right, bottom


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"axis range must be finite, got [{lo}, {hi}]")
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}"


@dataclass
class Axes:
    box: tuple[int, int, int, int]
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def x_px(self, x: float) -> float:
        (left, _, right, _), (x0, x1) = self.box, self.x_range
        return left + (x - x0) / ((x1 - x0) or 1.0) * (right - left)

    def y_px(self, y: float) -> float:
        (_, top, _, bottom), (y0, y1) = self.box, self.y_range
        return bottom - (y - y0) / ((y1 - y0) or 1.0) * (bottom - top)


def _canvas(title: str, xlabel: str, ylabel: str) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple]:
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    box = (MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3])
    draw.text((SIZE[0] // 2, 14), title, fill=INK, font=_font(16), anchor="mt")
    draw.text(((box[0] + box[2]) // 2, SIZE[1] - 8), xlabel, fill=INK, font=_font(13), anchor="md")
    label = Image.new("RGBA", (box[3] - box[1], 18), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((label.width // 2, 9), ylabel, fill=INK, font=_font(13), anchor="mm")
    image.paste(label.rotate(90, expand=True), (6, box[1]), label.rotate(90, expand=True))
    return image, draw, box


def _y_axis(draw: ImageDraw.ImageDraw, axes: Axes, ticks: Sequence[float]) -> None:
    left, _, right, _ = axes.box
    for t in ticks:
        y = axes.y_px(t)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((left - 6, y), _label(t), fill=INK, font=_font(11), anchor="rm")


def _legend(draw: ImageDraw.ImageDraw, box: tuple, labels: Sequence[str],
            colours: Sequence[tuple[int, int, int]] = PALETTE) -> None:
    x, y = box[0] + 10, box[1] + 8
    draw.rectangle([x - 4, y - 2, box[0] + 224, y + 17 * len(labels) + 2], fill="white")
    for i, name in enumerate(labels):
        colour = colours[i % len(colours)]
        draw.rectangle([x, y + 3, x + 14, y + 11], fill=colour)
        draw.text((x + 20, y + 7), name, fill=INK, font=_font(12), anchor="lm")
        y += 17


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    width: int = 2
    colour: tuple[int, int, int] | None = None  # None: the palette's, by position


def line_chart(path: str | Path, series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
               sections: Sequence[tuple[float, str]] = ()) -> Path:
    """Lines on shared axes; ``sections`` = (x where a section starts, its name), drawn as
    labelled vertical separators (the training steps of a multi-stage run)."""
    points = [(x, y) for s in series for x, y in zip(s.x, s.y)]
    if not points:
        raise ValueError(f"{path}: nothing to plot")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    y_ticks = nice_ticks(min(ys), max(ys))
    image, draw, box = _canvas(title, xlabel, ylabel)
    axes = Axes(box, (min(xs), max(xs)), (y_ticks[0], y_ticks[-1]))
    _y_axis(draw, axes, y_ticks)
    for t in nice_ticks(min(xs), max(xs), 8):
        if min(xs) <= t <= max(xs):
            draw.text((axes.x_px(t), box[3] + 6), _label(t), fill=INK, font=_font(11), anchor="mt")
    labels = []
    for x, name in sections:
        px = axes.x_px(x)
        draw.line([(px, box[1]), (px, box[3])], fill=(150, 150, 150), width=1)
        labels.append(((px + 4, box[3] - 4), name))
    for i, s in enumerate(series):
        colour = s.colour or PALETTE[i % len(PALETTE)]
        pts = [(axes.x_px(x), axes.y_px(y)) for x, y in zip(s.x, s.y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=s.width)
        elif pts:
            (x, y), = pts
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    for xy, name in labels:  # on top of the lines, on a white patch
        draw.rectangle(draw.textbbox(xy, name, font=_font(12), anchor="ld"), fill="white")
        draw.text(xy, name, fill=(90, 90, 90), font=_font(12), anchor="ld")
    draw.rectangle(box, outline=INK)
    _legend(draw, (box[2] - 230, box[1]), [s.label for s in series],
            [s.colour or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)])
    return _save(image, path)


def bar_chart(path: str | Path, groups: Sequence[str], bars: Sequence[tuple[str, Sequence[float]]], *,
              title: str, ylabel: str, y_max: float | None = None,
              reference: tuple[Sequence[float], str] | None = None) -> Path:
    """Grouped bars: ``bars`` = (label, one value per group); ``reference`` = (one value per
    group, label), drawn as a dashed mark across each group (e.g. chance level)."""
    values = [v for _, vs in bars for v in vs] + (list(reference[0]) if reference else [])
    if not values or any(len(vs) != len(groups) for _, vs in bars):
        raise ValueError(f"{path}: every bar series needs one value per group ({len(groups)})")
    y_ticks = nice_ticks(0.0, y_max if y_max is not None else max(values))
    image, draw, box = _canvas(title, "", ylabel)
    axes = Axes(box, (0.0, float(len(groups))), (0.0, y_ticks[-1]))
    _y_axis(draw, axes, y_ticks)
    width = 0.8 / len(bars)
    for g, name in enumerate(groups):
        draw.text((axes.x_px(g + 0.5), box[3] + 6), name, fill=INK, font=_font(12), anchor="mt")
        for b, (_, vs) in enumerate(bars):
            x0 = axes.x_px(g + 0.1 + b * width)
            x1 = axes.x_px(g + 0.1 + (b + 1) * width) - 2
            draw.rectangle([x0, axes.y_px(vs[g]), x1, axes.y_px(0.0)], fill=PALETTE[b % len(PALETTE)])
            draw.text(((x0 + x1) / 2, axes.y_px(vs[g]) - 2), f"{vs[g]:.2f}", fill=INK, font=_font(10),
                      anchor="md")
        if reference:
            y = axes.y_px(reference[0][g])
            for x in range(int(axes.x_px(g + 0.05)), int(axes.x_px(g + 0.95)), 8):
                draw.line([(x, y), (x + 4, y)], fill=INK, width=1)
    draw.rectangle(box, outline=INK)
    _legend(draw, (box[2] - 230, box[1]), [name for name, _ in bars])
    if reference:
        draw.text((box[2] - 220, box[1] + 15 + 17 * len(bars)), f"- - {reference[1]}", fill=INK,
                  font=_font(12), anchor="lm")
    return _save(image, path)


def _save(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats printed with 3 decimals."""
    def cell(v: object) -> str:
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
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


# ----------------------------------------------------------------------------- report.md
# ``results`` is the demo's results.json: seed, steps, train_tokens, probe_steps, timings
# {phase: s}, histories {step: [log entries]}, probes [rows], retrieval {model: {...}}.

SECTIONS = ("## 1. Loss curves", "## 2. Linear probe on frozen encoder features",
            "## 3. Image-text retrieval through the alignment prototypes",
            "## 4. Resolutions not seen in training")


def _mean(values: Sequence[float]) -> float | str:
    return sum(values) / len(values) if values else "-"


def loss_section(results: dict, figures: Path) -> list[str]:
    histories, steps = results["histories"], results["steps"]
    window = max(1, steps // 10)
    offset = 0
    # per key: x, y, the moving average (restarting at each step), section marks
    curves: dict[str, tuple[list[float], list[float], list[float], list[tuple[float, str]]]] = {
        "lm_loss": ([], [], [], []), "align_loss": ([], [], [], [])}
    for name, history in histories.items():
        for key, (xs, ys, smooth, marks) in curves.items():
            logged = [h for h in history if key in h]
            if logged:
                marks.append((offset + 1, name))
            xs += [offset + h["step"] for h in logged]
            ys += [float(h[key]) for h in logged]
            smooth += moving_average([float(h[key]) for h in logged], window)
        offset += max((h["step"] for h in history), default=0)
    for key, (xs, ys, smooth, marks) in curves.items():
        line_chart(figures / f"{key}.png",
                   [Series(f"{key} per step", xs, ys, width=1, colour=(150, 185, 225)),
                    Series(f"mean of the last {window}", xs, smooth, width=3, colour=PALETTE[1])],
                   title=f"{key}, training steps in a row", xlabel="optimizer step", ylabel=key,
                   sections=marks)
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
        "![lm_loss](figures/lm_loss.png)", "", "![align_loss](figures/align_loss.png)", ""]


def _by(rows: Sequence[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def probe_section(results: dict, figures: Path) -> list[str]:
    probes = results["probes"]
    encoders = list(dict.fromkeys(r["encoder"] for r in probes))
    at_train = _by(probes, setting="train-res")
    reference = _by(at_train, encoder=encoders[0])
    bar_chart(figures / "probe.png", [r["attribute"] for r in reference],
              [(e, [r["linear"] for r in _by(at_train, encoder=e)]) for e in encoders],
              title="linear probe top-1, val split at the training resolution", ylabel="top-1",
              y_max=1.0, reference=([r["chance"] for r in reference], "chance"))
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
    bar_chart(figures / "retrieval.png", [name.replace("after ", "") for name in names],
              [(f"{how} {k}", [models[m][how][k] for m in names])
               for how in ("prototypes", "features") for k in ("R@1", "R@5")],
              title=f"image -> caption recall, {n} pairs", ylabel="recall", y_max=1.0,
              reference=([min(1.0, 5 / n)] * len(names), "chance R@5"))
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
    reference = _by(probes, encoder=encoders[0])
    bar_chart(figures / "resolution.png", [f"{r['attribute']} {r['setting']}" for r in reference],
              [(e, [r["linear"] for r in _by(probes, encoder=e)]) for e in encoders],
              title="linear probe top-1 by resolution", ylabel="top-1", y_max=1.0,
              reference=([r["chance"] for r in reference], "chance"))
    return [
        SECTIONS[3], "",
        (f"No training image had more than {4 * results['train_tokens']} patches. *native*: the val "
         "images at their own size; *native 2x*: `val_hires`, the val scenes re-rendered at twice "
         "the size, classified by the probe trained on native-size train images."), "",
        markdown_table(["attribute", "setting", "encoder", "patches / image", "linear top-1",
                        "k-NN top-1", "chance"],
                       [[r["attribute"], r["setting"], r["encoder"], f"{r['patches_per_image']:.0f}",
                         r["linear"], r["knn"], r["chance"]] for r in probes]), "",
        "![resolution](figures/resolution.png)", ""]


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
    lines = [
        "# CoMP demo: the SigLIP recipe on tiny models", "",
        (f"Seed {results['seed']}, {results['steps']} optimizer steps per training step, "
         f"{sum(timings.values()):.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})."), "",
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
