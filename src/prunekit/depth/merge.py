"""LaCo's layer collapse (Yang et al. 2024, "LaCo: large language model pruning via layer collapse", eq. 2):
instead of deleting a run of blocks, fold their parameter differences into the block beside the run, then delete
the run. As in the authors' code, the differences of the attention and MLP projections are merged (their weights
and biases, the adapter's roles) and the block keeps its own norms. The merged model has the architecture of one
with the run removed, so it saves and loads as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.adapters import adapter_for
from prunekit.adapters.moe import MoeAdapter
from prunekit.depth.remove import check_removal, remove_blocks
from prunekit.depth.sublayers import RemovedAttention, RemovedMLP
from prunekit.errors import PrunekitError


def contiguous_runs(indices: list[int]) -> list[list[int]]:
    """`indices` grouped into runs of consecutive integers, in order: [1, 2, 5] -> [[1, 2], [5]]."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def merge_targets(removed: list[int]) -> dict[int, list[int]]:
    """The block each run of `removed` folds into: the block just before the run, or, for a run starting at block 0,
    the block just after it (LaCo merges a block with the ones that follow it). Keys are indices before removal."""
    return {(run[0] - 1 if run[0] > 0 else run[-1] + 1): run for run in contiguous_runs(removed)}


def _projection_parameters(adapter, block: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of a block's attention and MLP projections, by name inside the block."""
    return {f"{name}.{key}": p for name, module in adapter.projections(block).items()
            for key, p in module.named_parameters()}


def _check_mergeable(blocks: nn.ModuleList, targets: dict[int, list[int]]) -> None:
    for base, run in targets.items():
        for index in (base, *run):
            if any(isinstance(module, RemovedAttention | RemovedMLP) for module in blocks[index].modules()):
                raise PrunekitError(f"block {index} has a removed sublayer, so it cannot take part in a merge; merge "
                                    "only whole blocks, or remove without merge")
        shapes = {name: p.shape for name, p in blocks[base].named_parameters()}
        for index in run:
            if {name: p.shape for name, p in blocks[index].named_parameters()} != shapes:
                raise PrunekitError(f"block {index} cannot be merged into block {base}: their parameters differ in "
                                    "shapes (blocks pruned to other widths); merge only blocks of equal shapes, or "
                                    "remove without merge")


def merge_blocks(model: nn.Module, removed: list[int]) -> dict[int, list[int]]:
    """Fold every run of the blocks `removed` into the block beside it, θ_b ← θ_b + Σ_i (θ_i − θ_b) over the run's
    blocks i (LaCo eq. 2) for the projections' parameters θ, then delete the run's blocks and renumber the rest, in
    place. Returns {merged block: its run} in the indices before removal. Everything is checked before the model
    changes."""
    check_removal(model, removed)
    adapter = adapter_for(model)
    if isinstance(adapter, MoeAdapter):
        raise PrunekitError(f"LaCo merging of {adapter.family} blocks is not supported: expert e of one block is not "
                            "the counterpart of expert e of another, so their difference means nothing; remove the "
                            "blocks without merge")
    blocks = adapter.block_list(model)
    targets = merge_targets(removed)
    _check_mergeable(blocks, targets)
    with torch.no_grad():
        for base, run in targets.items():
            own = _projection_parameters(adapter, blocks[base])
            merged = {name: p.detach().clone() for name, p in own.items()}
            for index in run:
                for name, p in _projection_parameters(adapter, blocks[index]).items():
                    merged[name] += p - own[name]
            for name, p in own.items():
                p.copy_(merged[name])
    remove_blocks(model, removed)
    return targets
