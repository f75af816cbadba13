"""DSnoT: training-free prune-and-grow refinement of any mask (Zhang et al. 2024, "Dynamic Sparse No Training").

For one output row r with dense weights W, current (pruned, possibly updated) weights Ŵ and calibration inputs X,
the expected reconstruction error is E[ε_r] = Σ_j (W_rj − Ŵ_rj) E[X_j]: the mean output the pruning lost. DSnoT
swaps weights to drive it towards zero without changing how many weights the row keeps (Sec. 3.2):

- grow: the pruned weight j whose restoration W_rj E[X_j] most reduces the error in its direction (largest when
  E[ε_r] > 0, smallest when it is negative), ranked by W_rj E[X_j] / Var[X_j] (the paper's variance term, power 1:
  inputs that vary less give a more reliable reduction); a grown weight takes its dense value;
- prune: the kept weight with the lowest Wanda score |Ŵ_rk| ||X_k|| among those whose removal (Ŵ_rk E[X_k]) moves
  the error the same way (Eq. 6; for an N:M pattern, the lowest-scoring kept weight of the grown weight's group of
  M, so that every group keeps N).

Each weight is grown or pruned at most once. A row stops after `cycles` swaps, or as soon as the best swap would not
reduce |E[ε_r]| (the paper's reference code stops below an absolute threshold instead, whose scale depends on the
calibration length; stopping when the error stops improving needs no such constant).

The mean error is a proxy: a swap that centres the output can still raise its spread. Given the calibration
Hessian H = XᵀX / tokens, prunekit also computes each swap's exact change of the row's squared reconstruction error
δᵀHδ (δ = W − Ŵ, kept up to date as Hδ in O(in) per swap) and skips a pair that would raise it, so the layer's error
on its calibration inputs never increases. On SmolLM2-135M's block-3 projections, Wanda's 2:4 mask refined without
this check raised the error of q_proj and down_proj by 0.5%.
"""

from __future__ import annotations

import torch

from prunekit.budget import Pattern
from prunekit.errors import PrunekitError

DSNOT_CYCLES = 50  # the paper's maximum cycle count


def check_dsnot_options(cycles: int) -> None:
    """Refuse DSnoT settings that cannot run, before anything changes."""
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 0:
        raise PrunekitError(f"DSnoT cycles {cycles!r} must be a whole number >= 0")


def _ranked(key: torch.Tensor, candidate: torch.Tensor, count: int, *, largest: bool) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Per row, the first `count` candidate columns by `key` (largest or smallest first), and how many of them are
    candidates: a row makes at most `count` swaps, so no full sort is needed."""
    key = key.nan_to_num().masked_fill(~candidate, float("-inf") if largest else float("inf"))
    order = torch.topk(key, min(count, key.shape[1]), dim=1, largest=largest).indices
    return order, candidate.sum(1).clamp(max=order.shape[1])


def dsnot_refine(
    dense: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, *, mean: torch.Tensor, variance: torch.Tensor,
    norms: torch.Tensor, pattern: Pattern, cycles: int = DSNOT_CYCLES, hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, keep-mask) after DSnoT's swaps, for a [out, in] layer: `dense` its original weights, `pruned` the
    weights a method produced (zero outside `keep`), `mean`, `variance` and `norms` the per-input-feature statistics
    of the calibration inputs, `hessian` their XᵀX / tokens (when given, no swap raises a row's exact error). Every
    row (every N:M group) keeps as many weights as before; zero cycles return the inputs unchanged."""
    check_dsnot_options(cycles)
    if keep.shape != dense.shape or keep.dtype != torch.bool or pruned.shape != dense.shape:
        raise PrunekitError(f"DSnoT needs pruned weights and a bool keep-mask of the weight's shape "
                            f"{tuple(dense.shape)}, got {tuple(pruned.shape)} and {keep.dtype} {tuple(keep.shape)}")
    if cycles == 0:
        return pruned, keep
    w, current = dense.float(), pruned.float()
    mean, variance = mean.float().unsqueeze(0), variance.float().unsqueeze(0)
    row = torch.arange(w.shape[0], device=w.device)
    error = ((w - current) * mean).sum(1)
    grow_effect = w * mean  # the error falls by this when the weight regrows
    prune_effect = current * mean  # the error rises by this when the weight is pruned
    importance = current.abs() * norms.float().unsqueeze(0)

    grow_key = grow_effect / variance.clamp_min(torch.finfo(w.dtype).tiny)
    highest_order, highest_count = _ranked(grow_key, ~keep, cycles, largest=True)
    lowest_order, lowest_count = _ranked(grow_key, ~keep, cycles, largest=False)
    highest, lowest = torch.zeros_like(highest_count), torch.zeros_like(lowest_count)
    if pattern.is_nm:
        prunable = keep.clone()
    else:
        rising_order, rising_count = _ranked(importance, keep & (prune_effect > 0), cycles, largest=False)
        falling_order, falling_count = _ranked(importance, keep & (prune_effect < 0), cycles, largest=False)
        rising, falling = torch.zeros_like(rising_count), torch.zeros_like(falling_count)
    last = highest_order.shape[1] - 1
    if hessian is not None:
        h = hessian.float()
        h_delta = (w - current) @ h  # Hδ per row

    new_keep = keep.clone()
    active = error != 0
    for _ in range(cycles):
        if not active.any():
            break
        up = error > 0
        grown = torch.where(up, highest_order[row, highest.clamp(max=last)], lowest_order[row, lowest.clamp(max=last)])
        # both ends rank the same pruned weights: one grown from the other end is no longer a candidate
        valid = torch.where(up, highest < highest_count, lowest < lowest_count) & ~new_keep[row, grown]
        if pattern.is_nm:
            start = grown - grown % pattern.m
            group = start.unsqueeze(1) + torch.arange(pattern.m, device=w.device)
            scores = importance.gather(1, group).masked_fill(~prunable.gather(1, group), float("inf"))
            best = scores.argmin(1)
            cut = start + best
            valid &= torch.isfinite(scores[row, best])
        else:
            cut = torch.where(up, falling_order[row, falling.clamp(max=last)],
                              rising_order[row, rising.clamp(max=last)])
            valid &= torch.where(up, falling < falling_count, rising < rising_count)
        after = error - grow_effect[row, grown] + prune_effect[row, cut]
        # a row whose best pair would not lower the mean error stops
        active &= valid & (after.abs() < error.abs())
        swap = active
        if hessian is not None:
            # δ changes by -W_rj at the grown j and by +Ŵ_rk at the pruned k: the change of δᵀHδ in closed form
            restored, removed = w[row, grown], current[row, cut]
            change = (2 * (removed * h_delta[row, cut] - restored * h_delta[row, grown])
                      + restored.square() * h[grown, grown] + removed.square() * h[cut, cut]
                      - 2 * restored * removed * h[grown, cut])
            swap = active & (change < 0)
        swapped = row[swap]
        new_keep[swapped, grown[swap]] = True
        new_keep[swapped, cut[swap]] = False
        error = torch.where(swap, after, error)
        if hessian is not None:
            h_delta[swapped] += removed[swap, None] * h[cut[swap]] - restored[swap, None] * h[grown[swap]]
        # a pair the exact check skipped still moves its row on to the next candidates
        highest += (active & up).long()
        lowest += (active & ~up).long()
        if pattern.is_nm:
            prunable[swapped, cut[swap]] = False
        else:
            falling += (active & up).long()
            rising += (active & ~up).long()
    weights = torch.where(new_keep, torch.where(keep, current, w), torch.zeros_like(w)).to(pruned.dtype)
    return weights, new_keep
