"""comp demo: the step table agrees with the SigLIP script, a quick run writes a complete
report, and the retrieval scores are the alignment loss's own quantity."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comp.demo import run as demo

REPO = Path(__file__).resolve().parents[1]
FIGURES = {"loss.png", "probe.png", "retrieval.png", "resolution_colour.png"}  # --quick: colour only


def _flag_pairs(argv: list[str]) -> dict[str, str]:
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert len(pairs) == len(argv) // 2, f"a flag is given twice: {argv}"
    return pairs


@pytest.mark.skipif(shutil.which("bash") is None, reason="the seed scripts are bash")
def test_steps_match_the_siglip_script(tmp_path):
    """Run the script in smoke mode with a launcher that prints its arguments instead of
    training; each step's flags must equal the demo's (the demo adds only --seed)."""
    (tmp_path / "smoke_assets").mkdir()
    (tmp_path / "smoke_assets" / "ready").touch()  # skip the asset build
    env = dict(os.environ, COMP_SMOKE="1", COMP_WORKDIR=str(tmp_path), PYTHON="true",
               COMP_LAUNCHER="printf %s\\0")
    proc = subprocess.run(["bash", str(REPO / "scripts/comp/comp_1b_siglip.sh")], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    parts = re.split(r"== comp_1b_siglip/(\w+)\n", proc.stdout)[1:]
    script = {name: args.split("\0")[:-1] for name, args in zip(parts[::2], parts[1::2])}
    assert list(script) == [s.name for s in demo.STEPS]

    root = tmp_path / "smoke_assets"
    assets = demo.Assets(root / "qwen2", root / "siglip", root / "toyworld", root / "word_dist.pt")
    previous = None
    for step in demo.STEPS:
        launched = script[step.name]
        assert launched[0] == "comp.train"
        ours = _flag_pairs(demo.step_argv(step, assets, tmp_path / "comp_1b_siglip", previous,
                                          max_steps=3, seed=7))
        assert ours.pop("--seed") == "7"
        assert ours == _flag_pairs(launched[1:]), step.name
        previous = step.name


# ----------------------------------------------------------------------------- quick run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    import io
    from contextlib import redirect_stdout

    printed = io.StringIO()
    with redirect_stdout(printed):
        code = demo.main(["--quick", "--out", str(out), "--seed", "0"])
    return out, code, printed.getvalue()


def _finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _finite_numbers(v)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_quick_run_prints_phases_and_the_report_path(quick_run):
    out, code, printed = quick_run
    assert code == 0
    lines = printed.strip().splitlines()
    for phase in ("assets", "stage1", "stage2a", "stage2b", "stage3", "export", "probe", "retrieval"):
        assert any(line.startswith(f"[comp demo] {phase}") for line in lines), phase
    assert lines[-1].endswith(str(out / "report.md"))


def test_report_has_four_sections_valid_figures_and_finite_numbers(quick_run):
    out = quick_run[0]
    report = (out / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", report, flags=re.MULTILINE)
    assert [h.split(". ", 1)[1].split()[0] for h in headings] == ["Loss", "Linear", "Image-text", "Resolutions"]
    linked = set(re.findall(r"!\[[^]]*\]\(figures/([^)]+)\)", report))
    assert linked == FIGURES
    for name in linked:
        with Image.open(out / "figures" / name) as image:
            assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 200
            image.verify()
    table_cells = [c.strip() for line in report.splitlines() if line.startswith("| ")
                   for c in line.strip("|").split("|")]
    numbers = [float(c) for c in table_cells if re.fullmatch(r"-?\d+(\.\d+)?", c)]
    assert len(numbers) > 30 and all(math.isfinite(x) for x in numbers)
    assert not re.search(r"\b(nan|inf)\b", report, flags=re.IGNORECASE)
    results = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(x) for x in _finite_numbers(results))


def test_results_cover_every_step_probe_and_model(quick_run):
    out = quick_run[0]
    results = json.loads((out / "results.json").read_text())
    histories = results["histories"]
    assert list(histories) == ["stage1", "stage2a", "stage2b", "stage3"]
    assert all([h["step"] for h in hist] == [1, 2, 3] for hist in histories.values())
    assert all("align_loss" in h for name in ("stage1", "stage2a", "stage2b") for h in histories[name])
    assert not any("align_loss" in h for h in histories["stage3"])
    probes = results["probes"]
    assert {(r["encoder"], r["setting"]) for r in probes} == {
        (e, s) for e in ("SigLIP (original)", "CoMP-VFM") for s in ("train-res", "native", "native 2x")}
    hires = [r for r in probes if r["setting"] == "native 2x"]
    native = [r for r in probes if r["setting"] == "native"]
    assert all(h["patches_per_image"] > 3 * n["patches_per_image"] for h, n in zip(hires, native))
    assert all(r["patches_per_image"] <= 4 * demo.TRAIN_TOKENS for r in probes if r["setting"] == "train-res")
    assert all(0 <= r["linear"] <= 1 and 0 <= r["knn"] <= 1 for r in probes)
    assert list(results["retrieval"]) == ["before Stage I", "after stage1", "after stage2a",
                                          "after stage2b", "after stage3"]
    assert all(r["images"] == 24 and 0 <= r["prototypes"]["R@1"] <= r["prototypes"]["R@5"] <= 1
               for r in results["retrieval"].values())
    assert results["encoder_change"] > 0  # Stage II trains the encoder


def test_exported_vfm_loads_as_an_encoder(quick_run):
    from comp import CompVisionModel

    model = CompVisionModel.from_pretrained(quick_run[0] / "comp_1b_siglip" / "comp-vfm")
    assert model.config.use_rope  # Stage II switched C-RoPE on


def test_prototype_score_of_a_pair_is_minus_its_alignment_loss(quick_run):
    """The retrieval score of image i and caption i is exactly -alignment_loss of that pair."""
    from comp.data.processor import CompProcessor
    from comp.models.alignment import alignment_loss
    from comp.models.mllm import CompForConditionalGeneration

    out = quick_run[0]
    assets = out / "assets"
    model = CompForConditionalGeneration.from_pretrained(out / "comp_1b_siglip" / "stage2b").eval()
    model.set_word_prior(assets / "word_dist.pt")
    processor = CompProcessor.from_components(assets / "qwen2", assets / "siglip", max_num_vistoken=64)
    entries = json.loads((assets / "toyworld/retrieval/captions.json").read_text())[:3]
    root = assets / "toyworld/retrieval"
    F_v = demo.image_features(model, processor.image_processor, [root / e["image"] for e in entries])
    F_t = demo.text_features(model, processor.tokenizer, [e["caption"] for e in entries])
    log_p_v, log_p_t = demo.word_distributions(model, F_v, F_t)
    scores = log_p_v @ log_p_t.exp().T
    cfg = model.config
    for i in range(3):
        loss = alignment_loss(F_v[i:i + 1], F_t[i:i + 1], model.lm_head.weight[: model.num_prototypes],
                              model._log_prior(), torch.tensor([True]), embed_temp=cfg.embed_temp,
                              word_eps=cfg.word_eps, iters=cfg.sinkhorn_iters, mode=cfg.prior_mode)
        torch.testing.assert_close(scores[i, i], -loss, rtol=1e-5, atol=1e-4)


def test_initial_model_is_what_stage1_starts_from(quick_run, tmp_path):
    """Stage I with learning rate 0 leaves its starting model as it was: that model must be
    the "before Stage I" model of the retrieval table."""
    from safetensors.torch import load_file

    from comp.train.args import parse_args
    from comp.train.run import train

    root = quick_run[0] / "assets"
    assets = demo.Assets(root / "qwen2", root / "siglip", root / "toyworld", root / "word_dist.pt")
    argv = demo.step_argv(demo.STEPS[0], assets, tmp_path, None, max_steps=1, seed=0)
    train(*parse_args([*argv, "--learning_rate", "0", "--save_strategy", "no"]))
    started = load_file(tmp_path / "stage1" / "model.safetensors")
    ours = demo.initial_model(assets, seed=0).state_dict()
    merger = [k for k in started if k.startswith("visual.merger.")]
    assert merger
    for k in merger:
        torch.testing.assert_close(ours[k], started[k], rtol=0, atol=0)


def test_text_features_ignore_padding(quick_run):
    """A caption's F_t does not depend on the longer captions padded next to it."""
    from comp.data.processor import CompProcessor
    from comp.models.mllm import CompForConditionalGeneration

    out = quick_run[0]
    model = CompForConditionalGeneration.from_pretrained(out / "comp_1b_siglip" / "stage1").eval()
    tokenizer = CompProcessor.from_pretrained(out / "comp_1b_siglip" / "stage1").tokenizer
    alone = demo.text_features(model, tokenizer, ["a red circle."])
    padded = demo.text_features(model, tokenizer, ["a red circle.", "a blue star in the top left and the number 7."])
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- pure parts


