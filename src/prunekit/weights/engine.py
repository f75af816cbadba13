"""The sequential engine: calibrate and prune a transformer one block at a time.

One pass of the model, with every block standing in as the identity, records what each block is called with: the
hidden states entering block 0 and every block's own other arguments (attention masks and rotary embeddings differ
between layer types: sliding and full attention in Gemma 2/3 and windowed Qwen, no rotary embedding on some
SmolLM3 layers). Then, for each block: run the calibration samples through it while hooks gather statistics of
every projection's input, prune the block, and run it again so that the next block is calibrated on the outputs of
the *pruned* block (as in SparseGPT and Wanda). Memory is one block on the compute device plus the calibration
activations (kept on `activation_device`), never the whole model's.

Where a block's weights wait while another block computes is a `BlockWeights` object: by default the model's own
blocks, moved to the compute device and back; for a model loaded with `prunekit.weights.offload.load_offloaded`, files
on disk, so that pruning a model needs memory for one block, not for all of them.

Pruning returns its keep-masks (one per targeted weight, in the parameter's own layout and by its full name) when
asked, in the form `prunekit.training.Masks` takes, so that the zeros can be held while fine-tuning.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from prunekit.adapters import Adapter, adapter_for, is_conv1d, projection_weight, set_projection_weight
from prunekit.allocation import outlier_ratio, owl_nm_patterns, owl_sparsities
from prunekit.budget import Pattern
from prunekit.errors import PrunekitError
from prunekit.weights.methods import PruneOptions, WeightMethod
from prunekit.weights.scores import wanda_scores
from prunekit.weights.stats import InputStats

Arguments = tuple[tuple, dict]
"""A block's positional arguments after the hidden states, and its keyword arguments."""


class _Captured(Exception):
    """Raised once the last block's arguments are recorded: the final norm and the head need not run."""


@dataclass
class BlockInput:
    """One batch: the hidden states entering the next block to run, and every block's own arguments.

    `arguments[i]` is what the model passes block i besides the hidden states. A tensor that several blocks receive
    (the mask or rotary embedding of one layer type) is held once.
    """

    hidden: torch.Tensor
    arguments: list[Arguments]


def _to(value, device: torch.device, copies: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """`value` with its tensors on `device`; a tensor met again (same object) reuses its first copy."""
    if isinstance(value, torch.Tensor):
        if id(value) not in copies:  # the original is kept alive beside its copy, so that its id stays unique
            copies[id(value)] = (value, value.to(device))
        return copies[id(value)][1]
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device, copies) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, copies) for k, v in value.items()}
    return value


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Arguments]:
    """A block call's hidden states (first positional argument, or the `hidden_states` keyword) and the rest."""
    if args:
        return args[0], (tuple(args[1:]), dict(kwargs))
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), ((), kwargs)


