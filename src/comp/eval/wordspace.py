"""How close a CoMP-MM's image features sit to the LLM's word space, read through the
alignment loss's own prototypes.

The prototypes are the LLM's output word embeddings ``W`` (the tokenizer's rows of
``lm_head``), L2-normalised, as ``comp.models.alignment`` uses them; an image's ``F_v`` is
the mean of its merged visual tokens (encoder + merger), L2-normalised; its distribution
over words is ``p_v = softmax(F_v W^T / embed_temp)``.

- Zero-shot classification: an image's class is the class word whose prototype scores
  highest under ``p_v`` (argmax over the class words' rows; the softmax does not change
  the order). A class word is taken as running text writes it, after a space; tokens that
  are whitespace only are dropped (the Qwen tokenizer splits a digit from the space before
  it). A word of several tokens is scored by the mean of its tokens' normalised rows
  (renormalised); ``zero_shot`` reports which words needed that.
- Image-caption retrieval: captions through the LLM's text pass (masked mean of the last
  hidden states, the loss's ``F_t``) and the prior-sharpened targets ``p_t``; captions are
  ranked for each image by the loss's own quantity, sum_k p_t(k) log p_v(k), and by the
  cosine of F_v and F_t.

Shape legend: I images, J captions, K prototypes (vocabulary rows), D LLM width, M merged
visual tokens, L caption tokens, C classes.
"""
from __future__ import annotations

import math

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F


def prototypes(model) -> torch.Tensor:
    """W [K, D]: the tokenizer's rows of the output word embeddings, L2-normalised, float32."""
    return F.normalize(model.lm_head.weight[: model.num_prototypes].detach().float(), dim=-1)


@torch.no_grad()
def image_features(model, image_processor, paths: Sequence[Path], batch: int = 16) -> torch.Tensor:
    """F_v [I, D]: each image's merged tokens (encoder + merger), mean-pooled, L2-normalised."""
    from comp.models.alignment import pool_image_features

    pooled = []
    for lo in range(0, len(paths), batch):
        inputs = image_processor(list(paths[lo:lo + batch]), return_tensors="pt")
        grid_N3 = inputs["image_grid_thw"]
        feats_MD = model.image_features(inputs["pixel_values"], grid_N3)
        per_image = grid_N3.prod(-1) // model.config.spatial_merge_size ** 2
        index_M = torch.repeat_interleave(torch.arange(len(grid_N3)), per_image)
        pooled.append(pool_image_features(feats_MD, index_M, len(grid_N3))[0])
    return torch.cat(pooled)


@torch.no_grad()
def merged_token_health(model, image_processor, paths: Sequence[Path]) -> dict:
    """Whether the merged visual tokens still carry their images: their mean norm against the
    LLM's input word embeddings (``norm_ratio``), and the share of it that is not one vector
    common to every token of every image (``image_specific``: mean ||f - mean f|| / mean ||f||).
    A merger that drifts to a large shared offset leaves the LLM (after RMSNorm) nearly the
    same tokens for every image, and it stops reading them."""
    inputs = image_processor(list(paths), return_tensors="pt")
    feats_MD = model.image_features(inputs["pixel_values"], inputs["image_grid_thw"]).float()
    norm = feats_MD.norm(dim=-1).mean()
    text = model.get_input_embeddings().weight[: model.num_prototypes].float().norm(dim=-1).mean()
    specific = (feats_MD - feats_MD.mean(0)).norm(dim=-1).mean()
    return {"visual_norm": float(norm), "text_norm": float(text), "norm_ratio": float(norm / text),
            "image_specific": float(specific / norm), "images": len(paths)}


