"""The pure kernels: Wanda and SparseGPT on tensors."""

import pytest
import torch

from prunekit.budget import Pattern
from prunekit.select import row_mask, select_mask
from prunekit.weights.scores import magnitude_scores, outlier_ratio, wanda_scores
from prunekit.weights.sparsegpt import sparsegpt_prune
from prunekit.weights.stats import InputStats


def _layer(rows=48, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # correlated input features with a few large outlier features, as in LLM activations
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, :4] *= 20.0
    return w, x


def test_wanda_with_equal_norms_equals_row_magnitude():
    w, _ = _layer()
    norms = torch.full((w.shape[1],), 3.7)
    assert torch.equal(row_mask(wanda_scores(w, norms), 0.5), row_mask(magnitude_scores(w), 0.5))


def test_input_stats_match_direct_computation():
    _, x = _layer()
    stats = InputStats(x.shape[1], hessian=True)
    for chunk in x.split(100):
        stats.add(chunk.reshape(2, -1, x.shape[1]) if chunk.shape[0] % 2 == 0 else chunk)
    assert stats.tokens == x.shape[0]
    torch.testing.assert_close(stats.norms, x.norm(dim=0))
    torch.testing.assert_close(stats.hessian, x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)


def test_hessian_from_symmetric_strips_equals_the_full_gram_matrix():
    x = torch.randn(300, 1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    stats = InputStats(1000, hessian=True)
    stats.add(x[:120])
    stats.add(x[120:])
    hessian = stats.hessian
    torch.testing.assert_close(hessian, x.t() @ x / 300, rtol=1e-4, atol=1e-4)
    assert torch.equal(hessian, hessian.t())


def _stats(x):
    stats = InputStats(x.shape[1], hessian=True)
    stats.add(x)
    return stats


@pytest.mark.parametrize("pattern, sparsity", [(Pattern(), 0.5), (Pattern(2, 4), 0.5), (Pattern(4, 8), 0.5)])
def test_sparsegpt_beats_wanda_on_reconstruction_error(pattern, sparsity):
    w, x = _layer()
    stats = _stats(x)
    wanda = w * select_mask(wanda_scores(w, stats.norms), sparsity, pattern, "row")
    updated, keep = sparsegpt_prune(w, stats.hessian, sparsity=sparsity, pattern=pattern, blocksize=16)
    assert torch.equal(updated == 0, ~keep)
    err_wanda = (x @ (w - wanda).t()).norm()
    err_sparsegpt = (x @ (w - updated).t()).norm()
    assert err_sparsegpt < 0.9 * err_wanda


def test_sparsegpt_unstructured_sparsity_is_exact_per_row_group():
    w, x = _layer(rows=40)
    updated, keep = sparsegpt_prune(w, _stats(x).hessian, sparsity=0.6, pattern=Pattern(), blocksize=16,
                                    row_groups=[10, 30])
    for rows in (slice(0, 10), slice(10, 40)):
        zeros = (updated[rows] == 0).sum().item()
        assert zeros == round(0.6 * keep[rows].numel())


def test_sparsegpt_nm_groups_valid_with_block_not_multiple_of_m():
    w, x = _layer(cols=60)
    updated, _ = sparsegpt_prune(w, _stats(x).hessian, sparsity=0.4, pattern=Pattern(3, 5), blocksize=16)
    assert ((updated != 0).reshape(w.shape[0], -1, 5).sum(-1) <= 3).all()


def test_sparsegpt_at_zero_sparsity_is_identity():
    w, x = _layer()
    updated, keep = sparsegpt_prune(w, _stats(x).hessian, sparsity=0.0, pattern=Pattern())
    assert keep.all()
    torch.testing.assert_close(updated, w)


def test_sparsegpt_dead_inputs_are_pruned_and_ignored():
    w, x = _layer()
    x[:, 5] = 0.0
    updated, _ = sparsegpt_prune(w, _stats(x).hessian, sparsity=0.5, pattern=Pattern())
    assert (updated[:, 5] == 0).all()
    assert torch.isfinite(updated).all()


def test_outlier_ratio():
    scores = torch.ones(100)
    scores[:3] = 100.0
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.03)