def _tensors_on(module: nn.Module, device: torch.device, skip: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The parameters and buffers of `module` outside `skip`, by name, on `device` (the originals where they are
    already there), for `functional_call`. Tied parameters are listed once; functional_call ties the others."""
    inside = {id(t) for t in chain(skip.parameters(), skip.buffers())} if skip is not None else set()
    return {name: tensor.to(device) for name, tensor in chain(module.named_parameters(), module.named_buffers())
            if id(tensor) not in inside}


class _StandIns:
    """While entered, every block returns the hidden states it is given without computing anything, and records
    the arguments it is called with, as the model passes them (before any other pre-hook of the block).

    `first_output`, when set, is what block 0 returns instead: then the model's own code after the blocks (final
    norm, head, logit soft-capping) runs on it. The engine replays block i on block i-1's output, so every block
    must receive exactly what the block before it returned; a model that changes the hidden states between blocks,
    or calls them out of order, is refused.
    """

    def __init__(self, blocks: nn.ModuleList, *, stop_after_last: bool = False,
                 first_output: torch.Tensor | None = None) -> None:
        self.blocks = blocks
        self.stop_after_last = stop_after_last
        self.first_output = first_output
        self.calls: list[tuple[torch.Tensor, Arguments]] = []
        self._returned: torch.Tensor | None = None
        self._saved: list[Any] = []
        self._handles: list = []

    def _record(self, index: int):
        def hook(module, args, kwargs):
            hidden, arguments = _split(args, kwargs)
            if index != len(self.calls) or (index > 0 and hidden is not self._returned):
                raise PrunekitError(
                    f"block {index} is not called with the output of block {index - 1}: this model changes the "
                    "hidden states between its blocks or calls them out of order, which the sequential engine "
                    "cannot replay")
            self.calls.append((hidden, arguments))
            if self.stop_after_last and index == len(self.blocks) - 1:
                raise _Captured

        return hook

    def _stand_in(self, index: int):
        def forward(*args, **kwargs):
            hidden, _ = _split(args, kwargs)
            self._returned = self.first_output if index == 0 and self.first_output is not None else hidden
            return self._returned

        return forward

    def __enter__(self) -> _StandIns:
        for index, block in enumerate(self.blocks):
            # an instance-level forward (accelerate's offload hooks install one) is put back on exit
            self._saved.append(vars(block).get("forward"))
            block.forward = self._stand_in(index)
            self._handles.append(block.register_forward_pre_hook(self._record(index), with_kwargs=True, prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for block, forward in zip(self.blocks, self._saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
        self._handles, self._saved = [], []


class BlockWeights:
    """Where a model's blocks keep their weights while the engine is not computing them, and how a block gets to
    the compute device. This default keeps them in the model: `enter` moves a block to the device and `leave` moves
    it back. `prunekit.weights.offload` keeps them in files instead."""

    def __init__(self) -> None:
        self._homes: dict[int, torch.device] = {}

    def enter(self, index: int, block: nn.Module, device: torch.device) -> None:
        """Make block `index`'s weights usable on `device`."""
        self._homes[index] = next(block.parameters()).device
        block.to(device)

    def leave(self, index: int, block: nn.Module, *, changed: bool) -> None:
        """Put block `index` away; `changed` says that its weights were pruned meanwhile (and must be kept)."""
        block.to(self._homes.pop(index))

    @property
    def offloaded(self) -> bool:
        """True when the blocks' weights are not in the model (they exist only between `enter` and `leave`)."""
        return False


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, BlockWeights] = weakref.WeakKeyDictionary()


def attach_block_weights(model: nn.Module, weights: BlockWeights) -> None:
    """Make `weights` the place the engine takes `model`'s blocks from (`prunekit.weights.offload`)."""
    _ATTACHED[model] = weights


def block_weights(model: nn.Module) -> BlockWeights:
    """The `BlockWeights` of `model`: the one attached to it, else a fresh default."""
    return _ATTACHED.get(model) or BlockWeights()


def refuse_offloaded(model: nn.Module, what: str) -> None:
    """Refuse to run `what`, which needs the model's weights in memory, on an offloaded model."""
    if block_weights(model).offloaded:
        raise PrunekitError(f"{what} needs the model's weights in memory, but this model was loaded offloaded (its "
                            "blocks stay in files); load it with prunekit.assets.load_causal_lm")


