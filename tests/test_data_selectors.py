"""Data selectors: exact counts and class quotas, CCS's hard cut and budget, dedup, clear errors on bad input."""

import numpy as np
import pytest

from prunekit.data.selectors import SELECTORS, ccs_select, class_quotas, dedup_select, keep_count, select_examples
from prunekit.errors import PrunekitError
from prunekit.select import largest_remainder, top_k_indices


@pytest.mark.parametrize("n, keep, expected", [(10, 0.5, 5), (10, 1.0, 10), (10, 1, 1), (10, 10, 10), (7, 0.5, 4),
                                               (3, 0.01, 1), (1000, 0.3, 300), (10, np.int64(3), 3)])
def test_keep_count_is_exact(n, keep, expected):
    assert keep_count(n, keep) == expected


@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -1, -0.2, float("nan"), float("inf"), 11, True, "half"])
def test_keep_outside_the_budget_is_refused(keep):
    with pytest.raises(PrunekitError, match="keep"):
        keep_count(10, keep)


def test_empty_data_and_bad_scores_are_refused():
    with pytest.raises(PrunekitError, match="empty"):
        keep_count(0, 0.5)
    with pytest.raises(PrunekitError, match="empty"):
        select_examples(np.array([]), 0.5)
    with pytest.raises(PrunekitError, match="non-finite"):
        select_examples(np.array([0.1, np.nan, 0.3]), 0.5)
    with pytest.raises(PrunekitError, match="non-finite"):
        ccs_select(np.array([0.1, np.inf, 0.3]), 0.5)
    with pytest.raises(PrunekitError, match="1-D"):
        select_examples(np.zeros((3, 2)), 0.5)
    with pytest.raises(PrunekitError, match="mode 'middle'"):
        select_examples(np.arange(5.0), 0.5, mode="middle")
    with pytest.raises(PrunekitError, match="needs labels"):
        select_examples(np.arange(5.0), 0.5, class_balanced=True)
    with pytest.raises(PrunekitError, match="labels have shape"):
        select_examples(np.arange(5.0), 0.5, labels=np.zeros(4), class_balanced=True)


def test_top_k_breaks_ties_by_index_and_largest_remainder_sums_exactly():
    assert top_k_indices(np.array([1.0, 3.0, 3.0, 2.0, 3.0]), 3).tolist() == [1, 2, 4]
    assert top_k_indices(np.array([1.0, 0.0, 0.0]), 2, largest=False).tolist() == [1, 2]
    shares = largest_remainder(10, [1, 1, 1])
    assert shares.tolist() == [4, 3, 3] and shares.sum() == 10
    rng = np.random.default_rng(0)
    for _ in range(50):
        weights, total = rng.random(7), int(rng.integers(0, 500))
        shares = largest_remainder(total, weights)
        assert shares.sum() == total and np.all(np.abs(shares - total * weights / weights.sum()) < 1)


def test_hard_easy_and_band_keep_the_right_examples():
    scores = np.arange(10.0)  # example i has score i: 9 is the hardest
    assert select_examples(scores, 0.3).tolist() == [7, 8, 9]
    assert select_examples(scores, 0.3, mode="easy").tolist() == [0, 1, 2]
    assert select_examples(scores, 3, mode="band", band_start=0.2).tolist() == [5, 6, 7]
    assert select_examples(scores, 1.0).tolist() == list(range(10))
    with pytest.raises(PrunekitError, match="band_start 0.9"):
        select_examples(scores, 0.3, mode="band", band_start=0.9)


def test_selection_returns_sorted_int64_and_exact_counts():
    scores = np.random.default_rng(1).normal(size=997)
    for keep in (0.1, 0.33, 0.5, 0.9, 1.0, 1, 500):
        for mode in ("hard", "easy", "band"):
            kept = select_examples(scores, keep, mode=mode, band_start=0.05 if keep != 1.0 else 0.0)
            assert kept.dtype == np.int64 and len(kept) == keep_count(997, keep)
            assert np.all(np.diff(kept) > 0)


def test_class_balanced_selection_meets_the_largest_remainder_quotas():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    scores = rng.normal(size=1000) + labels  # class 2 is hardest overall: unbalanced selection would favour it
    kept = select_examples(scores, 0.25, labels=labels, class_balanced=True)
    assert len(kept) == 250 and np.bincount(labels[kept]).tolist() == [125, 75, 50]
    assert class_quotas(labels, 251) == {0: 126, 1: 75, 2: 50}
    # within each class it keeps that class's hardest examples
    for c in range(3):
        members = np.flatnonzero(labels == c)
        chosen = kept[labels[kept] == c]
        assert scores[chosen].min() >= np.sort(scores[members])[::-1][len(chosen) - 1]
    unbalanced = select_examples(scores, 0.25)
    assert np.bincount(labels[unbalanced], minlength=3)[2] > 50


