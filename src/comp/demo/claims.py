"""Measurements behind the demo's encoder claims that the pipeline does not make itself.

- ``caption_diversity``: how much toyworld's captions differ from one another, as the LLM
  reads them. The alignment loss's targets come from the text features ``F_t`` (the LLM's
  last hidden states, masked mean, as comp.eval.wordspace forms them); when every caption
  has nearly the same ``F_t`` every image gets the same target word distribution. Reported
  with two views of the same texts that need no LLM context: the mean input word embedding
  and a bag-of-words term-frequency vector (words and single digits); and with its floor: the
  same measure on texts of random words from the captions' own words (one per caption, as
  long), which share nothing but that vocabulary. A small LLM's features are anisotropic:
  its F_t cannot fall far below that floor whatever the captions say.
- ``alignment_targets``: the alignment loss's own targets ``p_t`` for texts (the prior and
  the reference's constants): how many distinct words they peak on, how peaked they are, and
  how many peak on a content word. The loss can only make image features differ by image if
  the targets do: targets that peak on the same few function words whatever the scene pull
  every image to one word distribution (the demo's word-space collapse, issue 23). Beside
  them, where the LLM's last hidden states point: at the next token or at the current one.
- ``probe_cell``: what a frozen encoder's tokens tell about one toyworld attribute, at the
  encoder's fixed size, at native size and at 2x; for digits and words also with large
  glyphs at the fixed size (can the encoder read at all; the other splits ask about small
  glyphs in large scenes, which the fixed-size squeeze makes illegible).

Shape legend: N texts or images, D width, V vocabulary (bag of words).
"""
from __future__ import annotations

