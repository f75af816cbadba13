"""The sequential engine: calibrate and prune a transformer one block at a time.

The inputs of the first block are captured once. Then, for each block: run the calibration samples through it
while hooks gather statistics of every projection's input, prune the block, and run it again so that the next
block is calibrated on the outputs of the *pruned* block (as in SparseGPT and Wanda). Memory is one block on the
compute device plus the calibration activations (kept on `activation_device`), never the whole model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import Adapter, projection_weight, set_projection_weight
from prunekit.budget import Pattern
from prunekit.errors import PrunekitError
from prunekit.select import owl_sparsities
from prunekit.weights.methods import PruneOptions, WeightMethod
from prunekit.weights.scores import wanda_scores
from prunekit.weights.stats import InputStats


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the first block's inputs are known."""


@dataclass
class BlockInput:
    """One calibration batch as a block receives it: hidden states plus the other arguments of its forward."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _outside_blocks(model: nn.Module, blocks: nn.ModuleList) -> Iterator[nn.Module]:
    """The modules that hold every parameter and buffer of `model` not inside `blocks`."""
    for child in model.children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            yield from _outside_blocks(child, blocks)
        else:
            yield child


def _check_finite(hidden: torch.Tensor, where: str) -> None:
    if not torch.isfinite(hidden).all():
        raise PrunekitError(f"non-finite (NaN or inf) activations {where}; the model or its inputs are broken")


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, token_ids: torch.Tensor, *, batch_size: int,
    device: torch.device, activation_device: torch.device,
) -> list[BlockInput]:
    """Run the model up to its first block for each calibration batch and keep what the block receives."""
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInput(hidden.to(activation_device), _to(tuple(args[1:]), activation_device),
                                   _to(kwargs, activation_device)))
        raise _Captured

    outside = list(_outside_blocks(model, blocks))
    home = next(model.parameters()).device
    for module in outside:
        module.to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in token_ids.split(batch_size):
                with contextlib.suppress(_Captured):
                    model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
        for module in outside:
            module.to(home)
    for i, item in enumerate(captured):
        _check_finite(item.hidden, f"entering block 0 (calibration batch {i})")
    return captured


def _forward(block: nn.Module, item: BlockInput, device: torch.device) -> torch.Tensor:
    out = block(item.hidden.to(device), *_to(item.args, device), **_to(item.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, inputs: list[BlockInput], device: torch.device) -> list[BlockInput]:
    """Forward every calibration batch through one block; outputs stay where the inputs were."""
    with torch.inference_mode():
        return [BlockInput(_forward(block, item, device).to(item.hidden.device), item.args, item.kwargs)
                for item in inputs]


class _LastInputRecorded(Exception):
    """Raised once the last projection input of a batch is recorded: the rest of the block is not needed."""


class InputGroups:
    """Gathers InputStats for the projections of one block, once per group of projections sharing an input."""

    def __init__(self, adapter: Adapter, block: nn.Module, *, hessian: bool, device: torch.device) -> None:
        self.projections = adapter.projections(block)
        grouped = {name for group in adapter.shared_inputs for name in group}
        self.groups: list[tuple[str, ...]] = [g for g in adapter.shared_inputs if g[0] in self.projections]
        self.groups += [(name,) for name in self.projections if name not in grouped]
        self.groups.sort(key=lambda g: list(self.projections).index(g[0]))
        self.stats = {
            g: InputStats(projection_weight(self.projections[g[0]]).shape[1], hessian=hessian, device=device)
            for g in self.groups
        }
        self._handles = []
        self._leader_input: dict[tuple[str, ...], torch.Tensor] = {}
        self._arrival: list[tuple[str, ...]] = []  # groups in the order their inputs arrive, learnt on one batch
        self._stop_at: tuple[str, ...] | None = None

    def calibrate(self, block: nn.Module, inputs: list[BlockInput], device: torch.device) -> None:
        """Record the inputs of every projection for all calibration batches, discarding the block's outputs.

        The first batch runs the whole block and shows which projection input arrives last; later batches stop
        there, which skips the last projection's own product (the MLP down projection: a quarter of the work).
        """
        self._arrival.clear()
        self._stop_at = None
        with self.recording(), torch.inference_mode():
            for item in inputs:
                with contextlib.suppress(_LastInputRecorded):
                    _forward(block, item, device)
                self._stop_at = self._stop_at or self._arrival[-1]
        tokens = sum(item.hidden.shape[:-1].numel() for item in inputs)
        for group, stats in self.stats.items():
            if stats.tokens != tokens:
                raise RuntimeError(f"adapter error: '{group[0]}' saw {stats.tokens} calibration tokens, not {tokens}")

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        for group in self.groups:
            self._handles.append(self.projections[group[0]].register_forward_pre_hook(self._leader(group)))
            for name in group[1:]:
                self._handles.append(self.projections[name].register_forward_pre_hook(self._member(group, name)))
        try:
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._leader_input.clear()

    def _leader(self, group):
        def hook(module, args):
            self._leader_input[group] = args[0]
            self.stats[group].add(args[0])
            if self._stop_at is None:
                self._arrival.append(group)
            elif group == self._stop_at:
                raise _LastInputRecorded

        return hook

    def _member(self, group, name):
        def hook(module, args):
            if args[0] is not self._leader_input.get(group):
                raise RuntimeError(f"adapter error: '{name}' does not read the same input as '{group[0]}'")

        return hook


@dataclass
class BlockPlan:
    """The sparsity each block gets (uniform, or OWL's outlier-weighted allocation)."""

    sparsities: list[float]
    outlier_ratios: list[float] | None = None


def owl_plan(
    model: nn.Module, adapter: Adapter, inputs: list[BlockInput], *, sparsity: float, threshold: float,
    limit: float, device: torch.device, progress: bool,
) -> BlockPlan:
    """Outlier ratios of the dense model's Wanda scores per block, then OWL's layer-wise sparsities."""
    blocks = adapter.block_list(model)
    ratios, sizes = [], []
    for block in tqdm(blocks, desc="OWL outlier ratios", unit="block", disable=not progress):
        home = next(block.parameters()).device
        block.to(device)
        groups = InputGroups(adapter, block, hessian=False, device=device)
        with groups.recording():
            inputs = run_block(block, inputs, device)
        scores = [
            wanda_scores(projection_weight(groups.projections[name]), groups.stats[group].norms)
            for group in groups.groups
            for name in group
        ]
        total = sum(s.numel() for s in scores)
        mean = sum(s.sum().item() for s in scores) / total
        ratios.append(sum((s > threshold * mean).sum().item() for s in scores) / total)
        sizes.append(total)
        block.to(home)
    return BlockPlan(owl_sparsities(ratios, sparsity, limit, sizes), ratios)


def prune_sequentially(
    model: nn.Module, adapter: Adapter, method: WeightMethod, *, sparsities: list[float], pattern: Pattern,
    inputs: list[BlockInput] | None, options: PruneOptions, device: torch.device, progress: bool,
    on_block: Callable[[int], None] | None = None,
) -> None:
    """Prune every block in order, calibrating each on the outputs of the already pruned blocks before it."""
    blocks = adapter.block_list(model)
    bar = tqdm(blocks, desc=f"{method.name} {pattern if pattern.is_nm else 'unstructured'}", unit="block",
               disable=not progress)
    for index, block in enumerate(bar):
        home = next(block.parameters()).device
        block.to(device)
        groups = InputGroups(adapter, block, hessian=method.statistics == "hessian", device=device)
        # sparsity 0 is a no-op: SparseGPT would otherwise still zero the weights of inputs that never fire
        active = pattern.is_nm or sparsities[index] > 0
        if method.statistics is not None and active:
            groups.calibrate(block, inputs, device)
        for ordinal, group in enumerate(groups.groups if active else ()):
            modules = [groups.projections[name] for name in group]
            generator = torch.Generator(device=device).manual_seed(options.seed * 1_000_003 + index * 1009 + ordinal)
            stats = groups.stats[group] if method.statistics is not None else None
            weights = [projection_weight(m) for m in modules]
            for module, pruned in zip(modules, method.prune_group(weights, stats, sparsities[index], pattern,
                                                                  options, generator), strict=True):
                set_projection_weight(module, pruned)
        if method.statistics is not None and index + 1 < len(blocks):
            inputs = run_block(block, inputs, device)
            for i, item in enumerate(inputs):
                _check_finite(item.hidden, f"leaving block {index} (calibration batch {i})")
        block.to(home)
        if on_block is not None:
            on_block(index)
