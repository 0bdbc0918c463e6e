"""CoMP alignment loss: image features pulled towards the text's distribution over words.

Each sample's pooled image feature ``F_v`` and pooled answer-text feature ``F_t`` are scored
against the LLM's word embeddings (prototypes ``W``, L2-normalised, detached). The text
scores become a target distribution ``p_t`` sharpened by a word-frequency prior (Sinkhorn
style) and the image scores are trained to match it with cross-entropy.

Departures from the reference code, on purpose:
- pooling averages exactly each sample's own merged image tokens, all of its images
  together (the reference averaged padded zeros and pooled per image);
- samples without an image contribute nothing (the reference dropped text-only data);
- all exponentials are taken in log space: ``exp(1 / 0.005)`` overflows float32.

Shape legend: B samples, I samples with an image, D LLM width, K prototype rows
(vocabulary), M merged image tokens of the batch, L text length.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from comp.models.configuration import PRIOR_MODES

__all__ = [
    "alignment_loss",
    "load_word_counts",
    "log_word_prior",
    "masked_mean_pool",
    "pool_image_features",
    "sinkhorn_log_targets",
]


def pool_image_features(
    merged_MD: torch.Tensor, sample_index_M: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each sample's merged image tokens, L2-normalised, in float32.

    Returns ``(F_v [B, D], has_image [B])``; a sample without tokens gets a zero row.
    """
    sample_index_M = sample_index_M.to(merged_MD.device).long()
    sum_BD = merged_MD.new_zeros(num_samples, merged_MD.shape[1], dtype=torch.float32)
    sum_BD = sum_BD.index_add(0, sample_index_M, merged_MD.float())
    count_B = torch.bincount(sample_index_M, minlength=num_samples)
    if count_B.numel() != num_samples:
        raise ValueError(f"sample_index holds ids up to {count_B.numel() - 1} but num_samples is {num_samples}")
    mean_BD = sum_BD / count_B.clamp(min=1).unsqueeze(1)
    return F.normalize(mean_BD, dim=-1), count_B > 0