import random
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
    and bag-of-words vectors (1: every caption the same), the text features' floor (module
    docstring) and the most common words."""
    from transformers import AutoModelForCausalLM

    from comp.data.collator import pad_rows
    from comp.data.conversation import load_tokenizer
    from comp.eval.wordspace import text_features

    if len(captions) < 2:
        raise ValueError(f"caption_diversity needs at least two captions, got {len(captions)}")
    tokenizer = load_tokenizer(str(llm_dir))
    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()

    def features_ND(texts: Sequence[str]) -> torch.Tensor:
        return torch.cat([text_features(model, tokenizer, list(texts[i:i + 64])) for i in range(0, len(texts), 64)])

    f_t_ND = features_ND(captions)
    rng = random.Random(0)
    pool = [w for t in captions for w in t.split()]
    random_texts = [" ".join(rng.choices(pool, k=len(t.split()))) for t in captions]
    rows = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    padded = pad_rows([torch.tensor(r) for r in rows], tokenizer.pad_token_id, "ids", "mask")
    mask_NL = padded["mask"].unsqueeze(-1).float()
    embed_NLD = model.get_input_embeddings()(padded["ids"]).float()
    embed_ND = (embed_NLD * mask_NL).sum(1) / mask_NL.sum(1)
    words = Counter(w for t in captions for w in WORD_PATTERN.findall(t.lower()))
    return {"captions": len(captions),
            "text_feature_cos": mean_pairwise_cos(f_t_ND),
            "text_feature_cos_random_words": mean_pairwise_cos(features_ND(random_texts)),
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


# A probe head is trained once per (train split, resolution) and scored on each of its val
# splits: (train split, fixed size?, {setting: val split}). "native 2x" is the val scenes
# rendered at twice the size, classified by the native-trained head.
PROBE_GROUPS = (("train", True, {"fixed": "val"}),
                ("train", False, {"native": "val", "native 2x": "val_hires"}))
# the reading probes add: large glyphs at the fixed size (can the encoder read at all?)
READING_GROUPS = (("train_large", True, {"large, fixed": "val_large"}),)


def probe_groups(attribute: str) -> tuple:
    from comp.data.toyworld import READING_PROBES

    return PROBE_GROUPS + (READING_GROUPS if attribute in READING_PROBES else ())


def probe_cell(encoder_dir: str | Path, toyworld: str | Path, attribute: str, image_size: int, *,
               attentive: bool, per_class: int | None = None, seeds: int = 3, linear_epochs: int = 300,
               attentive_epochs: int = 20, max_num_vistoken: int = 1280) -> list[dict]:
    """Linear (mean-pooled tokens) and, with ``attentive``, attentive (all tokens) probe top-1
    of a frozen encoder on one toyworld probe attribute: one row per setting of
    ``probe_groups(attribute)`` with mean, std and values over ``seeds`` probe seeds, chance,
    images and patches per image. "fixed" resizes every image to ``image_size`` square,
    native keeps each image's size within ``max_num_vistoken`` merged tokens. ``per_class``:
    the first images of each class per split (None: all). One cell is one child's work in
    comp.demo.pipeline.probe_results."""
    from comp.demo.common import per_class_subset, seed_stats
    from comp.eval.features import encode_files, load_encoder, mean_pool
    from comp.eval.heads import TrainSettings, attentive_probe, linear_probe, top1
    from comp.eval.probe import read_image_folder

    root = Path(toyworld) / "probe" / attribute
    rows = []
    for train_split, fixed, evals in probe_groups(attribute):
        encoder = load_encoder(encoder_dir, resolution=image_size if fixed else None,
                               max_num_vistoken=max_num_vistoken, device="cpu")
        train_p, train_y, classes = read_image_folder(root / train_split)
        train_p, train_y = per_class_subset(train_p, train_y, per_class)
        train_tokens, _ = encode_files(encoder, train_p)
        train_y = torch.tensor(train_y)
        vals = {}
        for setting, split in evals.items():
            paths, labels, _ = read_image_folder(root / split, classes)
            paths, labels = per_class_subset(paths, labels, per_class)
            vals[setting] = (*encode_files(encoder, paths), torch.tensor(labels))
        # one head per seed, scored on every val split of this group
        val_tokens = [t for tokens, _, _ in vals.values() for t in tokens]
        bounds = torch.tensor([0, *[len(y) for _, _, y in vals.values()]]).cumsum(0).tolist()
        preds: dict[str, list[torch.Tensor]] = {"linear": [], **({"attentive": []} if attentive else {})}
        for seed in range(seeds):
            full = TrainSettings(epochs=linear_epochs, lr=1e-2, wd=0.0, batch_size=len(train_y), seed=seed)
            preds["linear"].append(linear_probe(mean_pool(train_tokens), train_y, mean_pool(val_tokens),
                                                len(classes), full))
            if attentive:
                mini = TrainSettings(epochs=attentive_epochs, lr=1e-3, wd=0.0, batch_size=32, seed=seed)
                preds["attentive"].append(attentive_probe(train_tokens, train_y, val_tokens, len(classes), mini))
        for k, (setting, (_, grid_N3, val_y)) in enumerate(vals.items()):
            part = slice(bounds[k], bounds[k + 1])
            rows.append({"attribute": attribute, "setting": setting, "chance": 1 / len(classes),
                         "n_train": len(train_y), "n_val": len(val_y),
                         "patches_per_image": float(grid_N3.prod(-1).float().mean()), "attentive": None,
                         **{head: seed_stats([top1(p[part], val_y) for p in ps]) for head, ps in preds.items()}})
    return rows


# (fixed size?, {setting: val split}): as PROBE_GROUPS, for toyworld's segmentation split
DENSE_GROUPS = ((True, {"fixed": "val"}), (False, {"native": "val", "native 2x": "val_hires"}))


def dense_cell(encoder_dir: str | Path, seg_root: str | Path, image_size: int, fixed: bool, *, seeds: int = 3,
               epochs: int = 10, lr: float = 1e-2, batch_size: int = 16, n_train: int | None = None,
               n_val: int | None = None, max_num_vistoken: int = 1280) -> list[dict]:
    """mIoU and pixel accuracy (mean, std and values over ``seeds`` head seeds) of the linear
    segmentation probe (comp.eval.segmentation's head, loss and metric; one fixed lr instead
    of its sweep, as the demo's other probes) on a frozen encoder, one row per setting of the
    DENSE_GROUPS entry with that ``fixed`` (two cells: the halves run side by side).
    ``seg_root`` holds train/, val/ and val_hires/ in ADE20K's layout (toyworld's seg/);
    ``n_train`` / ``n_val``: the first images of each split (None: all)."""
    from comp.demo.common import seed_stats
    from comp.eval import segmentation as seg
    from comp.eval.features import encode_files, load_encoder
    from comp.eval.heads import TrainSettings

    root = Path(seg_root)
    names = seg.read_class_names(root)

    def split(name: str, limit: int | None):
        images, annotations = seg.read_split(root / name)
        images, annotations = images[:limit], annotations[:limit]
        return images, seg.load_labels(images, annotations)

    train_images, train_labels = split("train", n_train)
    num_classes = seg.num_classes_of(train_labels, names, str(root / "train"))
    names = names or [str(v) for v in range(1, num_classes + 1)]
    rows = []
    for _, evals in (group for group in DENSE_GROUPS if group[0] == fixed):
        encoder = load_encoder(encoder_dir, resolution=image_size if fixed else None,
                               max_num_vistoken=max_num_vistoken, device="cpu")
        train_tokens, train_grid = encode_files(encoder, train_images)
        vals = {}
        for setting, name in evals.items():
            images, labels = split(name, n_val)
            vals[setting] = (*encode_files(encoder, images), labels)
        scored: dict[str, list[dict]] = {setting: [] for setting in evals}
        fold_se: dict[str, float] = {}
        for seed in range(seeds):
            settings = TrainSettings(epochs=epochs, lr=lr, wd=0.0, batch_size=batch_size, seed=seed)
            head = seg.train_head(train_tokens, train_grid, train_labels, num_classes, settings)
            for setting, (tokens, grid_N3, labels) in vals.items():
                conf_NKK = torch.stack([seg.evaluate(head, [t], g[None], [y], num_classes)
                                        for t, g, y in zip(tokens, grid_N3, labels)])
                scored[setting].append(seg.scores(conf_NKK.sum(0), names))
                if seed == 0:
                    fold_se[setting] = miou_fold_se(conf_NKK, names)
        for setting, (tokens, _, labels) in vals.items():
            rows.append({"setting": setting, "classes": num_classes, "n_train": len(train_images),
                         "n_val": len(labels), "tokens_per_image": sum(map(len, tokens)) / len(tokens),
                         "miou": seed_stats([s["miou"] for s in scored[setting]]), "miou_se": fold_se[setting],
                         "pixel_acc": seed_stats([s["pixel_acc"] for s in scored[setting]])})
    return rows


def miou_fold_se(conf_NKK: torch.Tensor, names: list[str], folds: int = 5) -> float:
    """The sampling error of a val set's mIoU, from per-image confusions: the std of the mIoU
    of ``folds`` disjoint image folds over sqrt(folds) (0 with fewer images than folds)."""
    from comp.demo.common import mean_std
    from comp.eval.segmentation import scores

    if len(conf_NKK) < folds:
        return 0.0
    per_fold = [scores(conf_NKK[k::folds].sum(0), names)["miou"] for k in range(folds)]
    return mean_std(per_fold)[1] / folds ** 0.5
