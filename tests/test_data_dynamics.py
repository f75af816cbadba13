"""Training-dynamics scorers: deterministic under a seed, and sensible on a constructed problem with planted
mislabeled and ambiguous examples."""

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.data.dynamics import (
    TRAINING_SCORERS,
    TrainingDynamics,
    per_example_grad_norms,
    record_dynamics,
)
from prunekit.errors import PrunekitError

N = 300
MISLABELED = np.arange(0, N, 20)  # 15 planted label errors
AMBIGUOUS = np.arange(N, N + 15)  # 15 points halfway between two blobs, labelled like one of them


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blobs():
    """Three well-separated Gaussian blobs with planted mislabeled examples and ambiguous in-between points."""
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 3.0], [3.0, -2.0], [-3.0, -2.0]])
    clean = torch.arange(N) % 3
    x = centers[clean] + 0.8 * torch.randn(N, 2, generator=g)
    labels = clean.clone()
    labels[MISLABELED] = (clean[MISLABELED] + 1) % 3
    between = (centers[0] + centers[1]) / 2 + 0.1 * torch.randn(len(AMBIGUOUS), 2, generator=g)
    x = torch.cat([x, between])
    labels = torch.cat([labels, torch.arange(len(AMBIGUOUS)) % 2])
    return x, labels


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))


def ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of each score, 0 = highest."""
    return np.argsort(np.argsort(-scores, kind="stable"), kind="stable")


@pytest.mark.parametrize("name", list(TRAINING_SCORERS))
def test_scorers_are_deterministic_under_a_seed(blobs, name):
    x, y = blobs
    kwargs = dict(epochs=3, runs=2, batch_size=32, progress=False)
    first = TRAINING_SCORERS[name](make_mlp, x, y, seed=7, **kwargs)
    again = TRAINING_SCORERS[name](make_mlp, x, y, seed=7, **kwargs)
    other = TRAINING_SCORERS[name](make_mlp, x, y, seed=8, **kwargs)
    assert first.dtype == np.float64 and first.shape == (len(y),) and np.isfinite(first).all()
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name, kwargs", [("loss", {}), ("el2n", {}), ("grand", {"epochs": 2}),
                                          ("forgetting", {"epochs": 15}), ("aum", {"epochs": 15})])
def test_mislabeled_examples_score_highest(blobs, name, kwargs):
    x, y = blobs
    scores = TRAINING_SCORERS[name](make_mlp, x[:N], y[:N], seed=0, batch_size=32, progress=False, **kwargs)
    # all 15 planted label errors are among the 20 highest scores of 300
    assert ranks(scores)[MISLABELED].max() < 20


@pytest.mark.parametrize("name", ["entropy", "margin"])
def test_uncertainty_scores_rank_ambiguous_points_highest(blobs, name):
    x, y = blobs
    clean = np.setdiff1d(np.arange(len(y)), MISLABELED)  # the label-free scores would also flag label noise
    scores = TRAINING_SCORERS[name](make_mlp, x[clean], y[clean], seed=0, batch_size=32, epochs=5, progress=False)
    ambiguous = np.flatnonzero(np.isin(clean, AMBIGUOUS))
    assert np.median(ranks(scores)[ambiguous]) < 30 and ranks(scores)[ambiguous].max() < 60


def test_random_scores_are_uniform_and_ignore_the_model(blobs):
    x, y = blobs
    scores = TRAINING_SCORERS["random"](None, x, y, seed=3)
    assert scores.min() >= 0 and scores.max() < 1 and np.array_equal(scores, np.random.default_rng(3).random(len(y)))


def test_forgetting_counts_transitions_and_ranks_never_learned_highest():
    # 4 examples over 5 epochs; correct = logit of class 0 above class 1 (all labels 0)
    pattern = np.array([[1, 1, 1, 0],
                        [0, 1, 1, 0],
                        [1, 1, 1, 0],
                        [0, 0, 1, 0],
                        [1, 1, 0, 0]], dtype=bool)
    logits = [torch.tensor([[1.0, 0.0] if c else [0.0, 1.0] for c in row]) for row in pattern]
    dynamics = TrainingDynamics.from_logits(logits, torch.zeros(4, dtype=torch.long))
    assert dynamics.forgetting().tolist() == [2.0, 1.0, 1.0, 5.0]
    assert dynamics.aum().tolist() == pytest.approx([0.2, 0.6, 0.6, -1.0])
    assert dynamics.el2n.shape == (5, 4) and dynamics.loss.shape == (5, 4)


def test_grand_uses_the_full_per_example_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    norms = per_example_grad_norms(model, x, y, batch_size=4)
    for i in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        assert norms[i] == pytest.approx(expected.item(), rel=1e-5)


def test_record_dynamics_returns_the_trained_model_and_one_row_per_epoch(blobs):
    x, y = blobs
    dynamics, model = record_dynamics(make_mlp, x, y, seed=0, epochs=4, batch_size=32)
    assert dynamics.correct.shape == (4, len(y))
    assert dynamics.correct[-1].mean() > 0.85 and isinstance(model, nn.Module)


@pytest.mark.parametrize("name", list(TRAINING_SCORERS))
def test_bad_inputs_are_refused(name):
    with pytest.raises(PrunekitError, match="empty"):
        TRAINING_SCORERS[name](make_mlp, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), progress=False)
    with pytest.raises(PrunekitError, match="NaN"):
        TRAINING_SCORERS[name](make_mlp, torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), progress=False)
    with pytest.raises(PrunekitError, match="one integer label"):
        TRAINING_SCORERS[name](make_mlp, torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), progress=False)
