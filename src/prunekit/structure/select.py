"""How many units of each kind every block loses, for a budget in parameters: uniform or global.

The allocations of `prunekit.allocation` split a count of equal-sized weights; structured units differ in size (a
KV group of SmolLM2 holds 295k parameters, a neuron 1.7k), so the budget here is met in parameters: units are
removed in order of score until the removed parameters reach the target, the unit closest to it deciding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from prunekit.errors import PrunekitError
from prunekit.select import fraction_count, top_k_indices
from prunekit.structure.groups import BlockLayout

UNIT_KINDS = ("heads", "neurons")
MODES = ("remove", "mask")  # apply a selection by shrinking the tensors, or by zeros and masks


def check_selection_options(mode: str, round_to: int | None, min_keep: float, units: str) -> None:
    """The options that every structured pruner (adapter-declared groups and traced graphs alike) shares: how the
    selection is applied, the multiple kept counts are rounded to, and the fraction of each group's `units` kept."""
    if mode not in MODES:
        raise PrunekitError(f"mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise PrunekitError(f"round_to={round_to!r} must be an integer >= 1 (or None)")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int | float) or not 0 < min_keep <= 1:
        raise PrunekitError(f"min_keep={min_keep!r} must be the fraction of {units} kept, in (0, 1]")


@dataclass(frozen=True)
class Floors:
    """The fewest KV groups and neurons a block keeps: `min_keep` of each (at least one, and a whole multiple of
    `round_to` neurons); a kind not being pruned keeps everything."""

    heads: int
    neurons: int

    @staticmethod
    def of(layout: BlockLayout, min_keep: float, round_to: int, kinds: tuple[str, ...]) -> Floors:
        heads = max(1, math.ceil(min_keep * layout.kv_heads)) if "heads" in kinds else layout.kv_heads
        neurons = layout.neurons
        if "neurons" in kinds:
            neurons = max(round_to, math.ceil(min_keep * layout.neurons / round_to) * round_to)
        return Floors(min(heads, layout.kv_heads), min(neurons, layout.neurons))


def removable(layouts: list[BlockLayout], floors: list[Floors]) -> int:
    """The most parameters the floors allow to remove."""
    return sum((lay.kv_heads - f.heads) * lay.head_cost + (lay.neurons - f.neurons) * lay.neuron_cost
               for lay, f in zip(layouts, floors, strict=True))


def _round_neurons(kept: int, layout: BlockLayout, floor: int, round_to: int) -> int:
    return min(layout.neurons, max(floor, round_to * round(kept / round_to)))


def uniform_counts(layouts: list[BlockLayout], floors: list[Floors], target: int, kinds: tuple[str, ...],
                   round_to: int) -> list[tuple[int, int]]:
    """(KV groups kept, neurons kept) per block: every block loses its share of the target (in proportion to
    its prunable parameters), the same fraction of its KV groups and of its neurons, within its floors; the
    neurons take up what whole KV groups leave of the share."""
    total = sum(lay.prunable for lay in layouts)
    counts = []
    for lay, floor in zip(layouts, floors, strict=True):
        share = target * lay.prunable / total
        heads = 0
        if "heads" in kinds:
            heads = min(fraction_count(lay.kv_heads, share / lay.prunable), lay.kv_heads - floor.heads)
            while heads and heads * lay.head_cost > share:
                heads -= 1
        neurons_kept = lay.neurons
        if "neurons" in kinds:
            gone = round((share - heads * lay.head_cost) / lay.neuron_cost)
            neurons_kept = _round_neurons(lay.neurons - gone, lay, floor.neurons, round_to)
        counts.append((lay.kv_heads - heads, neurons_kept))
    return counts


def global_counts(scores: list[tuple[torch.Tensor, torch.Tensor]], layouts: list[BlockLayout],
                  floors: list[Floors], target: int, round_to: int) -> list[tuple[int, int]]:
    """(KV groups kept, neurons kept) per block from one ranking of all units of all blocks by their (already
    comparable, e.g. standardised) scores; the floor's highest-scoring units of every block are never removed.
    Neuron counts are then rounded to multiples of `round_to`."""
    values, costs, owners = [], [], []
    for index, ((heads, neurons), lay, floor) in enumerate(zip(scores, layouts, floors, strict=True)):
        for kind, s, cost, keep in ((0, heads, lay.head_cost, floor.heads), (1, neurons, lay.neuron_cost,
                                                                                floor.neurons)):
            lifted = s.double().clone()
            lifted[torch.from_numpy(top_k_indices(s.numpy(), keep))] = math.inf
            values.append(lifted)
            costs.append(torch.full((len(s),), cost, dtype=torch.float64))
            owners.append(torch.full((len(s),), 2 * index + kind))
    values, costs, owners = torch.cat(values), torch.cat(costs), torch.cat(owners)
    order = torch.from_numpy(np.lexsort((np.arange(len(values)), values.numpy())))
    removed = torch.cumsum(costs[order], 0)
    # The shortest prefix reaching the target, or the one before it if that lands closer.
    k = int(torch.searchsorted(removed, torch.tensor(float(target), dtype=torch.float64)))
    k = min(k, len(removed) - 1)
    if k > 0 and abs(removed[k - 1] - target) <= abs(removed[k] - target):
        k -= 1
    gone = torch.bincount(owners[order[:k + 1]], minlength=2 * len(layouts)) if target > 0 else \
        torch.zeros(2 * len(layouts), dtype=torch.long)
    counts = []
    for index, (lay, floor) in enumerate(zip(layouts, floors, strict=True)):
        neurons = lay.neurons - int(gone[2 * index + 1])
        if neurons != lay.neurons:
            neurons = _round_neurons(neurons, lay, floor.neurons, round_to)
        counts.append((lay.kv_heads - int(gone[2 * index]), neurons))
    return counts


def kept_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` highest-scoring units, as sorted indices (ties to the lower index)."""
    return torch.from_numpy(np.sort(top_k_indices(scores.numpy(), keep)))