def test_random_fraction_mixes_exactly_that_many_random_examples():
    scores = np.arange(1000.0)
    kept = select_examples(scores, 100, random_fraction=0.3, seed=5)
    assert len(kept) == 100 and len(np.unique(kept)) == 100
    assert np.sum(kept >= 930) == 70  # the 70 hardest by score
    assert np.array_equal(kept, select_examples(scores, 100, random_fraction=0.3, seed=5))
    assert not np.array_equal(kept, select_examples(scores, 100, random_fraction=0.3, seed=6))
    everything_random = select_examples(scores, 100, random_fraction=1.0, seed=5)
    assert len(everything_random) == 100 and everything_random.min() < 900


def test_ccs_respects_hard_cut_and_budget_and_covers_the_score_range():
    scores = np.random.default_rng(3).normal(size=2000)
    for keep in (0.05, 0.3, 0.5, 0.9):
        kept = ccs_select(scores, keep, hard_cut=0.1, strata=20, seed=0)
        assert len(kept) == keep_count(2000, keep) and len(np.unique(kept)) == len(kept)
        hardest = top_k_indices(scores, 200)
        assert not np.isin(kept, hardest).any()  # the hardest 10% are never kept
    # Coverage: with a small budget CCS keeps examples from across the range instead of its dense middle only.
    kept = ccs_select(scores, 0.1, hard_cut=0.0, strata=10, seed=0)
    edges = np.linspace(scores.min(), scores.max(), 11)
    per_stratum = np.histogram(scores[kept], edges)[0]
    sizes = np.histogram(scores, edges)[0]
    # strata smaller than an equal share are taken whole, the others get equal shares (±1 from the redistribution)
    small = sizes <= 200 // 10
    assert np.array_equal(per_stratum[small], sizes[small])
    assert per_stratum[~small].max() - per_stratum[~small].min() <= 1
    assert np.array_equal(ccs_select(scores, 0.1, seed=4), ccs_select(scores, 0.1, seed=4))


def test_ccs_class_balanced_and_errors():
    labels = np.repeat([0, 1], [600, 400])
    scores = np.random.default_rng(4).random(1000)
    kept = ccs_select(scores, 0.5, labels=labels, hard_cut=0.2)
    assert np.bincount(labels[kept]).tolist() == [300, 200]
    with pytest.raises(PrunekitError, match="hard cut"):
        ccs_select(scores, 0.95, hard_cut=0.1)
    with pytest.raises(PrunekitError, match="hard_cut 1.0"):
        ccs_select(scores, 0.5, hard_cut=1.0)
    with pytest.raises(PrunekitError, match="strata"):
        ccs_select(scores, 0.5, strata=0)
    assert len(ccs_select(np.ones(10), 4, hard_cut=0.0)) == 4  # constant scores: one stratum


def test_dedup_keeps_exactly_one_per_group():
    groups = np.array([0, 0, 1, -1, 1, 1, 2, -1, 0])
    assert dedup_select(groups).tolist() == [0, 2, 3, 6, 7]
    scores = np.array([0.9, 0.1, 0.5, 0.0, 0.2, 0.2, 0.0, 0.0, 0.1])
    assert dedup_select(groups, scores).tolist() == [1, 3, 4, 6, 7]  # group 0: index 1 beats 8 on the tie
    rng = np.random.default_rng(5)
    groups = rng.integers(-1, 50, size=500)
    kept = dedup_select(groups, rng.random(500))
    assert len(kept) == np.sum(groups == -1) + len(np.unique(groups[groups >= 0]))
    assert len(np.unique(groups[kept][groups[kept] >= 0])) == np.sum(groups[kept] >= 0)
    with pytest.raises(PrunekitError, match="integers"):
        dedup_select(np.array([0.5, 1.0]))
    with pytest.raises(PrunekitError, match="3 scores for 2"):
        dedup_select(np.array([0, 0]), np.zeros(3))


def test_selector_registry_dispatches_by_name():
    scores = np.arange(20.0)
    assert SELECTORS["hard"](scores, 2).tolist() == [18, 19]
    assert SELECTORS["easy"](scores, 2).tolist() == [0, 1]
    assert len(SELECTORS["ccs"](scores, 5, hard_cut=0.0)) == 5
