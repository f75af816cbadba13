"""Allocation across layers: how a network-wide sparsity is split among the weights, then selected within each.

`allocate` turns scores (higher = keep) into boolean keep-masks. The overall number of removed weights is always
`removal_count(total, sparsity)`; per-layer counts are whole numbers, so a layer's achieved sparsity is exact to
within one weight.

- `uniform`: every layer at the same sparsity.
- `global`: one ranking of all scores pooled together (scores must be comparable across layers); may empty a
  layer at high sparsity.
- `global-min`: global, but every layer keeps at least `ceil(min_density * numel)` of its highest scores.
- `lamp`: global ranking of LAMP scores (Lee et al. 2021, Eq. 2): s_u² / Σ_{v ≥ u} s_v² within the layer, where
  the sum runs over the entries scoring at least as high as u. Each layer's highest entry has LAMP score 1, the
  largest possible, so LAMP never empties a layer.
- `erk` / `er`: density of each layer proportional to Σ dims / Π dims (Erdős–Rényi–Kernel, Evci et al. 2020,
  Sec. 3; `er` counts only the two channel dimensions, Mocanu et al. 2018), scaled to meet the budget, capped at
  1 with the excess redistributed to the other layers. Only shapes decide the counts; the scores choose the
  entries within each layer (random scores give the usual random sparse initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from prunekit.budget import check_sparsity
from prunekit.errors import PrunekitError
from prunekit.select import global_lowest_masks, largest_remainder, lowest_count_mask, lowest_mask, removal_count

ALLOCATIONS = ("uniform", "global", "global-min", "lamp", "erk", "er")


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP score of every entry (Lee et al. 2021, Eq. 2) from non-negative scores (|w| for magnitude)."""
    flat = scores.detach().flatten().double() ** 2
    order = torch.argsort(flat)
    ascending = flat[order]
    # Sum over the entry itself and every entry after it in ascending order (all scoring at least as high).
    tail_sums = ascending.flip(0).cumsum(0).flip(0)
    lamp = torch.empty_like(flat)
    lamp[order] = ascending / tail_sums.clamp_min(torch.finfo(torch.float64).tiny)
    return lamp.view_as(scores)


def erk_densities(shapes: Mapping[str, torch.Size | tuple[int, ...]], sparsity: float,
                  kernel: bool = True) -> dict[str, float]:
    """Per-layer densities (kept fractions) of ERK (`kernel=True`) or ER, before rounding to whole weights.

    Raw density ∝ (n_out + n_in + k_h + k_w) / (n_out · n_in · k_h · k_w); layers whose scaled density would
    exceed 1 are made dense and the rest rescaled (the loop of Evci et al.'s `get_sparsities_erdos_renyi`).
    """
    sparsity = check_sparsity(sparsity)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) if kernel else (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    keep_total = sum(sizes.values()) - removal_count(sum(sizes.values()), sparsity)
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:
            return dict.fromkeys(shapes, 1.0)
        budget = keep_total - sum(sizes[n] for n in dense)
        epsilon = budget / sum(raw[n] * sizes[n] for n in free)
        highest = max(raw[n] for n in free)
        if epsilon * highest <= 1.0:
            return {n: 1.0 if n in dense else epsilon * raw[n] for n in shapes}
        dense.update(n for n in free if raw[n] == highest)


def _keep_counts(shapes: Mapping[str, torch.Size], sparsity: float, kernel: bool) -> dict[str, int]:
    densities = erk_densities(shapes, sparsity, kernel)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    keep_total = total - removal_count(total, sparsity)
    dense = [n for n in shapes if densities[n] >= 1.0]
    free = [n for n in shapes if densities[n] < 1.0]
    counts = {n: sizes[n] for n in dense}
    if free:
        shares = largest_remainder(keep_total - sum(counts.values()), np.array([densities[n] * sizes[n] for n in free]))
        counts.update({n: min(int(k), sizes[n]) for n, k in zip(free, shares, strict=True)})
    return counts


def allocate(scores: Mapping[str, torch.Tensor], sparsity: float, allocation: str = "global", *,
             min_density: float = 0.0) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = keep) removing `sparsity` of all scored weights, split by `allocation`.

    `min_density` is the smallest kept fraction per layer and is used (and required) by `global-min` only.
    """
    sparsity = check_sparsity(sparsity)
    if allocation not in ALLOCATIONS:
        raise PrunekitError(f"allocation {allocation!r} is unknown; choose one of {', '.join(ALLOCATIONS)}")
    if not scores:
        raise PrunekitError("allocate got no scores; pass a mapping of weight name -> score tensor")
    if allocation == "global-min" and not 0.0 < min_density <= 1.0:
        raise PrunekitError(f"global-min needs min_density in (0, 1], got {min_density!r}")
    if allocation != "global-min" and min_density != 0.0:
        raise PrunekitError(f"min_density={min_density!r} is only used by allocation 'global-min', not {allocation!r}")
    total = sum(s.numel() for s in scores.values())
    count = removal_count(total, sparsity)
    if allocation == "uniform":
        return {n: lowest_mask(s, sparsity) for n, s in scores.items()}
    if allocation == "global":
        return global_lowest_masks(dict(scores), count)
    if allocation == "lamp":
        if any(bool((s < 0).any()) for s in scores.values()):
            raise PrunekitError("LAMP needs non-negative scores such as |w|; got negative scores")
        return global_lowest_masks({n: lamp_scores(s) for n, s in scores.items()}, count)
    if allocation == "global-min":
        return _global_min(scores, count, min_density)
    counts = _keep_counts({n: s.shape for n, s in scores.items()}, sparsity, kernel=allocation == "erk")
    return {n: lowest_count_mask(s, s.numel() - counts[n]) for n, s in scores.items()}


def _global_min(scores: Mapping[str, torch.Tensor], count: int, min_density: float) -> dict[str, torch.Tensor]:
    floors = {n: math.ceil(min_density * s.numel()) for n, s in scores.items()}
    removable = sum(s.numel() - floors[n] for n, s in scores.items())
    if count > removable:
        raise PrunekitError(
            f"min_density {min_density} keeps {sum(floors.values())} weights, so at most {removable} of "
            f"{sum(s.numel() for s in scores.values())} can be removed, but the sparsity asks for {count}"
        )
    lifted = {}
    for name, s in scores.items():
        # The layer's `floor` highest scores are protected by lifting them above every other score.
        protected = lowest_count_mask(s, s.numel() - floors[name])
        lifted[name] = s.detach().masked_fill(protected, math.inf)
    return global_lowest_masks(lifted, count)
