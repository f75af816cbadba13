"""One-shot weight pruning methods: each is scores -> selection, or a reconstruction kernel.

A method decides for the projections of one *input group* (projections that read the same input, such as q, k and
v) given the calibration statistics of that input; methods that need no calibration get `stats=None`. It returns a
`GroupDecision` (keep-masks, and updated weights for reconstruction methods) and changes nothing: applying the
decision is the engine's separate step.
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


@dataclass
class GroupDecision:
    """What a method chose for the weights of one input group, in their order, each [out, in].

    masks: keep-masks (True = keep).
    weights: for reconstruction methods, the updated weights (zero wherever the mask is False); None when the
        kept weights keep their values.
    """

    masks: list[torch.Tensor]
    weights: list[torch.Tensor] | None = None

    def pruned(self, originals: list[torch.Tensor]) -> list[torch.Tensor]:
        """The weights to write back: the updated weights, or the originals with the removed entries zeroed."""
        if self.weights is not None:
            return self.weights
        return [w.masked_fill(~keep, 0) for w, keep in zip(originals, self.masks, strict=True)]


ScoreFn = Callable[[torch.Tensor, "InputStats | None", torch.Generator], torch.Tensor]
GroupPruner = Callable[[list[torch.Tensor], InputStats | None, float, Pattern, PruneOptions, torch.Generator],
                       GroupDecision]


@dataclass(frozen=True)
class WeightMethod:
    """A named method: which calibration statistics it needs and how it decides for one input group."""

    name: str
    statistics: str | None  # None, "norms" or "hessian"
    comparison: str  # where unstructured scores compete: "row" or "layer"
    prune_group: GroupPruner = field(repr=False)
    summary: str = ""


def scored_method(name: str, statistics: str | None, comparison: str, score: ScoreFn, summary: str) -> WeightMethod:
    """A method that is exactly score -> select, with no weight update."""

    def prune_group(weights, stats, sparsity, pattern, options, generator):
        return GroupDecision([select_mask(score(w, stats, generator), sparsity, pattern, comparison) for w in weights])

    return WeightMethod(name, statistics, comparison, prune_group, summary)


def _sparsegpt_group(weights, stats, sparsity, pattern, options, generator):
    stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
    rows = [w.shape[0] for w in weights]
    updated, keep = sparsegpt_prune(stacked, stats.hessian, sparsity=sparsity, pattern=pattern,
                                    blocksize=options.blocksize, damping=options.damping, row_groups=rows)
    return GroupDecision(list(keep.split(rows)), list(updated.split(rows)))


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
