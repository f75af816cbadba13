"""Selection: turn scores into keep-masks under a budget and a pattern.

A selector never knows where its scores came from. Masks are boolean and True means *keep*, as in
`torch.nn.utils.prune`. Higher scores are more important; the lowest are removed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from prunekit.budget import Pattern
from prunekit.errors import PrunekitError

COMPARISON_GROUPS = ("layer", "row")


def fraction_count(total: int, fraction: float) -> int:
    """The whole number of units that `fraction` of `total` makes, rounded half up (0.5 of 3 is 2).

    prunekit's one rounding rule for budgets: weights removed by a sparsity, examples kept by a keep fraction.
    Python's `round` rounds halves to even instead: 0.5 of 5 to 2 but 0.5 of 7 to 4.
    """
    return math.floor(total * fraction + 0.5)


def lowest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the lowest-scoring fraction of the whole tensor."""
    return lowest_count_mask(scores, fraction_count(scores.numel(), sparsity))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the same number of lowest-scoring entries from every row (every output unit)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = fraction_count(scores.shape[-1], sparsity)
    if k:
        keep.scatter_(-1, torch.topk(scores, k, dim=-1, largest=False, sorted=False).indices, False)
    return keep


_PAIRWISE_MAX_M = 8  # above it, the M(M-1)/2 comparisons cost more than a sort


def group_ranks(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Each entry's rank within its group of M consecutive entries along the last (input) dimension, as uint8 of
    shape [rows, cols / M, M]: 0 for the group's highest score, M - 1 for its lowest (of equal scores, the earlier
    entry ranks higher)."""
    rows, cols = scores.shape
    if cols % m:
        raise PrunekitError(f"groups of {m} need a width divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    if m > _PAIRWISE_MAX_M:
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
        positions = torch.arange(m, device=scores.device).expand_as(order)
        return torch.empty_like(order).scatter_(-1, order, positions).to(torch.uint8)
    # Small M: count, for each entry, the entries of its group that beat it, from the M(M-1)/2 pairwise comparisons
    # (3-5x faster than topk over groups of 4 or 8 on a CPU); a tie goes to the earlier entry.
    entries = [groups[..., i] for i in range(m)]
    # entry j starts beaten by the j entries before it, and wins back each pair it takes (uint8 throughout: a bool
    # comparison is viewed, not converted)
    beaten = [torch.full(groups.shape[:-1], j, dtype=torch.uint8, device=scores.device) for j in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            later_wins = (entries[j] > entries[i]).view(torch.uint8)
            beaten[i] += later_wins
            beaten[j] -= later_wins
    return torch.stack(beaten, -1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest of every M consecutive entries along the last (input) dimension (of equal scores, the
    earlier entries)."""
    rows, cols = scores.shape
    if cols % m:
        raise PrunekitError(f"pattern {n}:{m} needs a width divisible by {m}, got {cols}")
    return (group_ranks(scores, m) < n).reshape(rows, cols)


def nm_ramp_mask(scores: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """A mask on the way to N:M: every row loses the `sparsity` fraction of its entries (at most 1 - N/M), each
    group of M its lowest-ranked first.

    With k entries to remove from a row of G groups, every group loses its k // G lowest, and the k mod G groups
    whose next-lowest entry scores lowest in the row lose that one too. Each group therefore keeps its N highest
    throughout, and at sparsity 1 - N/M the mask is `nm_mask`'s. It needs one selection over G entries per row
    rather than over the row's M G.
    """
    rows, cols = scores.shape
    ranks = group_ranks(scores, m)
    k = fraction_count(cols, sparsity)
    whole, extra = divmod(k, ranks.shape[1])
    if whole > m - n or (whole == m - n and extra):
        raise PrunekitError(f"sparsity {sparsity} is above the {1 - n / m:g} that pattern {n}:{m} reaches")
    keep = ranks < m - whole
    if extra:
        next_out = ranks == m - whole - 1  # the entry each group would lose next
        candidates = scores.reshape(ranks.shape).where(next_out, 0).sum(-1)
        losing = torch.topk(candidates, extra, dim=-1, largest=False, sorted=False).indices
        lose = torch.zeros(ranks.shape[:-1], dtype=torch.bool, device=scores.device).scatter_(-1, losing, True)
        keep &= ~(next_out & lose.unsqueeze(-1))
    return keep.reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, comparison: str = "row") -> torch.Tensor:
    """One entry point: an N:M pattern, or unstructured selection within rows or the whole layer."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    if comparison == "row":
        return row_mask(scores, sparsity)
    if comparison == "layer":
        return lowest_mask(scores, sparsity)
    raise PrunekitError(f"comparison group '{comparison}' is unknown; use one of {', '.join(COMPARISON_GROUPS)}")


def top_k_indices(scores: np.ndarray, k: int, *, largest: bool = True) -> np.ndarray:
    """Indices of the `k` highest (or lowest) scores, best first; ties go to the lower index, so the result
    is the same on every platform and for every sort implementation."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 <= k <= len(scores):
        raise PrunekitError(f"cannot take the top {k} of {len(scores)} scores; use 0 <= k <= {len(scores)}")
    # lexsort sorts by the last key first: the score (negated for largest), then the index breaks ties.
    order = np.lexsort((np.arange(len(scores)), -scores if largest else scores))
    return order[:k].astype(np.int64)


def largest_remainder(total: int, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Split the integer `total` in proportion to `weights` (Hamilton's largest-remainder method).

    Every share is the floor of its exact quota, and the units still missing go to the largest remainders
    (ties to the lower position); the shares sum to `total` exactly and differ from the exact quotas by less than 1.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if total < 0 or len(weights) == 0 or not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
        raise PrunekitError(f"cannot split {total} by weights {weights.tolist()}; use a count >= 0 and finite "
                            "non-negative weights with a positive sum")
    exact = total * weights / weights.sum()
    shares = np.floor(exact).astype(np.int64)
    missing = total - int(shares.sum())
    if missing:
        shares[top_k_indices(exact - shares, missing)] += 1
    return shares


def lowest_count_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Remove exactly `count` lowest-scoring entries of the tensor (a count rather than a fraction)."""
    if not 0 <= count <= scores.numel():
        raise PrunekitError(f"cannot remove {count} of {scores.numel()} entries; use 0 <= count <= {scores.numel()}")
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        keep[torch.topk(scores.flatten(), count, largest=False, sorted=False).indices] = False
    return keep.view_as(scores)


def global_lowest_masks(scores: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Remove exactly `count` lowest scores pooled over all tensors (scores must be comparable across them)."""
    names = list(scores)
    dtype = torch.float32
    for s in scores.values():  # float64 scores (SynFlow's products of many weights) keep their precision
        dtype = torch.promote_types(dtype, s.dtype)
    flat = torch.cat([scores[n].detach().flatten().to(dtype) for n in names])
    pooled = lowest_count_mask(flat, count)
    masks, start = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = pooled[start:start + size].view_as(scores[name])
        start += size
    return masks