def state_items(model: nn.Module, names: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the entries of `model.state_dict()` in the order of `names` (default: the state dict's).

    An offloaded model's blocks are read from their files on the CPU one at a time, each while its entries are
    yielded, so the order must keep every block's entries together (the state dict's order and sorted order do).
    """
    state = model.state_dict()
    order = list(state) if names is None else names
    store = block_weights(model)
    if not store.offloaded:
        yield from ((name, state[name]) for name in order)
        return
    adapter = adapter_for(model)
    prefix = adapter.block_prefix(model) + "."
    blocks = adapter.block_list(model)
    current: tuple[int, dict[str, torch.Tensor]] | None = None
    done: set[int] = set()
    try:
        for name in order:
            if not name.startswith(prefix):
                yield name, state[name]
                continue
            index_text, local = name[len(prefix):].split(".", 1)
            index = int(index_text)
            if current is None or current[0] != index:
                if current is not None:
                    store.leave(current[0], blocks[current[0]], changed=False)
                    current = None
                if index in done:
                    raise ValueError(f"the entries of block {index} are not together in the order given")
                store.enter(index, blocks[index], torch.device("cpu"))
                current = (index, blocks[index].state_dict())
                done.add(index)
            yield name, current[1][local]
    finally:
        if current is not None:
            store.leave(current[0], blocks[current[0]], changed=False)


def _check_finite(hidden: torch.Tensor, where: str) -> None:
    if not torch.isfinite(hidden).all():
        raise PrunekitError(f"non-finite (NaN or inf) activations {where}; the model or its inputs are broken")


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, token_ids: torch.Tensor, *, batch_size: int,
    device: torch.device, activation_device: torch.device,
) -> list[BlockInput]:
    """For each batch, the hidden states entering block 0 and the arguments every block receives.

    One pass per batch through what the model computes before and between its blocks (embeddings, masks, rotary
    embeddings) on `device`, from copies of those weights there (the model is not moved). The blocks stand in as
    the identity and the pass stops at the last block, so no block, final norm or head is computed.
    """
    outside = _tensors_on(model, device, skip=blocks)
    captured: list[BlockInput] = []
    with _StandIns(blocks, stop_after_last=True) as stand_ins, torch.inference_mode():
        for i, batch in enumerate(token_ids.split(batch_size)):
            stand_ins.calls.clear()
            with contextlib.suppress(_Captured):
                functional_call(model, outside, (), {"input_ids": batch.to(device), "use_cache": False})
            if len(stand_ins.calls) != len(blocks):
                raise PrunekitError(f"the model called {len(stand_ins.calls)} of its {len(blocks)} blocks in a "
                                    "forward pass; the sequential engine needs every block called once, in order")
            hidden = stand_ins.calls[0][0]
            _check_finite(hidden, f"entering block 0 (batch {i})")
            copies: dict = {}
            captured.append(BlockInput(_to(hidden, activation_device, copies),
                                       [_to(arguments, activation_device, copies) for _, arguments in stand_ins.calls]))
    return captured


def _forward(block: nn.Module, index: int, item: BlockInput, device: torch.device,
             tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    args, kwargs = _to(item.arguments[index], device, {})
    hidden = item.hidden.to(device)
    if tensors is None:
        out = block(hidden, *args, **kwargs)
    else:
        out = functional_call(block, tensors, (hidden, *args), kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, index: int, inputs: list[BlockInput], device: torch.device,
              tensors: dict[str, torch.Tensor] | None = None) -> list[BlockInput]:
    """Forward every batch through `block`, the model's block number `index`; outputs stay where the inputs were.

    The block computes with its own weights, which must be on `device`, or with `tensors` (its parameters and
    buffers by name, on `device`) in their place.
    """
    with torch.inference_mode():
        return [BlockInput(_forward(block, index, item, device, tensors).to(item.hidden.device), item.arguments)
                for item in inputs]


def blockwise_forward(
    model: nn.Module, blocks: nn.ModuleList, token_ids: torch.Tensor, *, batch_size: int, device: torch.device,
    activation_device: torch.device, progress: bool = False,
) -> Iterator[Any]:
    """The outputs of `model(input_ids=batch, use_cache=False)` for each batch of `token_ids`, computed on `device`
    one block at a time, as pruning places them: `device` holds one block's weights (copies: the model is neither
    moved nor changed), the weights outside the blocks, and one batch's outputs; the activations of every batch
    wait on `activation_device` between blocks.

    The model's own code runs before the blocks (`capture_block_inputs`) and after them (final norm, head, logit
    soft-capping), with the blocks standing in and block 0 returning the last block's output, so the result equals
    a normal forward pass for any model whose blocks pass their output on unchanged. An offloaded model's blocks
    are read from their files one at a time.
    """
    inputs = capture_block_inputs(model, blocks, token_ids, batch_size=batch_size, device=device,
                                  activation_device=activation_device)
    weights = block_weights(model)
    for index, block in enumerate(tqdm(blocks, desc="forward block by block", unit="block", disable=not progress)):
        if weights.offloaded:
            weights.enter(index, block, device)
            try:
                inputs = run_block(block, index, inputs, device)
            finally:
                weights.leave(index, block, changed=False)
        else:
            inputs = run_block(block, index, inputs, device, _tensors_on(block, device))
    outside = _tensors_on(model, device, skip=blocks)
    for batch, item in zip(token_ids.split(batch_size), inputs, strict=True):
        # the stand-ins are removed before the caller sees the output, even if it never asks for the next one
        with _StandIns(blocks, first_output=item.hidden.to(device)), torch.inference_mode():
            output = functional_call(model, outside, (), {"input_ids": batch.to(device), "use_cache": False})
        yield output


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
        self._hessian, self._device = hessian, device
        self.stats = {g: self._fresh(g) for g in self.groups}
        self._handles = []
        self._leader_input: dict[tuple[str, ...], torch.Tensor] = {}
        self._arrival: list[tuple[str, ...]] = []  # groups in the order their inputs arrive, learnt on one batch
        self._stop_at: tuple[str, ...] | None = None

    def _fresh(self, group: tuple[str, ...]) -> InputStats:
        features = projection_weight(self.projections[group[0]]).shape[1]
        return InputStats(features, hessian=self._hessian, device=self._device)

    def calibrate(self, block: nn.Module, index: int, inputs: list[BlockInput], device: torch.device,
                  only: tuple[str, ...] | None = None) -> None:
        """Record the inputs of every projection of block `index` for all calibration batches, discarding the
        block's outputs.

        The first batch runs the whole block and shows which projection input arrives last; later batches stop
        there, which skips the last projection's own product (the MLP down projection: a quarter of the work).
        With `only` (true-sequential calibration), the statistics of that one group are recorded afresh, each batch
        running only up to its input: projections before it compute with their weights as they are now.
        """
        groups = [only] if only is not None else self.groups
        if only is not None:
            self.stats[only] = self._fresh(only)
        self._arrival.clear()
        self._stop_at = only
        with self.recording(groups), torch.inference_mode():
            for item in inputs:
                with contextlib.suppress(_LastInputRecorded):
                    _forward(block, index, item, device)
                self._stop_at = self._stop_at or self._arrival[-1]
        tokens = sum(item.hidden.shape[:-1].numel() for item in inputs)
        for group in groups:
            if self.stats[group].tokens != tokens:
                raise RuntimeError(f"adapter error: '{group[0]}' saw {self.stats[group].tokens} calibration tokens, "
                                   f"not {tokens}")

    @contextlib.contextmanager
    def recording(self, groups: Sequence[tuple[str, ...]] | None = None) -> Iterator[None]:
        """While entered, the inputs of `groups` (default: all) are added to their statistics."""
        for group in self.groups if groups is None else groups:
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
    """The sparsity each block gets (uniform, OWL's outlier-weighted or ECoFLaP's allocation), and with OWL's N:M
    allocation each block's own pattern (`prune_sequentially` takes `patterns or` the one pattern)."""

    sparsities: list[float]
    outlier_ratios: list[float] | None = None
    patterns: list[Pattern] | None = None
    block_scores: list[float] | None = None


