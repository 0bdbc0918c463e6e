"""comp demo: the recipe's stages come from the package's recipe file (what the bash script
runs too), a quick run from an installed wheel (a fresh venv, another directory) writes the
summary (claim rows with verdicts by the stated rule) into results.json and report.md, which
leads with the summary table and links only figures that exist."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from test_demo_report import check_report

from comp.demo import common, pipeline, recipe, summary
from comp.demo.report import summary_markdown
from comp.demo import run as demo
from comp.recipes.__main__ import plan_fields

REPO = Path(__file__).resolve().parents[1]


def _recipe_stages() -> dict[str, tuple[str, str, list[str]]]:
    """The stages as the bash script gets them (``python -m comp.recipes plan``, smoke mode),
    parsed here independently of comp.demo.recipe: name -> (mixture, start, flags)."""
    fields, stages, i = plan_fields(recipe.RUN, "smoke"), {}, 0
    while i < len(fields) and fields[i] == "stage":
        n = int(fields[i + 4])
        stages[fields[i + 1]] = (fields[i + 2], fields[i + 3], fields[i + 5:i + 5 + n])
        i += 5 + n
    return stages


def _pairs(argv: list[str]) -> dict[str, str]:
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert len(pairs) == len(argv) // 2, f"a flag is given twice: {argv}"
    return pairs


def test_demo_runs_the_recipes_stages_with_only_its_stated_changes(tmp_path):
    script = _recipe_stages()
    root = tmp_path / "assets"
    assets = pipeline.Assets(root / "qwen2", root / "siglip", root / "toyworld", root / "word_dist.pt",
                             image_size=112, quality={})
    plan = pipeline.Plan(steps=5, lr_cap=1e-3, stage3_lr_scale=10.0, stage3_projector_lr=1e-3,
                         stage3_steps_scale=12, train_tokens=256)
    run_dir = tmp_path / "run"
    ours = pipeline.step_argvs(assets, run_dir, plan, seed=7)
    assert list(ours) == list(script) == ["stage1", "stage2a", "stage2b", "stage3"]
    previous = None
    for name, (data, start, flags) in script.items():
        assert start == (previous or "")
        theirs, mine = _pairs(flags), _pairs(ours[name])
        final = name == "stage3"
        runner = {"--data_path", "--output_dir", "--word_dist_path", "--model_name_or_path", "--max_steps",
                  "--seed", *(() if previous else ("--custom_visual_model",))}
        assert set(mine) == set(theirs) | runner | ({"--mm_projector_lr"} if final else set())
        assert mine["--seed"] == "7" and mine["--max_steps"] == ("60" if final else "5")
        assert mine["--data_path"] == str(root / "toyworld" / data)
        assert mine["--output_dir"] == str(run_dir / name)
        assert mine["--word_dist_path"] == str(root / "word_dist.pt")
        if previous is None:
            assert (mine["--model_name_or_path"], mine["--custom_visual_model"]) == (str(root / "qwen2"),
                                                                                    str(root / "siglip"))
        else:
            assert mine["--model_name_or_path"] == str(run_dir / previous)
        # the demo's stated settings: toy resolution, token budget, learning rates (Stages
        # I-II's x sqrt(demo batch / the recipe's 256 on 8 GPUs), Stage III's x10, every one
        # capped at 1e-3, Stage III's merger at 1e-3), Stage III's steps
        assert mine["--max_num_vistoken"] == "256"
        assert mine["--gradient_checkpointing"] == "False"  # the same weights, 1.6x faster at toy size
        if "--force_resize" in theirs:
            assert int(mine["--force_resize"]) == round(int(theirs["--force_resize"]) * 112 / 48 / 28) * 28
        for flag in recipe.LR_FLAGS:
            if flag in theirs:
                scale = 10 if final else math.sqrt({"stage1": 2, "stage2a": 4, "stage2b": 4}[name] / 256)
                assert float(mine[flag]) == pytest.approx(min(1e-3, scale * float(theirs[flag])), rel=1e-5)
        if final:
            assert float(mine["--mm_projector_lr"]) == pytest.approx(1e-3)
        changed = {"--seed", "--max_steps", "--data_path", "--output_dir", "--word_dist_path",
                   "--model_name_or_path", "--custom_visual_model", "--max_num_vistoken", "--force_resize",
                   "--gradient_checkpointing", *recipe.LR_FLAGS}
        assert {k: v for k, v in mine.items() if k not in changed} == \
               {k: v for k, v in theirs.items() if k not in changed}, name
        previous = name
    assert _pairs(ours["stage1"])["--force_resize"] == "112"  # Stage I at the VFM's own size


def test_verdict_rule():
    assert summary._row("c", "m", 0.1, 0.5, 0.1, 0.1)["supported"]
    assert not summary._row("c", "m", 0.1, 0.25, 0.1, 0.1)["supported"]  # 0.15 < 2 x 0.1
    assert not summary._row("c", "m", 0.5, 0.1, 0.1, 0.0)["supported"]  # a drop never supports
    assert common.binomial_se(0.5, 100) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- quick run


def install_wheel(source: Path, root: Path) -> Path:
    """``pip install .`` (not editable) of ``source`` into a fresh venv under ``root``; the
    dependencies come from this interpreter's site-packages (a .pth line), so nothing is
    downloaded. -> the venv's ``bin``."""
    tree = root / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(source / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(source / name, tree / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "outer_site_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--ignore-installed", str(tree)], env=_clean_env(), check=True, timeout=600)
    return bin_dir


