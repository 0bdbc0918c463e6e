"""The probe heads and their training, shared by the image-level probes (``probe``) and the
dense probe (``segmentation``): a linear and an attentive head, k-NN voting, one AdamW loop,
and the (lr, wd) sweep on a held-out part of the training split.

Shape legend: N images, B a batch, L tokens (padded), D encoder width, H attention heads of
width d, C classes, K neighbours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

KNN_TEMPERATURE = 0.07


def pad_tokens(tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length token sets -> (x_BLD zero-padded, valid_BL)."""
    length = max(len(t) for t in tokens)
    x_BLD = tokens[0].new_zeros(len(tokens), length, tokens[0].shape[1])
    valid_BL = torch.zeros(len(tokens), length, dtype=torch.bool)
    for i, t in enumerate(tokens):
        x_BLD[i, : len(t)] = t
        valid_BL[i, : len(t)] = True
    return x_BLD, valid_BL


# ----------------------------------------------------------------------------- probes


class AttentiveProbe(nn.Module):
    """A learned query cross-attends to the frozen tokens; the pooled vector is classified."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8):
        super().__init__()
        heads = math.gcd(dim, num_heads)
        self.norm_in = nn.LayerNorm(dim)
        self.query_1D = nn.Parameter(torch.zeros(1, dim))
        nn.init.trunc_normal_(self.query_1D, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x_BLD: torch.Tensor, valid_BL: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_out(self.pool(self.norm_in(x_BLD), valid_BL)))

    def pool(self, x_BLD: torch.Tensor, valid_BL: torch.Tensor) -> torch.Tensor:
        """``self.attn`` of the one query over the tokens, without projecting every token:
        with a single query, each head's logits are x . (W_k,h^T q_h) (the key bias is the same
        for every token and cancels in the softmax) and its output is W_v,h (sum_L a_L x_L) + b_v,h
        (the weights sum to 1). The same function of the same parameters as
        ``self.attn(q, x, x, key_padding_mask=~valid_BL)`` at O(L D H) per image instead of
        O(L D^2) (tests/test_eval_probe.py holds it to the module); the tokens are the probe's
        whole cost."""
        attn, (B, _, D) = self.attn, x_BLD.shape
        H = attn.num_heads
        W_q, W_k, W_v = attn.in_proj_weight.chunk(3)
        b_q, _, b_v = attn.in_proj_bias.chunk(3)
        q_Hd = (self.query_1D[0] @ W_q.T + b_q).view(H, D // H)
        keys_DH = torch.einsum("hdD,hd->Dh", W_k.view(H, D // H, D), q_Hd) / math.sqrt(D // H)
        logits_BHL = (x_BLD @ keys_DH).transpose(1, 2).masked_fill(~valid_BL[:, None, :], float("-inf"))
        mixed_BHD = logits_BHL.softmax(-1) @ x_BLD
        values_BD = torch.einsum("bhD,hdD->bhd", mixed_BHD, W_v.view(H, D // H, D)).reshape(B, D) + b_v
        return attn.out_proj(values_BD)


class LinearProbe(nn.Module):
    """Standardisation (train statistics, frozen) + a linear classifier."""

    def __init__(self, mean_D: torch.Tensor, std_D: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean_D", mean_D)
        self.register_buffer("std_D", std_D.clamp_min(1e-6))
        self.head = nn.Linear(len(mean_D), num_classes)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.head((x_BD - self.mean_D) / self.std_D)


@dataclass
class TrainSettings:
    epochs: int = 10
    lr: float = 1e-4
    wd: float = 0.05
    batch_size: int = 32
    seed: int = 0


def fit(model: nn.Module, inputs, labels_N, settings: TrainSettings, batch_fn, loss_fn=None) -> nn.Module:
    """AdamW, cross-entropy, shuffled mini-batches from a seeded generator.
    ``batch_fn(inputs, index_B)`` gives the model's positional arguments for a batch;
    ``loss_fn(output, index_B)`` (None: cross-entropy against ``labels_N[index_B]``) lets a
    dense probe score per-pixel label maps instead of one label per item."""
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.wd)
    gen = torch.Generator().manual_seed(settings.seed)
    if loss_fn is None:
        def loss_fn(output, index_B):
            return nn.functional.cross_entropy(output, labels_N[index_B])
    model.train()
    for _ in range(settings.epochs):
        for index_B in torch.randperm(len(labels_N), generator=gen).split(settings.batch_size):
            loss = loss_fn(model(*batch_fn(inputs, index_B)), index_B)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, inputs, n: int, batch_fn, batch_size: int = 256) -> torch.Tensor:
    index = torch.arange(n)
    return torch.cat([model(*batch_fn(inputs, i)).argmax(-1) for i in index.split(batch_size)])


def _pooled_batch(x_ND, index_B):
    return (x_ND[index_B],)


def _token_batch(tokens, index_B):
    return pad_tokens([tokens[i] for i in index_B.tolist()])


def linear_probe(train_ND, train_y, val_ND, num_classes: int, settings: TrainSettings) -> torch.Tensor:
    """Predicted classes of ``val_ND`` by a linear probe on pooled features (full-batch AdamW
    with ``settings.batch_size = len(train_y)``)."""
    torch.manual_seed(settings.seed)
    model = LinearProbe(train_ND.mean(0), train_ND.std(0, unbiased=False), num_classes)
    fit(model, train_ND, train_y, settings, _pooled_batch)
    return predict(model, val_ND, len(val_ND), _pooled_batch)


def attentive_probe(train_tokens, train_y, val_tokens, num_classes: int,
                    settings: TrainSettings) -> torch.Tensor:
    """Predicted classes of ``val_tokens`` (one [n_i, D] tensor per image, any n_i) by an
    ``AttentiveProbe``: no mean over the tokens, so a label held by a few tokens (a small
    digit) is not diluted by the rest; padding is masked."""
    torch.manual_seed(settings.seed)
    model = AttentiveProbe(train_tokens[0].shape[1], num_classes)
    fit(model, train_tokens, train_y, settings, _token_batch)
    return predict(model, val_tokens, len(val_tokens), _token_batch)


def knn_predict(train_ND: torch.Tensor, train_y: torch.Tensor, val_ND: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Cosine k-NN with exp(sim / T) weighted votes; ties go to the lower class index."""
    k = min(k, len(train_ND))
    sim_VN = nn.functional.normalize(val_ND, dim=-1) @ nn.functional.normalize(train_ND, dim=-1).T
    sim_VK, idx_VK = sim_VN.topk(k, dim=-1)
    votes_VC = torch.zeros(len(val_ND), num_classes, dtype=sim_VK.dtype)
    votes_VC.scatter_add_(1, train_y[idx_VK], (sim_VK / temperature).exp())
    return votes_VC.argmax(-1)


