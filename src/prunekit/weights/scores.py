"""Importance scores for single weights. Pure functions: tensors in, tensors out; higher means keep.

The one magnitude and the one random scorer of prunekit, for one-shot and training-time pruning alike. Wanda's
weights are laid out [out_features, in_features] (the layout of `nn.Linear`); magnitude and random scores keep
whatever layout they are given.
"""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the classic baseline (Han et al. 2015)."""
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, Sun et al. 2024, Eq. 1): weight magnitude times the L2 norm of its input
    feature over all calibration tokens."""
    return magnitude_scores(weight) * input_norms.float().unsqueeze(0)


def random_scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores: the baseline every method must beat."""
    return torch.rand(weight.shape, generator=generator, device=generator.device)


def ria_scores(weight: torch.Tensor, input_norms: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """Relative importance and activations (RIA, Zhang et al. 2024, Eq. 1 and 3): (|W_ij| / sum_k |W_kj| +
    |W_ij| / sum_k |W_ik|) * ||X_j||_2^power, each weight's share of its input column's and of its output row's
    absolute sum, times the input feature's norm to the power a = 0.5 (the paper's choice)."""
    magnitude = magnitude_scores(weight)
    # an all-zero row or column has shares 0/0: its weights score 0
    column_share = magnitude / magnitude.sum(0, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
    row_share = magnitude / magnitude.sum(1, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
    return (column_share + row_share) * input_norms.float().pow(power).unsqueeze(0)


def pruner_zero_scores(weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """|W ⊙ W| ⊙ mms(|G|) (Pruner-Zero, Dong et al. 2024, the evolved metric of Table 3): squared weight magnitude
    times the absolute gradient of the calibration loss (`prunekit.weights.gradients`: its L2 norm over the
    calibration sequences), min-max scaled to [0, 1] over the layer. A layer whose gradients are all equal scales
    them to 0; its scores then tie at 0."""
    magnitude = gradient.abs().float()
    low, high = magnitude.min(), magnitude.max()
    scaled = (magnitude - low) / (high - low) if high > low else torch.zeros_like(magnitude)
    return (weight.float() * weight.float()).abs() * scaled