def _clean_env() -> dict:
    """The environment without a PYTHONPATH that could put a source tree before the wheel."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``comp demo --quick`` from an installed wheel, started in another directory."""
    root = tmp_path_factory.mktemp("demo")
    bin_dir = install_wheel(REPO, root / "install")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    out = root / "run"
    proc = subprocess.run([str(bin_dir / "comp"), "demo", "--quick", "--out", str(out), "--seed", "0"],
                          cwd=elsewhere, env=_clean_env(), capture_output=True, text=True, timeout=1200)
    where = subprocess.run([str(bin_dir / "python"), "-c", "import importlib.util; "
                            "print(importlib.util.find_spec('comp').origin)"],  # finds, does not import
                           cwd=elsewhere, env=_clean_env(), capture_output=True, text=True, timeout=60)
    return out, proc.returncode, proc.stdout, proc.stderr, Path(where.stdout.strip()), bin_dir.parent


@pytest.mark.slow
def test_quick_run_works_from_an_installed_wheel(quick_run):
    out, code, printed, errors, comp_init, venv = quick_run
    assert code == 0, f"comp demo --quick from the wheel failed:\n{printed[-3000:]}\n{errors[-3000:]}"
    assert comp_init.is_relative_to(venv), f"the demo ran {comp_init}, not the wheel in {venv}"
    assert (comp_init.parent / "recipes" / "data" / "stage2.yaml").is_file()  # package data installed
    assert (out / "results.json").is_file() and (out / "report.md").is_file()


def _numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


@pytest.mark.slow
def test_quick_run_writes_summary_rows_with_verdicts(quick_run):
    out, code, printed = quick_run[:3]
    assert code == 0
    lines = printed.strip().splitlines()
    for phase in ("assets", "stage1", "stage2a", "stage2b", "stage3", "export", "probe", "word space", "qa"):
        assert any(line.startswith(f"[comp demo] {phase}") for line in lines), phase
    assert lines[-1].endswith(str(out / "report.md"))
    results = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(x) for x in _numbers(results))
    rows = results["summary"]
    assert [r["claim"][:3] for r in rows] == ["(a)"] * 5 + ["(b)", "(c)", "(d)"]
    for r in rows:
        assert set(r) >= {"claim", "metric", "before", "after", "chance", "spread", "supported"}
        assert r["supported"] == (r["after"] - r["before"] > summary.Z * r["spread"])
    # the rows are computed from the detailed results, not apart from them
    probe = {(p["attribute"], p["encoder"], p["setting"]): p["attentive"]["mean"] for p in results["probes"]
             if p["attentive"] is not None}
    assert (rows[0]["before"], rows[0]["after"]) == (probe["digit", "original", "fixed"],
                                                     probe["digit", "CoMP-VFM", "native"])
    assert rows[1]["after"] == probe["word", "CoMP-VFM", "native"]
    assert rows[2]["before"] == probe["digit", "original", "native 2x"]
    dense = {(d["encoder"], d["setting"]): d["miou"]["mean"] for d in results["dense"]}
    assert (rows[3]["before"], rows[3]["after"]) == (dense["original", "fixed"], dense["CoMP-VFM", "native"])
    assert rows[4]["after"] == dense["CoMP-VFM", "native 2x"]
    assert rows[6]["after"] == results["qa"]["native"]["accuracy"]
    assert rows[7]["after"] - rows[7]["before"] == pytest.approx(results["qa"]["native"]["image_use"]["difference"],
                                                                 abs=1e-6)
    report = check_report(out)  # summary table first, every linked figure exists
    assert summary_markdown(rows, rule=summary.RULE) in report
    for r in rows:
        verdict = "supports" if r["supported"] else "does not support"
        assert f'- This run {verdict} the claim "{r["claim"]}"' in report


