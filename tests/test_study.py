"""comp study: the variants change exactly their flags in every step; a cell is deterministic
per seed and is read back, not recomputed, once written."""
from __future__ import annotations

import json
import re

import pytest

from comp.demo import pipeline, study


@pytest.fixture(scope="module")
def assets():
    return pipeline.build_assets(0, pipeline.Plan(**pipeline.QUICK), log=lambda *_: None)


def test_variant_flags_reach_every_step(tmp_path, assets):
    plan = pipeline.Plan(**pipeline.QUICK)
    full = pipeline.step_argvs(assets, tmp_path, plan, 0)
    for variant, (flag, value) in {"C-RoPE off": ("--use_rope", "0"),
                                   "alignment loss off": ("--use_alignment_loss", "0"),
                                   "native resolution off": ("--force_resize", str(assets.image_size)),
                                   "word prior off": ("--word_dist_path", "uniform")}.items():
        flags, word_dist = study.variant_flags(variant, assets.image_size)
        argvs = pipeline.step_argvs(assets, tmp_path, plan, 0, flags, word_dist)
        for name, argv in argvs.items():
            pairs, base = dict(zip(argv[::2], argv[1::2])), dict(zip(full[name][::2], full[name][1::2]))
            assert pairs[flag] == value, (variant, name)
            assert {k: v for k, v in pairs.items() if k != flag} == {k: v for k, v in base.items() if k != flag}
    with pytest.raises(ValueError, match="unknown variant"):
        study.variant_flags("no such", 112)


def test_cell_is_deterministic_and_resumes(tmp_path, assets, monkeypatch):
    plan = lambda: pipeline.Plan(**pipeline.QUICK)  # noqa: E731
    say = lambda *_: None  # noqa: E731
    first = study.run_cell(tmp_path / "a", "alignment loss off", 0, plan(), assets, say)
    second = study.run_cell(tmp_path / "b", "alignment loss off", 0, plan(), assets, say)
    assert first["metrics"] == second["metrics"]
    assert first["results"]["histories"] == second["results"]["histories"]
    # one process (a --jobs N worker's plan): the evaluation in turn here, the same numbers
    alone = study.run_cell(tmp_path / "c", "alignment loss off", 0, pipeline.Plan(**pipeline.QUICK, jobs=1), assets,
                           say)
    assert alone["metrics"] == first["metrics"] and alone["results"]["probes"] == first["results"]["probes"]
    assert all("align_loss" not in h for hist in first["results"]["histories"].values() for h in hist)
    # what comp study runs: the same metrics without the demo's "before" measurements
    lean = study.run_cell(tmp_path / "d", "alignment loss off", 0, pipeline.Plan(**{**pipeline.QUICK, **study.CELL_PLAN}),
                          assets, say)
    assert lean["metrics"] == first["metrics"]
    assert lean["results"]["word_space"]["before"] is None and "before" not in lean["results"]["health"]
    assert {p["encoder"] for p in lean["results"]["probes"] + lean["results"]["dense"]} == {"CoMP-VFM"}
    assert "native 2x" in first["results"]["qa"] and "native 2x" not in lean["results"]["qa"]

    def no_training(*args, **kwargs):
        raise AssertionError("a computed cell must be read back")

    monkeypatch.setattr(pipeline, "run_pipeline", no_training)
    again = study.run_cell(tmp_path / "a", "alignment loss off", 0, plan(), assets, say)
    assert again == json.loads(json.dumps(first))
    # --jobs 2: the same cells through spawned workers (read back here: a worker finds cell.json)
    pooled = study.run_cells(tmp_path / "a", ["alignment loss off"], [0], dict(pipeline.QUICK), jobs=2)
    assert pooled == [again]


def test_study_md_has_the_table_and_its_figures(tmp_path):
    cells = [{"variant": "full", "seed": s, "metrics": {"QA native": v, study.IMAGE_USE: u}}
             for s, v, u in ((0, 0.5, 0.05), (1, 0.7, 0.07))]
    cells.append({"variant": "C-RoPE off", "seed": 0, "metrics": {"QA native": 0.4, study.IMAGE_USE: 0.0}})
    assert study.cell_table(cells) == {"full": {"QA native": [0.5, 0.7], study.IMAGE_USE: [0.05, 0.07]},
                                       "C-RoPE off": {"QA native": [0.4], study.IMAGE_USE: [0.0]}}
    text = study.write_study(tmp_path, cells, [0, 1]).read_text()
    assert "| full | 2 | 0.600 ± 0.141 | 0.060 ± 0.014 |" in text
    assert "| C-RoPE off | 1 | 0.400 ± 0.000 (-0.200) | 0.000 ± 0.000 (-0.060) |" in text
    linked = re.findall(r"\(figures/([^)]+)\)", text)
    assert sorted(linked) == sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["study.png",
                                                                                        "study_image_use.png"]


def test_cli_lists_study(capsys):
    from comp.cli import main

    assert main(["study", "--variants", "nonsense"]) == 2
    assert "unknown variants" in capsys.readouterr().err
    assert main(["study", "--jobs", "0"]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err
    assert main(["study", "--quick", "--toy", "reading"]) == 2
    assert "--toy reading" in capsys.readouterr().err
