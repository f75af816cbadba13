"""Selectors: turn one score per example into the sorted indices of the examples to keep.

A selector never knows where its scores came from. Scores are oriented HIGHER = HARDER (see
`prunekit.data.dynamics`); `keep` is a fraction in (0, 1] or an integer count in [1, N], and the kept count is
exact. Every selector returns a sorted `np.ndarray` of int64 indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from prunekit.errors import PrunekitError
from prunekit.select import fraction_count, largest_remainder, top_k_indices

MODES = ("hard", "easy", "band")


def keep_count(n: int, keep: float | int) -> int:
    """The exact number of examples a keep budget means for `n` examples.

    An integer (Python or NumPy) is a count in [1, n]; a float is a fraction in (0, 1], rounded half up and at
    least 1. So `keep=1` keeps one example and `keep=1.0` keeps them all.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise PrunekitError(f"cannot select from {n} examples: the data is empty; give at least one example")
    if isinstance(keep, bool) or not isinstance(keep, int | float | np.integer | np.floating):
        raise PrunekitError(f"keep {keep!r} is not a number; use a fraction in (0, 1] or a count in [1, {n}]")
    if isinstance(keep, int | np.integer):
        if not 1 <= keep <= n:
            raise PrunekitError(f"keep count {keep} is outside [1, {n}] (the number of examples)")
        return int(keep)
    if not (math.isfinite(keep) and 0 < keep <= 1):
        raise PrunekitError(f"keep fraction {keep} is outside (0, 1]; use a fraction in (0, 1] or a count in [1, {n}]")
    return max(1, fraction_count(n, keep))


