"""The pure kernels: Wanda and SparseGPT on tensors; OWL's allocation on a model with planted outliers."""

import pytest
import torch

import prunekit
from prunekit.budget import Pattern
from prunekit.select import row_mask, select_mask
from prunekit.weights.scores import magnitude_scores, wanda_scores
from prunekit.weights.sparsegpt import sparsegpt_prune
from prunekit.weights.stats import InputStats
from tiny_models import tiny_causal_lm


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


def _sparsegpt_algorithm_1(w, hessian, *, sparsity=0.5, nm=None, lazy=16, select=16, damping=0.01):
    """Frantar & Alistarh 2023, Algorithm 1, written out column by column in float64 as a reference.

    `lazy` is the lazy-batch width B, `select` the mask-selection width Bs (M for an N:M pattern). Unstructured:
    every Bs columns, the (p · rows · Bs) weights with the lowest w² / [H^-1]_cc² in W[:, j:j+Bs] are pruned.
    N:M: every M columns, the N highest of each row are kept.
    """
    w = w.double().clone()
    h = hessian.double().clone()
    rows, cols = w.shape
    h += damping * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # Cholesky(H^-1)^T: the OBS rows
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for i in range(0, cols, lazy):
        errors = torch.zeros(rows, lazy, dtype=torch.float64)
        for j in range(i, i + lazy):
            if j % select == 0:
                span = slice(j, j + select)
                saliency = w[:, span] ** 2 / hinv.diagonal()[span] ** 2
                if nm is None:
                    pruned = saliency.flatten().argsort()[: round(sparsity * saliency.numel())]
                    keep = torch.ones(saliency.numel(), dtype=torch.bool)
                    keep[pruned] = False
                    mask[:, span] = keep.reshape(saliency.shape)
                else:
                    n, m = nm
                    lowest = saliency.argsort(dim=1)[:, : m - n]
                    mask[:, span] = ~torch.zeros_like(saliency, dtype=torch.bool).scatter(1, lowest, True)
            errors[:, j - i] = w[:, j] / hinv[j, j]
            errors[:, j - i] *= ~mask[:, j]  # kept weights have no error
            w[:, j : i + lazy] -= errors[:, j - i, None] * hinv[j, j : i + lazy][None, :]
        w[:, i + lazy :] -= errors @ hinv[i : i + lazy, i + lazy :]
    return w * mask, mask


@pytest.mark.parametrize("lazy", [8, 16, 64])
@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_equals_algorithm_1_of_the_paper(pattern, lazy):
    """Same masks and weights as the published algorithm, whatever its lazy-batch width (B dividing or a multiple
    of the selection width, the lazy updates are exact)."""
    w, x = _layer()
    hessian = _stats(x).hessian
    nm = (pattern.n, pattern.m) if pattern.is_nm else None
    expected, expected_keep = _sparsegpt_algorithm_1(w, hessian, nm=nm, lazy=lazy, select=pattern.m if nm else 16)
    updated, keep = sparsegpt_prune(w, hessian, sparsity=0.5, pattern=pattern, blocksize=16)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(updated.double(), expected, rtol=1e-5, atol=1e-5)
    assert (~keep).sum().item() == w.numel() // 2


@pytest.mark.parametrize("planted", [0, 2])
def test_owl_prunes_the_block_with_planted_outlier_features_least(planted):
    """Outlier features (Yin et al. 2024): four hidden dimensions of one block's normalised inputs 20x larger, so
    that block's Wanda scores hold about 3% outliers against about 0.6% elsewhere; OWL gives it the lowest
    sparsity, by close to its whole range below the rest, and the block-size-weighted mean stays at the target."""
    model = tiny_causal_lm("llama", layers=4)
    block = model.model.layers[planted]
    with torch.no_grad():
        block.input_layernorm.weight[:4] *= 20
        block.post_attention_layernorm.weight[:4] *= 20
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    record = prunekit.prune(model, method="wanda", sparsity=0.5, allocation="owl", owl_limit=0.08,
                            calibration=calibration, progress=False)
    ratios, sparsities = record["method"]["owl_outlier_ratios"], record["method"]["owl_block_sparsities"]
    assert ratios[planted] > 0.02 > max(r for i, r in enumerate(ratios) if i != planted)
    others = [s for i, s in enumerate(sparsities) if i != planted]
    assert min(others) - sparsities[planted] > 1.5 * 0.08  # the full range is 2 * owl_limit
    assert sum(sparsities) / 4 == pytest.approx(0.5, abs=1e-12)  # equal blocks: the plain mean
    achieved = [0.0] * 4
    for name, layer in record["metrics"]["sparsity"]["per_layer"].items():
        achieved[int(name.split(".")[2])] += layer["zeros"]
    assert min(range(4), key=achieved.__getitem__) == planted
