"""Allocation across layers: exact counts, global ranking, per-layer floors, LAMP, ERK/ER, OWL, per-block budgets."""

import math

import pytest
import torch

import prunekit
from prunekit import names
from prunekit.adapters import adapter_for
from prunekit.allocation import (
    ALLOCATIONS,
    allocate,
    block_sparsities,
    check_allocation,
    erk_densities,
    lamp_scores,
    outlier_ratio,
    owl_sparsities,
)
from prunekit.api import check_prune_options
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count
from prunekit.training import check_layer_collapse
from tiny_models import tiny_causal_lm

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
        assert counts == {n: fraction_count(t.numel(), sparsity) for n, t in s.items()}
        assert abs(sum(counts.values()) - fraction_count(total, sparsity)) <= len(s)
    else:
        assert sum(counts.values()) == fraction_count(total, sparsity)
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
        assert sum(removed(keep).values()) == fraction_count(total, sparsity)


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
    assert kept == pytest.approx(total - fraction_count(total, sparsity))
    # Capping: at low sparsity the smallest (highest raw density) layer becomes dense, the rest rescaled.
    low = erk_densities(SHAPES, 0.3)
    assert low["fc2"] == 1.0 and low["conv"] == 1.0 and low["fc1"] < 1.0
    assert sum(low[n] * sizes[n] for n in SHAPES) == pytest.approx(total - fraction_count(total, 0.3))


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
    with pytest.raises(PrunekitError, match="only used by allocation 'owl'"):
        allocate(scores(), 0.5, "lamp", owl_limit=0.1)


def test_one_vocabulary_for_one_shot_and_training():
    assert ALLOCATIONS is names.ALLOCATIONS
    assert set(names.ONESHOT_ALLOCATIONS) < set(ALLOCATIONS)
    with pytest.raises(PrunekitError, match="'erk' is not available for one-shot pruning; choose one of uniform, "
                                            "global, lamp, owl"):
        check_allocation("erk", names.ONESHOT_ALLOCATIONS, "one-shot pruning")
    with pytest.raises(PrunekitError, match="'best' is unknown; choose one of uniform, global, global-min"):
        check_allocation("best")


def test_outlier_ratio_counts_scores_above_a_multiple_of_the_mean():
    scores_ = torch.ones(100)
    scores_[:3] = 100.0  # mean 3.97: the three planted scores are above 5x the mean, the rest below
    assert outlier_ratio(scores_, 5.0) == pytest.approx(0.03)
    # Several tensors are one layer: one mean over all of them.
    assert outlier_ratio([scores_[:50], scores_[50:]], 5.0) == pytest.approx(0.03)
    assert outlier_ratio([scores_[:50], torch.ones(950)], 5.0) == pytest.approx(0.003)


def test_owl_sparsities_keep_the_mean_and_favour_outlier_layers():
    ratios = [0.01, 0.05, 0.02, 0.10]
    result = owl_sparsities(ratios, 0.5, 0.08)
    assert sum(result) / 4 == pytest.approx(0.5, abs=1e-12)
    assert max(result) - min(result) == pytest.approx(0.16)
    assert result[3] == min(result) and result[0] == max(result)  # most outliers -> least pruned
    # Linear in the outlier ratio between the two extremes.
    assert result[1] == pytest.approx(result[0] - 0.16 * (0.05 - 0.01) / (0.10 - 0.01))
    sized = owl_sparsities(ratios, 0.5, 0.08, sizes=[1, 2, 3, 4])
    assert sum(s * w for s, w in zip(sized, [1, 2, 3, 4], strict=True)) / 10 == pytest.approx(0.5, abs=1e-12)
    assert owl_sparsities([0.1, 0.1], 0.5, 0.08) == [0.5, 0.5]
    with pytest.raises(PrunekitError, match="owl-limit"):
        owl_sparsities(ratios, 0.95, 0.08)


