"""Budgets, patterns and selection: exact counts, valid N:M groups, clear errors."""

import pytest
import torch

from prunekit.budget import Pattern, parse_pattern, weight_budget
from prunekit.errors import PrunekitError
from prunekit.measure import nm_violations
from prunekit.select import (
    fraction_count,
    group_ranks,
    lowest_mask,
    nm_mask,
    nm_ramp_mask,
    row_mask,
    select_mask,
)


@pytest.mark.parametrize("text, n, m", [("2:4", 2, 4), ("4:8", 4, 8), (" 1 : 3 ", 1, 3)])
def test_parse_nm(text, n, m):
    assert parse_pattern(text) == Pattern(n, m)


@pytest.mark.parametrize("text", ["4:2", "0:4", "4:4", "2-4", "a:b", "2:4:8"])
def test_parse_rejects_malformed_or_impossible(text):
    with pytest.raises(PrunekitError, match="pattern"):
        parse_pattern(text)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "half"])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
    with pytest.raises(PrunekitError, match="sparsity"):
        weight_budget(sparsity)


def test_nm_fixes_sparsity_and_refuses_contradiction():
    assert weight_budget(None, "2:4").sparsity == 0.5
    assert weight_budget(0.5, "2:4").sparsity == 0.5
    with pytest.raises(PrunekitError, match="contradicts"):
        weight_budget(0.7, "2:4")
    with pytest.raises(PrunekitError, match="no budget"):
        weight_budget(None, None)


def test_width_not_divisible_by_m():
    with pytest.raises(PrunekitError, match="divisible by 5.*width 64"):
        Pattern(2, 5).check_width(64, "layer")


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_row_mask_removes_exactly_the_same_count_per_row(sparsity):
    scores = torch.rand(17, 100, generator=torch.Generator().manual_seed(0))
    keep = row_mask(scores, sparsity)
    removed = (~keep).sum(1)
    assert (removed == round(100 * sparsity)).all()
    # the removed entries are the lowest of their row
    for r in range(17):
        if removed[r]:
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_layer_mask_exact_and_lowest(sparsity):
    scores = torch.randn(33, 64, generator=torch.Generator().manual_seed(1))
    keep = lowest_mask(scores, sparsity)
    assert (~keep).sum().item() == round(33 * 64 * sparsity)
    if sparsity:
        assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 5)])
def test_nm_mask_groups_are_valid_and_keep_the_largest(n, m):
    scores = torch.rand(12, m * 7, generator=torch.Generator().manual_seed(2))
    keep = nm_mask(scores, n, m)
    groups = keep.reshape(12, 7, m)
    assert (groups.sum(-1) == n).all()
    assert nm_violations(keep.float(), n, m) == 0
    s = scores.reshape(12, 7, m)
    assert (s.masked_fill(~groups, float("inf")).amin(-1) >= s.masked_fill(groups, -1).amax(-1)).all()


def test_nm_mask_ties_go_to_the_earlier_entries():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0, 0.0, 5.0, 5.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False,
                                                True, False, True, False]]
    assert nm_mask(scores, 1, 4).sum().item() == 3
    # the sorting path (M > 8) breaks ties the same way: a block of dead inputs (score 0) keeps its first entries
    wide = torch.zeros(1, 32)
    wide[0, 20] = 1.0
    assert nm_mask(wide, 4, 16).nonzero()[:, 1].tolist() == [0, 1, 2, 3, 16, 17, 18, 20]


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 8), (8, 16)])
def test_nm_mask_keeps_the_n_largest_of_distinct_scores_as_topk_does(n, m):
    """The pairwise path (M <= 8) and the sorting path (larger M) both keep exactly the N largest of every group."""
    scores = torch.randn(64, m * 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    groups = scores.reshape(64, 24, m)
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    assert torch.equal(nm_mask(scores, n, m), expected.reshape(64, -1))


@pytest.mark.parametrize("m", [4, 8, 16])
def test_group_ranks_are_the_stable_descending_order_within_each_group(m):
    """Pairwise counting (M <= 8) and sorting (larger M) agree with a stable sort, ties going to the earlier entry."""
    scores = torch.randint(0, 5, (9, m * 6), generator=torch.Generator().manual_seed(4)).float()  # many ties
    ranks = group_ranks(scores, m)
    assert ranks.dtype == torch.uint8 and ranks.shape == (9, 6, m)
    order = torch.sort(scores.reshape(9, 6, m), dim=-1, descending=True, stable=True).indices
    expected = torch.empty_like(order).scatter_(-1, order, torch.arange(m).expand_as(order))
    assert torch.equal(ranks.long(), expected)


def _ramp_reference(scores, sparsity, n, m):
    """nm_ramp_mask by loops: remove one entry at a time, always a group's lowest remaining one, choosing among
    groups with the fewest removals so far the entry of lowest score (the earlier group on ties)."""
    rows, cols = scores.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    ranks = group_ranks(scores, m)
    for r in range(rows):
        removed = [0] * (cols // m)
        for _ in range(fraction_count(cols, sparsity)):
            fewest = min(removed)
            candidates = []
            for g, count in enumerate(removed):
                if count == fewest:
                    j = int((ranks[r, g] == m - 1 - count).nonzero())
                    candidates.append((float(scores[r, g * m + j]), g, j))
            _, g, j = min(candidates)
            keep[r, g * m + j] = False
            removed[g] += 1
    return keep


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_ramp_mask_removes_each_groups_lowest_first_and_ends_on_nm(n, m):
    scores = torch.rand(6, m * 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    final = nm_mask(scores, n, m)
    for sparsity in (0.0, 0.1, 0.2, 0.3, 0.45, 1 - n / m):
        sparsity = min(sparsity, 1 - n / m)
        keep = nm_ramp_mask(scores, sparsity, n, m)
        assert ((~keep).sum(1) == fraction_count(m * 5, sparsity)).all()
        assert (keep | ~final).all()  # every group's N best stay throughout
        lost = (~keep).reshape(6, 5, m).sum(-1)
        assert (lost.amax(1) - lost.amin(1) <= 1).all()  # groups lose evenly
        assert torch.equal(keep, _ramp_reference(scores, sparsity, n, m))
    assert torch.equal(nm_ramp_mask(scores, 1 - n / m, n, m), final)


def test_nm_ramp_mask_refuses_a_sparsity_beyond_the_pattern():
    with pytest.raises(PrunekitError, match=r"^sparsity 0.6 is above the 0.5 that pattern 2:4 reaches$"):
        nm_ramp_mask(torch.rand(4, 16), 0.6, 2, 4)


def test_select_mask_dispatch():
    scores = torch.rand(8, 16)
    assert torch.equal(select_mask(scores, 0.5, Pattern(2, 4)), nm_mask(scores, 2, 4))
    assert torch.equal(select_mask(scores, 0.5, Pattern(), "row"), row_mask(scores, 0.5))
    assert torch.equal(select_mask(scores, 0.5, Pattern(), "layer"), lowest_mask(scores, 0.5))
    with pytest.raises(PrunekitError, match="comparison group"):
        select_mask(scores, 0.5, Pattern(), "column")


def test_fraction_count_rounds_halves_up():
    assert [fraction_count(n, 0.5) for n in (1, 3, 5, 7)] == [1, 2, 3, 4]  # round() would give 0, 2, 2, 4
    assert fraction_count(10, 0.0) == 0 and fraction_count(10, 1.0) == 10
    assert fraction_count(100, 0.3) == 30  # 100 * 0.3 is 30.000000000000004 in floating point
