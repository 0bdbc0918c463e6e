"""comp.demo.report: each figure function writes a PNG that shows its series and chance
line, bad input is refused by name, the markdown helpers render what they are given, and
write_report turns a results dict of the shape ``comp demo`` writes into report.md that
leads with the summary table and whose linked figures all exist. No training here (tests/test_demo.py runs the real demo)."""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comp.demo.report import (
    accuracy_vs_resolution,
    bars_with_errors,
    loss_curves,
    markdown_table,
    moving_average,
    prototype_words,
    study_bars,
    study_table_markdown,
    summary_markdown,
    write_report,
)
from comp.demo.common import mean_std

C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours


def _png(path: Path) -> np.ndarray:
    """The PNG's pixels, after checking it is a sane, complete PNG."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 400 <= image.size[0] <= 3000 and 250 <= image.size[1] <= 3000, image.size
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], at_least: int = 50) -> bool:
    return int((np.abs(pixels.astype(int) - rgb).sum(-1) <= 6).sum()) >= at_least


def _histories() -> dict[str, list[dict]]:
    rng = np.random.default_rng(0)
    return {
        "stage1": [{"step": s, "lm_loss": 6 - 0.1 * s + rng.normal(0, 0.05), "align_loss": 3 - 0.05 * s}
                   for s in range(1, 21)],
        "stage2": [{"step": s, "lm_loss": 4 - 0.05 * s, "align_loss": 2.0} for s in range(1, 21)],
        "stage3": [{"step": s, "lm_loss": 3 - 0.02 * s} for s in range(1, 11)],
    }


# ----------------------------------------------------------------------------- figures


def test_loss_curves_draw_each_stage(tmp_path):
    pixels = _png(loss_curves(_histories(), tmp_path / "loss.png"))
    assert _has_colour(pixels, C0) and _has_colour(pixels, C1)
    no_align = {k: [{"step": h["step"], "lm_loss": h["lm_loss"]} for h in v] for k, v in _histories().items()}
    _png(loss_curves(no_align, tmp_path / "lm_only.png", window=3))  # the empty panel says so
    with pytest.raises(ValueError, match=r"stage 'stage1', log entry 0 lacks"):
        loss_curves({"stage1": [{"loss": 1.0}]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no stage has logged steps"):
        loss_curves({"stage1": []}, tmp_path / "bad.png")


def test_bars_with_errors_draw_series_and_chance(tmp_path):
    groups = ["colour", "shape", "digit"]
    series = {"SigLIP (original)": ([0.3, 0.5, 0.1], [0.02, 0.05, 0.01]),
              "CoMP-VFM": ([0.6, 0.7, None], [0.03, 0.04, 0.0])}
    plain = _png(bars_with_errors(groups, series, tmp_path / "bars.png", ylabel="top-1", title="t"))
    assert _has_colour(plain, C0, 2000) and _has_colour(plain, C1, 2000)
    per_group = _png(bars_with_errors(groups, series, tmp_path / "chance.png", chance=[1 / 6, 1 / 4, 0.1],
                                      ylabel="top-1", title="t", ylim=(0, 1)))
    one_line = _png(bars_with_errors(groups, series, tmp_path / "chance1.png", chance=0.25,
                                     ylabel="top-1", title="t", ylim=(0, 1)))
    assert plain.shape == per_group.shape and (plain != per_group).any() and (per_group != one_line).any()
    _png(bars_with_errors(groups, {"one seed": ([0.1, 0.2, 0.3], None)}, tmp_path / "single.png",
                          ylabel="top-1", title="$x$ is not mathtext"))


@pytest.mark.parametrize("series, match", [
    ({"short": ([0.1, 0.2], None)}, r"series 'short' needs one mean \(and std\) per group \(3\)"),
    ({"stds": ([0.1, 0.2, 0.3], [0.1])}, r"series 'stds' needs one mean"),
    ({"nan": ([0.1, float("nan"), 0.3], None)}, r"series 'nan' has a non-finite mean"),
    ({"neg": ([0.1, 0.2, 0.3], [0.1, -0.1, 0.0])}, r"series 'neg' has a non-finite mean or a negative"),
    ({}, "no series"),
])
def test_bars_with_errors_refuse_bad_series(tmp_path, series, match):
    with pytest.raises(ValueError, match=match):
        bars_with_errors(["a", "b", "c"], series, tmp_path / "bad.png", ylabel="y", title="t")
    assert not (tmp_path / "bad.png").exists()


def test_bars_with_errors_refuse_a_chance_list_of_the_wrong_length(tmp_path):
    with pytest.raises(ValueError, match=r"chance needs one value per group \(2\), got 3"):
        bars_with_errors(["a", "b"], {"s": ([0.1, 0.2], None)}, tmp_path / "bad.png", chance=[0.1] * 3,
                         ylabel="y", title="t")


def test_accuracy_vs_resolution(tmp_path):
    resolutions = ["fixed 224", "native", "2x native"]
    series = {"original": ([0.5, 0.4, None], [0.05, 0.04, 0.0]), "CoMP-VFM": ([0.5, 0.7, 0.8], [0.02, 0.03, 0.05])}
    pixels = _png(accuracy_vs_resolution(resolutions, series, tmp_path / "res.png", chance=0.1))
    assert _has_colour(pixels, C0) and _has_colour(pixels, C1)
    with pytest.raises(ValueError, match=r"per resolution \(3\)"):
        accuracy_vs_resolution(resolutions, {"x": ([0.1], None)}, tmp_path / "bad.png")


def test_prototype_words(tmp_path):
    rows = [("red circle", [("red", 0.4), ("circle", 0.2), ("a", 0.05)]),
            ("blue star", [("blue", 0.3), ("star", 0.25), ("Ġ\x01$", 0.01)]),
            ("digit 7", [("7", 0.5)]), ("green", [("green", 0.1), ("square", 0.1)])]
    pixels = _png(prototype_words(rows, tmp_path / "words.png", uniform=1 / 64))
    half = pixels.shape[0] // 2  # 4 rows: a row of 3 panels above a row of 1
    assert _has_colour(pixels[:half], C0, 500) and _has_colour(pixels[half:], C0, 300)
    with pytest.raises(ValueError, match=r"row 'x' needs \(word, probability in \[0, 1\]\) pairs"):
        prototype_words([("x", [("w", 1.5)])], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no rows"):
        prototype_words([], tmp_path / "bad.png")


def test_figures_leave_the_global_backend_and_pyplot_alone(tmp_path):
    code = ("import sys, matplotlib; from comp.demo.report import bars_with_errors; "
            f"bars_with_errors(['a'], {{'s': ([0.5], None)}}, {str(tmp_path / 'x.png')!r}, ylabel='y', title='t'); "
            "print(matplotlib.rcParams['backend'], 'matplotlib.pyplot' in sys.modules)")
    env = {"MPLBACKEND": "svg", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "False"]
    _png(tmp_path / "x.png")


def test_import_comp_and_the_demo_command_do_not_import_matplotlib():
    code = "import sys, comp, comp.cli, comp.demo.run; print(any(m.startswith('matplotlib') for m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


# ----------------------------------------------------------------------------- study


CELLS = {"full recipe": {"fine-detail probe": [0.8, 0.82, 0.78], "zero-shot": [0.6, 0.62, 0.64]},
         "C-RoPE off": {"fine-detail probe": [0.6, 0.65, 0.55], "zero-shot": [0.58, 0.6, 0.62]},
         "alignment off": {"fine-detail probe": [0.79, 0.8]}}  # zero-shot not computed yet


def test_mean_std_is_the_sample_statistic():
    assert mean_std([0.8, 0.82, 0.78]) == pytest.approx((statistics.fmean([0.8, 0.82, 0.78]),
                                                         statistics.stdev([0.8, 0.82, 0.78])))
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def test_study_table_markdown():
    table = study_table_markdown(CELLS, reference="full recipe")
    lines = table.splitlines()
    assert lines[0] == "| variant | seeds | fine-detail probe | zero-shot |"
    assert lines[2] == "| full recipe | 3 | 0.800 ± 0.020 | 0.620 ± 0.020 |"
    assert lines[3] == "| C-RoPE off | 3 | 0.600 ± 0.050 (-0.200) | 0.600 ± 0.020 (-0.020) |"
    assert lines[4] == "| alignment off | 2 | 0.795 ± 0.007 (-0.005) | - |"
    assert lines[-1] == "In brackets: difference of the mean to full recipe's."
    assert "(" not in study_table_markdown(CELLS)
    with pytest.raises(ValueError, match="reference variant 'nope'"):
        study_table_markdown(CELLS, reference="nope")


def test_study_bars(tmp_path):
    pixels = _png(study_bars(CELLS, tmp_path / "study.png", chance=0.1, ylabel="top-1"))
    assert _has_colour(pixels, C0, 1000) and _has_colour(pixels, C1, 1000)


# ----------------------------------------------------------------------------- markdown


def test_markdown_helpers():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert markdown_table(["a", "b", "c"], [[0.5, "x|y", None]]).splitlines()[-1] == "| 0.500 | x\\|y | - |"


SUMMARY = [
    {"claim": "native resolution reads fine detail", "metric": "digit probe at 2x native",
     "before": 0.21, "after": 0.55, "chance": 0.1, "spread": 0.04, "verdict": True},
    {"claim": "features closer to word space", "metric": "zero-shot colour", "before": 0.3, "after": 0.31,
     "chance": 1 / 6, "spread": None, "verdict": "not supported", "note": "Tried 3 seeds of 1000 steps."},
]


def test_summary_markdown_renders_rows_and_verdict_sentences():
    text = summary_markdown(SUMMARY)
    lines = text.splitlines()
    assert lines[0] == "| claim | metric | before | after | chance | spread | verdict |"
    assert lines[2] == ("| native resolution reads fine detail | digit probe at 2x native | 0.210 | 0.550 | "
                        "0.100 | ± 0.040 | supported |")
    assert lines[3].endswith("| 0.167 | - | not supported |")
    assert lines[5] == ('- This run supports the claim "native resolution reads fine detail": digit probe at '
                        "2x native 0.210 before, 0.550 after (chance 0.100, spread ± 0.040).")
    assert lines[6] == ('- This run does not support the claim "features closer to word space": zero-shot colour '
                        "0.300 before, 0.310 after (chance 0.167, no spread measured). Tried 3 seeds of 1000 steps.")


def test_summary_markdown_takes_a_supported_flag_and_prints_the_rule():
    rows = [{k: v for k, v in SUMMARY[0].items() if k != "verdict"} | {"supported": False, "effect": 0.34}]
    lines = summary_markdown(rows, rule="effect > 2 x spread").splitlines()
    assert lines[0] == "Verdict rule, fixed before the run: effect > 2 x spread."
    assert lines[4].endswith("| not supported |") and lines[6].startswith("- This run does not support")


def test_summary_markdown_refuses_incomplete_rows():
    with pytest.raises(ValueError, match=r"summary row 0 \('c'\) lacks \['chance', 'spread'\]"):
        summary_markdown([{"claim": "c", "metric": "m", "before": 0.1, "after": 0.2, "verdict": True}])
    with pytest.raises(ValueError, match=r"lacks \['verdict \(or supported\)'\]"):
        summary_markdown([{k: v for k, v in SUMMARY[0].items() if k != "verdict"}])
    with pytest.raises(ValueError, match="verdict must be True/False"):
        summary_markdown([dict(SUMMARY[0], verdict="maybe")])


# ----------------------------------------------------------------------------- write_report


def _seeds(mean: float) -> dict:
    values = [mean - 0.02, mean, mean + 0.02]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "values": values}


def _results(attributes=("colour", "digit")) -> dict:
    """A results dict of the shape comp.demo.run writes (tests/test_demo.py checks the real one)."""
    probes = [{"attribute": a, "encoder": e, "setting": s, "patches_per_image": p, "n_train": 40, "n_val": 40,
               "chance": 1 / 8 if a == "colour" else 1 / 10, "linear": _seeds(0.3 + 0.1 * i),
               "attentive": _seeds(0.2 + 0.2 * i) if a == "digit" else None}
              for a in attributes for i, e in enumerate(("original", "CoMP-VFM"))
              for s, p in (("fixed", 64.0), ("native", 220.0), ("native 2x", 880.0))]
    example = {"caption": "a red circle.", "image_words": ["red", "circle"],
               "image_word_probs": [["red", 0.3], ["circle", 0.1]]}
    word_space = {m: {"zero_shot": {a: {"top1": 0.2 + k * 0.1, "chance": 0.125, "n": 40, "multi_token": 0}
                                    for a in ("colour", "shape", "digit")},
                      "retrieval": {"images": 24, "prototypes": {"R@1": 0.05, "R@5": 0.2}, "examples": [example] * 2}}
                  for k, m in enumerate(("before", "after"))}
    qa = {v: {"n": 40, "accuracy": 0.4, "by_type": {t: {"n": 20, "accuracy": 0.3 + j * 0.2, "majority": 0.25}
                                                      for j, t in enumerate(("colour", "count"))},
              "image_use": {"nll_right": 1.5, "nll_wrong": 1.8, "difference": 0.3, "difference_se": 0.05,
                            "right_better": 0.8, "n": 40}}
          for v in ("fixed 112px", "native", "native 2x")}
    health = {name: {"norm_ratio": 20.0, "image_specific": share, "image_cos": cos, "cos_images": 100}
              for name, share, cos in (("before", 0.7, 0.35), ("stage1", 0.6, 0.5), ("stage2a", 0.05, 0.98))}
    dense = [{"encoder": e, "setting": s, "classes": 9, "n_train": 300, "n_val": 100, "tokens_per_image": t,
              "miou": _seeds(0.13 + 0.01 * i), "miou_se": 0.004, "pixel_acc": _seeds(0.96)}
             for i, e in enumerate(("original", "CoMP-VFM"))
             for s, t in (("fixed", 64.0), ("native", 240.0), ("native 2x", 960.0))]
    targets = {"texts": 24, "distinct_argmax": 3, "top_targets": [[" the", 20], [" in", 3], [",", 1]],
               "entropy": 0.1, "max_p": 0.95, "target_cos": 0.3, "content_share": 0.0, "next_token_cos": 0.8,
               "current_token_cos": 0.25}
    captions = {"captions": 24, "text_feature_cos": 0.8,
                "text_feature_cos_random_words": 0.757, "word_embedding_cos": 0.78, "bag_of_words_cos": 0.46,
                "tokens_per_caption": 25.0, "top_words": ["the", "in"], "targets": targets}
    return {"seed": 0, "image_size": 112, "health": health, "dense": dense, "captions": captions,
            "plan": {"steps": 20, "stage3_steps_scale": 12, "probe_seeds": 3, "attentive_attributes": ["digit"]},
            "toy_quality": {"siglip": {"colour_accuracy": 0.9, "colour_chance": 0.125, "shape_accuracy": 0.3,
                                       "shape_chance": 1 / 6},
                            "lm": {"perplexity": 1.7, "unigram_perplexity": 60.0}},
            "timings": {"assets": 1.0, "stage1": 2.0, "probe": 3.0}, "histories": _histories(),
            "probes": probes, "word_space": word_space, "qa": qa, "summary": SUMMARY}


def check_report(out: Path) -> str:
    """report.md under ``out``: the summary table leads, every linked figure is a PNG that
    exists and every PNG under figures/ is linked; -> its text."""
    text = (out / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings[0] == "Summary", headings
    first_table = text.index("\n| ")
    assert text[first_table:].startswith("\n| claim | metric | before | after | chance | spread | verdict |")
    assert first_table > text.index("## Summary") and first_table < text.index(f"## {headings[1]}")
    linked = re.findall(r"!\[[^]]*\]\(figures/([^)]+)\)", text)
    assert linked and len(set(linked)) == len(linked)
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(linked)
    for name in linked:
        _png(out / "figures" / name)
    return text


@pytest.mark.parametrize("attributes", [("digit",), ("colour", "digit")])
def test_write_report_leads_with_the_summary_and_writes_every_figure_it_links(tmp_path, attributes):
    write_report(tmp_path / "out", _results(attributes), rule="effect > 2 x spread")
    text = check_report(tmp_path / "out")
    assert summary_markdown(SUMMARY, rule="effect > 2 x spread") in text
    linked = set(re.findall(r"\(figures/([^)]+)\)", text))
    assert linked == {"loss.png", "probe_fixed.png", "probe_native.png", "probe_native-2x.png", "zero_shot.png",
                      "prototype_words.png", "qa.png", "image_use.png", "dense.png",
                      *(f"resolution_{a}.png" for a in attributes)}
    assert "| stage2a | 20.0 | 0.05 | 0.980 |" in text and "(240 in Stage III)" in text
    assert "| CoMP-VFM | native 2x | 960 | 0.140 ± 0.020 | 0.004 | 0.960 |" in text
    assert "peak on 3 distinct words (commonest: the 20, in 3, , 1)" in text
    assert "F_t 0.800 (random texts of the captions' own words, as long: 0.757," in text
    # the attentive head is shown where it ran and "-" where it did not
    assert "| digit | CoMP-VFM | native | 220 | 0.400 ± 0.020 | 0.400 ± 0.020 | 0.100 |" in text
    if "colour" in attributes:
        assert "| colour | original | fixed | 64 | 0.300 ± 0.020 | - | 0.125 |" in text
