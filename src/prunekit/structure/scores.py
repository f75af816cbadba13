"""Structured scorers: pure functions from weights and calibration statistics to one score per unit.

Higher = more important. Every scorer returns (KV-group scores [kv_heads], neuron scores [neurons]) for one
block; how many units go and which is decided elsewhere. Calibrated scorers read the statistics of the inputs of
the two output projections (o and down), whose input channels are exactly the units' outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prunekit.structure.groups import BlockLayout

CALIBRATED = ("activation", "wanda-sp", "flap", "obs")  # obs: see structure.reconstruct


@dataclass
class ChannelStats:
    """Running per-channel statistics of an output projection's input X ([tokens, channels]), in float64."""

    channels: int
    heads: int = 0  # > 0: also the sum over tokens of each head's output norm (o projection input)
    tokens: int = 0
    total: torch.Tensor = field(init=False)
    square_total: torch.Tensor = field(init=False)
    abs_total: torch.Tensor = field(init=False)
    head_norm_total: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        self.total, self.square_total, self.abs_total = zeros(self.channels), zeros(self.channels), zeros(self.channels)
        self.head_norm_total = zeros(self.heads)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.channels).double().cpu()
        self.tokens += x.shape[0]
        self.total += x.sum(0)
        self.square_total += x.square().sum(0)
        self.abs_total += x.abs().sum(0)
        if self.heads:
            self.head_norm_total += x.view(x.shape[0], self.heads, -1).norm(dim=-1).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per channel: FLAP's fluctuation of the channel over calibration tokens."""
        return ((self.square_total - self.tokens * self.mean.square()) / max(self.tokens - 1, 1)).clamp_min(0)

    @property
    def norms(self) -> torch.Tensor:
        return self.square_total.sqrt()


def _per_group(channel_scores: torch.Tensor, groups: int) -> torch.Tensor:
    return channel_scores.reshape(groups, -1).sum(1)


def group_norm_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      mlp_in: list[torch.Tensor], mlp_out: torch.Tensor, layout: BlockLayout,
                      p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (p=1) or L2 (p=2) norm of all weights of each unit (weights [out, in]; biases are not counted)."""
    def power(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.double().abs().pow(p).sum(dim)

    kv = layout.kv_heads
    heads = (_per_group(power(q, 1), kv) + _per_group(power(k, 1), kv) + _per_group(power(v, 1), kv)
             + _per_group(power(o, 0), kv))
    neurons = sum(power(w, 1) for w in mlp_in) + power(mlp_out, 0)
    return heads.pow(1 / p), neurons.pow(1 / p)


def random_scores(layout: BlockLayout, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The random baseline: independent uniform scores."""
    return (torch.rand(layout.kv_heads, generator=generator, dtype=torch.float64),
            torch.rand(layout.neurons, generator=generator, dtype=torch.float64))


def activation_scores(o_stats: ChannelStats, down_stats: ChannelStats,
                      layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Minitron's activation importance (Muralidharan et al. 2024, Sec. 2.2), mean over calibration tokens: a
    neuron's mean |activation| (the input of down), a head's mean L2 norm of its attention output (the input of o);
    a KV group scores the sum of its query heads."""
    heads = _per_group(o_stats.head_norm_total / o_stats.tokens, layout.kv_heads)
    return heads, down_stats.abs_total / down_stats.tokens


def wanda_sp_scores(o: torch.Tensor, down: torch.Tensor, o_stats: ChannelStats,
                    down_stats: ChannelStats, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda-sp (An et al. 2024, the structured Wanda baseline of FLAP): Σ_i |W_ij|·‖X_j‖₂ over the output
    projection's column j, summed over the unit's channels."""
    def channel(w: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
        return (w.double().abs() * stats.norms).sum(0)

    return _per_group(channel(o, o_stats), layout.kv_heads), channel(down, down_stats)


def flap_scores(o: torch.Tensor, down: torch.Tensor, o_stats: ChannelStats,
                down_stats: ChannelStats, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's fluctuation metric (An et al. 2024, Eq. 5): the sample variance of input channel j over calibration
    tokens times ‖W_:,j‖₂² of the output projection, summed over the unit's channels."""
    def channel(w: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
        return stats.variance * w.double().square().sum(0)

    return _per_group(channel(o, o_stats), layout.kv_heads), channel(down, down_stats)


def standardize(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """FLAP's standardisation (Sec. 3.2) of one kind of unit across all layers: (s - mean) / std, which makes
    attention and MLP scores comparable in one global ranking."""
    pooled = torch.cat(scores)
    std = pooled.std() if pooled.numel() > 1 else pooled.new_tensor(1.0)
    return [(s - pooled.mean()) / (std if std > 0 else 1.0) for s in scores]
