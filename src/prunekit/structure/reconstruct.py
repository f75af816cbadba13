"""Least-squares reconstruction of an output projection after some of its input channels are removed.

When the units feeding an output projection (attention heads into o, MLP neurons into down) go, the layer's
output on calibration data can be kept close to the dense one by re-fitting the kept columns, and the bias where
the model may have one: with X̃ = [X, 1] the calibration inputs with a constant column and W̃ = [W, b],

    min_Ŵ ‖X̃ W̃ᵀ − X̃_S Ŵᵀ‖²   →   Ŵᵀ = G_SS⁻¹ G_S: W̃ᵀ,   G = X̃ᵀX̃,

S being the kept channels (and the constant one when a bias is allowed). FLAP's bias compensation is the special
case that re-fits only the bias. The kept set is chosen by structured Optimal Brain Surgeon (Hassibi & Stork 1993;
applied to LLM widths by ZipLM, Kurtic et al. 2023, and SlimGPT, Ling et al. 2024): the unit whose removal, with
the others re-fitted, raises the error least, ‖W_U (G⁻¹_UU)⁻¹ W_Uᵀ‖ summed over its channels U, goes first, and
G⁻¹ and W are updated before the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prunekit.errors import PrunekitError


@dataclass
class Gram:
    """Running X̃ᵀX̃ of an output projection's inputs (last row and column: the constant 1), in float64."""

    channels: int
    tokens: int = 0
    matrix: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = torch.zeros(self.channels + 1, self.channels + 1, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.channels).float().cpu()
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        # one batch's product in float32 (the costly part: tokens × channels²), the running sum in float64
        self.matrix += (x.T @ x).double()
        self.tokens += x.shape[0]

    def damped(self, damp: float) -> torch.Tensor:
        """G + λI with λ = `damp` × the mean diagonal (as in SparseGPT), so that dead channels stay invertible."""
        if not self.tokens:
            raise PrunekitError("no calibration tokens reached this layer; reconstruction needs calibration data")
        g = self.matrix / self.tokens
        return g + damp * g.diagonal().mean() * torch.eye(len(g), dtype=g.dtype)


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().double().cpu()
    b = bias.detach().double().cpu() if bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, b[:, None]], dim=1)


def refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: Gram, kept: torch.Tensor, *, with_bias: bool,
          damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(new weight [out, len(kept)], new bias or None): the least-squares fit of the dense layer's output from the
    kept input channels (and a bias, if `with_bias`). A layer without bias whose output may not take one keeps
    none; a layer with a bias keeps it (re-fitted only if `with_bias`)."""
    g = gram.damped(damp)
    w = _augmented(weight, bias)
    constant = torch.tensor([gram.channels])
    columns = torch.cat([kept.cpu(), constant]) if with_bias else kept.cpu()
    target = w @ g[:, columns]  # W̃ G_:S  -> [out, |S|]
    if not with_bias and bias is not None:
        # the bias stays as it is: its contribution is part of the target, not a free column
        target = target - bias.detach().double().cpu()[:, None] * g[gram.channels, columns][None, :]
    solved = torch.linalg.solve(g[columns][:, columns], target.T).T
    new_bias = solved[:, -1] if with_bias else (bias.detach().double().cpu() if bias is not None else None)
    new_weight = solved[:, :-1] if with_bias else solved
    return new_weight.to(weight.dtype), None if new_bias is None else new_bias.to(weight.dtype)


def obs_keep(weight: torch.Tensor, bias: torch.Tensor | None, gram: Gram, unit_channels: torch.Tensor, keep: int,
             *, with_bias: bool, damp: float = 0.01, rounds: int = 32) -> torch.Tensor:
    """The `keep` units (rows of `unit_channels`, [units, width]: the input channels each unit owns) that structured
    OBS keeps, removing the units of least added output error with the rest re-fitted, G⁻¹ and W updated after
    each round. The removals are spread over at most `rounds` rounds (as SlimGPT batches them): a few hundred
    one-at-a-time rank updates of a 1537² inverse per block would dominate the pruning time. Sorted indices."""
    units = unit_channels.shape[0]
    if not 0 < keep <= units:
        raise PrunekitError(f"cannot keep {keep} of {units} units")
    g = gram.damped(damp)
    columns = torch.arange(gram.channels + 1) if with_bias else torch.arange(gram.channels)
    w = _augmented(weight, bias)[:, columns]  # a fixed bias adds the same to every candidate's error: left out
    hinv = torch.linalg.inv(g[columns][:, columns])
    alive = torch.ones(units, dtype=torch.bool)
    per_round = -(-(units - keep) // rounds)
    while int(alive.sum()) > keep:
        candidates = alive.nonzero().flatten()
        errors = torch.stack([_group_error(w, hinv, unit_channels[u]) for u in candidates.tolist()]) \
            if unit_channels.shape[1] > 1 else w[:, unit_channels[candidates, 0]].square().sum(0) / hinv[
                unit_channels[candidates, 0], unit_channels[candidates, 0]]
        chosen = candidates[errors.argsort(stable=True)[:min(per_round, int(alive.sum()) - keep)]]
        alive[chosen] = False
        c = unit_channels[chosen].flatten()
        block = torch.linalg.inv(hinv[c][:, c])  # (G⁻¹_UU)⁻¹ for all removed channels U of the round
        w -= (w[:, c] @ block) @ hinv[c, :]
        hinv -= hinv[:, c] @ block @ hinv[c, :]
        w[:, c] = 0
    return alive.nonzero().flatten()


def _group_error(w: torch.Tensor, hinv: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    wc = w[:, channels]
    return (wc @ torch.linalg.inv(hinv[channels][:, channels]) * wc).sum()
