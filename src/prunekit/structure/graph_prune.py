"""`prune_graph`: structured pruning of any traceable PyTorch model (CNNs first) through its dependency graph.

Score every unit of every coupled group (`prunekit.structure.graph`), choose which units go under a budget in
parameters (or MACs), then remove them from every member tensor in place, or zero them and return keep-masks.
Budgets are met on exact counts: removing a channel from a conv and from its consumer shares entries, so the
removed parameters of a selection are recounted from the kept sizes, never summed per unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.allocation import check_allocation
from prunekit.errors import PrunekitError
from prunekit.inputs import model_card
from prunekit.measure import ResourceMonitor, parameter_counts, result_record
from prunekit.measure.speed import count_macs
from prunekit.structure.graph import CONVOLUTIONS, TRANSPOSED_CONVOLUTIONS, DependencyGraph, Group
from prunekit.structure.select import check_selection_options
from prunekit.targets import target_weights

GRAPH_METHODS = ("l1", "l2", "bn-scale", "taylor", "activation", "random")
GRAPH_ALLOCATIONS = ("uniform", "global")
CALIBRATED = ("taylor", "activation")
ALL_CONVOLUTIONS = CONVOLUTIONS + TRANSPOSED_CONVOLUTIONS
WEIGHTED = ALL_CONVOLUTIONS + (nn.Linear,)  # the layers whose MACs the weight's size decides
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _check_options(method: str, remove, remove_macs, allocation: str, round_to, min_keep: float,
                   mode: str) -> tuple[str, float]:
    if method not in GRAPH_METHODS:
        raise PrunekitError(f"structured method {method!r} is unknown for graph pruning; choose one of "
                            f"{', '.join(GRAPH_METHODS)}")
    if (remove is None) == (remove_macs is None):
        raise PrunekitError("give exactly one budget: remove= (fraction of parameters) or remove_macs= (fraction "
                            "of multiply-accumulates)")
    kind, value = ("parameters", remove) if remove is not None else ("macs", remove_macs)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        name = "remove" if kind == "parameters" else "remove_macs"
        raise PrunekitError(f"{name}={value!r} must be a fraction of the model's {kind} in (0, 1)")
    check_allocation(allocation, GRAPH_ALLOCATIONS, "graph pruning")
    check_selection_options(mode, round_to, min_keep, "each group's channels")
    return kind, float(value)


def _batches(calibration, example_inputs) -> list[tuple[tuple, torch.Tensor | None]]:
    """(positional inputs, labels or None) per calibration batch. A batch is a tensor, a tuple of positional
    inputs, or a dict {'inputs': ..., 'labels': ...}; None uses the example inputs."""
    items = [example_inputs] if calibration is None else (
        [calibration] if isinstance(calibration, torch.Tensor | dict) else list(calibration))
    if not items:
        raise PrunekitError("calibration is empty; pass a tensor or a list of input batches")
    result = []
    for item in items:
        labels = None
        if isinstance(item, dict):
            if "inputs" not in item:
                raise PrunekitError(f"a calibration batch given as a dict needs 'inputs' (and optionally 'labels'); "
                                    f"got keys {sorted(item)}")
            item, labels = item["inputs"], item.get("labels")
        result.append(((item,) if isinstance(item, torch.Tensor) else tuple(item), labels))
    return result


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise PrunekitError(f"the default Taylor loss needs a tensor output (or a tuple starting with one), got "
                        f"{type(output).__name__}; pass loss_fn=")


def default_loss(output, labels: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the (first) output against `labels`, or against its own argmax when there are none."""
    logits = _logits(output)
    logits = logits.reshape(-1, logits.shape[-1])
    target = logits.argmax(-1) if labels is None else labels.reshape(-1)
    return nn.functional.cross_entropy(logits, target)


