"""Measurements behind the demo's encoder claims that the pipeline does not make itself.

- ``caption_diversity``: how much toyworld's captions differ from one another, as the LLM
  reads them. The alignment loss's targets come from the text features ``F_t`` (the LLM's
  last hidden states, masked mean, as comp.eval.wordspace forms them); when every caption
  has nearly the same ``F_t`` every image gets the same target word distribution. Reported
  with two views of the same texts that need no LLM context: the mean input word embedding
  and a bag-of-words term-frequency vector (words and single digits).
- ``alignment_targets``: the alignment loss's own targets ``p_t`` for texts (the prior and
  the reference's constants): how many distinct words they peak on, how peaked they are, and
  how many peak on a content word. The loss can only make image features differ by image if
  the targets do: targets that peak on the same few function words whatever the scene pull
  every image to one word distribution (the demo's word-space collapse, issue 23). Beside
  them, where the LLM's last hidden states point: at the next token or at the current one.
- ``reading_probe``: does an encoder read digits and words, and at which resolution. Probes
  on frozen tokens over toyworld's reading splits: large glyphs at the encoder's fixed size
  ("large, fixed": can it read at all), small glyphs in large scenes squeezed to the fixed
  size ("small, fixed": what the squeeze leaves) and at native size ("small, native").

Shape legend: N texts or images, D width, V vocabulary (bag of words).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from comp.eval.wordspace import mean_pairwise_cos

WORD_PATTERN = re.compile(r"[a-z]+|\d")  # words and single digits (the tokenizer splits numbers)


def bag_of_words(texts: Sequence[str]) -> torch.Tensor:
    """Term-frequency vectors [N, V] over the texts' own lower-cased words and digits."""
    tokens = [WORD_PATTERN.findall(t.lower()) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for row in tokens for w in row}))}
    x_NV = torch.zeros(len(texts), max(1, len(vocab)))
    for i, row in enumerate(tokens):
        for word, count in Counter(row).items():
            x_NV[i, vocab[word]] = count
    return x_NV


@torch.no_grad()
def caption_diversity(llm_dir: str | Path, captions: Sequence[str]) -> dict:
    """Mean pairwise cosine of the captions' LLM text features, mean input word embeddings
    and bag-of-words vectors (1: every caption the same), and the most common words."""
    from transformers import AutoModelForCausalLM

    from comp.data.collator import pad_rows
    from comp.data.conversation import load_tokenizer
    from comp.eval.wordspace import text_features

    if len(captions) < 2:
        raise ValueError(f"caption_diversity needs at least two captions, got {len(captions)}")
    tokenizer = load_tokenizer(str(llm_dir))
    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    f_t_ND = torch.cat([text_features(model, tokenizer, list(captions[i:i + 64]))
                        for i in range(0, len(captions), 64)])
    rows = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    padded = pad_rows([torch.tensor(r) for r in rows], tokenizer.pad_token_id, "ids", "mask")
    mask_NL = padded["mask"].unsqueeze(-1).float()
    embed_NLD = model.get_input_embeddings()(padded["ids"]).float()
    embed_ND = (embed_NLD * mask_NL).sum(1) / mask_NL.sum(1)
    words = Counter(w for t in captions for w in WORD_PATTERN.findall(t.lower()))
    return {"captions": len(captions),
            "text_feature_cos": mean_pairwise_cos(f_t_ND),
            "word_embedding_cos": mean_pairwise_cos(embed_ND),
            "bag_of_words_cos": mean_pairwise_cos(bag_of_words(captions)),
            "tokens_per_caption": sum(map(len, rows)) / len(rows),
            "top_words": [w for w, _ in words.most_common(8)]}


@torch.no_grad()
def alignment_targets(llm_dir: str | Path, texts: Sequence[str], word_dist: str | Path,
                      content_words: Sequence[str] = (), top: int = 5) -> dict:
    """The targets ``p_t`` of ``texts`` as the alignment loss forms them (comp.models.alignment
    at its defaults: prior from ``word_dist``, eps 0.005, 3 reference iterations), summarised:
    distinct argmax words, the commonest ones with counts, mean entropy (nats) and top
    probability, mean pairwise cosine of the p_t rows, the share whose argmax is one of
    ``content_words`` (as running text writes them, after a space), and the mean cosine of
    each position's last hidden state with the next and with the current token's prototype."""
    from transformers import AutoModelForCausalLM

    from comp.data.collator import pad_rows
    from comp.data.conversation import load_tokenizer
    from comp.models.alignment import (
        log_word_prior,
        masked_mean_pool,
        sinkhorn_log_targets,
    )
    from comp.models.configuration import CompConfig

    if not texts:
        raise ValueError("alignment_targets needs at least one text")
    tokenizer = load_tokenizer(str(llm_dir))
    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    K = len(tokenizer)
    W_KD = torch.nn.functional.normalize(model.get_output_embeddings().weight[:K].float(), dim=-1)
    log_prior_K = log_word_prior(str(word_dist), K, CompConfig.word_temp)
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    log_p, next_cos, current_cos, positions = [], 0.0, 0.0, 0
    for lo in range(0, len(rows), 64):
        padded = pad_rows([torch.tensor(r) for r in rows[lo:lo + 64]], tokenizer.pad_token_id, "ids", "mask")
        ids_NL, mask_NL = padded["ids"], padded["mask"]
        hidden_NLD = model.model(input_ids=ids_NL, attention_mask=mask_NL).last_hidden_state.float()
        log_p.append(sinkhorn_log_targets(masked_mean_pool(hidden_NLD, mask_NL) @ W_KD.T, log_prior_K,
                                          eps=CompConfig.word_eps, iters=CompConfig.sinkhorn_iters))
        unit_NLD = torch.nn.functional.normalize(hidden_NLD, dim=-1)
        current_cos += float(((unit_NLD * W_KD[ids_NL]).sum(-1) * mask_NL).sum())
        next_cos += float(((unit_NLD[:, :-1] * W_KD[ids_NL[:, 1:]]).sum(-1) * mask_NL[:, 1:]).sum())
        positions += int(mask_NL.sum())
    log_p_NK = torch.cat(log_p)
    p_NK = log_p_NK.exp()
    argmax_N = p_NK.argmax(-1)
    counts_K = torch.bincount(argmax_N, minlength=K)
    content = {i for w in content_words for i in tokenizer(" " + w, add_special_tokens=False)["input_ids"][-1:]}
    commonest = counts_K.topk(min(top, K))
    return {"texts": len(rows),
            "distinct_argmax": int((counts_K > 0).sum()),
            "top_targets": [(tokenizer.decode([int(i)]), int(c)) for c, i in zip(commonest.values, commonest.indices)
                            if c > 0],
            "entropy": float(-(p_NK * log_p_NK).nan_to_num().sum(-1).mean()),
            "max_p": float(p_NK.max(-1).values.mean()),
            "target_cos": mean_pairwise_cos(p_NK) if len(rows) > 1 else 1.0,
            "content_share": sum(int(i) in content for i in argmax_N) / len(rows),
            "next_token_cos": next_cos / max(1, positions - len(rows)),
            "current_token_cos": current_cos / max(1, positions)}


