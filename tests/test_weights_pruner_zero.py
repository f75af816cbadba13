"""Pruner-Zero (Dong et al. 2024): the score by hand, the calibration gradients, and exact per-row sparsity."""

import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for
from prunekit.budget import Pattern
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count, select_mask
from prunekit.weights.engine import prune_sequentially
from prunekit.weights.gradients import calibration_gradients, target_parameters
from prunekit.weights.methods import METHODS, PruneOptions
from prunekit.weights.scores import pruner_zero_scores
from tiny_models import tiny_causal_lm

CPU = torch.device("cpu")


def test_score_equals_the_formula_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    g = torch.tensor([[-0.1, 0.3], [0.5, -0.2]])
    # |g| = 0.1, 0.3, 0.5, 0.2: min 0.1, max 0.5, so scaled (|g| - 0.1) / 0.4 = 0, 0.5, 1, 0.25
    expected = torch.tensor([[1.0 * 0.0, 4.0 * 0.5], [9.0 * 1.0, 0.25 * 0.25]])
    torch.testing.assert_close(pruner_zero_scores(w, g), expected)


def test_constant_gradients_score_zero_not_nan():
    scores = pruner_zero_scores(torch.randn(3, 4), torch.full((3, 4), 0.7))
    assert torch.equal(scores, torch.zeros(3, 4))


def _calibration(samples=8):
    return torch.randint(0, 128, (samples, 32), generator=torch.Generator().manual_seed(1))


def test_gradients_are_the_l2_norm_over_sequences_and_leave_nothing_on_the_model():
    model = tiny_causal_lm("llama", layers=2)
    adapter = adapter_for(model)
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag the call must put back as it was
    ids = _calibration(3)
    grads = calibration_gradients(model, adapter, ids)
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    targets = target_parameters(model, adapter)
    squares = {name: torch.zeros_like(p) for name, p in targets.items()}
    for sequence in ids:
        model.zero_grad(set_to_none=True)
        model(input_ids=sequence[None], labels=sequence[None], use_cache=False).loss.backward()
        for name, p in targets.items():
            squares[name] += p.grad.square()
    assert set(grads) == set(targets)
    for name in targets:
        torch.testing.assert_close(grads[name], squares[name].sqrt(), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("pattern, sparsity", [(Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5)])
def test_pruner_zero_prunes_each_row_exactly(pattern, sparsity):
    model = tiny_causal_lm("llama", layers=2)
    adapter = adapter_for(model)
    grads = calibration_gradients(model, adapter, _calibration())
    blocks = len(adapter.block_list(model))
    masks = prune_sequentially(model, adapter, METHODS["pruner-zero"], sparsities=[sparsity] * blocks,
                               pattern=pattern, inputs=None, options=PruneOptions(), device=CPU, progress=False,
                               keep_masks=True, gradients=grads)
    for name, weight in prunekit.target_weights(model).items():
        assert (weight[~masks[name]] == 0).all(), name
        if pattern.is_nm:
            assert (masks[name].reshape(weight.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:
            assert ((~masks[name]).sum(1) == fraction_count(weight.shape[1], sparsity)).all(), name
    # the gradient matters: the first mask differs from the one |W|² alone gives per row (the test can fail)
    first = next(iter(grads))
    dense = prunekit.target_weights(tiny_causal_lm("llama", layers=2))[first]
    assert not torch.equal(masks[first], select_mask(dense.abs(), sparsity, pattern, "row"))


def test_without_gradients_the_engine_refuses_before_any_change():
    model = tiny_causal_lm("llama", layers=2)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(PrunekitError, match="gradients"):
        prune_sequentially(model, adapter_for(model), METHODS["pruner-zero"], sparsities=[0.5, 0.5],
                           pattern=Pattern(), inputs=None, options=PruneOptions(), device=CPU, progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