class _Plan:
    """The graph's units as arrays: which positions of which tensor each unit owns, and what removing costs."""

    def __init__(self, model: nn.Module, graph: DependencyGraph):
        self.model, self.graph = model, graph
        self.unit_maps: dict[str, dict[int, np.ndarray]] = {}
        for group in graph.groups:
            for m in group.members:
                full = self.unit_maps.setdefault(m.name, {}).setdefault(m.dim, np.full(m.size, -1, dtype=np.int64))
                full[m.positions] = m.units
        self.parameters = dict(model.named_parameters())
        self.shapes = {name: tuple(self.parameters[name].shape) for name in self.unit_maps if name in self.parameters}

    def numels(self, removed: np.ndarray) -> dict[str, int]:
        """Parameter entries of every member parameter once the `removed` units are gone."""
        result = {}
        for name, shape in self.shapes.items():
            sizes = list(shape)
            for dim, units in self.unit_maps[name].items():
                sizes[dim] -= int(removed[units].sum())
            result[name] = math.prod(sizes)
        return result

    def keep(self, removed: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
        return {name: {dim: np.flatnonzero(~removed[units]) for dim, units in dims.items()
                       if removed[units].any()}
                for name, dims in self.unit_maps.items()}


def _module_positions(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """For every conv and linear weight, the output positions it is applied at in one forward pass: its MACs are
    positions × weight entries (also for grouped convs), so they scale with the weight's kept entries."""
    positions: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED) and isinstance(module.weight, nn.Parameter):
            def hook(m, args, out, key=f"{name}.weight" if name else "weight"):
                if isinstance(m, TRANSPOSED_CONVOLUTIONS):
                    positions[key] = positions.get(key, 0) + args[0].numel() // m.in_channels
                elif isinstance(m, nn.Linear):
                    positions[key] = positions.get(key, 0) + out.numel() // m.out_features
                else:
                    positions[key] = positions.get(key, 0) + out.numel() // m.out_channels
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return positions


# ---- scorers: one score per unit, higher = more important; inf = not scored, never removed ------------------

def _along(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The sum of `values` over every dimension but `dim` (`sum([])` would sum everything)."""
    other = [d for d in range(values.dim()) if d != dim]
    return values.sum(other) if other else values


def _norm_scores(plan: _Plan, p: int) -> np.ndarray:
    """Group norm (Li et al. 2017 for L1): the norm of all the unit's slices across every member parameter."""
    scores = np.zeros(plan.graph.unit_count)
    for name, dims in plan.unit_maps.items():
        if name not in plan.parameters:
            continue
        weight = plan.parameters[name].detach().double()
        for dim, units in dims.items():
            np.add.at(scores, units, _along(weight.abs() if p == 1 else weight.pow(2), dim).cpu().numpy())
    return scores if p == 1 else np.sqrt(scores)


def _bn_scale_scores(plan: _Plan) -> np.ndarray:
    """Network slimming (Liu et al. 2017): |gamma| of the norm layers; units without one are not scored."""
    scores = np.full(plan.graph.unit_count, np.inf)
    seen = np.zeros(plan.graph.unit_count, dtype=bool)
    total = np.zeros(plan.graph.unit_count)
    for name, module in plan.model.named_modules():
        if isinstance(module, NORMS[:2]) and module.weight is not None:
            key = f"{name}.weight" if name else "weight"
            units = plan.unit_maps.get(key, {}).get(0)
            if units is not None:
                np.add.at(total, units, module.weight.detach().abs().double().cpu().numpy())
                seen[units] = True
    scores[seen] = total[seen]
    return scores


def _taylor_scores(plan: _Plan, batches, loss_fn, progress: bool) -> np.ndarray:
    """First-order Taylor (Molchanov et al. 2019): sum over the unit's weights of |w · dL/dw|, gradients summed
    over the calibration batches. Gradients come from `torch.autograd.grad`, so no `.grad` is left behind."""
    names = [n for n in plan.unit_maps if n in plan.parameters]
    params = [plan.parameters[n] for n in names]
    flags = [p.requires_grad for p in params]
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for inputs, labels in tqdm(batches, desc="taylor", disable=not progress):
                loss = loss_fn(plan.model(*inputs), labels)
                for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                    if g is not None:
                        acc += g.double()
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    scores = np.zeros(plan.graph.unit_count)
    for name, p, g in zip(names, params, grads, strict=True):
        saliency = (p.detach().double() * g).abs()
        for dim, units in plan.unit_maps[name].items():
            np.add.at(scores, units, _along(saliency, dim).cpu().numpy())
    return scores


def _activation_scores(plan: _Plan, batches, progress: bool) -> np.ndarray:
    """Mean |activation| of every unit's channels over the calibration batches (Minitron's activation norm),
    measured after the unit's normalisation layers where it has any, else at its conv and linear outputs: a
    channel's raw conv output says nothing about its size after BatchNorm, and a channel BatchNorm turns into a
    constant (gamma near 0, large beta) still feeds the next layer."""
    kinds = {"norm": (np.zeros(plan.graph.unit_count), np.zeros(plan.graph.unit_count, dtype=bool)),
             "producer": (np.zeros(plan.graph.unit_count), np.zeros(plan.graph.unit_count, dtype=bool))}
    handles = []
    for name, module in plan.model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, NORMS) and module.weight is not None:
            kind, units = "norm", plan.unit_maps.get(prefix + "weight", {}).get(0)
            channel = -1 if isinstance(module, nn.LayerNorm) else 1
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                continue
        elif isinstance(module, WEIGHTED):
            kind = "producer"
            units = plan.unit_maps.get(prefix + "weight", {}).get(
                1 if isinstance(module, TRANSPOSED_CONVOLUTIONS) else 0)
            if units is None and module.bias is not None:
                units = plan.unit_maps.get(prefix + "bias", {}).get(0)
            channel = -1 if isinstance(module, nn.Linear) else 1
        else:
            continue
        if units is None:
            continue

        def hook(m, args, out, units=units, channel=channel, kind=kind):
            values = out.detach().abs().double().movedim(channel, -1).reshape(-1, out.shape[channel]).mean(0)
            total, seen = kinds[kind]
            np.add.at(total, units, values.cpu().numpy() / len(batches))
            seen[units] = True
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for inputs, _ in tqdm(batches, desc="activation", disable=not progress):
                plan.model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    (norm, normed), (produced, made) = kinds["norm"], kinds["producer"]
    return np.where(normed, norm, np.where(made, produced, np.inf))


# ---- selection ---------------------------------------------------------------------------------------------

class _Choices:
    """Per prunable group: its candidates by ascending score, the most it may lose, and the rounding step."""

    def __init__(self, groups: list[Group], scores: np.ndarray, min_keep: float, round_to: int | None):
        self.step = round_to or 1
        self.groups: list[tuple[Group, np.ndarray, int]] = []
        for group in groups:
            candidates = group.units[~group.pinned & np.isfinite(scores[group.units])]
            if not len(candidates):
                continue
            n = len(group.units)
            if n % self.step:
                raise PrunekitError(f"round_to={round_to} does not divide group {group.index}'s {n} units "
                                    f"({group.members[0].name}); use a divisor of every prunable width")
            floor = max(self.step, math.ceil(min_keep * n / self.step) * self.step)
            most = (min(len(candidates), n - floor) // self.step) * self.step
            if most <= 0:
                continue
            order = np.lexsort((candidates, scores[candidates]))
            self.groups.append((group, candidates[order], most))
        self.scores = scores

    def uniform(self, fraction: float, removed: np.ndarray) -> np.ndarray:
        """Every group loses the same fraction of its channels (to the nearest step, within its floor)."""
        removed[:] = False
        for group, ordered, most in self.groups:
            count = min(most, self.step * math.floor(fraction * len(group.units) / self.step + 0.5))
            removed[ordered[:count]] = True
        return removed

    def global_order(self) -> tuple[np.ndarray, np.ndarray]:
        """All removable candidates in one ranking by score / mean score of their group (scale-free across
        layers), with the group each belongs to."""
        values, owners, units = [], [], []
        for k, (_, ordered, most) in enumerate(self.groups):
            s = self.scores[ordered]
            mean = float(s.mean())
            values.append(s[:most] / (mean if mean > 0 else 1.0))
            owners.append(np.full(most, k))
            units.append(ordered[:most])
        values, owners, units = np.concatenate(values), np.concatenate(owners), np.concatenate(units)
        order = np.lexsort((units, values))
        return units[order], owners[order]

    def prefix(self, units: np.ndarray, owners: np.ndarray, k: int, removed: np.ndarray) -> np.ndarray:
        """The first `k` of the global ranking, each group's count rounded down to the step."""
        removed[:] = False
        counts = np.bincount(owners[:k], minlength=len(self.groups))
        for g, (_, ordered, _) in enumerate(self.groups):
            removed[ordered[:(counts[g] // self.step) * self.step]] = True
        return removed


def _closest(measure: Callable[[float], float], target: float, lo: float, hi: float, integer: bool) -> float:
    """Bisect a non-decreasing step function for the argument whose value lands closest to `target`."""
    for _ in range(64 if integer else 48):
        if (hi - lo <= 1) if integer else (hi - lo < 1e-9):
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        if measure(mid) >= target:
            hi = mid
        else:
            lo = mid
    return lo if abs(measure(lo) - target) <= abs(measure(hi) - target) else hi


def _choose(choices: _Choices, allocation: str, cost: Callable[[np.ndarray], float], target: float,
            units: int) -> tuple[np.ndarray | None, float]:
    """(the removed units whose cost lands closest to `target`, or None if even the most removable falls short;
    that most). Uniform searches the common fraction, global the length of the ranking's prefix."""
    removed = np.zeros(units, dtype=bool)
    if not choices.groups:
        return None, 0.0
    if allocation == "uniform":
        def select(x: float) -> np.ndarray:
            return choices.uniform(x, removed)
        top: float = 1.0
    else:
        ranked, owners = choices.global_order()

        def select(x: float) -> np.ndarray:
            return choices.prefix(ranked, owners, int(x), removed)
        top = len(ranked)
    most = cost(select(top))
    if most < target:
        return None, most
    select(_closest(lambda x: cost(select(x)), target, 0, top, integer=allocation == "global"))
    return removed, most


# ---- applying ----------------------------------------------------------------------------------------------

def _module_attributes(model: nn.Module) -> dict[str, tuple]:
    return {name: (m.in_channels, m.out_channels, m.groups) if isinstance(m, ALL_CONVOLUTIONS) else
            (m.num_channels, m.num_groups) if isinstance(m, nn.GroupNorm) else ()
            for name, m in model.named_modules()}


def _sync_attributes(module: nn.Module, before: tuple) -> None:
    """Make a module's size attributes agree with its (new) tensors."""
    if isinstance(module, CONVOLUTIONS):
        in_channels, out_channels, groups = before
        out = module.weight.shape[0]
        module.groups = groups if groups == 1 else out // (out_channels // groups)
        module.out_channels = out
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, TRANSPOSED_CONVOLUTIONS):
        in_channels, out_channels, groups = before
        module.groups = groups if groups == 1 else module.weight.shape[0] // (in_channels // groups)
        module.in_channels = module.weight.shape[0]
        module.out_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.GroupNorm):
        channels, groups = before
        module.num_channels = module.weight.shape[0]
        module.num_groups = module.num_channels // (channels // groups)
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]


def _apply(model: nn.Module, keep: dict[str, dict[int, np.ndarray]], remove: bool) -> dict[str, torch.Tensor]:
    """Remove (or zero) every kept-out slice; return keep-masks of the conv and linear weights that changed."""
    attributes = _module_attributes(model)
    targets = set(target_weights(model))
    masks: dict[str, torch.Tensor] = {}
    touched: dict[str, nn.Module] = {}
    with torch.no_grad():
        for name, dims in keep.items():
            if not dims:
                continue
            path, _, attr = name.rpartition(".")
            module = model.get_submodule(path)
            tensor = getattr(module, attr)
            if remove:
                data = tensor.data
                for dim, kept in dims.items():
                    data = data.index_select(dim, torch.as_tensor(kept, device=data.device))
                if attr in module._parameters:
                    module._parameters[attr] = nn.Parameter(data.clone(), requires_grad=tensor.requires_grad)
                else:
                    module._buffers[attr] = data.clone()
                touched[path] = module
                continue
            mask = torch.ones_like(tensor, dtype=torch.bool)
            for dim, kept in dims.items():
                gone = np.setdiff1d(np.arange(tensor.shape[dim]), kept)
                mask.index_fill_(dim, torch.as_tensor(gone, device=mask.device), False)
            # running_var stays: with the BN's weight, bias and running_mean at zero the channel is exactly zero
            if attr != "running_var":
                tensor.mul_(mask)
            if name in targets:
                masks[name] = mask
    for path, module in touched.items():
        _sync_attributes(module, attributes[path])
    return masks


def prune_graph(
    model: nn.Module,
    example_inputs,
    *,
    method: str = "l2",
    remove: float | None = None,
    remove_macs: float | None = None,
    ignore: Iterable[nn.Module | str] = (),
    allocation: str = "uniform",
    round_to: int | None = None,
    min_keep: float = 0.1,
    mode: str = "remove",
    calibration=None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Remove coupled channels of any torch.fx-traceable model in place; return (record, masks or None).

    example_inputs: a tensor or a tuple of positional inputs, used to trace the model and count MACs.
    method: l1, l2 (group norms over every member's slices), bn-scale (|gamma|, network slimming; groups without
        a norm layer are kept), taylor (|w · grad| on calibration), activation (mean |output| of the producers on
        calibration), random (baseline).
    remove / remove_macs: the fraction of the model's parameters, or of its MACs on `example_inputs`, to remove.
    ignore: modules (or module names) whose parameters must not shrink.
    allocation: 'uniform' (every group loses the same fraction of its channels, the fraction searched until the
        budget is met) or 'global' (one ranking of scores normalised by their group's mean).
    round_to: every group keeps a multiple of this many units (it must divide every prunable group's count); a
        unit is a channel, or a whole group of a grouped convolution or GroupNorm.
    min_keep: every group keeps at least this fraction of its units.
    mode: 'remove' shrinks the tensors and module attributes; 'mask' zeros the same slices (BatchNorm weight, bias
        and running mean included, so outputs equal the removed model's) and returns keep-masks of the conv and
        linear weights for `prunekit.training.Masks`.
    calibration: a tensor, or a list of batches (tensors, tuples of inputs, or {'inputs':, 'labels':} dicts) for
        taylor and activation; default the example inputs.
    loss_fn: `(output, labels or None) -> loss` for taylor; default cross-entropy against labels, or against the
        output's own argmax.

    Every option and the budget are checked before the model changes; the graph's errors name the operation.
    """
    kind, value = _check_options(method, remove, remove_macs, allocation, round_to, min_keep, mode)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    graph = DependencyGraph(model, inputs, ignore=ignore)
    ignore = graph.ignored
    if not any(g.prunable for g in graph.groups):
        raise PrunekitError(f"nothing in {type(model).__name__} is prunable: every group touches an input, an "
                            f"output or an ignored module (ignore={ignore})")
    batches = _batches(calibration, inputs) if method in CALIBRATED else []
    plan = _Plan(model, graph)
    card = model_card(model, None)
    was_training = model.training
    model.eval()
    try:
        with ResourceMonitor() as monitor:
            before_params = parameter_counts(model)["total"]
            before_macs = count_macs(model, inputs)
            positions = _module_positions(model, inputs)
            dense = plan.numels(np.zeros(graph.unit_count, dtype=bool))

            def cost(removed: np.ndarray, what: str = kind) -> float:
                """Parameters (or MACs) the removal of `removed` takes away, from the kept sizes."""
                numels = plan.numels(removed)
                if what == "parameters":
                    return float(sum(dense[n] - numels[n] for n in numels))
                return float(sum(positions.get(n, 0) * (dense[n] - numels[n]) for n in numels))

            if method in ("l1", "l2"):
                scores = _norm_scores(plan, 1 if method == "l1" else 2)
            elif method == "bn-scale":
                scores = _bn_scale_scores(plan)
            elif method == "taylor":
                scores = _taylor_scores(plan, batches, loss_fn or default_loss, progress)
            elif method == "activation":
                scores = _activation_scores(plan, batches, progress)
            else:
                scores = torch.rand(graph.unit_count, generator=torch.Generator().manual_seed(seed),
                                    dtype=torch.float64).numpy()
            choices = _Choices(graph.groups, scores, min_keep, round_to)
            total = before_params if kind == "parameters" else before_macs
            target = value * total
            removed, most = _choose(choices, allocation, cost, target, graph.unit_count)
            if removed is None:
                raise PrunekitError(f"{'remove' if kind == 'parameters' else 'remove_macs'}={value} asks for "
                                    f"{target:.0f} of {total} {kind}, but at most {most:.0f} ({most / total:.1%}) "
                                    f"are removable with min_keep={min_keep}, round_to={round_to}, method={method} "
                                    f"and ignore={ignore}")
            keep = plan.keep(removed)
            macs_removed = cost(removed, "macs")  # the mask mode's estimate of what removal would save
            masks = _apply(model, keep, remove=mode == "remove")
    finally:
        model.train(was_training)

    after_params = parameter_counts(model)
    removed_params = before_params - after_params["total"] if mode == "remove" else \
        int(sum(dense[n] - m for n, m in plan.numels(removed).items()))
    metrics: dict = {"removed_fraction": {"target": remove, "achieved": removed_params / before_params}}
    after_macs = count_macs(model, inputs) if mode == "remove" else int(before_macs - macs_removed)
    metrics["macs_removed_fraction"] = {"target": remove_macs, "achieved": 1 - after_macs / before_macs}
    metrics["parameters"] = {"before": before_params, "after": before_params - removed_params,
                             "nonzero_after": after_params["nonzero"], "removed": removed_params}
    metrics["macs"] = {"before": before_macs, "after": after_macs,
                       "measured": mode == "remove"}  # in mask mode: what removal would leave
    metrics["groups"] = [{"group": g.index, "units": len(g.units), "kept": int((~removed[g.units]).sum()),
                          "first_member": g.members[0].name}
                         for g, _, _ in choices.groups]
    method_card = {"name": method, "object": "structure", "remove": remove, "remove_macs": remove_macs,
                   "allocation": allocation, "round_to": round_to, "min_keep": min_keep, "mode": mode,
                   "ignore": ignore, "seed": seed}
    calibration_card = {"batches": len(batches), "shapes": [[list(t.shape) for t in b if isinstance(
        t, torch.Tensor)] for b, _ in batches[:1]]} if batches else None
    record = result_record(model=card, method=method_card, calibration=calibration_card, evaluation=None,
                           metrics=metrics, resources={"prune": monitor.as_dict(), "threads": torch.get_num_threads(),
                                                       "device": str(next(model.parameters()).device)})
    return record, (masks if mode == "mask" else None)