def owl_plan(
    model: nn.Module, adapter: Adapter, inputs: list[BlockInput], *, sparsity: float, threshold: float,
    limit: float, device: torch.device, progress: bool, pattern: Pattern | None = None,
) -> BlockPlan:
    """Outlier ratios of the dense model's Wanda scores per block, then OWL's layer-wise sparsities; with an N:M
    `pattern`, each block's own N:M pattern (`owl_nm_patterns`) and the sparsity it implies."""
    blocks = adapter.block_list(model)
    ratios, sizes = [], []
    weights = block_weights(model)
    for index, block in enumerate(tqdm(blocks, desc="OWL outlier ratios", unit="block", disable=not progress)):
        weights.enter(index, block, device)
        try:
            groups = InputGroups(adapter, block, hessian=False, device=device)
            with groups.recording():
                inputs = run_block(block, index, inputs, device)
            scores = [
                wanda_scores(projection_weight(groups.projections[name]), groups.stats[group].norms)
                for group in groups.groups
                for name in group
            ]
            ratios.append(outlier_ratio(scores, threshold))
            sizes.append(sum(s.numel() for s in scores))
        finally:
            weights.leave(index, block, changed=False)
    if pattern is not None and pattern.is_nm:
        patterns = owl_nm_patterns(ratios, pattern, limit, sizes)
        return BlockPlan([p.sparsity for p in patterns], ratios, patterns)
    return BlockPlan(owl_sparsities(ratios, sparsity, limit, sizes), ratios)


def _parameter_layout(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A [out, in] keep-mask in the layout of the module's weight parameter (GPT-2's Conv1D stores [in, out])."""
    return mask.t().contiguous() if is_conv1d(module) else mask


def _given_mask(masks: Mapping[str, torch.Tensor] | None, name: str, module: nn.Module, weight: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """The caller's keep-mask of one weight as [out, in] on `device` (all True when none is given for it)."""
    keep = (masks or {}).get(name)
    if keep is None:
        return torch.ones(weight.shape, dtype=torch.bool, device=device)
    return _parameter_layout(module, keep.to(device=device, dtype=torch.bool))