@pytest.mark.slow
def test_probes_cover_encoders_settings_and_seeds(quick_run):
    results = json.loads((quick_run[0] / "results.json").read_text())
    probes = results["probes"]
    reading = ("large, fixed",)
    assert {(p["attribute"], p["encoder"], p["setting"]) for p in probes} == {
        (a, e, s) for a in ("colour", "digit", "word") for e in ("original", "CoMP-VFM")
        for s in ("fixed", "native", "native 2x", *(reading if a != "colour" else ()))}
    for p in probes:
        heads = ("linear", "attentive") if p["attribute"] in results["plan"]["attentive_attributes"] else ("linear",)
        assert (p["attentive"] is None) == (heads == ("linear",))
        for head in heads:
            assert len(p[head]["values"]) == 3 and all(0 <= v <= 1 for v in p[head]["values"])
    assert {p["attribute"] for p in probes if p["attentive"] is not None} == {"digit", "word"}
    size = results["image_size"]
    fixed = [p for p in probes if p["setting"] in ("fixed", "large, fixed")]
    assert all(p["patches_per_image"] == (size // 14) ** 2 for p in fixed)
    native = {(p["attribute"], p["encoder"]): p for p in probes if p["setting"] == "native"}
    assert all(p["patches_per_image"] > 3 * native[(p["attribute"], p["encoder"])]["patches_per_image"]
               for p in probes if p["setting"] == "native 2x")
    dense = results["dense"]
    assert {(d["encoder"], d["setting"]) for d in dense} == {
        (e, s) for e in ("original", "CoMP-VFM") for s in ("fixed", "native", "native 2x")}
    assert all(len(d["miou"]["values"]) == 3 and 0 <= d["miou"]["mean"] <= 1 for d in dense)
    assert list(results["health"]) == ["before", "stage1", "stage2a", "stage2b", "stage3"]
    assert all(-1 <= h["image_cos"] <= 1 for h in results["health"].values())
    assert 0 < results["captions"]["text_feature_cos"] < 1
    assert set(results["word_space"]) == {"before", "after"}
    assert set(results["qa"]) == {f"fixed {size}px", "native", "native 2x"}


@pytest.mark.slow
def test_exported_vfm_loads_as_an_encoder(quick_run):
    from comp import CompVisionModel

    model = CompVisionModel.from_pretrained(quick_run[0] / "comp_1b_siglip" / "comp-vfm")
    assert model.config.use_rope  # Stage II switched C-RoPE on


# ----------------------------------------------------------------------------- pure parts


def test_per_class_subset_keeps_the_first_of_each_class():
    paths = [Path(f"{i}.png") for i in range(7)]
    labels = [0, 0, 1, 0, 1, 1, 2]
    kept, kept_y = common.per_class_subset(paths, labels, 2)
    assert [p.name for p in kept] == ["0.png", "1.png", "2.png", "4.png", "6.png"] and kept_y == [0, 0, 1, 1, 2]
    assert common.per_class_subset(paths, labels, None) == (paths, labels)


def test_prepare_out_replaces_an_earlier_demo_and_refuses_other_directories(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a comp demo directory"):
        demo.prepare_out(foreign)
    assert (foreign / "notes.txt").exists()
    earlier = tmp_path / "earlier"
    demo.prepare_out(earlier)
    (earlier / "report.md").write_text("old")
    demo.prepare_out(earlier)
    assert not (earlier / "report.md").exists()


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert demo.main(["--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--steps" in capsys.readouterr().err
    assert demo.main(["--quick", "--toy", "reading", "--out", str(tmp_path / "y")]) == 2
    assert "--toy reading" in capsys.readouterr().err


def test_reading_note_only_where_the_original_cannot_read_large_glyphs():
    def probes(mean: float) -> list[dict]:
        return [{"attribute": "digit", "encoder": "original", "setting": "large, fixed", "chance": 0.1,
                 "n_val": 500, "attentive": {"mean": mean, "std": 0.01, "values": [mean]}}]

    assert "does not read digits" in summary.reading_note(probes(0.11), "digit")
    assert summary.reading_note(probes(0.6), "digit") is None
    assert summary.reading_note(probes(0.11), "word") is None  # not probed
    native = [{"attribute": "digit", "encoder": e, "setting": "native", "attentive": {"mean": m}}
              for e, m in (("original", 0.413), ("CoMP-VFM", 0.275))]
    assert summary.same_size_note(native, "native", lambda r: r["attentive"]["mean"], "digit") == (
        "Both at native size: original 0.413, CoMP-VFM 0.275 (CoMP's training beyond the size: -0.138).")
    assert summary.same_size_note(native, "native", lambda r: r["attentive"]["mean"], "word") is None
    note = summary.collapse_note({"health": {"before": {"image_cos": 0.35}, "stage2b": {"image_cos": 0.79}},
                                  "captions": {"targets": {"distinct_argmax": 14, "content_share": 0.004}}})
    assert note == ("Measured: image cos after Stage II-b 0.79 (before Stage I 0.35); the loss's targets for "
                    "the captions peak on 14 distinct words, a class word for 0.4% of them.")
