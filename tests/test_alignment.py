"""CoMP alignment loss against a literal float64 evaluation of the reference formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comp.models.alignment import (
    alignment_loss,
    load_word_counts,
    log_word_prior,
    masked_mean_pool,
    pool_image_features,
    sinkhorn_log_targets,
)

B, D, K = 4, 8, 50


def make(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    F_v = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1)
    F_t = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1)
    prototypes = torch.randn(K, D, generator=g, dtype=dtype)
    counts = torch.randint(0, 1000, (K,), generator=g).double()
    return F_v, F_t, prototypes, counts


def naive_loss(F_v, F_t, prototypes, counts, has_image, *, word_temp, embed_temp, eps, iters=3):
    """The reference's steps written out in probability space, float64."""
    F_v, F_t, W = F_v.double(), F_t.double(), prototypes.double()
    W = W / W.norm(dim=-1, keepdim=True)
    u = counts.double().clamp(min=1)
    u = u / u.sum()
    prior = torch.exp(u / word_temp) / torch.exp(u / word_temp).sum()
    Q_KB = torch.exp(F_t @ W.T / eps).T
    for _ in range(iters):
        Q_KB = Q_KB * prior[:, None]
        Q_KB = Q_KB / Q_KB.sum(0, keepdim=True)
    p_t = Q_KB.T
    p_v = torch.softmax(F_v @ W.T / embed_temp, dim=-1)
    per_sample = -(p_t * torch.log(p_v)).sum(-1)
    return per_sample[has_image].mean()


@pytest.mark.parametrize("seed", range(3))
def test_equals_naive_formula_on_moderate_inputs(seed):
    F_v, F_t, prototypes, counts = make(seed)
    has_image = torch.tensor([True, False, True, True])
    log_prior = log_word_prior(counts, K, word_temp=0.05)
    got = alignment_loss(F_v, F_t, prototypes, log_prior, has_image, embed_temp=0.5, word_eps=0.5)
    want = naive_loss(F_v, F_t, prototypes, counts, has_image, word_temp=0.05, embed_temp=0.5, eps=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_finite_and_correct_at_cosine_one_with_reference_temperatures():
    F_v, F_t, prototypes, counts = make(3)
    F_v = torch.nn.functional.normalize(prototypes[:B], dim=-1)  # cosine exactly 1.0 with a prototype
    F_t = torch.nn.functional.normalize(prototypes[1:B + 1], dim=-1)
    has_image = torch.ones(B, dtype=torch.bool)
    F_v.requires_grad_()
    got = alignment_loss(F_v, F_t, prototypes, log_word_prior(counts, K), has_image)
    assert torch.isfinite(got)
    got.backward()
    assert torch.isfinite(F_v.grad).all()
    # float64 still holds exp(1 / 0.005) = 7e86, so the literal loop is a valid oracle here.
    want = naive_loss(F_v.detach(), F_t, prototypes, counts, has_image, word_temp=0.05, embed_temp=0.005, eps=0.005)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    assert want > 100  # a genuinely extreme case: targets and predictions sit on different words


def test_gradient_reaches_producer_of_F_v_only():
    _, F_t, prototypes, counts = make(4)
    torch.manual_seed(0)
    producer = torch.nn.Linear(6, D)
    tokens = torch.randn(9, 6)
    F_v, has_image = pool_image_features(producer(tokens), torch.tensor([0, 0, 0, 1, 1, 1, 1, 3, 3]), B)
    F_t.requires_grad_()
    prototypes.requires_grad_()
    loss = alignment_loss(F_v, F_t, prototypes, log_word_prior(counts, K), has_image, embed_temp=0.1, word_eps=0.1)
    loss.backward()
    assert producer.weight.grad is not None and producer.weight.grad.abs().sum() > 0
    assert F_t.grad is None and prototypes.grad is None


@pytest.mark.parametrize("mode", ["reference", "sinkhorn"])
def test_text_only_sample_changes_nothing(mode):
    F_v, F_t, prototypes, counts = make(5)
    log_prior = log_word_prior(counts, K)
    kw = dict(embed_temp=0.1, word_eps=0.1, mode=mode)
    with_text_only = alignment_loss(F_v, F_t, prototypes, log_prior, torch.tensor([True, True, False, True]), **kw)
    keep = [0, 1, 3]
    without = alignment_loss(F_v[keep], F_t[keep], prototypes, log_prior, torch.ones(3, dtype=torch.bool), **kw)
    torch.testing.assert_close(with_text_only, without, rtol=0, atol=1e-6)


def test_no_image_in_batch_is_exact_zero_and_connected():
    F_v, F_t, prototypes, counts = make(6)
    F_v.requires_grad_()
    loss = alignment_loss(F_v, F_t, prototypes, log_word_prior(counts, K), torch.zeros(B, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.count_nonzero(F_v.grad) == 0


def test_pool_image_features_per_sample_and_multi_image():
    g = torch.Generator().manual_seed(7)
    merged = torch.randn(10, D, generator=g)
    # sample 0: one image of 3 tokens; sample 2: two images (2 + 5 tokens) interleaved with sample 0's.
    sample_index = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 2, 2])
    F_v, has_image = pool_image_features(merged, sample_index, 3)
    assert has_image.tolist() == [True, False, True]
    want0 = merged[:3].mean(0)
    want2 = merged[3:].mean(0)  # all 7 tokens together, not the mean of two image means
    torch.testing.assert_close(F_v[0], want0 / want0.norm())
    torch.testing.assert_close(F_v[2], want2 / want2.norm())
    assert torch.count_nonzero(F_v[1]) == 0
    # Changing another sample's tokens leaves sample 0 untouched.
    merged2 = merged.clone()
    merged2[3:] += 5.0
    torch.testing.assert_close(pool_image_features(merged2, sample_index, 3)[0][0], F_v[0], rtol=0, atol=0)


def test_masked_mean_pool_ignores_masked_positions():
    hidden = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(10))
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 1]])
    got = masked_mean_pool(hidden, mask)
    for b, sl in ((0, slice(0, 2)), (1, slice(1, 5))):
        want = hidden[b, sl].mean(0)
        torch.testing.assert_close(got[b], want / want.norm())


