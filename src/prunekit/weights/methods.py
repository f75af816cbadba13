"""One-shot weight pruning methods: each is scores -> selection -> apply, or a reconstruction kernel.

A method prunes the projections of one *input group* (projections that read the same input, such as q, k and v)
given the calibration statistics of that input. Methods that need no calibration get `stats=None`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prunekit.budget import Pattern
from prunekit.errors import PrunekitError
from prunekit.select import select_mask
from prunekit.weights.scores import magnitude_scores, random_scores, wanda_scores
from prunekit.weights.sparsegpt import sparsegpt_prune
from prunekit.weights.stats import InputStats


@dataclass(frozen=True)
class PruneOptions:
    """Hyperparameters of the one-shot methods, recorded in the protocol card.

    seed: seeds random scores (and calibration sampling, elsewhere).
    blocksize: SparseGPT's lazy-update column block (Frantar & Alistarh 2023 use 128).
    damping: SparseGPT's dampening, a fraction of the mean Hessian diagonal added to it (paper: 0.01).
    """

    seed: int = 0
    blocksize: int = 128
    damping: float = 0.01

    def as_dict(self) -> dict:
        return {"seed": self.seed, "blocksize": self.blocksize, "damping": self.damping}


ScoreFn = Callable[[torch.Tensor, "InputStats | None", torch.Generator], torch.Tensor]
GroupPruner = Callable[[list[torch.Tensor], InputStats | None, float, Pattern, PruneOptions, torch.Generator],
                       list[torch.Tensor]]


@dataclass(frozen=True)
class WeightMethod:
    """A named method: which calibration statistics it needs and how it prunes one input group."""

    name: str
    statistics: str | None  # None, "norms" or "hessian"
    comparison: str  # where unstructured scores compete: "row" or "layer"
    prune_group: GroupPruner = field(repr=False)
    summary: str = ""


def scored_method(name: str, statistics: str | None, comparison: str, score: ScoreFn, summary: str) -> WeightMethod:
    """A method that is exactly score -> select -> apply the mask, with no weight update."""

    def prune_group(weights, stats, sparsity, pattern, options, generator):
        return [
            weight * select_mask(score(weight, stats, generator), sparsity, pattern, comparison).to(weight.dtype)
            for weight in weights
        ]

    return WeightMethod(name, statistics, comparison, prune_group, summary)


def _sparsegpt_group(weights, stats, sparsity, pattern, options, generator):
    stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
    updated, _ = sparsegpt_prune(
        stacked, stats.hessian, sparsity=sparsity, pattern=pattern, blocksize=options.blocksize,
        damping=options.damping, row_groups=[w.shape[0] for w in weights],
    )
    return list(updated.split([w.shape[0] for w in weights]))


METHODS: dict[str, WeightMethod] = {
    m.name: m
    for m in (
        scored_method("magnitude", None, "layer", lambda w, s, g: magnitude_scores(w),
                      "|W|, lowest removed per layer"),
        scored_method("random", None, "layer", lambda w, s, g: random_scores(w, g),
                      "uniformly random removal per layer (baseline)"),
        scored_method("wanda", "norms", "row", lambda w, s, g: wanda_scores(w, s.norms),
                      "|W| * ||X||, lowest removed per output row (Sun et al. 2024)"),
        WeightMethod("sparsegpt", "hessian", "block", _sparsegpt_group,
                     "OBS reconstruction with lazy column blocks (Frantar & Alistarh 2023)"),
    )
}


def get_method(name: str) -> WeightMethod:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise PrunekitError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}") from None
