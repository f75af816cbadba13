"""Scorers at initialization: SNIP, GraSP, SynFlow, magnitude, random, and the layer-collapse check."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from prunekit.allocation import allocate
from prunekit.errors import PrunekitError
from prunekit.training import (
    OneShot,
    PruneAtInit,
    check_layer_collapse,
    grasp_scores,
    snip_scores,
    synflow_scores,
    target_weights,
)
from prunekit.weights.scores import magnitude_scores, random_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10), nn.ReLU(), nn.Linear(10, 3))


def image_batches(seed: int, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(count)]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_snip_is_gradient_times_weight_and_leaves_the_model_untouched():
    model = cnn()
    batches = image_batches(0)
    reference = copy.deepcopy(model)
    for x, y in batches:
        nn.functional.cross_entropy(reference(x), y).backward()
    before = state(model)
    scores = snip_scores(model, batches)
    assert_untouched(model, before)
    for name, w in target_weights(reference).items():
        torch.testing.assert_close(scores[name], (w.grad * w).abs())


def test_grasp_is_weight_times_hessian_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 10), nn.Tanh(), nn.Linear(10, 3))
    batches = image_batches(1)
    before = state(model)
    scores = grasp_scores(model, batches, temperature=2.0)
    assert_untouched(model, before)
    weights = {n: w.detach() for n, w in target_weights(model).items()}

    def loss(params):
        total = 0.0
        for x, y in batches:
            out = functional_call(model, {**dict(model.named_parameters()), **params}, (x,))
            total = total + nn.functional.cross_entropy(out / 2.0, y)
        return total

    g = grad(loss)(weights)
    _, hg = jvp(grad(loss), (weights,), (g,))  # H is symmetric: H g
    for name, w in weights.items():
        torch.testing.assert_close(scores[name], w * hg[name], rtol=1e-4, atol=1e-7)


def test_synflow_matches_the_closed_form_of_a_linear_chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False))
    w1, w2 = model[0].weight.detach().double().abs(), model[2].weight.detach().double().abs()
    scores = synflow_scores(model, (5,))
    # R = 1ᵀ|W2||W1|1: dR/dW1_ij = (1ᵀ|W2|)_i, dR/dW2_ki = (|W1|1)_i.
    torch.testing.assert_close(scores["0.weight"], w1 * w2.sum(0)[:, None])
    torch.testing.assert_close(scores["2.weight"], w2 * w1.sum(1)[None, :])


def test_synflow_is_data_free_and_deterministic():
    model = cnn()
    before = state(model)
    first = synflow_scores(model, (1, 6, 6))
    assert_untouched(model, before)
    torch.manual_seed(123)
    model.eval()  # the mode of the caller does not matter: SynFlow always scores in eval mode
    second = synflow_scores(model, (1, 6, 6))
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_synflow_pruning_is_invariant_to_the_batches_given():
    a = PruneAtInit(cnn(), 0.9, "synflow", batches=image_batches(0), input_shape=(1, 6, 6), rounds=10)
    b = PruneAtInit(cnn(), 0.9, "synflow", batches=image_batches(7, 3), input_shape=(1, 6, 6), rounds=10)
    assert all(torch.equal(a.masks.masks[n], b.masks.masks[n]) for n in a.masks.masks)


def test_iterative_synflow_reaches_the_exact_sparsity_without_collapse():
    model = cnn()
    total = sum(w.numel() for w in target_weights(model).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner = PruneAtInit(model, 0.98, "synflow", input_shape=(1, 6, 6), rounds=20)
    assert pruner.masks.sparsity()["numel"] == total
    assert pruner.sparsity() == round(0.98 * total) / total
    assert check_layer_collapse(pruner.masks.masks) == []


@pytest.mark.parametrize("pruner", [OneShot, PruneAtInit])
def test_magnitude_and_random_pruning_use_the_one_weight_scorers(pruner):
    """Data-free pruning scores each target with prunekit.weights.scores, random ones from one seeded stream."""
    weights = {n: w.detach().clone() for n, w in target_weights(cnn()).items()}
    generator = torch.Generator().manual_seed(3)
    expected = {"magnitude": allocate({n: magnitude_scores(w) for n, w in weights.items()}, 0.7),
                "random": allocate({n: random_scores(w, generator) for n, w in weights.items()}, 0.7)}
    for scorer, keep in expected.items():
        masks = pruner(cnn(), 0.7, scorer=scorer, allocation="global", seed=3).masks.masks
        assert all(torch.equal(masks[n], keep[n]) for n in weights), scorer
    other_seed = pruner(cnn(), 0.7, scorer="random", allocation="global", seed=4).masks.masks
    assert not torch.equal(other_seed["0.weight"], expected["random"]["0.weight"])


def test_collapse_check_warns_only_on_empty_layers():
    full = {"a": torch.tensor([True, False]), "b": torch.tensor([False, False])}
    with pytest.warns(UserWarning, match="layer collapse.*b"):
        assert check_layer_collapse(full) == ["b"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_layer_collapse({"a": torch.tensor([True])}) == []


def test_scorers_refuse_missing_inputs():
    with pytest.raises(PrunekitError, match="batches"):
        snip_scores(cnn(), [])
    with pytest.raises(PrunekitError, match="input_shape"):
        synflow_scores(cnn(), ())
    with pytest.raises(PrunekitError, match="input_shape"):
        PruneAtInit(cnn(), 0.5, "synflow")
    with pytest.raises(PrunekitError, match="rounds"):
        PruneAtInit(cnn(), 0.5, "snip", batches=image_batches(0), rounds=5)
    with pytest.raises(PrunekitError, match="'obd'"):
        PruneAtInit(cnn(), 0.5, "obd")
