"""comp study: the variants change exactly their flags in every step; a cell is deterministic
per seed and is read back, not recomputed, once written."""
from __future__ import annotations

import json

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
    assert all("align_loss" not in h for hist in first["results"]["histories"].values() for h in hist)

    def no_training(*args, **kwargs):
        raise AssertionError("a computed cell must be read back")

    monkeypatch.setattr(pipeline, "run_pipeline", no_training)
    again = study.run_cell(tmp_path / "a", "alignment loss off", 0, plan(), assets, say)
    assert again == json.loads(json.dumps(first))


def test_table_has_mean_and_std_over_seeds():
    cells = [{"variant": "full", "seed": s, "metrics": {"QA native": v}} for s, v in ((0, 0.5), (1, 0.7))]
    cells.append({"variant": "C-RoPE off", "seed": 0, "metrics": {"QA native": 0.4}})
    agg = study.aggregate(cells)
    assert agg["full"]["QA native"]["mean"] == pytest.approx(0.6)
    assert agg["full"]["QA native"]["std"] == pytest.approx(0.1414, abs=1e-4)
    text = study.study_markdown(agg, [0, 1])
    assert "| full | 0.600 +- 0.141 |" in text and "| C-RoPE off | 0.400 +- 0.000 |" in text


def test_cli_lists_study(capsys):
    from comp.cli import main

    assert main(["study", "--variants", "nonsense"]) == 2
    assert "unknown variants" in capsys.readouterr().err