def check_scores(scores: np.ndarray | list[float], name: str = "scores") -> np.ndarray:
    """Scores as a 1-D float64 array; empty, multi-dimensional or non-finite scores are refused."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise PrunekitError(f"{name} must be one value per example (1-D), got shape {array.shape}")
    if len(array) == 0:
        raise PrunekitError(f"{name} are empty: the data has no examples")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise PrunekitError(f"{name} hold {len(bad)} non-finite values (first at index {bad[0]}: {array[bad[0]]}); "
                            "every example needs a finite score")
    return array


def _check_labels(labels: np.ndarray | None, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise PrunekitError(f"labels have shape {labels.shape}; need one label per example, shape ({n},)")
    return labels


def _check_fraction(value: float, name: str, upper_open: bool = True) -> float:
    ok = math.isfinite(value) and value >= 0 and (value < 1 if upper_open else value <= 1)
    if not ok:
        raise PrunekitError(f"{name} {value} is outside [0, {'1)' if upper_open else '1]'}")
    return float(value)


def class_quotas(labels: np.ndarray, total: int) -> dict:
    """Per-class counts proportional to the class sizes, by largest remainder, summing to `total` exactly."""
    classes, sizes = np.unique(labels, return_counts=True)
    return dict(zip(classes.tolist(), largest_remainder(total, sizes).tolist(), strict=True))


def _ranked(scores: np.ndarray, count: int, mode: str, band_start: float) -> np.ndarray:
    """Positions of `count` examples chosen by mode among `scores` (ties to the lower position)."""
    if mode == "easy":
        return top_k_indices(scores, count, largest=False)
    skip = fraction_count(len(scores), band_start) if mode == "band" else 0
    if skip + count > len(scores):
        raise PrunekitError(f"band_start {band_start} skips {skip} of {len(scores)} examples, leaving fewer than the "
                            f"{count} to keep; use band_start <= {(len(scores) - count) / len(scores):.4f}")
    return top_k_indices(scores, skip + count)[skip:]


def select_examples(scores: np.ndarray, keep: float | int, *, mode: str = "hard", band_start: float = 0.0,
                    labels: np.ndarray | None = None, class_balanced: bool = False, random_fraction: float = 0.0,
                    seed: int = 0) -> np.ndarray:
    """Keep the hardest (`hard`), easiest (`easy`) or a middle band (`band`) of the examples.

    `band` skips the hardest `band_start` fraction and keeps the next hardest. With `class_balanced`, each class
    keeps a quota proportional to its size (largest remainder, exact total) chosen by `mode` within the class
    (`band_start` then applies within each class). `random_fraction` of the kept count is drawn uniformly (under
    `seed`) from the examples the scores did not select, and the rest by score. Ties go to the lower index.
    """
    scores = check_scores(scores)
    n = len(scores)
    total = keep_count(n, keep)
    if mode not in MODES:
        raise PrunekitError(f"selection mode '{mode}' is unknown; use one of {', '.join(MODES)}")
    _check_fraction(band_start, "band_start")
    _check_fraction(random_fraction, "random_fraction", upper_open=False)
    labels = _check_labels(labels, n)
    if class_balanced and labels is None:
        raise PrunekitError("class_balanced selection needs labels (one per example)")
    n_random = fraction_count(total, random_fraction)
    n_scored = total - n_random
    if class_balanced:
        chosen = [np.flatnonzero(labels == c)[_ranked(scores[labels == c], q, mode, band_start)]
                  for c, q in class_quotas(labels, n_scored).items()]
        picked = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    else:
        picked = _ranked(scores, n_scored, mode, band_start)
    if n_random:
        rest = np.setdiff1d(np.arange(n), picked)
        picked = np.concatenate([picked, np.random.default_rng(seed).choice(rest, n_random, replace=False)])
    return np.sort(picked).astype(np.int64)


def _ccs_one(scores: np.ndarray, budget: int, hard_cut: float, strata: int, rng: np.random.Generator) -> np.ndarray:
    """CCS (Zheng et al. 2023, Algorithm 1) on one pool of examples; positions within `scores`."""
    n = len(scores)
    cut = fraction_count(n, hard_cut)
    if budget > n - cut:
        raise PrunekitError(f"CCS cannot keep {budget} of {n} examples after its hard cut removes the hardest {cut}; "
                            f"use a hard_cut <= {(n - budget) / n:.4f} or keep fewer")
    pool = np.sort(top_k_indices(scores, n - cut, largest=False))  # everything but the hardest `cut`
    values = scores[pool]
    low, high = values.min(), values.max()
    # Equal-width strata over the remaining score range; the top edge belongs to the last stratum.
    width = (high - low) / strata
    stratum = np.minimum(((values - low) / width).astype(np.int64), strata - 1) if width > 0 else np.zeros(len(pool),
                                                                                                           np.int64)
    members = [pool[stratum == s] for s in range(strata)]
    members = [m for m in members if len(m)]
    chosen, remaining = [], budget
    # Visit strata from the smallest up; each takes an equal share of what is left, so the share a small stratum
    # cannot fill passes on to the larger ones (the shares then sum to the budget exactly).
    for position, s in enumerate(sorted(range(len(members)), key=lambda s: (len(members[s]), s))):
        share = min(len(members[s]), remaining // (len(members) - position))
        chosen.append(rng.choice(members[s], share, replace=False))
        remaining -= share
    return np.concatenate(chosen)


def ccs_select(scores: np.ndarray, keep: float | int, *, hard_cut: float = 0.1, strata: int = 50,
               labels: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Coverage-centric coreset selection (CCS, Zheng et al. 2023).

    Drop the hardest `hard_cut` fraction (mislabeled and ambiguous examples), split the remaining score range
    into `strata` equal-width strata, then fill the budget by drawing uniformly (under `seed`) from the strata in
    increasing size order, each with an equal share of the budget still open. With `labels`, CCS runs within
    each class on a class quota proportional to its size (largest remainder), keeping the total exact.
    """
    scores = check_scores(scores)
    n = len(scores)
    total = keep_count(n, keep)
    _check_fraction(hard_cut, "hard_cut")
    if isinstance(strata, bool) or not isinstance(strata, int | np.integer) or strata < 1:
        raise PrunekitError(f"strata {strata!r} must be a whole number >= 1")
    labels = _check_labels(labels, n)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(_ccs_one(scores, total, hard_cut, strata, rng)).astype(np.int64)
    chosen = [np.flatnonzero(labels == c)[_ccs_one(scores[labels == c], q, hard_cut, strata, rng)]
              for c, q in class_quotas(labels, total).items()]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def dedup_select(groups: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """Keep one example per duplicate group: the lowest-scoring member if `scores` are given, else the first.

    `groups` holds a group id per example; −1 (or an id no other example shares) means "no duplicates", so the
    example is kept. Ties in score go to the lower index. For SemDeDup give its `similarity` as the scores (or use
    `SemDeDupResult.kept`): the member it keeps is not always the group's first.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0:
        raise PrunekitError(f"groups must be one id per example (non-empty, 1-D), got shape {groups.shape}")
    if not np.issubdtype(groups.dtype, np.integer):
        raise PrunekitError(f"group ids must be integers, got dtype {groups.dtype}")
    if scores is None:
        scores = np.zeros(len(groups))
    scores = check_scores(scores)
    if len(scores) != len(groups):
        raise PrunekitError(f"{len(scores)} scores for {len(groups)} group ids; give one score per example")
    singles = np.flatnonzero(groups < 0)
    grouped = np.flatnonzero(groups >= 0)
    # Sort the grouped examples by (group, score, index) and keep the first row of every group.
    order = grouped[np.lexsort((grouped, scores[grouped], groups[grouped]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    return np.sort(np.concatenate([singles, order[first]])).astype(np.int64)


def _hard(scores, keep, **kwargs):
    return select_examples(scores, keep, mode="hard", **kwargs)


def _easy(scores, keep, **kwargs):
    return select_examples(scores, keep, mode="easy", **kwargs)


def _band(scores, keep, **kwargs):
    return select_examples(scores, keep, mode="band", **kwargs)


SELECTORS: dict[str, Callable[..., np.ndarray]] = {"hard": _hard, "easy": _easy, "band": _band, "ccs": ccs_select}
"""Selection by name: every value takes `(scores, keep, **options)` and returns sorted kept indices."""
