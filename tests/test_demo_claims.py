"""comp.demo.claims (caption diversity, the reading probe) and comp.demo.parallel, on the tiny
checkpoints and a few toyworld probe images."""
from __future__ import annotations

import pytest
import torch

from comp.data import toyworld as tw
from comp.demo import claims
from comp.demo.parallel import run_parallel


def test_caption_diversity_is_one_for_one_caption_and_lower_for_different_ones(tiny_dir):
    same = claims.caption_diversity(tiny_dir("qwen2"), ["a red circle on the left."] * 3)
    for key in ("text_feature_cos", "word_embedding_cos", "bag_of_words_cos"):
        assert same[key] == pytest.approx(1.0, abs=1e-5), key
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


def test_reading_probe_rows_per_setting(tiny_dir, tmp_path):
    """Real encoder, real probe splits (two images per class): one row per setting, the
    fixed ones at the given size (56 px: 4 x 4 patches), the native one at each image's."""
    tw._write_probes(tmp_path, 0, {"probe_train": 2, "probe_val": 1}, {})
    rows = claims.reading_probe(tiny_dir("siglip"), tmp_path, 56, attributes=("digit",), seeds=2,
                                linear_epochs=2, attentive_epochs=1)
    assert [r["setting"] for r in rows] == [s[0] for s in claims.READING_SETTINGS]
    for row in rows:
        assert (row["n_train"], row["n_val"], row["chance"]) == (20, 10, 0.1)
        assert len(row["attentive"]["values"]) == len(row["linear"]["values"]) == 2
        assert all(0 <= v <= 1 for v in row["attentive"]["values"])
    assert rows[0]["patches_per_image"] == rows[1]["patches_per_image"] == 16
    assert rows[2]["patches_per_image"] > 100  # large scenes at native size


def test_run_parallel_matches_serial_and_names_a_failing_child():
    """Two children side by side (each a fresh Python: seconds to import torch), one failing."""
    calls = [(["red star", "red ring"],), (["x", "y"],)]
    serial = run_parallel("comp.demo.claims:mean_pairwise_bow_cos", calls, jobs=1)
    assert run_parallel("comp.demo.claims:mean_pairwise_bow_cos", calls, jobs=2) == serial
    assert serial == [pytest.approx(0.5), pytest.approx(0.0, abs=1e-6)]
    with pytest.raises(RuntimeError, match="at least two captions"):
        run_parallel("comp.demo.claims:caption_diversity", [("unused", ["one"])], jobs=2)


def test_first_per_class_keeps_order():
    paths, labels = list("abcdef"), [0, 1, 0, 0, 1, 2]
    assert claims.first_per_class(paths, labels, 2) == (list("abcef"), [0, 1, 0, 1, 2])
    assert claims.first_per_class(paths, labels, None) == (paths, labels)
