"""Allocation across layers: exact counts, global ranking, per-layer floors, LAMP, ERK/ER."""

import math

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.select import removal_count
from prunekit.training import ALLOCATIONS, allocate, check_layer_collapse, erk_densities, lamp_scores

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"conv": (8, 3, 3, 3), "fc1": (64, 72), "fc2": (10, 64)}


def scores(seed: int = 0, scale: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scale = scale or {}
    return {n: torch.randn(s, generator=generator).abs() * scale.get(n, 1.0) for n, s in SHAPES.items()}


def removed(keep: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: int((~m).sum()) for n, m in keep.items()}


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8, 0.95])
def test_total_removed_is_exact(allocation, sparsity):
    s = scores()
    options = {"min_density": 0.02} if allocation == "global-min" else {}
    keep = allocate(s, sparsity, allocation, **options)
    total = sum(t.numel() for t in s.values())
    counts = removed(keep)
    if allocation == "uniform":  # exact per layer; the total is within one weight per layer
        assert counts == {n: removal_count(t.numel(), sparsity) for n, t in s.items()}
        assert abs(sum(counts.values()) - removal_count(total, sparsity)) <= len(s)
    else:
        assert sum(counts.values()) == removal_count(total, sparsity)
    assert all(keep[n].dtype == torch.bool and keep[n].shape == s[n].shape for n in s)


def test_global_removes_the_lowest_pooled_scores():
    s = scores()
    keep = allocate(s, 0.6, "global")
    kept = torch.cat([s[n][keep[n]] for n in s])
    dropped = torch.cat([s[n][~keep[n]] for n in s])
    assert dropped.max() <= kept.min()


def test_global_can_empty_a_layer_and_the_collapse_check_warns():
    s = scores(scale={"fc2": 1e-3})
    keep = allocate(s, 0.9, "global")
    with pytest.warns(UserWarning, match="fc2"):
        assert check_layer_collapse(keep) == ["fc2"]


def test_global_min_keeps_the_floor_in_every_layer():
    s = scores(scale={"fc2": 1e-3})
    keep = allocate(s, 0.9, "global-min", min_density=0.05)
    for name, mask in keep.items():
        assert int(mask.sum()) >= math.ceil(0.05 * mask.numel())
        # Within the floor the layer keeps its own highest scores.
        assert s[name][~mask].max() <= s[name][mask].min()
    with pytest.raises(PrunekitError, match="min_density"):
        allocate(s, 0.9, "global-min", min_density=0.5)
    with pytest.raises(PrunekitError, match="min_density"):
        allocate(s, 0.9, "global-min")
    with pytest.raises(PrunekitError, match="only used by"):
        allocate(s, 0.9, "global", min_density=0.1)


def test_lamp_scores_match_the_definition():
    w = torch.tensor([0.5, -2.0, 1.0, 0.1])
    lamp = lamp_scores(w.abs())
    squares = w ** 2
    expected = torch.stack([squares[i] / squares[squares >= squares[i]].sum() for i in range(4)])
    torch.testing.assert_close(lamp, expected.double())
    assert lamp.max() == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_lamp_never_empties_a_layer(seed):
    s = scores(seed, scale={"fc2": 1e-4, "conv": 1e-2})
    total = sum(t.numel() for t in s.values())
    for sparsity in (0.9, 0.99, (total - len(s)) / total):
        keep = allocate(s, sparsity, "lamp")
        assert check_layer_collapse(keep) == []
        assert sum(removed(keep).values()) == removal_count(total, sparsity)


def test_erk_densities_follow_the_formula_with_capping():
    sparsity = 0.9
    densities = erk_densities(SHAPES, sparsity)
    raw = {n: sum(s) / math.prod(s) for n, s in SHAPES.items()}
    sizes = {n: math.prod(s) for n, s in SHAPES.items()}
    assert all(0 < d <= 1 for d in densities.values())
    free = [n for n in SHAPES if densities[n] < 1]
    # Uncapped layers: density / raw is one constant epsilon.
    ratios = [densities[n] / raw[n] for n in free]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
    kept = sum(densities[n] * sizes[n] for n in SHAPES)
    total = sum(sizes.values())
    assert kept == pytest.approx(total - removal_count(total, sparsity))
    # Capping: at low sparsity the smallest (highest raw density) layer becomes dense, the rest rescaled.
    low = erk_densities(SHAPES, 0.3)
    assert low["fc2"] == 1.0 and low["conv"] == 1.0 and low["fc1"] < 1.0
    assert sum(low[n] * sizes[n] for n in SHAPES) == pytest.approx(total - removal_count(total, 0.3))


def test_er_ignores_kernel_dimensions_and_erk_uses_them():
    erk, er = erk_densities(SHAPES, 0.95), erk_densities(SHAPES, 0.95, kernel=False)
    assert erk["fc1"] / erk["fc2"] == pytest.approx((64 + 72) / (64 * 72) / ((10 + 64) / (10 * 64)))
    assert er["fc1"] / er["conv"] == pytest.approx((64 + 72) / (64 * 72) / ((8 + 3) / (8 * 3)))
    assert erk["conv"] != pytest.approx(er["conv"])


@pytest.mark.parametrize("allocation", ["erk", "er"])
def test_erk_masks_use_shapes_for_counts_and_scores_within_layer(allocation):
    a, b = scores(0), scores(1)
    keep_a, keep_b = allocate(a, 0.9, allocation), allocate(b, 0.9, allocation)
    assert removed(keep_a) == removed(keep_b)
    densities = erk_densities(SHAPES, 0.9, kernel=allocation == "erk")
    for name, mask in keep_a.items():
        assert abs(int(mask.sum()) - densities[name] * mask.numel()) < 1
        assert a[name][~mask].max() <= a[name][mask].min()


def test_bad_input_is_refused():
    with pytest.raises(PrunekitError, match="'best'"):
        allocate(scores(), 0.5, "best")
    with pytest.raises(PrunekitError, match="1.5"):
        allocate(scores(), 1.5)
    with pytest.raises(PrunekitError, match="negative"):
        allocate({"w": torch.tensor([1.0, -1.0])}, 0.5, "lamp")