def test_reference_mode_is_softmax_of_scores_plus_iters_log_prior():
    g = torch.Generator().manual_seed(9)
    C_t = torch.rand(B, K, generator=g) * 2 - 1
    log_prior = torch.log_softmax(torch.randn(K, generator=g), 0)
    got = sinkhorn_log_targets(C_t, log_prior, eps=0.005, iters=3).double()
    want = torch.log_softmax(C_t.double() / 0.005 + 3 * log_prior.double(), -1)
    # log-probabilities reach -400 here, where one fp32 step is 3e-5.
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    torch.testing.assert_close(got.exp(), want.exp(), rtol=0, atol=1e-5)


def test_sinkhorn_mode_has_requested_marginals_and_matches_literal_loop():
    g = torch.Generator().manual_seed(8)
    C_t = torch.rand(B, K, generator=g) * 2 - 1
    log_prior = torch.log_softmax(torch.randn(K, generator=g), 0)
    log_p = sinkhorn_log_targets(C_t, log_prior, eps=0.2, iters=300, mode="sinkhorn")
    p = log_p.double().exp()
    torch.testing.assert_close(p.sum(1), torch.ones(B, dtype=torch.float64))
    torch.testing.assert_close(p.mean(0), log_prior.double().exp(), rtol=0, atol=1e-5)
    # Three rounds, against the same steps in probability space.
    Q_KB = torch.exp(C_t.double().T / 0.2)
    for _ in range(3):
        Q_KB = Q_KB / Q_KB.sum(0, keepdim=True) / B
        Q_KB = Q_KB * (log_prior.double().exp() / Q_KB.sum(1))[:, None]
    want = (Q_KB / Q_KB.sum(0, keepdim=True)).T
    got = sinkhorn_log_targets(C_t, log_prior, eps=0.2, iters=3, mode="sinkhorn").double().exp()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # Still finite at the reference temperature.
    assert torch.isfinite(sinkhorn_log_targets(C_t, log_prior, eps=0.005, mode="sinkhorn")).all()


def test_real_word_distribution_file(word_dist_fixture):
    counts = load_word_counts(word_dist_fixture)
    assert counts.shape == (151_657,) and counts.sum().item() == 577_775_292
    with pytest.raises(ValueError, match=r"word_dist\.pth: 151657 word counts .* 151936 prototype rows.*pad=True"):
        log_word_prior(word_dist_fixture, 151_936, pad=False)
    with pytest.warns(UserWarning, match="the 279 rows beyond the file count 1"):  # padded unasked
        log_prior = log_word_prior(word_dist_fixture, 151_936)
    torch.testing.assert_close(log_prior, log_word_prior(word_dist_fixture, 151_936, pad=True))
    with pytest.raises(ValueError, match="pad=True"):  # too short to be the same vocabulary
        log_word_prior(word_dist_fixture, 160_000)
    assert log_prior.shape == (151_936,) and abs(torch.logsumexp(log_prior.double(), 0).item()) < 1e-6
    # The most frequent id (264) gets the largest prior; padded rows share the count-1 value.
    assert int(log_prior.argmax()) == 264
    assert log_prior[151_657:].unique().numel() == 1
    assert log_prior[151_700] == log_prior[int(counts.argmin())]


def test_npy_counts_uniform_fallback_and_bad_files(tmp_path):
    counts = np.arange(K, dtype=np.int64)
    np.save(tmp_path / "counts.npy", counts)
    torch.testing.assert_close(load_word_counts(tmp_path / "counts.npy"), torch.arange(K, dtype=torch.float64))
    torch.save(torch.arange(K), tmp_path / "counts.pt")
    torch.testing.assert_close(log_word_prior(tmp_path / "counts.pt", K), log_word_prior(counts, K))
    with pytest.raises(ValueError, match=r"counts\.pt: 50 word counts .* 40 prototype rows"):
        log_word_prior(tmp_path / "counts.pt", 40, pad=True)
    with pytest.raises(ValueError, match="comp data prior.*--word_dist_path uniform"):
        log_word_prior(None, K)
    uniform = log_word_prior("uniform", K)
    torch.testing.assert_close(uniform.exp(), torch.full((K,), 1 / K))
    (tmp_path / "counts.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"counts\.txt: word counts must be"):
        load_word_counts(tmp_path / "counts.txt")
    torch.save(torch.ones(3, 2), tmp_path / "square.pt")
    with pytest.raises(ValueError, match=r"square\.pt: expected a 1-D array"):
        load_word_counts(tmp_path / "square.pt")
