"""RIA scores (Zhang et al. 2024): the formula by hand, and the registered method's per-row comparison."""

import pytest
import torch

import prunekit
from prunekit.select import fraction_count
from prunekit.weights.scores import ria_scores


def test_ria_equals_the_formula_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.0, 6.0]])
    norms = torch.tensor([4.0, 9.0, 1.0])
    # row sums 6 and 10; column sums 5, 2 and 9; ||X_j||^0.5 = 2, 3, 1
    expected = torch.tensor([
        [(1 / 6 + 1 / 5) * 2, (2 / 6 + 2 / 2) * 3, (3 / 6 + 3 / 9) * 1],
        [(4 / 10 + 4 / 5) * 2, 0.0, (6 / 10 + 6 / 9) * 1],
    ])
    torch.testing.assert_close(ria_scores(w, norms), expected)


def test_ria_power_scales_each_input_column_by_its_norm_to_the_power():
    g = torch.Generator().manual_seed(0)
    w, norms = torch.randn(8, 16, generator=g), torch.rand(16, generator=g) + 0.5
    doubled = norms.clone()
    doubled[3] *= 4
    ratio = ria_scores(w, doubled) / ria_scores(w, norms)
    torch.testing.assert_close(ratio[:, 3], torch.full((8,), 2.0))  # 4^0.5
    torch.testing.assert_close(ratio[:, 4], torch.ones(8))


def test_ria_of_an_all_zero_row_is_zero_not_nan():
    w = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    scores = ria_scores(w, torch.ones(2))
    assert torch.isfinite(scores).all() and (scores[0] == 0).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_ria_prunes_the_same_count_from_every_output_row(sparsity):
    from tiny_models import tiny_causal_lm

    model = tiny_causal_lm("llama", layers=2)
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    record = prunekit.prune(model, method="ria", sparsity=sparsity, calibration=calibration, progress=False)
    assert record["method"]["comparison_group"] == "row"
    for name, weight in prunekit.target_weights(model).items():
        assert ((weight == 0).sum(1) == fraction_count(weight.shape[1], sparsity)).all(), name
