"""Delta-parameter pruning and merging as pure tensor functions: tensors in, tensors out.

A delta is Δ = W_tuned − W_base of one tensor. Pruning keeps a subset of its entries (a boolean keep-mask, True =
kept, as everywhere in prunekit) and rescales them; merging adds one or several pruned deltas to the base.
`drop` is the fraction of the delta's entries removed (DARE's p), in [0, 1).

- DARE (Yu et al. 2024, "Language Models are Super Mario", eq. 1): drop each entry with probability p and rescale
  the kept ones by 1/(1 − p), so that E[Δ̂] = Δ.
- DAREx-q (Deng et al. 2024, "DARE the Extreme"): the same random mask, rescaled by 1/q with q ≠ 1 − p. Here q is
  chosen per layer without labels as the exact minimiser of the layer's output change on calibration inputs X,
  ||XΔᵀ − X(Δ̂/q)ᵀ||_F (the base weight cancels), which is a least-squares problem in the scale s = 1/q with the
  closed form s* = <XΔᵀ, XDᵀ> / ||XDᵀ||² for the kept, unscaled delta D (`optimal_rescale`).
- Magnitude: keep the (1 − p) largest |Δ| of the tensor.
- Activation-aware: Wanda's score (Sun et al. 2024) applied to the delta, |Δ_ij|·||X_j||₂, compared within each
  output row.
- Merging: task arithmetic (Ilharco et al. 2023), W = W_base + λ·Σ_t Δ̂_t; or TIES (Yadav et al. 2023) sign election
  and disjoint mean, W = W_base + λ·mean of the Δ̂_t that agree with the elected sign, entry by entry.

Every matrix function takes [out_features, in_features] (nn.Linear's layout).
"""

from __future__ import annotations

import math

import torch

from prunekit.errors import PrunekitError
from prunekit.select import lowest_mask, row_mask

DELTA_METHODS = ("dare", "darex-q", "magnitude", "activation")
MERGE_METHODS = ("sum", "ties")


def check_drop(drop: float) -> float:
    """`drop` as a float, refused unless it is a fraction in [0, 1) (1 would remove the whole delta)."""
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop < 1:
        raise PrunekitError(f"drop {drop!r} is not a fraction in [0, 1): the share of the delta's entries removed")
    return float(drop)


def check_scale(scale: float) -> float:
    """A merge scale λ as a float, refused unless it is a finite number."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise PrunekitError(f"merge scale {scale!r} is not a finite number")
    return float(scale)


def dare_mask(shape: torch.Size | tuple[int, ...], drop: float, generator: torch.Generator) -> torch.Tensor:
    """Each entry kept independently with probability 1 − drop (a Bernoulli draw from `generator`)."""
    return torch.rand(shape, generator=generator, device=generator.device) >= drop


def dare(delta: torch.Tensor, drop: float, generator: torch.Generator, rescale: float | None = None) -> torch.Tensor:
    """DARE: drop entries at random with probability `drop`, multiply the rest by `rescale` (default 1/(1 − drop))."""
    keep = dare_mask(delta.shape, drop, generator)
    scale = 1.0 / (1.0 - drop) if rescale is None else rescale
    return torch.where(keep, delta * scale, torch.zeros((), dtype=delta.dtype))


def magnitude_mask(delta: torch.Tensor, drop: float) -> torch.Tensor:
    """Keep the largest |Δ|: exactly `fraction_count(numel, drop)` entries of the tensor are removed."""
    return lowest_mask(delta.abs(), drop)


def activation_scores(delta: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score of each delta entry, |Δ_ij|·||X_j||₂, for a [out, in] delta and per-input-feature norms."""
    if delta.dim() != 2 or input_norms.shape != (delta.shape[1],):
        raise PrunekitError(f"activation scores need a [out, in] delta and {delta.shape[-1]} input norms, got "
                            f"{tuple(delta.shape)} and {tuple(input_norms.shape)}")
    return delta.abs() * input_norms.to(delta.dtype)


def activation_mask(delta: torch.Tensor, input_norms: torch.Tensor, drop: float) -> torch.Tensor:
    """Remove the same number of lowest `activation_scores` from every output row, as Wanda does for weights."""
    return row_mask(activation_scores(delta, input_norms), drop)


def output_error(delta: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||XΔᵀ − XΔ̂ᵀ||_F² = tr(E XᵀX Eᵀ) with E = Δ − Δ̂, from the inputs' Gram matrix XᵀX (any positive factor)."""
    error = (delta - pruned).double()
    return ((error @ gram.double()) * error).sum()


def optimal_rescale(delta: torch.Tensor, kept: torch.Tensor, gram: torch.Tensor) -> float:
    """The scale s ≥ 0 minimising ||XΔᵀ − s·XDᵀ||_F for the kept, unscaled delta D; DAREx-q's 1/q.

    Least squares in one variable: s* = tr(Δ G Dᵀ) / tr(D G Dᵀ) with G = XᵀX, clipped at 0 (a negative scale would
    flip the delta). Returns 0 where D is zero or unseen by the inputs, so that nothing is added.
    """
    delta, kept, gram = delta.double(), kept.double(), gram.double()
    projected = kept @ gram
    denominator = (projected * kept).sum().item()
    if denominator <= 0:
        return 0.0
    return max((projected * delta).sum().item() / denominator, 0.0)


def task_arithmetic(deltas: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """λ·Σ_t Δ_t: the update task arithmetic adds to the base."""
    _check_same_shapes(deltas)
    return scale * torch.stack(deltas).sum(0)


def ties_merge(deltas: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """TIES' elect and disjoint-merge steps (Yadav et al. 2023, §3), times λ.

    Per entry, the elected sign is that of Σ_t Δ_t (the sign of the larger total mass); the merged value is the
    mean of the nonzero Δ_t with that sign; entries where nothing agrees stay 0. TIES' own trim step (keep the top
    k% by magnitude) is the delta pruning that precedes the merge.
    """
    _check_same_shapes(deltas)
    stacked = torch.stack(deltas)
    elected = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    total = torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype)).sum(0)
    return scale * total / agree.sum(0).clamp(min=1)


def _check_same_shapes(deltas: list[torch.Tensor]) -> None:
    if not deltas:
        raise PrunekitError("merging needs at least one delta; got none")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) > 1:
        raise PrunekitError(f"deltas of different shapes {sorted(shapes)} cannot be merged; give deltas of one base")