def test_recall_counts_ties_against_the_match():
    assert demo.recall_at(torch.eye(4)) == {"R@1": 1.0, "R@5": 1.0}
    assert demo.recall_at(torch.zeros(4, 4), ks=(1, 3)) == {"R@1": 0.0, "R@3": 0.0}
    # the same caption order for every image: recall@k is exactly k / n
    same_order = torch.arange(10.0).expand(10, 10)
    assert demo.recall_at(same_order, ks=(1, 5)) == {"R@1": 0.1, "R@5": 0.5}
    with pytest.raises(ValueError, match="one caption per image"):
        demo.recall_at(torch.zeros(3, 4))


def test_mean_pairwise_cos():
    assert demo.mean_pairwise_cos(torch.ones(5, 3)) == pytest.approx(1.0)
    assert demo.mean_pairwise_cos(torch.eye(4)) == pytest.approx(0.0, abs=1e-7)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    n = F.normalize(x, dim=-1)
    brute = (n @ n.T)[~torch.eye(6, dtype=torch.bool)].mean()
    assert demo.mean_pairwise_cos(x) == pytest.approx(float(brute), abs=1e-6)


def test_per_class_subset_keeps_the_first_of_each_class():
    paths = [Path(f"{i}.png") for i in range(7)]
    labels = [0, 0, 1, 0, 1, 1, 2]
    kept, kept_y = demo.per_class_subset(paths, labels, 2)
    assert [p.name for p in kept] == ["0.png", "1.png", "2.png", "4.png", "6.png"] and kept_y == [0, 0, 1, 1, 2]
    assert demo.per_class_subset(paths, labels, None) == (paths, labels)


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
    (earlier / "figures").mkdir()
    (earlier / "assets").mkdir()
    demo.prepare_out(earlier)
    assert not (earlier / "report.md").exists() and not (earlier / "figures").exists()
    assert (earlier / "assets").is_dir()  # reused when its seed matches


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert demo.main(["--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--steps" in capsys.readouterr().err