def top1(pred_N: torch.Tensor, labels_N: torch.Tensor) -> float:
    return float((pred_N == labels_N).float().mean())


def holdout_split(labels_N: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): ``fraction`` of each class held out (at least one
    image of every class that has two or more), drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels_N.unique().tolist():
        idx = (labels_N == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def select_setting(fit_predict, labels_N: torch.Tensor, settings: TrainSettings, lrs, wds,
                   holdout: float, desc: str = "", score=None,
                   metric: str = "heldout_top1") -> tuple[TrainSettings, list[dict]]:
    """The (lr, wd) of the grid whose probe, trained without the held-out part, is most
    accurate on it. ``fit_predict(fit_idx, eval_idx, settings)`` -> predictions for eval_idx;
    ``score(predictions, eval_idx)`` (None: top-1 against ``labels_N``) ranks them, saved
    as ``metric``. ``labels_N`` also stratifies the held-out part (all zeros: no strata)."""
    if score is None:
        def score(pred, idx):
            return top1(pred, labels_N[idx])
    grid = [(lr, wd) for lr in lrs for wd in wds]
    if len(grid) == 1:
        return replace(settings, lr=grid[0][0], wd=grid[0][1]), []
    fit_idx, held_idx = holdout_split(labels_N, holdout, settings.seed)
    if len(held_idx) == 0:
        raise ValueError("the lr/wd sweep needs at least two training images in some class; "
                         "pass one --lr and one --wd")
    sweep = []
    for lr, wd in tqdm(grid, desc=desc, unit="setting", disable=None, leave=False):
        pred = fit_predict(fit_idx, held_idx, replace(settings, lr=lr, wd=wd))
        sweep.append({"lr": lr, "wd": wd, metric: score(pred, held_idx)})
    best = max(sweep, key=lambda r: r[metric])  # max keeps the first of equals
    return replace(settings, lr=best["lr"], wd=best["wd"]), sweep
