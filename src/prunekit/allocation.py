"""Allocation: how one sparsity budget is split among layers, for every kind of weight pruning.

`allocate` turns per-layer scores (higher = keep) into boolean keep-masks; training-time pruners call it at every
pruning step, and one-shot pruning uses it (through `block_sparsities` and the OWL functions) to give each
transformer block its own sparsity. The overall number of removed weights is always
`fraction_count(total, sparsity)`; per-layer counts are whole numbers, so a layer's achieved sparsity is exact to
within one weight. Selection within a layer is over the whole tensor, so the layout a weight is stored in
(GPT-2's Conv1D keeps [in, out]) makes no difference.

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
- `owl`: outlier-weighted layer-wise sparsity (Yin et al. 2024, Sec. 4): layers with a larger share of outlier
  scores (above `owl_threshold` times the layer's mean score) are pruned less, by up to `owl_limit` around the
  target. One-shot pruning measures the outliers of each block's Wanda scores on calibration data, as the paper
  does; `allocate` measures them on the scores it is given (|w| for magnitude pruning). With an N:M pattern,
  `owl_nm_patterns` gives each block its own N of every M instead (Yin et al. 2024, Sec. 5, N:M sparsity).
- `ecoflap`: layer-wise sparsity from each layer's importance (Sung et al. 2024, Sec. 3.2), more important layers
  pruned less, by up to `OWL_LIMIT` around the target (`ecoflap_sparsities`). One-shot pruning measures a block's
  importance forward-only, by ECoFLaP's zeroth-order estimate (`prunekit.weights.ecoflap`); `allocate` takes a
  layer's importance to be the mean of the scores it is given (ECoFLaP's |w ⊙ ∇L| when given Taylor scores).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from prunekit.budget import Pattern, check_sparsity
from prunekit.errors import PrunekitError
from prunekit.names import ALLOCATIONS, ONESHOT_ALLOCATIONS
from prunekit.select import fraction_count, global_lowest_masks, largest_remainder, lowest_count_mask, lowest_mask

__all__ = ["ALLOCATIONS", "ONESHOT_ALLOCATIONS", "allocate", "block_sparsities", "check_allocation",
           "ecoflap_sparsities", "erk_densities", "lamp_scores", "outlier_ratio", "owl_nm_patterns",
           "owl_sparsities"]

OWL_THRESHOLD = 5.0  # the paper's outlier multiple M
OWL_LIMIT = 0.08  # the paper's largest deviation lambda


def check_allocation(allocation: str, accepted: Sequence[str] = ALLOCATIONS, user: str = "") -> str:
    """`allocation` if it is one of `accepted`, else an error that lists them (`user` names who refuses it)."""
    if allocation in accepted:
        return allocation
    if allocation in ALLOCATIONS:
        raise PrunekitError(f"allocation {allocation!r} is not available for {user}; choose one of "
                            f"{', '.join(accepted)}")
    raise PrunekitError(f"allocation {allocation!r} is unknown; choose one of {', '.join(accepted)}")


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
    keep_total = sum(sizes.values()) - fraction_count(sum(sizes.values()), sparsity)
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


def _erk_keep_counts(shapes: Mapping[str, torch.Size], sparsity: float, kernel: bool) -> dict[str, int]:
    densities = erk_densities(shapes, sparsity, kernel)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    keep_total = total - fraction_count(total, sparsity)
    dense = [n for n in shapes if densities[n] >= 1.0]
    free = [n for n in shapes if densities[n] < 1.0]
    counts = {n: sizes[n] for n in dense}
    if free:
        shares = largest_remainder(keep_total - sum(counts.values()), np.array([densities[n] * sizes[n] for n in free]))
        counts.update({n: min(int(k), sizes[n]) for n, k in zip(free, shares, strict=True)})
    return counts


def outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], multiplier: float) -> float:
    """Share of scores above `multiplier` times their mean: OWL's layerwise outlier distribution (Yin et al.
    2024, Eq. 3). Several tensors (the projections of one block) count as one layer."""
    tensors = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    total = sum(s.numel() for s in tensors)
    mean = sum(s.sum().item() for s in tensors) / total
    return sum((s > multiplier * mean).sum().item() for s in tensors) / total


def _owl_offsets(outlier_ratios: Sequence[float], limit: float, sizes: Sequence[int] | None) -> np.ndarray:
    """OWL's move of each layer's sparsity away from the target: more outliers -> lower sparsity, mapped linearly
    onto [-limit, +limit], then centred so that the (parameter-weighted) mean move is zero."""
    ratios = np.asarray(list(outlier_ratios), dtype=np.float64)
    weights = np.ones_like(ratios) if sizes is None else np.asarray(list(sizes), dtype=np.float64)
    if len(ratios) < 2 or ratios.max() == ratios.min():
        return np.zeros_like(ratios)
    offsets = limit - 2 * limit * (ratios - ratios.min()) / (ratios.max() - ratios.min())
    return offsets - (offsets * weights).sum() / weights.sum()


def owl_sparsities(
    outlier_ratios: Sequence[float], sparsity: float, limit: float, sizes: Sequence[int] | None = None
) -> list[float]:
    """Outlier-weighted layer-wise sparsity (OWL, Yin et al. 2024, Sec. 4).

    Layers with a larger share of outlier scores keep more weights: each layer's sparsity is moved by at most
    `limit` (the paper's lambda) around the target, linearly in its outlier ratio, and the result is centred so
    that the parameter-weighted mean equals the target sparsity exactly.
    """
    result = (sparsity + _owl_offsets(outlier_ratios, limit, sizes)).tolist()
    if min(result) < 0 or max(result) >= 1:
        raise PrunekitError(
            f"OWL limit {limit} around sparsity {sparsity} gives layer sparsities from {min(result):.3f} to "
            f"{max(result):.3f}, outside [0, 1); use a smaller OWL limit (--owl-limit)"
        )
    return [check_sparsity(s, "OWL layer sparsity") for s in result]


def owl_nm_patterns(outlier_ratios: Sequence[float], pattern: Pattern, limit: float,
                    sizes: Sequence[int] | None = None) -> list[Pattern]:
    """OWL's allocation with N:M sparsity (Yin et al. 2024, Sec. 5): each block keeps its own N_b of every M, more
    for blocks with more outliers, with the mean N_b exactly the target's N, so that the blocks together keep N/M.

    N_b is OWL's own block sparsity s_b (`owl_sparsities`: moved by up to `limit` from the target, centred) put on
    the grid of whole N: M * (1 - s_b), kept in 1 .. M - 1 and rounded to whole numbers that sum to the target's
    (largest remainders). A block therefore moves only where OWL moves it by about half a step (1 / 2M) or more: on
    SmolLM2-135M, with the default limit 0.08, every block keeps 2:4 (a step there is 0.25; a warning says so) and
    six blocks move to 3:8 or 5:8 around 4:8; a limit of 0.25 gives {1:4, 2:4, 3:4}. Forcing a whole step on every
    block whatever the limit (1:4 on 8 of its 30 blocks at 2:4) multiplied Wanda's perplexity by 18 (bench/owl_nm.py).
    Blocks must be equal in size (every decoder's are) for the mean to be exact.
    """
    if not pattern.is_nm:
        raise PrunekitError(f"OWL's N:M allocation needs an N:M pattern, got {pattern}")
    if sizes is not None and len(set(sizes)) > 1:
        raise PrunekitError(f"OWL's N:M allocation needs blocks of equal size to keep the mean exact; got sizes from "
                            f"{min(sizes)} to {max(sizes)}")
    n, m = pattern.n, pattern.m
    ratios = list(outlier_ratios)
    low, high = min(1, n), max(m - 1, n)
    exact = np.clip(n - m * _owl_offsets(ratios, limit, sizes), low, high)
    counts = np.round(exact).astype(np.int64)  # exact lies in [low, high], whole bounds: so do the counts
    # whole units still missing (or in excess) go to the largest (leave the smallest) remainders, within 1 .. M - 1
    missing = len(ratios) * n - int(counts.sum())
    while missing:
        room = counts < high if missing > 0 else counts > low
        gap = np.where(room, exact - counts, -np.inf if missing > 0 else np.inf)
        chosen = int(np.argmax(gap)) if missing > 0 else int(np.argmin(gap))
        counts[chosen] += 1 if missing > 0 else -1
        missing += -1 if missing > 0 else 1
    if len(ratios) > 1 and (counts == n).all() and max(ratios) > min(ratios):
        warnings.warn(f"OWL with {pattern}: block sparsities within {limit:g} of the target never reach half a step "
                      f"({1 / (2 * m):g}), so every block keeps {pattern} (uniform); a larger owl_limit "
                      f"(--owl-limit) lets blocks move", stacklevel=2)
    return [Pattern(int(k), m) for k in counts]


def ecoflap_sparsities(
    block_scores: Sequence[float], sparsity: float, limit: float, sizes: Sequence[int] | None = None
) -> list[float]:
    """Block sparsities from ECoFLaP's zeroth-order block importance (Sung et al. 2024, Sec. 3.2): a block's
    sparsity falls linearly in its score, by at most `limit` either side of the target, centred so that the
    parameter-weighted mean is `sparsity` exactly; the same bounded map OWL applies to its outlier ratios (ECoFLaP's
    own maps scores to sparsities with a maximum-sparsity cap; a bounded linear map keeps the two allocations
    comparable and never empties a block)."""
    scores = [float(s) for s in block_scores]
    if not all(math.isfinite(s) and s >= 0 for s in scores):
        raise PrunekitError(f"ECoFLaP block scores must be finite and >= 0, got {scores}")
    return owl_sparsities(scores, sparsity, limit, sizes)


def _owl_masks(scores: Mapping[str, torch.Tensor], sparsity: float, count: int, threshold: float,
               limit: float) -> dict[str, torch.Tensor]:
    # Capped so that every layer stays in [0, 1): schedules pass through targets smaller than the paper's lambda.
    limit = min(limit, sparsity / 2, (1 - sparsity) / 2 * 0.999)
    ratios = [outlier_ratio(s, threshold) for s in scores.values()]
    sizes = [s.numel() for s in scores.values()]
    layer_sparsities = owl_sparsities(ratios, sparsity, limit, sizes)
    # Whole counts summing exactly to the budget, each within one weight of the layer's OWL sparsity.
    counts = largest_remainder(count, [s * n for s, n in zip(layer_sparsities, sizes, strict=True)])
    return {n: lowest_count_mask(s, int(k)) for (n, s), k in zip(scores.items(), counts, strict=True)}


def allocate(scores: Mapping[str, torch.Tensor], sparsity: float, allocation: str = "global", *,
             min_density: float = 0.0, owl_threshold: float | None = None,
             owl_limit: float | None = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = keep) removing `sparsity` of all scored weights, split by `allocation`.

    `min_density` is the smallest kept fraction per layer and is used (and required) by `global-min` only.
    `owl_threshold` (M, default 5) and `owl_limit` (lambda, default 0.08) are used by `owl` only; the limit is
    capped at half the sparsity (and half the density) so that every layer's sparsity stays in [0, 1).
    """
    sparsity = check_sparsity(sparsity)
    check_allocation(allocation)
    if not scores:
        raise PrunekitError("allocate got no scores; pass a mapping of weight name -> score tensor")
    if allocation == "global-min" and not 0.0 < min_density <= 1.0:
        raise PrunekitError(f"global-min needs min_density in (0, 1], got {min_density!r}")
    if allocation != "global-min" and min_density != 0.0:
        raise PrunekitError(f"min_density={min_density!r} is only used by allocation 'global-min', not {allocation!r}")
    if allocation != "owl" and (owl_threshold, owl_limit) != (None, None):
        raise PrunekitError(f"owl_threshold and owl_limit are only used by allocation 'owl', not {allocation!r}")
    total = sum(s.numel() for s in scores.values())
    count = fraction_count(total, sparsity)
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
    if allocation == "ecoflap":
        if count == 0:
            return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        limit = min(OWL_LIMIT, sparsity / 2, (1 - sparsity) / 2 * 0.999)  # every layer stays in [0, 1), as OWL's
        sizes = [s.numel() for s in scores.values()]
        importance = [float(s.detach().double().mean()) for s in scores.values()]
        layer_sparsities = ecoflap_sparsities(importance, sparsity, limit, sizes)
        counts = largest_remainder(count, [s * n for s, n in zip(layer_sparsities, sizes, strict=True)])
        return {n: lowest_count_mask(s, int(k)) for (n, s), k in zip(scores.items(), counts, strict=True)}
    if allocation == "owl":
        threshold = OWL_THRESHOLD if owl_threshold is None else owl_threshold
        limit = OWL_LIMIT if owl_limit is None else owl_limit
        if not threshold > 0 or not limit >= 0:
            raise PrunekitError(f"OWL needs owl_threshold > 0 and owl_limit >= 0, got {threshold!r} and {limit!r}")
        if count == 0:
            return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        return _owl_masks(scores, sparsity, count, threshold, limit)
    counts = _erk_keep_counts({n: s.shape for n, s in scores.items()}, sparsity, kernel=allocation == "erk")
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


def block_sparsities(blocks: Sequence[Mapping[str, torch.Tensor]], sparsity: float, allocation: str) -> list[float]:
    """The sparsity of each block when `allocation` prunes the scores of all blocks together.

    One-shot pruning's per-block budget for `global` and `lamp`: the allocation ranks the dense weights'
    magnitudes of every block (one tensor per projection), and each block is then pruned by the chosen method at
    the share it lost; within a block the method selects its own weights. Holds a float32 copy of every score.
    """
    check_allocation(allocation, ("global", "lamp"), "per-block sparsities from scores")
    named = {f"{index}.{name}": s for index, block in enumerate(blocks) for name, s in block.items()}
    keep = allocate(named, sparsity, allocation)
    result = []
    for index, block in enumerate(blocks):
        masks = [keep[f"{index}.{name}"] for name in block]
        removed = sum(m.numel() - int(m.count_nonzero()) for m in masks)
        size = sum(m.numel() for m in masks)
        result.append(check_sparsity(removed / size, f"{allocation} sparsity of block {index}"))
    return result