@torch.no_grad()
def text_features(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """F_t [J, D]: the LLM's last hidden states of each text, masked mean, L2-normalised
    (the alignment loss's text pass)."""
    from comp.data.collator import pad_rows
    from comp.models.alignment import masked_mean_pool

    # padded as the collator pads the alignment text
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    padded = pad_rows([torch.tensor(r) for r in rows], tokenizer.pad_token_id, "ids", "mask")
    ids_JL, mask_JL = padded["ids"], padded["mask"]
    hidden_JLD = model.model(input_ids=ids_JL, attention_mask=mask_JL).last_hidden_state
    return masked_mean_pool(hidden_JLD, mask_JL)


def word_distributions(model, F_v_ID: torch.Tensor, F_t_JD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_v [I, K], log p_t [J, K]) exactly as the alignment loss forms them: image
    scores at ``embed_temp``, text targets through the prior (Sinkhorn) at ``word_eps``."""
    from comp.models.alignment import sinkhorn_log_targets

    cfg = model.config
    W_KD = prototypes(model)
    log_p_v_IK = torch.log_softmax(F_v_ID.float() @ W_KD.T / cfg.embed_temp, dim=-1)
    log_p_t_JK = sinkhorn_log_targets(F_t_JD.float() @ W_KD.T, model._log_prior(), eps=cfg.word_eps,
                                      iters=cfg.sinkhorn_iters, mode=cfg.prior_mode)
    return log_p_v_IK, log_p_t_JK


def recall_at(scores_IJ: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image -> text recall@k, caption i belonging to image i. Ties count against the match
    (a constant score gives recall 0, never a lucky 1)."""
    if scores_IJ.shape[0] != scores_IJ.shape[1]:
        raise ValueError(f"expected one caption per image, got scores {tuple(scores_IJ.shape)}")
    own_I1 = scores_IJ.diagonal().unsqueeze(1)
    rank_I = (scores_IJ >= own_I1).sum(1) - 1  # captions scored at least as high, self excluded
    return {f"R@{k}": int((rank_I < k).sum()) / len(rank_I) for k in ks}


def top_words(tokenizer, log_p_K: torch.Tensor, k: int = 5) -> list[str]:
    """The ``k`` most probable tokens, as text where they decode to printable text."""
    return [word for word, _ in top_word_probs(tokenizer, log_p_K, k)]


def top_word_probs(tokenizer, log_p_K: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most probable tokens with their probabilities (the prototype-word panel)."""
    out = []
    top = log_p_K.topk(k)
    for i, log_p in zip(top.indices.tolist(), top.values.tolist()):
        text = tokenizer.decode([i]).strip()
        word = (text if text.isprintable() and text and "\ufffd" not in text
                else tokenizer.convert_ids_to_tokens(i))
        out.append((word, math.exp(log_p)))
    return out


def mean_pairwise_cos(x_ND: torch.Tensor) -> float:
    """Mean cosine between distinct rows: 1 means every row points the same way."""
    x_ND = F.normalize(x_ND.float(), dim=-1)
    n = len(x_ND)
    return float(((x_ND.sum(0) ** 2).sum() - n) / max(1, n * (n - 1)))


@torch.no_grad()
def retrieval(model, processor, word_dist: Path, entries: list[dict], root: Path,
              examples: int = 3) -> dict:
    """Recall@1/5 over ``entries`` (toyworld retrieval records) and a few images' top words."""
    model.eval()
    model.set_word_prior(word_dist)
    F_v_ID = image_features(model, processor.image_processor, [root / e["image"] for e in entries])
    F_t_JD = text_features(model, processor.tokenizer, [e["caption"] for e in entries])
    log_p_v_IK, log_p_t_JK = word_distributions(model, F_v_ID, F_t_JD)
    return {
        "images": len(entries),
        "prototypes": recall_at(log_p_v_IK @ log_p_t_JK.exp().T),
        "features": recall_at(F_v_ID @ F_t_JD.T),
        "image_cos": mean_pairwise_cos(F_v_ID), "caption_cos": mean_pairwise_cos(F_t_JD),
        "examples": [{"caption": entries[i]["caption"],
                      "image_words": top_words(processor.tokenizer, log_p_v_IK[i]),
                      "image_word_probs": top_word_probs(processor.tokenizer, log_p_v_IK[i]),
                      "caption_words": top_words(processor.tokenizer, log_p_t_JK[i])}
                     for i in range(min(examples, len(entries)))],
    }


# ----------------------------------------------------------------------------- zero-shot


def class_word_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Token ids of each word as running text writes it (after a space), whitespace-only
    tokens dropped; an error names a word that leaves no token."""
    ids = []
    for word in words:
        row = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        row = [i for i in row if tokenizer.decode([i]).strip()]
        if not row:
            raise ValueError(f"class word {word!r} has no token besides whitespace; "
                             "pass non-empty class words")
        ids.append(row)
    return ids


def class_prototypes(W_KD: torch.Tensor, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """W_C [C, D]: each class word's prototype row; a word of several tokens gets the mean
    of its rows, renormalised."""
    return F.normalize(torch.stack([W_KD[list(row)].mean(0) for row in ids]), dim=-1)


def zero_shot_predict(F_v_ND: torch.Tensor, W_CD: torch.Tensor) -> torch.Tensor:
    """The class whose prototype p_v ranks highest: argmax of F_v . W_c (ties: lower index)."""
    return (F_v_ND.float() @ W_CD.float().T).argmax(-1)


@torch.no_grad()
def zero_shot(model, processor, paths: Sequence[Path], labels: Sequence[int],
              classes: Sequence[str]) -> dict:
    """Zero-shot top-1 of ``paths`` (true class ``classes[labels[i]]``) by the prototypes of
    the class words, with chance 1 / C and the tokens each class word was read as. The image
    resolution is ``processor.image_processor``'s (budget or fixed square)."""
    model.eval()
    ids = class_word_ids(processor.tokenizer, classes)
    W_CD = class_prototypes(prototypes(model), ids)
    F_v_ND = image_features(model, processor.image_processor, list(paths))
    pred_N = zero_shot_predict(F_v_ND, W_CD)
    labels_N = torch.as_tensor(list(labels))
    return {"top1": float((pred_N == labels_N).float().mean()), "chance": 1 / len(classes),
            "n": len(labels_N), "predictions": pred_N.tolist(),
            "tokens": {c: processor.tokenizer.convert_ids_to_tokens(row) for c, row in zip(classes, ids)},
            "multi_token": [c for c, row in zip(classes, ids) if len(row) > 1]}