def planted_outliers(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three equal layers of scores in [0.5, 1.5), none above 5x their mean; `fc1` then has 3% of its scores raised
    100-fold, all of them outliers (its mean becomes about 4)."""
    generator = torch.Generator().manual_seed(seed)
    s = {n: torch.rand(40, 50, generator=generator) + 0.5 for n in ("fc0", "fc1", "fc2")}
    s["fc1"].view(-1)[torch.randperm(2000, generator=generator)[:60]] *= 100
    return s


def test_owl_prunes_the_layer_with_planted_outliers_least():
    s = planted_outliers()
    assert [outlier_ratio(t, 5.0) for t in s.values()] == [0.0, 0.03, 0.0]
    keep = allocate(s, 0.6, "owl", owl_limit=0.09)
    # Offsets +0.09, -0.09, +0.09 centred on their mean 0.03: fc1 at 0.48, the others at 0.66.
    assert removed(keep) == {"fc0": 1320, "fc1": 960, "fc2": 1320}
    assert all(s[n][~m].max() <= s[n][m].min() for n, m in keep.items())  # within a layer the lowest go
    default = removed(allocate(s, 0.6, "owl"))  # the paper's M = 5, lambda = 0.08
    assert min(default, key=default.get) == "fc1" and sum(default.values()) == 3600
    assert removed(allocate(s, 0.6, "owl", owl_threshold=200.0)) == {"fc0": 1200, "fc1": 1200, "fc2": 1200}


def test_owl_limit_shrinks_at_small_sparsities_so_schedules_can_start_at_zero():
    s = planted_outliers()
    assert removed(allocate(s, 0.0, "owl")) == {"fc0": 0, "fc1": 0, "fc2": 0}
    # lambda 0.08 capped at 0.06 / 2: fc1 at 0.06 - 0.04, the others at 0.06 + 0.02.
    assert removed(allocate(s, 0.06, "owl")) == {"fc0": 160, "fc1": 40, "fc2": 160}


def test_block_sparsities_are_the_share_each_block_loses_in_a_global_ranking():
    s = planted_outliers()
    blocks = [{"a": s["fc0"], "b": s["fc2"]}, {"a": 2 * s["fc0"], "b": 2 * s["fc2"]}]  # block 1: twice the magnitudes
    for allocation in ("global", "lamp"):
        keep = allocate({f"{i}.{n}": t for i, block in enumerate(blocks) for n, t in block.items()}, 0.5, allocation)
        expected = [sum(int((~keep[f"{i}.{n}"]).sum()) for n in ("a", "b")) / 4000 for i in range(2)]
        assert block_sparsities(blocks, 0.5, allocation) == expected
        assert sum(expected) == 1.0
    # A global ranking of magnitudes prunes the small block most; LAMP, invariant to each layer's scale, does not.
    small, large = block_sparsities(blocks, 0.5, "global")
    assert small > 0.7 and large < 0.3
    assert block_sparsities(blocks, 0.5, "lamp") == pytest.approx([0.5, 0.5], abs=1e-3)
    with pytest.raises(PrunekitError, match="choose one of global, lamp"):
        block_sparsities(blocks, 0.5, "erk")


@pytest.mark.parametrize("allocation", ["global", "lamp"])
def test_one_shot_pruning_takes_block_sparsities_from_the_dense_magnitudes(allocation):
    model = tiny_causal_lm("llama", layers=4)
    with torch.no_grad():  # block 2 twice as large: a global ranking of magnitudes spares it, LAMP does not
        for module in adapter_for(model).projections(model.model.layers[2]).values():
            module.weight.mul_(2)
    adapter = adapter_for(model)
    dense = [{n: m.weight.detach().abs() for n, m in adapter.projections(b).items()} for b in adapter.block_list(model)]
    record = prunekit.prune(model, method="magnitude", sparsity=0.5, allocation=allocation, progress=False)
    planned = record["method"]["block_sparsities"]
    assert planned == block_sparsities(dense, 0.5, allocation)
    assert sum(planned) / 4 == pytest.approx(0.5, abs=1e-12)
    if allocation == "global":
        assert planned[2] == min(planned) < 0.4
    else:
        assert planned == pytest.approx([0.5] * 4, abs=0.02)
    for name, layer in record["metrics"]["sparsity"]["per_layer"].items():
        assert layer["target"] == planned[int(name.split(".")[2])]
        assert layer["sparsity"] == pytest.approx(layer["target"], abs=1e-3), name


@pytest.mark.parametrize("allocation, pattern, message", [
    ("erk", None, "'erk' is not available for one-shot pruning .*; choose one of uniform, global, lamp, owl"),
    ("global-min", None, "'global-min' is not available for one-shot pruning"),
    ("nearest", None, "'nearest' is unknown; choose one of uniform, global, lamp, owl"),
    ("lamp", "2:4", "LAMP allocates a different sparsity to each block, but pattern 2:4"),
])
def test_one_shot_pruning_refuses_allocations_it_does_not_use(allocation, pattern, message):
    sparsity = None if pattern else 0.5
    with pytest.raises(PrunekitError, match=message):
        check_prune_options("magnitude", sparsity, pattern, allocation)