def mean_pairwise_bow_cos(texts: Sequence[str]) -> float:
    """The bag-of-words view alone (no model): cheap enough for a test of toyworld."""
    return mean_pairwise_cos(bag_of_words(texts))


# (setting, train split, val split, fixed size?): what each reading-probe row measures
READING_SETTINGS = (("large, fixed", "train_large", "val_large", True),
                    ("small, fixed", "train", "val", True),
                    ("small, native", "train", "val", False))


def reading_probe(encoder_dir: str | Path, toyworld: str | Path, image_size: int,
                  attributes: Sequence[str] = ("digit", "word"), *, per_class: int | None = None,
                  seeds: int = 3, linear_epochs: int = 300, attentive_epochs: int = 20,
                  max_num_vistoken: int = 1280) -> list[dict]:
    """Linear (mean-pooled tokens) and attentive (all tokens) probe top-1 of a frozen encoder
    on toyworld's reading splits, one row per attribute and READING_SETTINGS entry: mean,
    std and values over ``seeds`` probe seeds, chance, images and patches per image. The
    heads and their settings are the demo's (comp.demo.pipeline.probe_results); "fixed"
    resizes every image to ``image_size`` square, "native" keeps each image's size within
    ``max_num_vistoken`` merged tokens. ``per_class``: the first images of each class per
    split (None: all)."""
    from comp.eval.features import encode_files, load_encoder, mean_pool
    from comp.eval.probe import (
        TrainSettings,
        attentive_probe,
        linear_probe,
        read_image_folder,
        top1,
    )

    rows = []
    encoders = {}
    for attribute in attributes:
        root = Path(toyworld) / "probe" / attribute
        for setting, train_split, val_split, fixed in READING_SETTINGS:
            resolution = image_size if fixed else None
            if resolution not in encoders:
                encoders[resolution] = load_encoder(encoder_dir, resolution=resolution,
                                                    max_num_vistoken=max_num_vistoken, device="cpu")
            encoder = encoders[resolution]
            train_p, train_y, classes = read_image_folder(root / train_split)
            val_p, val_y, _ = read_image_folder(root / val_split, classes)
            train_p, train_y = first_per_class(train_p, train_y, per_class)
            val_p, val_y = first_per_class(val_p, val_y, per_class)
            train_tokens, _ = encode_files(encoder, train_p)
            val_tokens, val_grid = encode_files(encoder, val_p)
            train_y, val_y = torch.tensor(train_y), torch.tensor(val_y)
            heads: dict[str, list[float]] = {"linear": [], "attentive": []}
            for seed in range(seeds):
                full = TrainSettings(epochs=linear_epochs, lr=1e-2, wd=0.0, batch_size=len(train_y), seed=seed)
                pred = linear_probe(mean_pool(train_tokens), train_y, mean_pool(val_tokens), len(classes), full)
                heads["linear"].append(top1(pred, val_y))
                mini = TrainSettings(epochs=attentive_epochs, lr=1e-3, wd=0.0, batch_size=32, seed=seed)
                pred = attentive_probe(train_tokens, train_y, val_tokens, len(classes), mini)
                heads["attentive"].append(top1(pred, val_y))
            rows.append({"attribute": attribute, "setting": setting, "chance": 1 / len(classes),
                         "n_train": len(train_y), "n_val": len(val_y),
                         "patches_per_image": float(val_grid.prod(-1).float().mean()),
                         **{head: _stats(values) for head, values in heads.items()}})
    return rows


def first_per_class(paths: list, labels: list[int], limit: int | None) -> tuple[list, list[int]]:
    """The first ``limit`` items of each class (all when None), order kept."""
    if limit is None:
        return paths, labels
    seen: Counter = Counter()
    keep = []
    for i, y in enumerate(labels):
        seen[y] += 1
        if seen[y] <= limit:
            keep.append(i)
    return [paths[i] for i in keep], [labels[i] for i in keep]


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
    return {"mean": mean, "std": std, "values": values}