def masked_mean_pool(hidden_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean of the unmasked positions of each row, L2-normalised, in float32."""
    mask_BL1 = mask_BL.to(device=hidden_BLD.device, dtype=torch.float32).unsqueeze(-1)
    sum_BD = (hidden_BLD.float() * mask_BL1).sum(1)
    return F.normalize(sum_BD / mask_BL1.sum(1).clamp(min=1), dim=-1)


def load_word_counts(path: str | os.PathLike) -> torch.Tensor:
    """Token counts from a ``.pt``/``.pth`` (pickled list or tensor) or ``.npy`` file, float64."""
    path = Path(path)
    if path.suffix not in (".pt", ".pth", ".npy"):
        raise ValueError(f"{path}: word counts must be a .pt/.pth (list or tensor) or .npy file")
    try:
        if path.suffix == ".npy":
            raw = np.load(path, allow_pickle=False)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # empty, truncated, text: the loaders' own errors say little or pages
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable counts file ({type(err).__name__}{': ' + first if first else ''}; "
                         f"{path.stat().st_size if path.exists() else 0} bytes)") from None

    try:
        counts = torch.as_tensor(raw, dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: expected a flat list/array of token counts, got {type(raw).__name__}") from err
    if counts.ndim != 1 or not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{path}: expected a 1-D array of finite, non-negative token counts, "
                         f"got shape {tuple(counts.shape)}")
    return counts


UNIFORM_PRIOR = "uniform"
AUTO_PAD_FRACTION = 0.01  # a counts file may lack at most this share of rows unasked


def log_word_prior(
    counts: torch.Tensor | Sequence[float] | str | os.PathLike | None,
    num_rows: int,
    word_temp: float = 0.05,
    *,
    pad: bool | None = None,
    source: str | None = None,
) -> torch.Tensor:
    """Log of the reference prior ``softmax(u / word_temp)``, ``u`` = counts (>= 1) normalised.

    ``counts`` may be a file path (read with ``load_word_counts``) or ``"uniform"`` (the
    ablation, asked for explicitly); None is an error: the prior is never silently uniform.
    Its length must equal ``num_rows`` (the prototype rows). A shorter file gets count 1 for
    the rows beyond it: with ``pad=None`` (default) when at most ``AUTO_PAD_FRACTION`` of the
    rows are missing (the reference's 151,657 Qwen2-VL entries against Qwen2.5's 151,665
    tokens: its 8 extra specials), with ``pad=True`` always, with ``pad=False`` never.
    ``source`` names the counts in error messages. Returns float32 ``[num_rows]``.
    """
    if counts is None:
        raise ValueError("the alignment loss needs a word-frequency prior: build one with `comp data "
                         "prior DATA --tokenizer LLM --out word_dist.pth` and pass --word_dist_path, or "
                         f"pass --word_dist_path {UNIFORM_PRIOR} for the uniform-prior ablation")
    if isinstance(counts, str) and counts == UNIFORM_PRIOR:
        return torch.full((num_rows,), -math.log(num_rows), dtype=torch.float32)
    if isinstance(counts, (str, os.PathLike)):
        source = source or str(counts)
        counts = load_word_counts(counts)
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    name = source or "word counts"
    missing = num_rows - counts.numel()
    if pad is None:
        pad = 0 < missing <= AUTO_PAD_FRACTION * num_rows
        if pad:
            warnings.warn(f"{name}: {counts.numel()} word counts for {num_rows} prototype rows; the "
                          f"{missing} rows beyond the file count 1", stacklevel=2)
    if missing and not (pad and missing > 0):
        hint = ("; pass pad=True (--word_dist_pad True) to give the extra rows count 1" if missing > 0
                else "; it was counted with a larger vocabulary than the model's")
        raise ValueError(
            f"{name}: {counts.numel()} word counts but the model has {num_rows} prototype rows "
            f"(embedding rows); count the prior with the model's tokenizer (`comp data prior`){hint}"
        )
    u_K = F.pad(counts, (0, missing), value=1.0).clamp(min=1.0)
    return torch.log_softmax(u_K / u_K.sum() / word_temp, dim=0).float()


def sinkhorn_log_targets(
    C_t_BK: torch.Tensor,
    log_prior_K: torch.Tensor,
    *,
    eps: float = 0.005,
    iters: int = 3,
    mode: str = "reference",
) -> torch.Tensor:
    """Log target distributions ``log p_t [B, K]`` (each row sums to 1) from text scores.

    ``"reference"``: the reference loop, ``iters`` times {multiply by the prior, normalise each
    sample over K}, i.e. ``log_softmax(C_t / eps + iters * log_prior)``.
    ``"sinkhorn"``: two-sided Sinkhorn-Knopp (paper eq. 9), ``P = Diag(a) exp(C_t / eps) Diag(b)``
    with the prior as marginal over K and a uniform one over samples; ``iters`` rounds of
    {fit the sample marginal, fit the vocabulary marginal}; rows returned normalised.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    logits_BK = C_t_BK.float() / eps
    log_prior_K = log_prior_K.to(logits_BK)
    if mode == "reference":
        return torch.log_softmax(logits_BK + iters * log_prior_K, dim=-1)
    if mode != "sinkhorn":
        raise ValueError(f"mode must be one of {PRIOR_MODES}, got {mode!r}")
    log_b_K = torch.zeros_like(log_prior_K)
    log_sample_marginal = -math.log(C_t_BK.shape[0])
    for _ in range(iters):
        log_a_B = log_sample_marginal - torch.logsumexp(logits_BK + log_b_K, dim=1)
        log_b_K = log_prior_K - torch.logsumexp(logits_BK + log_a_B[:, None], dim=0)
    return torch.log_softmax(logits_BK + log_b_K, dim=-1)


def alignment_loss(
    F_v_BD: torch.Tensor,
    F_t_BD: torch.Tensor,
    prototypes_KD: torch.Tensor,
    log_prior_K: torch.Tensor,
    has_image_B: torch.Tensor,
    *,
    embed_temp: float = 0.005,
    word_eps: float = 0.005,
    iters: int = 3,
    mode: str = "reference",
) -> torch.Tensor:
    """``-sum_k p_t log softmax(C_v / embed_temp)``, averaged over samples with an image.

    Gradient flows only into ``F_v`` (prototypes and text side are targets). With no image in
    the batch the result is exactly 0 and still connected to ``F_v``, so every rank runs the
    same backward. Returns a float32 scalar.
    """
    if not (F_v_BD.shape == F_t_BD.shape and F_v_BD.shape[:1] == has_image_B.shape):
        raise ValueError(f"F_v {tuple(F_v_BD.shape)}, F_t {tuple(F_t_BD.shape)} and has_image "
                         f"{tuple(has_image_B.shape)} must agree on [B, D] / [B]")
    W_KD = F.normalize(prototypes_KD.detach().float(), dim=-1)
    # Only samples with an image take part, also in the (batch-coupled) Sinkhorn targets.
    keep_I = has_image_B.to(F_v_BD.device).bool().nonzero().squeeze(1)
    log_p_v_IK = torch.log_softmax(F_v_BD[keep_I].float() @ W_KD.t() / embed_temp, dim=-1)
    if keep_I.numel() == 0:
        return log_p_v_IK.sum()
    with torch.no_grad():
        log_p_t_IK = sinkhorn_log_targets(F_t_BD[keep_I].float() @ W_KD.t(), log_prior_K,
                                          eps=word_eps, iters=iters, mode=mode)
    return -(log_p_t_IK.exp() * log_p_v_IK).sum() / keep_I.numel()
