"""Block allocations for one-shot pruning: OWL with N:M patterns (Yin et al. 2024) and ECoFLaP's zeroth-order block
importance (Sung et al. 2024)."""

import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for
from prunekit.allocation import allocate, ecoflap_sparsities, owl_nm_patterns, owl_sparsities
from prunekit.budget import Pattern
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count
from prunekit.weights.ecoflap import ecoflap_block_scores, ecoflap_plan
from prunekit.weights.engine import capture_block_inputs, owl_plan, prune_sequentially
from prunekit.weights.gradients import target_parameters
from prunekit.weights.methods import METHODS, PruneOptions
from tiny_models import tiny_causal_lm

CPU = torch.device("cpu")


RATIOS = torch.rand(30, generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("pattern, limit, family", [
    (Pattern(4, 8), 0.08, {3, 4, 5}), (Pattern(2, 4), 0.25, {1, 2, 3}), (Pattern(4, 8), 0.25, {2, 3, 4, 5, 6}),
    (Pattern(6, 8), 0.25, {4, 5, 6, 7}),
])
def test_owl_nm_patterns_keep_the_mean_exactly_within_the_family(pattern, limit, family):
    patterns = owl_nm_patterns(RATIOS, pattern, limit)
    assert all(p.m == pattern.m for p in patterns)
    assert {p.n for p in patterns} <= family
    assert len({p.n for p in patterns}) == len(family)  # the whole family is used (the test can fail)
    assert sum(p.n for p in patterns) == pattern.n * len(RATIOS)
    # more outliers keep more weights
    order = sorted(range(len(RATIOS)), key=RATIOS.__getitem__)
    assert all(patterns[a].n <= patterns[b].n for a, b in zip(order, order[1:], strict=False))
    # each block's pattern is OWL's own block sparsity on the grid of whole N, within one step of it
    moves = [s - 0.5 for s in owl_sparsities(RATIOS, 0.5, limit)]
    owl = [min(max(pattern.sparsity + move, 1 / pattern.m), 1 - 1 / pattern.m) for move in moves]
    assert all(abs(p.sparsity - s) <= 1 / pattern.m for p, s in zip(patterns, owl, strict=True))


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(1, 4)], ids=str)
def test_owl_nm_patterns_stay_uniform_and_warn_when_the_limit_is_under_half_a_step(pattern):
    """The default limit 0.08 moves no block by half of a 2:4 step (0.125): no block is forced a whole step away."""
    with pytest.warns(UserWarning, match="never reach half a step"):
        assert owl_nm_patterns(RATIOS, pattern, 0.08) == [pattern] * len(RATIOS)


def test_owl_nm_patterns_refuse_unequal_blocks_and_unstructured():
    with pytest.raises(PrunekitError, match="equal size"):
        owl_nm_patterns([0.1, 0.2], Pattern(2, 4), 0.08, sizes=[10, 12])
    with pytest.raises(PrunekitError, match="N:M pattern"):
        owl_nm_patterns([0.1, 0.2], Pattern(), 0.08)
    assert owl_nm_patterns([0.3, 0.3, 0.3], Pattern(2, 4), 0.08) == [Pattern(2, 4)] * 3


def _calibration(samples=8, length=32):
    return torch.randint(0, 128, (samples, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(4, 8)], ids=str)
def test_owl_nm_plan_prunes_every_block_to_its_own_valid_pattern(pattern):
    model = tiny_causal_lm("llama", layers=6)
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)

    def inputs():
        return capture_block_inputs(model, blocks, _calibration(), batch_size=4, device=CPU, activation_device=CPU)

    plan = owl_plan(model, adapter, inputs(), sparsity=pattern.sparsity, threshold=5.0, limit=0.25, device=CPU,
                    progress=False, pattern=pattern)
    assert len({p.n for p in plan.patterns}) > 1
    masks = prune_sequentially(model, adapter, METHODS["wanda"], sparsities=plan.sparsities, pattern=plan.patterns,
                               inputs=inputs(), options=PruneOptions(), device=CPU, progress=False, keep_masks=True)
    removed = total = 0
    for name, keep in masks.items():
        block = plan.patterns[int(name.split(".")[2])]
        assert (keep.reshape(keep.shape[0], -1, block.m).sum(-1) == block.n).all(), name
        removed += int((~keep).sum())
        total += keep.numel()
    assert removed == total * pattern.sparsity


