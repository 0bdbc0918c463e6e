"""comp.eval.wordspace: zero-shot classification through the word prototypes, on the tiny
CoMP-MM saved by the fixtures and toyworld probe scenes rendered on the fly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comp.data import toyworld as tw
from comp.eval import wordspace as ws

COLOURS = list(tw.COLOURS)


@pytest.fixture(scope="module")
def colour_images(tmp_path_factory):
    """One colour-probe scene per colour class, rendered at native size."""
    root = tmp_path_factory.mktemp("colours")
    paths = []
    for i, colour in enumerate(COLOURS):
        scene = tw.probe_scene(tw.rng_for(0, "test-zero-shot", i), "colour", colour)
        paths.append(root / f"{i}.png")
        tw.render(scene).save(paths[-1])
    return paths, list(range(len(COLOURS)))


def test_class_word_ids_drop_whitespace_tokens(mm):
    tokenizer = mm[1].tokenizer
    ids = ws.class_word_ids(tokenizer, ["7", "red"])
    assert tokenizer.decode(ids[0]) == "7"  # the space before a digit is a token of its own
    assert tokenizer.decode(ids[1]).strip() == "red"
    assert all(tokenizer.decode([i]).strip() for row in ids for i in row)
    with pytest.raises(ValueError, match="class word ' '"):
        ws.class_word_ids(tokenizer, [" "])


def test_class_prototypes_average_a_multi_token_word():
    W_KD = F.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    W_CD = ws.class_prototypes(W_KD, [[3], [1, 2]])
    torch.testing.assert_close(W_CD[0], W_KD[3])
    torch.testing.assert_close(W_CD[1], F.normalize(W_KD[1] + W_KD[2], dim=0))
    assert ws.zero_shot_predict(W_CD, W_CD).tolist() == [0, 1]
    assert ws.zero_shot_predict(torch.zeros(2, 4), W_CD).tolist() == [0, 0]  # ties: lower index


def _set_class_rows(model, ids, F_v_CD):
    """Every token row of class c (in lm_head, the prototypes) becomes F_v of image c."""
    with torch.no_grad():
        for row, f in zip(ids, F_v_CD):
            model.lm_head.weight[row] = f.to(model.lm_head.weight.dtype)


def test_zero_shot_is_exact_when_class_prototypes_are_the_image_features(mm, colour_images, tiny_mm_dir):
    """A model whose colour-word rows equal the F_v of that colour's image classifies every
    image right; the same rows one class off get every image wrong; the untouched model gives
    a valid accuracy with chance 1/8."""
    from comp import CompForConditionalGeneration

    _, processor = mm
    paths, labels = colour_images
    untouched = ws.zero_shot(mm[0], processor, paths, labels, COLOURS)
    assert untouched["n"] == 8 and untouched["chance"] == 1 / 8 and 0 <= untouched["top1"] <= 1
    assert len(untouched["predictions"]) == 8 and set(untouched["tokens"]) == set(COLOURS)

    model = CompForConditionalGeneration.from_pretrained(tiny_mm_dir).eval()
    ids = ws.class_word_ids(processor.tokenizer, COLOURS)
    flat = [i for row in ids for i in row]
    assert len(flat) == len(set(flat)), "class words must not share tokens for this construction"
    F_v_CD = ws.image_features(model, processor.image_processor, paths)
    assert ws.mean_pairwise_cos(F_v_CD) < 0.999  # distinct images, distinct features
    _set_class_rows(model, ids, F_v_CD)
    right = ws.zero_shot(model, processor, paths, labels, COLOURS)
    assert right["top1"] == 1.0 and right["predictions"] == labels
    _set_class_rows(model, ids, F_v_CD.roll(1, dims=0))
    assert ws.zero_shot(model, processor, paths, labels, COLOURS)["top1"] == 0.0


def test_p_v_over_the_prototypes_is_a_distribution(mm, colour_images):
    model, processor = mm
    F_v_ID = ws.image_features(model, processor.image_processor, colour_images[0][:3])
    assert F_v_ID.shape == (3, model.config.text_config.hidden_size)
    torch.testing.assert_close(F_v_ID.norm(dim=-1), torch.ones(3))
    model.set_word_prior("uniform")
    F_t_JD = ws.text_features(model, processor.tokenizer, ["a red circle.", "the number 7."])
    log_p_v, log_p_t = ws.word_distributions(model, F_v_ID, F_t_JD)
    assert log_p_v.shape == (3, model.num_prototypes) and log_p_t.shape == (2, model.num_prototypes)
    torch.testing.assert_close(log_p_v.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(log_p_t.exp().sum(-1), torch.ones(2))
    # argmax of p_v over the class words is the argmax of the cosine with their rows
    ids = ws.class_word_ids(processor.tokenizer, COLOURS)
    single = [row[0] for row in ids if len(row) == 1]
    assert single, "the tiny tokenizer holds colour words as single tokens"
    W_CD = ws.prototypes(model)[single]
    assert ws.zero_shot_predict(F_v_ID, W_CD).tolist() == log_p_v[:, single].argmax(-1).tolist()


def test_demo_uses_the_one_implementation():
    """No module of the demo package keeps its own copy of the word-space functions."""
    import importlib

    for module in ("run", "pipeline", "summary", "study"):
        demo = importlib.import_module(f"comp.demo.{module}")
        for name in ("image_features", "text_features", "word_distributions", "recall_at", "top_words",
                     "mean_pairwise_cos", "retrieval", "zero_shot", "class_word_ids"):
            assert getattr(demo, name, ws) in (ws, getattr(ws, name)), (module, name)


def test_merged_token_health_sees_a_shared_offset(mm, colour_images):
    """A merger whose output is dominated by one bias vector (the collapse the demo watches
    for) has a tiny image-specific share and a large norm against the word embeddings."""
    model, processor = mm
    paths, _ = colour_images
    healthy = ws.merged_token_health(model, processor.image_processor, paths)
    assert healthy["image_specific"] > 0.05 and healthy["images"] == len(paths)
    bias = model.visual.merger.mlp[2].bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(100.0)
        collapsed = ws.merged_token_health(model, processor.image_processor, paths)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert collapsed["image_specific"] < healthy["image_specific"] / 10
    assert collapsed["norm_ratio"] > 10 * healthy["norm_ratio"]
    word_norm = model.get_input_embeddings().weight[: model.num_prototypes].detach().norm(dim=-1).mean()
    expected = 100.0 * bias.numel() ** 0.5 / word_norm
    assert collapsed["norm_ratio"] == pytest.approx(float(expected), rel=0.05)
