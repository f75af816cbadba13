"""Pruners: exact sparsity at every step, monotone masks, rewinding, movement scores, RigL/SET regrowth."""

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.select import fraction_count
from prunekit.training import (
    SET,
    GradualMagnitude,
    IterativeMagnitude,
    Movement,
    OneShot,
    PruneAtInit,
    RigL,
    cubic_sparsity,
    target_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def batch(step: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(n, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, micro_batches: int = 1) -> None:
    optimizer.zero_grad()
    for micro in range(micro_batches):
        x, y = batch(step * micro_batches + micro)
        nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def total_weights(model: nn.Module) -> int:
    return sum(w.numel() for w in target_weights(model).values())


def assert_pruned_are_zero(pruner) -> None:
    for name, mask in pruner.masks.masks.items():
        assert torch.count_nonzero(pruner.masks.weights[name][~mask]) == 0


@pytest.mark.parametrize("allocation", ["global", "uniform", "lamp"])
def test_gradual_magnitude_is_exact_and_monotone_at_every_step(allocation):
    model = mlp()
    opt = sgd(model)
    total = total_weights(model)
    pruner = GradualMagnitude(model, 0.9, start_step=3, end_step=20, frequency=4, allocation=allocation)
    previous = {n: m.clone() for n, m in pruner.masks.masks.items()}
    targets = []
    for step in range(1, 26):
        train_step(model, opt, step)
        pruner.step()
        target = pruner.target_sparsity()
        targets.append(target)
        if allocation == "uniform":
            for name, layer in pruner.masks.sparsity()["layers"].items():
                numel = pruner.masks.masks[name].numel()
                assert layer == fraction_count(numel, target) / numel
        else:
            assert pruner.sparsity() == fraction_count(total, target) / total
        masks = pruner.masks.masks
        assert all(not (masks[n] & ~previous[n]).any() for n in masks)  # nothing pruned comes back
        previous = {n: m.clone() for n, m in masks.items()}
        assert_pruned_are_zero(pruner)
    assert targets[:2] == [0.0, 0.0]
    assert targets[2] == cubic_sparsity(3, 0.0, 0.9, 3, 20) == 0.0
    assert targets[6] == pytest.approx(0.9 * (1 - (1 - 4 / 17) ** 3))  # step 7, the second pruning step
    assert targets[5] == targets[3]  # between pruning steps the last target holds
    assert targets[19:] == [0.9] * 6  # end_step 20 prunes to the final sparsity though it is off the grid
    assert sorted(targets) == targets


def test_gradual_magnitude_with_initial_sparsity_prunes_at_construction():
    model = mlp()
    pruner = GradualMagnitude(model, 0.8, start_step=0, end_step=10, frequency=5, initial_sparsity=0.5)
    assert pruner.sparsity() == fraction_count(total_weights(model), 0.5) / total_weights(model)
    with pytest.raises(PrunekitError, match="initial_sparsity"):
        GradualMagnitude(mlp(), 0.5, 0, 10, 5, initial_sparsity=0.6)
    with pytest.raises(PrunekitError, match="start_step"):
        GradualMagnitude(mlp(), 0.5, 10, 5, 1)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_shot_then_fine_tune_keeps_exact_zeros(optimizer):
    model = mlp()
    pruner = OneShot(model, 0.75)
    opt = sgd(model) if optimizer == "sgd" else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    keep = {n: m.clone() for n, m in pruner.masks.masks.items()}
    for step in range(100):
        train_step(model, opt, step)
        pruner.step()
    assert all(torch.equal(keep[n], m) for n, m in pruner.masks.masks.items())
    assert_pruned_are_zero(pruner)
    assert pruner.sparsity() == fraction_count(total_weights(model), 0.75) / total_weights(model)


def test_iterative_magnitude_rewinds_exactly_to_step_k():
    model = mlp()
    opt = sgd(model)
    total = total_weights(model)
    pruner = IterativeMagnitude(model, 0.9, rounds=3, rewind_step=4)
    with pytest.raises(PrunekitError, match="rewind"):
        pruner.next_round()
    saved = None
    previous = {n: m.clone() for n, m in pruner.masks.masks.items()}
    for round_index in range(1, 4):
        for step in range(pruner.step_count, 10):
            train_step(model, opt, step)
            pruner.step()
            if pruner.step_count == 4 and saved is None:
                saved = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_mask")}
        pruner.next_round()
        assert pruner.round == round_index and pruner.step_count == 4
        target = 1 - 0.1 ** (round_index / 3)
        assert pruner.target_sparsity() == pytest.approx(target)
        assert pruner.sparsity() == fraction_count(total, target) / total
        masks = pruner.masks.masks
        assert all(not (masks[n] & ~previous[n]).any() for n in masks)
        previous = {n: m.clone() for n, m in masks.items()}
        for key, value in model.state_dict().items():
            if key.endswith("_mask"):
                continue
            mask = masks.get(key)
            expected = saved[key] if mask is None else saved[key] * mask
            assert torch.equal(value, expected), key
        opt = sgd(model)  # the caller re-creates its optimizer for the next round
    assert pruner.target_sparsity() == pytest.approx(0.9)
    with pytest.raises(PrunekitError, match="rounds"):
        pruner.next_round()


def test_learning_rate_rewinding_keeps_the_trained_weights():
    model = mlp()
    opt = sgd(model)
    pruner = IterativeMagnitude(model, 0.5, rounds=2, rewind="lr")
    for step in range(8):
        train_step(model, opt, step)
        pruner.step()
    trained = {n: w.detach().clone() for n, w in target_weights(model).items()}
    pruner.next_round()
    for name, mask in pruner.masks.masks.items():
        assert torch.equal(target_weights(model)[name], trained[name] * mask)
    assert pruner.step_count == 8


def test_movement_scores_accumulate_minus_weight_times_gradient():
    model = mlp()
    opt = sgd(model)
    pruner = Movement(model, 0.5, start_step=3, end_step=3, frequency=1)
    expected = {n: torch.zeros_like(w) for n, w in target_weights(model).items()}
    for step in range(1, 3):
        weights = {n: w.detach().clone() for n, w in target_weights(model).items()}
        train_step(model, opt, step, micro_batches=2)
        for name, w in target_weights(model).items():
            expected[name] -= weights[name] * w.grad
        pruner.step()
        assert pruner.sparsity() == 0.0
    for name in expected:
        torch.testing.assert_close(pruner.scores[name], expected[name])
    train_step(model, opt, 3)
    pruner.step()
    for name, mask in pruner.masks.masks.items():  # hard movement: per-layer top-k of the scores
        assert int((~mask).sum()) == fraction_count(mask.numel(), 0.5)
        assert pruner.scores[name][~mask].max() <= pruner.scores[name][mask].min()


def test_soft_movement_meets_the_overall_budget_with_one_threshold():
    model = mlp()
    opt = sgd(model)
    total = total_weights(model)
    pruner = Movement(model, 0.8, start_step=2, end_step=10, frequency=2, soft=True)
    for step in range(1, 13):
        train_step(model, opt, step)
        pruner.step()
        assert pruner.sparsity() == fraction_count(total, pruner.target_sparsity()) / total
        assert_pruned_are_zero(pruner)
        if pruner.is_pruning_step(step) and step > 2:  # the threshold holds where it prunes; scores move on
            masks, scores = pruner.masks.masks, pruner.scores
            kept = torch.cat([scores[n][masks[n]] for n in masks])
            dropped = torch.cat([scores[n][~masks[n]] for n in masks])
            assert dropped.max() <= kept.min()
    assert len(set(pruner.masks.sparsity()["layers"].values())) > 1
    with pytest.raises(PrunekitError, match="start_step"):
        Movement(mlp(), 0.5, start_step=0, end_step=5, frequency=1)


@pytest.mark.parametrize("cls", [RigL, SET])
def test_dynamic_sparse_training_keeps_per_layer_counts(cls):
    model = mlp()
    opt = sgd(model)
    pruner = cls(model, 0.8, allocation="erk", update_frequency=3, end_step=12, drop_fraction=0.5, seed=1,
                 optimizer=opt)
    counts = {n: int(m.sum()) for n, m in pruner.masks.masks.items()}
    changed = 0
    for step in range(1, 19):
        before = {n: m.clone() for n, m in pruner.masks.masks.items()}
        train_step(model, opt, step, micro_batches=2)
        pruner.step()
        masks = pruner.masks.masks
        assert {n: int(m.sum()) for n, m in masks.items()} == counts
        moved = sum(int((masks[n] != before[n]).sum()) for n in masks)
        assert (moved > 0) == (step % 3 == 0 and step < 12)
        changed += moved
        if moved:
            for name, mask in masks.items():  # regrown connections start at zero
                grown = mask & ~before[name]
                assert torch.count_nonzero(pruner.masks.weights[name][grown]) == 0
                assert torch.count_nonzero(opt.state[pruner.masks.weights[name]]["momentum_buffer"][grown]) == 0
        assert_pruned_are_zero(pruner)
    assert pruner.updates == 3 and changed > 0
    assert pruner.sparsity() == pytest.approx(0.8, abs=1 / total_weights(model))


def test_rigl_regrows_the_largest_dense_gradients():
    model = mlp()
    opt = sgd(model)
    pruner = RigL(model, 0.8, allocation="uniform", update_frequency=1, end_step=100, drop_fraction=0.3)
    before = {n: m.clone() for n, m in pruner.masks.masks.items()}
    x, y = batch(0)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    dense = {n: g.abs() for n, g in pruner.dense_grads.items()}
    opt.step()
    fraction = pruner.drop_fraction_at(1)
    pruner.step()
    for name, mask in pruner.masks.masks.items():
        grown = mask & ~before[name]
        count = round(fraction * int(before[name].sum()))
        # A just-dropped connection may be regrown, so at most `count` are new, and as many were dropped.
        assert 0 < int(grown.sum()) <= count
        assert int((before[name] & ~mask).sum()) == int(grown.sum())
        # Every regrown connection has at least the dense-gradient magnitude of every inactive one left out.
        assert dense[name][grown].min() >= dense[name][~mask & ~before[name]].max()


def test_set_and_rigl_are_reproducible_under_a_seed():
    def run(seed):
        model = mlp()
        opt = sgd(model)
        pruner = SET(model, 0.7, update_frequency=2, end_step=8, seed=seed)
        for step in range(1, 8):
            train_step(model, opt, step)
            pruner.step()
        return pruner.masks.masks

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    with pytest.raises(PrunekitError, match="end_step"):
        RigL(mlp(), 0.5)


@pytest.mark.parametrize("scorer", ["snip", "grasp", "random", "magnitude"])
def test_prune_at_init_is_exact_and_holds(scorer):
    model = mlp()
    batches = [batch(100), batch(101)]
    pruner = PruneAtInit(model, 0.9, scorer, batches=batches, allocation="global")
    total = total_weights(model)
    assert pruner.sparsity() == fraction_count(total, 0.9) / total
    assert pruner.target_sparsity(50) == 0.9
    opt = sgd(model)
    for step in range(20):
        train_step(model, opt, step)
        pruner.step()
    assert_pruned_are_zero(pruner)


def test_finalize_leaves_identical_outputs_and_no_masks():
    model = mlp()
    opt = sgd(model)
    pruner = GradualMagnitude(model, 0.7, start_step=1, end_step=5, frequency=2)
    for step in range(1, 7):
        train_step(model, opt, step)
        pruner.step()
    x, _ = batch(999)
    before = model(x)
    assert pruner.finalize() is model
    assert torch.equal(model(x), before)
    assert not any(k.endswith("_mask") for k in model.state_dict())
    zeros = sum(int((w == 0).sum()) for w in target_weights(model).values())
    assert zeros >= fraction_count(total_weights(model), 0.7)


def test_pruners_refuse_bad_input():
    with pytest.raises(PrunekitError, match="'nearest'"):
        OneShot(mlp(), 0.5, allocation="nearest")
    with pytest.raises(PrunekitError, match="'snip'"):
        OneShot(mlp(), 0.5, scorer="snip")
    with pytest.raises(PrunekitError, match="1.2"):
        OneShot(mlp(), 1.2)
    with pytest.raises(PrunekitError, match="rewind"):
        IterativeMagnitude(mlp(), 0.5, rounds=2, rewind="both")
    with pytest.raises(PrunekitError, match="frequency"):
        GradualMagnitude(mlp(), 0.5, 0, 10, 0)
