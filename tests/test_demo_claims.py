"""comp.demo.claims (caption diversity, the probe and dense cells) and comp.demo.parallel, on the tiny
checkpoints and a few toyworld probe images."""
from __future__ import annotations

import pytest
import torch

from comp.data import toyworld as tw
from comp.demo import claims
from comp.demo.parallel import ChildPool, run_parallel


def test_caption_diversity_is_one_for_one_caption_and_lower_for_different_ones(tiny_dir):
    same = claims.caption_diversity(tiny_dir("qwen2"), ["a red circle on the left."] * 3)
    for key in ("text_feature_cos", "word_embedding_cos", "bag_of_words_cos"):
        assert same[key] == pytest.approx(1.0, abs=1e-5), key
    # the floor: random texts of the same few words differ although the captions do not
    assert 0 < same["text_feature_cos_random_words"] < 0.9999
    different = claims.caption_diversity(tiny_dir("qwen2"), ["a red circle on the left.", "number 47 (top)",
                                                             "blue star; zebra"])
    assert all(different[key] < 0.99 for key in ("text_feature_cos", "word_embedding_cos"))
    assert different["bag_of_words_cos"] < 0.2 and different["captions"] == 3
    assert claims.mean_pairwise_bow_cos(["red star", "blue ring"]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least two captions"):
        claims.caption_diversity(tiny_dir("qwen2"), ["one"])


def test_alignment_targets_same_texts_one_target_and_content_share(tiny_dir, tmp_path):
    """The loss's targets on the tiny Qwen2 with a flat prior: identical texts peak on one word
    (cosine 1); content_share counts argmax words among the given words (all of them: 1)."""
    from transformers import AutoTokenizer

    counts = tmp_path / "counts.pt"
    vocab = len(AutoTokenizer.from_pretrained(tiny_dir("qwen2")))
    torch.save(torch.ones(vocab), counts)
    same = claims.alignment_targets(tiny_dir("qwen2"), ["a red circle on the left."] * 3, counts)
    assert (same["texts"], same["distinct_argmax"]) == (3, 1)
    assert same["target_cos"] == pytest.approx(1.0, abs=1e-5) and same["content_share"] == 0.0
    assert same["top_targets"][0][1] == 3 and 0 < same["max_p"] <= 1 and same["entropy"] >= 0
    assert -1 <= same["next_token_cos"] <= 1 and -1 <= same["current_token_cos"] <= 1
    word = same["top_targets"][0][0].strip()
    assert claims.alignment_targets(tiny_dir("qwen2"), ["a red circle on the left."], counts,
                                    content_words=[word])["content_share"] == 1.0
    with pytest.raises(ValueError, match="at least one text"):
        claims.alignment_targets(tiny_dir("qwen2"), [], counts)


def test_probe_cell_rows_per_setting(tiny_dir, tmp_path):
    """Real encoder, real probe splits (two images per class): one row per setting, the
    fixed ones at the given size (56 px: 4 x 4 patches), the native ones at each image's."""
    tw._write_probes(tmp_path, 0, {"probe_train": 2, "probe_val": 1}, {})
    rows = claims.probe_cell(tiny_dir("siglip"), tmp_path, "digit", 56, attentive=True, seeds=2,
                             linear_epochs=2, attentive_epochs=1)
    by = {r["setting"]: r for r in rows}
    assert list(by) == ["fixed", "native", "native 2x", "large, fixed"]
    for row in rows:
        assert (row["n_train"], row["n_val"], row["chance"]) == (20, 10, 0.1)
        assert len(row["attentive"]["values"]) == len(row["linear"]["values"]) == 2
        assert all(0 <= v <= 1 for v in row["attentive"]["values"])
    assert by["fixed"]["patches_per_image"] == by["large, fixed"]["patches_per_image"] == 16
    assert by["native"]["patches_per_image"] > 100  # large scenes at native size
    assert by["native 2x"]["patches_per_image"] > 3 * by["native"]["patches_per_image"]
    colour = claims.probe_cell(tiny_dir("siglip"), tmp_path, "colour", 56, attentive=False, seeds=1,
                               linear_epochs=2, per_class=1)
    assert [r["setting"] for r in colour] == ["fixed", "native", "native 2x"]
    assert all(r["attentive"] is None and r["n_train"] == 8 for r in colour)


def test_dense_cell_rows_per_setting(tiny_dir, tmp_path):
    tw.write_seg(tmp_path / "seg", 0, 4, 5)
    rows = [row for fixed in (True, False)
            for row in claims.dense_cell(tiny_dir("siglip"), tmp_path / "seg", 56, fixed, seeds=2, epochs=1, n_train=3)]
    by = {r["setting"]: r for r in rows}
    assert list(by) == ["fixed", "native", "native 2x"]
    assert all((r["n_train"], r["n_val"], r["classes"]) == (3, 5, len(tw.SEG_CLASSES)) for r in rows)
    assert all(len(r["miou"]["values"]) == 2 and 0 <= r["miou"]["mean"] <= 1 and r["miou_se"] >= 0 for r in rows)
    assert by["fixed"]["tokens_per_image"] == 16
    assert by["native 2x"]["tokens_per_image"] > 3 * by["native"]["tokens_per_image"]


def test_miou_fold_se_is_zero_for_identical_folds_and_grows_with_disagreement():
    eye = torch.eye(2, dtype=torch.long) * 10
    assert claims.miou_fold_se(eye.expand(5, 2, 2), ["a", "b"]) == pytest.approx(0.0)
    wrong = torch.tensor([[0, 10], [10, 0]])
    mixed = torch.stack([eye, eye, wrong, eye, wrong])
    assert claims.miou_fold_se(mixed, ["a", "b"]) > 0.1
    assert claims.miou_fold_se(eye.expand(3, 2, 2), ["a", "b"]) == 0.0  # fewer images than folds


def test_run_parallel_matches_serial_and_names_a_failing_child():
    """Two children side by side (fresh Pythons: seconds to import torch), one failing."""
    calls = [(["red star", "red ring"],), (["x", "y"],)]
    serial = run_parallel("comp.demo.claims:mean_pairwise_bow_cos", calls, jobs=1)
    assert run_parallel("comp.demo.claims:mean_pairwise_bow_cos", calls, jobs=2) == serial
    assert serial == [pytest.approx(0.5), pytest.approx(0.0, abs=1e-6)]
    with pytest.raises(RuntimeError, match="at least two captions"):
        run_parallel("comp.demo.claims:caption_diversity", [("unused", ["one"])], jobs=2)


def test_child_pool_runs_calls_while_the_caller_works_and_reports_each():
    """Calls submitted before and after the caller's own work, labelled and timed; a failing
    call's error reaches its future, the others still finish."""
    finished = []
    with ChildPool(1, on_done=lambda f: finished.append((f.label, f.seconds > 0))) as pool:
        first = pool.submit("comp.demo.claims:mean_pairwise_bow_cos", (["red star", "red ring"],), label="first")
        assert sum(range(1000)) == 499500  # the caller's own work meanwhile
        pool.jobs = 2
        bad = pool.submit("comp.demo.claims:caption_diversity", ("unused", ["one"]), label="bad")
        second = pool.submit("comp.demo.claims:mean_pairwise_bow_cos", (["x", "y"],), label="second")
        assert first.result() == pytest.approx(0.5) and second.result() == pytest.approx(0.0, abs=1e-6)
        with pytest.raises(RuntimeError, match="at least two captions"):
            bad.result()
    assert sorted(finished) == [("bad", True), ("first", True), ("second", True)]
    with ChildPool(1) as pool:  # a call that cannot reach a child fails its future, not the pool
        unpicklable = pool.submit("comp.demo.claims:mean_pairwise_bow_cos", (lambda: None,), label="lambda")
        with pytest.raises(Exception, match="pickle"):
            unpicklable.result(timeout=60)
        assert pool.submit("comp.demo.claims:mean_pairwise_bow_cos", (["a", "a"],)).result() == pytest.approx(1.0)


def test_child_pool_reuses_its_workers_from_a_fresh_state_and_replaces_one_that_dies():
    """One worker for calls in turn (one import of torch, not one per call); each call finds
    torch's generator as the worker started; a worker that exits fails its call, naming the
    exit status, and the next call gets a new one."""
    with ChildPool(1) as pool:
        pids = [pool.submit("os:getpid").result(timeout=120) for _ in range(2)]
        draws = [pool.submit("torch:rand", (3,)).result(timeout=60).tolist() for _ in range(2)]
        died = pool.submit("os:_exit", (3,))
        with pytest.raises(RuntimeError, match="exited with 3"):
            died.result(timeout=60)
        after = pool.submit("os:getpid").result(timeout=120)
        pool.warm(2)  # a second worker, started before any call needs it
        assert len(pool._idle) == 2
        pool.jobs = 2
        pair = [pool.submit("os:getpid") for _ in range(2)]
        assert len({f.result(timeout=120) for f in pair} | {after}) == 2
    assert pids[0] == pids[1] != after
    assert draws[0] == draws[1]


def test_cached_call_computes_once_per_function_and_arguments(tmp_path, monkeypatch):
    from comp.demo import pipeline

    calls = []
    real = claims.mean_pairwise_bow_cos
    monkeypatch.setattr(claims, "mean_pairwise_bow_cos", lambda texts: calls.append(texts) or real(texts))
    function = "comp.demo.claims:mean_pairwise_bow_cos"
    first = pipeline.cached_call(tmp_path, function, (["red star", "red ring"],), {})
    again = pipeline.cached_call(tmp_path, function, (["red star", "red ring"],), {})
    other = pipeline.cached_call(tmp_path, function, (["x", "y"],), {})
    assert first == again == pytest.approx(0.5) and other == pytest.approx(0.0, abs=1e-6)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.json"))) == 2