def prune_sequentially(
    model: nn.Module, adapter: Adapter, method: WeightMethod, *, sparsities: list[float],
    pattern: Pattern | Sequence[Pattern], inputs: list[BlockInput] | None, options: PruneOptions,
    device: torch.device, progress: bool, keep_masks: bool = False, gradients: dict[str, torch.Tensor] | None = None,
    given_masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune every block in order, calibrating each on the outputs of the already pruned blocks before it.

    `pattern` is one for all blocks, or one per block (OWL's N:M allocation, `owl_nm_patterns`). A method with
    statistics "gradients" (Pruner-Zero) needs `gradients`, by parameter name (`calibration_gradients`), and no
    `inputs`. A method with `given_masks` gets, for each weight, its keep-mask from `given_masks` (by parameter
    name, in the parameter's layout, as `keep_masks` returns them; a weight without one is kept whole). Each input
    group is decided by `method` (masks, and updated weights for reconstruction), then applied.
    With `keep_masks`, returns the keep-mask of every targeted weight by its parameter name (`<block prefix>.<i>.
    self_attn.q_proj.weight`), boolean, in the parameter's layout and on its device: the form
    `prunekit.training.Masks` takes. A block left dense (sparsity 0) has all-True masks. Otherwise returns {}.
    """
    blocks = adapter.block_list(model)
    prefix = adapter.block_prefix(model)
    patterns = [pattern] * len(blocks) if isinstance(pattern, Pattern) else list(pattern)
    if len(patterns) != len(blocks):
        raise PrunekitError(f"got {len(patterns)} patterns for {len(blocks)} blocks; give one, or one per block")
    calibrated = method.statistics in ("norms", "hessian")
    if method.statistics == "gradients" and gradients is None:
        raise PrunekitError(f"method '{method.name}' scores with gradients of the calibration loss; pass "
                            "gradients=calibration_gradients(...)")
    masks: dict[str, torch.Tensor] = {}
    label = str(pattern) if isinstance(pattern, Pattern) else "N:M per block"
    store = block_weights(model)
    bar = tqdm(blocks, desc=f"{method.name} {label}", unit="block", disable=not progress)
    for index, block in enumerate(bar):
        home = next(block.parameters()).device
        home = torch.device("cpu") if home.type == "meta" else home  # where the masks go
        store.enter(index, block, device)
        changed = False
        try:
            groups = InputGroups(adapter, block, hessian=method.statistics == "hessian", device=device)
            # sparsity 0 is a no-op: SparseGPT would otherwise still zero the weights of inputs that never fire
            active = patterns[index].is_nm or sparsities[index] > 0
            if calibrated and active and not options.true_sequential:
                groups.calibrate(block, index, inputs, device)
            decided: dict[str, torch.Tensor] = {}
            for ordinal, group in enumerate(groups.groups if active else ()):
                if calibrated and options.true_sequential:  # on the outputs of the groups pruned before it
                    groups.calibrate(block, index, inputs, device, only=group)
                modules = [groups.projections[name] for name in group]
                generator = torch.Generator(device=device).manual_seed(
                    options.seed * 1_000_003 + index * 1009 + ordinal)
                if method.statistics == "gradients":  # one gradient per weight, [out, in] like the weight
                    stats = [_parameter_layout(m, gradients[f"{prefix}.{index}.{n}.weight"]).to(device)
                             for n, m in zip(group, modules, strict=True)]
                else:
                    stats = groups.stats[group] if calibrated else None
                weights = [projection_weight(m) for m in modules]
                extra = {}
                if method.given_masks:
                    extra["masks"] = [_given_mask(given_masks, f"{prefix}.{index}.{n}.weight", m, w, device)
                                      for n, m, w in zip(group, modules, weights, strict=True)]
                decision = method.prune_group(weights, stats, sparsities[index], patterns[index], options, generator,
                                              **extra)
                for name, module, pruned, keep in zip(group, modules, decision.pruned(weights), decision.masks,
                                                      strict=True):
                    set_projection_weight(module, pruned)
                    decided[name] = keep
                changed = True
            if calibrated and index + 1 < len(blocks):
                inputs = run_block(block, index, inputs, device)
                for i, item in enumerate(inputs):
                    _check_finite(item.hidden, f"leaving block {index} (calibration batch {i})")
            if keep_masks:
                for name, module in groups.projections.items():
                    keep = decided.get(name)
                    masks[f"{prefix}.{index}.{name}.weight"] = (
                        torch.ones(module.weight.shape, dtype=torch.bool, device=home) if keep is None
                        else _parameter_layout(module, keep).to(home))
        finally:
            store.leave(index, block, changed=changed)
    return masks