def test_ecoflap_sparsities_are_monotone_in_the_scores_and_keep_the_mean():
    scores = [0.5, 2.0, 1.0, 0.1, 3.0, 1.5]
    sizes = [100, 100, 100, 100, 100, 100]
    sparsities = ecoflap_sparsities(scores, 0.6, 0.08, sizes)
    assert sum(s * n for s, n in zip(sparsities, sizes, strict=True)) / sum(sizes) == pytest.approx(0.6, abs=1e-12)
    order = sorted(range(len(scores)), key=scores.__getitem__)
    assert all(sparsities[a] > sparsities[b] for a, b in zip(order, order[1:], strict=False))
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    with pytest.raises(PrunekitError, match="finite and >= 0"):
        ecoflap_sparsities([1.0, float("nan")], 0.5, 0.08)


@pytest.mark.usefixtures("one_thread")
def test_ecoflap_block_scores_estimate_the_first_order_importance_and_leave_the_model_unchanged():
    """The central difference along |W| ⊙ u estimates sqrt(2/π) ||∇L ⊙ W|| per block: with many directions, the
    ranking of blocks agrees with the backward-pass value."""
    model = tiny_causal_lm("llama", layers=4)
    adapter = adapter_for(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ids = _calibration(4, 16)
    scores = ecoflap_block_scores(model, adapter, ids, directions=32, batch_size=4)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    exact = [0.0] * 4
    for name, w in target_parameters(model, adapter).items():
        exact[int(name.split(".")[2])] += float((w.grad * w.detach()).square().sum())
    exact = [(2 / torch.pi) ** 0.5 * e**0.5 for e in exact]
    for estimate, value in zip(scores, exact, strict=True):
        assert estimate == pytest.approx(value, rel=0.35)


def test_ecoflap_plan_meets_the_mean_target_through_the_engine():
    model = tiny_causal_lm("llama", layers=4)
    adapter = adapter_for(model)
    plan = ecoflap_plan(model, adapter, _calibration(4, 16), sparsity=0.6, limit=0.08, batch_size=4)
    assert len(set(plan.sparsities)) == 4 and plan.block_scores is not None
    blocks = adapter.block_list(model)
    inputs = capture_block_inputs(model, blocks, _calibration(), batch_size=4, device=CPU, activation_device=CPU)
    prune_sequentially(model, adapter, METHODS["wanda"], sparsities=plan.sparsities, pattern=Pattern(),
                       inputs=inputs, options=PruneOptions(), device=CPU, progress=False)
    weights = prunekit.target_weights(model).values()
    achieved = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert achieved == pytest.approx(0.6, abs=2e-3)


@pytest.mark.parametrize("options, bad", [(dict(directions=0), "directions 0"), (dict(epsilon=0.0), "epsilon 0.0")])
def test_bad_ecoflap_options_raise_one_line(options, bad):
    model = tiny_causal_lm("llama", layers=2)
    with pytest.raises(PrunekitError, match=bad) as error:
        ecoflap_block_scores(model, adapter_for(model), _calibration(), **options)
    assert "\n" not in str(error.value)


def test_ecoflap_allocate_prunes_layers_with_higher_mean_importance_less():
    g = torch.Generator().manual_seed(0)
    scores = {f"layer{i}": torch.rand(32, 48, generator=g) * scale for i, scale in enumerate((1.0, 3.0, 0.5, 2.0))}
    masks = allocate(scores, 0.6, "ecoflap")
    removed = {n: int((~m).sum()) for n, m in masks.items()}
    assert sum(removed.values()) == fraction_count(4 * 32 * 48, 0.6)
    assert removed["layer1"] < removed["layer3"] < removed["layer0"] < removed["layer2"]
    for name, keep in masks.items():  # within a layer, the lowest scores go
        assert scores[name][~keep].max() <= scores[name][keep].min()
