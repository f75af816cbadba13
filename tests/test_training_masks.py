"""Masks that hold: zero gradients on pruned entries, re-zeroing, optimizers, accumulation, bf16, save, finalize."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.training import Masks, target_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def half_masks(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.rand(w.shape, generator=generator) > 0.5 for n, w in target_weights(model).items()}


def batch(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, masks: Masks | None = None) -> None:
    """`masks` given: re-zero after every step (what every pruner does); None: rely on the gradient hook alone."""
    for step in range(steps):
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if masks is not None:
            masks.apply()


def pruned_values(model: nn.Module, keep: dict[str, torch.Tensor]) -> torch.Tensor:
    weights = target_weights(model)
    return torch.cat([weights[n].detach()[~m] for n, m in keep.items()])


OPTIMIZERS = {
    "sgd-momentum-wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov-wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adam-l2": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1),
}


def test_target_weights_of_any_network_are_its_linear_and_conv_weights_once():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8), nn.Conv2d(1, 2, 3),
                          nn.LayerNorm(4), nn.Linear(4, 2))
    targets = target_weights(model)
    assert list(targets) == ["1.weight", "3.weight", "5.weight"]
    assert all(targets[n] is p for n, p in model.named_parameters() if n in targets)
    shared = nn.Linear(4, 4)
    assert list(target_weights(nn.Sequential(shared, nn.ReLU(), shared))) == ["0.weight"]


def test_all_true_masks_are_identity():
    model = mlp()
    x, _ = batch(0)
    before = model(x)
    masks = Masks(model)
    masks.apply()
    assert torch.equal(model(x), before)
    assert masks.sparsity() == {"achieved": 0.0, "numel": 8 * 16 + 16 * 16 + 16 * 4,
                                "layers": dict.fromkeys(masks.masks, 0.0)}


def test_update_zeroes_weights_and_gradients_and_is_registered_as_buffers():
    model = mlp()
    masks = Masks(model)
    keep = half_masks(model)
    masks.update(keep)
    for name, w in target_weights(model).items():
        assert torch.equal(w, w * keep[name])
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    for name, w in target_weights(model).items():
        assert w.grad[~keep[name]].abs().sum() == 0
        assert w.grad[keep[name]].abs().sum() > 0
    assert {"0.weight_mask", "2.weight_mask", "4.weight_mask"} <= set(model.state_dict())
    pruned = sum(int((~m).sum()) for m in keep.values())
    assert masks.sparsity()["achieved"] == pruned / masks.sparsity()["numel"]


def test_bad_names_and_masks_are_refused():
    model = mlp()
    with pytest.raises(PrunekitError, match="0.bias"):
        Masks(model, ["0.bias"])
    masks = Masks(model, ["0.weight"])
    with pytest.raises(PrunekitError, match="shape"):
        masks.update({"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(PrunekitError, match="2.weight"):
        masks.update({"2.weight": torch.ones(16, 16, dtype=torch.bool)})
    with pytest.raises(PrunekitError, match="already has a mask"):
        Masks(model, ["0.weight"])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gradient_zeroing_alone_holds_when_masked_from_the_start(optimizer):
    # Zero weight, zero gradient and zero optimizer state give a zero update, weight decay included.
    model = mlp()
    keep = half_masks(model)
    Masks(model).update(keep)
    train(model, OPTIMIZERS[optimizer](model.parameters()), steps=150)
    assert torch.count_nonzero(pruned_values(model, keep)) == 0


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_mid_training_prune_needs_rezeroing(optimizer):
    """After dense steps the optimizer state (momentum, Adam moments) is nonzero: gradient zeroing alone lets
    pruned weights drift away from zero; re-zeroing after each step holds them at exactly zero."""
    results = {}
    for rezero in (False, True):
        model = mlp()
        opt = OPTIMIZERS[optimizer](model.parameters())
        train(model, opt, steps=20)
        masks = Masks(model)
        keep = half_masks(model)
        masks.update(keep)
        train(model, opt, steps=150, masks=masks if rezero else None)
        results[rezero] = int(torch.count_nonzero(pruned_values(model, keep)))
    assert results[False] > 0
    assert results[True] == 0


def test_gradient_accumulation_adds_only_masked_gradients():
    model = mlp()
    masks = Masks(model)
    keep = half_masks(model)
    masks.update(keep)
    singles = []
    for micro in range(4):
        model.zero_grad()
        x, y = batch(micro, n=8)
        nn.functional.cross_entropy(model(x), y).backward()
        singles.append({n: w.grad.clone() for n, w in target_weights(model).items()})
    model.zero_grad()
    for micro in range(4):
        x, y = batch(micro, n=8)
        nn.functional.cross_entropy(model(x), y).backward()
    for name, w in target_weights(model).items():
        assert w.grad[~keep[name]].abs().sum() == 0
        torch.testing.assert_close(w.grad, sum(s[name] for s in singles))
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2).step()
    masks.apply()
    assert torch.count_nonzero(pruned_values(model, keep)) == 0


def test_bfloat16_autocast_keeps_pruned_weights_at_zero():
    model = mlp()
    masks = Masks(model)
    keep = half_masks(model)
    masks.update(keep)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(20):
        x, y = batch(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16
        nn.functional.cross_entropy(logits.float(), y).backward()
        assert all(w.grad.dtype == torch.float32 for w in target_weights(model).values())
        assert all(w.grad[~keep[n]].abs().sum() == 0 for n, w in target_weights(model).items())
        opt.step()
        masks.apply()
    assert torch.count_nonzero(pruned_values(model, keep)) == 0


def test_masks_survive_a_safetensors_round_trip_into_a_fresh_model(tmp_path):
    model = mlp(seed=0)
    masks = Masks(model)
    keep = half_masks(model)
    masks.update(keep)
    save_file(model.state_dict(), tmp_path / "model.safetensors")

    fresh = mlp(seed=5)
    fresh_masks = Masks(fresh)
    fresh_masks.apply()  # caches the all-True masks; loading must replace them
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for name, mask in fresh_masks.masks.items():
        assert torch.equal(mask, keep[name])
    x, _ = batch(0)
    assert torch.equal(fresh(x), model(x))
    # The loaded masks, not the all-True ones the fresh model started with, drive the gradient hooks.
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    train(fresh, opt, steps=30, masks=fresh_masks)
    assert torch.count_nonzero(pruned_values(fresh, keep)) == 0
    assert fresh_masks.sparsity() == masks.sparsity()


def test_finalize_bakes_zeros_and_leaves_a_plain_model():
    model = mlp()
    masks = Masks(model)
    keep = half_masks(model)
    masks.update(keep)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=5, masks=masks)
    x, y = batch(0)
    before = model(x)
    plain = masks.finalize()
    assert plain is model
    assert torch.equal(model(x), before)
    assert set(model.state_dict()) == set(mlp().state_dict())
    # Hooks are gone: pruned entries now receive gradient again.
    nn.functional.cross_entropy(model(x), y).backward()
    assert any(w.grad[~keep[n]].abs().sum() > 0 for n, w in target_weights(model).items())
    assert torch.count_nonzero(pruned_values(model, keep)) == 0
    with pytest.raises(PrunekitError, match="finalized"):
        masks.apply()
    Masks(model)  # the weights can be masked again


def test_gradient_observer_sees_the_dense_gradient():
    model = mlp()
    masks = Masks(model)
    keep = half_masks(model)
    masks.update(keep)
    seen = {}
    masks.observe_gradients(lambda name, grad: seen.__setitem__(name, grad.clone()))
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    for name, w in target_weights(model).items():
        assert seen[name][~keep[name]].abs().sum() > 0
        assert torch.equal(w.grad, seen[name] * keep[name])


def test_masks_follow_the_model_to_another_dtype():
    model = mlp()
    masks = Masks(model)
    keep = half_masks(model)
    masks.update(keep)
    model.double()
    assert all(m.dtype == torch.bool for m in masks.masks.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for step in range(5):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.double()), y).backward()
        assert all(w.grad[~keep[n]].abs().sum() == 0 for n, w in target_weights(model).items())
        opt.step()
        masks.apply()
    assert torch.count_nonzero(pruned_values(model, keep)) == 0
