"""`prune_structure`: score coupled groups, select them under a parameter budget, remove or mask them, measure."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from prunekit.adapters import Adapter
from prunekit.allocation import check_allocation
from prunekit.errors import PrunekitError
from prunekit.inputs import calibration_set, check_lengths, evaluation_set, model_card
from prunekit.measure import ResourceMonitor, parameter_counts, perplexity, result_record
from prunekit.names import STRUCTURE_ALLOCATIONS, STRUCTURE_METHODS
from prunekit.structure import scores as S
from prunekit.structure.groups import BlockLayout, block_layouts, head_channels, roles, structure_adapter
from prunekit.structure.remove import (
    BlockPlan,
    add_bias_flags,
    apply_plan,
    block_widths,
    config_mismatch,
    missing_bias_parameters,
    removed_indices,
    resize_to_widths,
)
from prunekit.structure.select import (
    UNIT_KINDS,
    Floors,
    global_counts,
    kept_indices,
    removable,
    uniform_counts,
)

MODES = ("remove", "mask")


def check_structure_options(method: str, remove: float, allocation: str = "uniform", mode: str = "remove",
                            round_to: int | None = None, min_keep: float = 0.1,
                            units: tuple[str, ...] = UNIT_KINDS, bias_compensation: bool | None = None) -> None:
    """Validate the model-independent options of `prune_structure`, so that callers can fail before loading."""
    if method not in STRUCTURE_METHODS:
        raise PrunekitError(f"structured method {method!r} is unknown; choose one of {', '.join(STRUCTURE_METHODS)}")
    if isinstance(remove, bool) or not isinstance(remove, int | float) or not 0 < remove < 1:
        raise PrunekitError(f"remove={remove!r} must be a fraction of the model's parameters in (0, 1)")
    check_allocation(allocation, STRUCTURE_ALLOCATIONS, "structured pruning")
    if mode not in MODES:
        raise PrunekitError(f"mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise PrunekitError(f"round_to={round_to!r} must be an integer >= 1 (or None)")
    if not 0 < min_keep <= 1:
        raise PrunekitError(f"min_keep={min_keep!r} must be the fraction of each block's units kept, in (0, 1]")
    if not units or any(u not in UNIT_KINDS for u in units) or len(set(units)) != len(units):
        raise PrunekitError(f"units={units!r} must name some of {', '.join(UNIT_KINDS)}, each once")
    if bias_compensation and method not in S.CALIBRATED:
        raise PrunekitError(f"bias compensation needs calibration statistics, which {method!r} does not gather; "
                            f"use one of {', '.join(S.CALIBRATED)}")


def _check_head_norms(model: nn.Module, adapter: Adapter, layouts: list[BlockLayout]) -> None:
    """Refuse head removal where a block norm spans all heads (OLMo 2's query/key norms): its RMS over the kept
    heads differs from the one over all heads, so removing heads, even all-zero ones, would change the others."""
    block = adapter.block_list(model)[0]
    for name in adapter.norms:
        weight = getattr(block.get_submodule(name), "weight", None)
        if name.startswith(adapter.attention[0].rpartition(".")[0] + ".") and weight is not None \
                and weight.numel() != layouts[0].head_dim:
            raise PrunekitError(f"'{name}' normalises across all heads ({weight.numel()} features) in "
                                f"{type(model).__name__}, so heads cannot be removed; use units=('neurons',)")


def _compensated_kinds(model: nn.Module, adapter: Adapter, units: tuple[str, ...],
                       requested: bool | None) -> set[str]:
    """The roles ('attention', 'mlp') whose config can hold an output bias, among those being pruned."""
    flags = dict(adapter.bias_flags)
    pruned = {"heads": "attention", "neurons": "mlp"}
    wanted = {pruned[u] for u in units}
    able = {kind for kind in wanted if kind in flags and hasattr(model.config, flags[kind])}
    if requested and able != wanted:
        missing = sorted(wanted - able)
        raise PrunekitError(f"{type(model.config).__name__} has no config flag for {', '.join(missing)} biases, so "
                            "compensation could not be saved; pass bias_compensation=False or units without them")
    return able if requested is not False else set()


def collect_stats(model: nn.Module, adapter: Adapter, layouts: list[BlockLayout], token_ids: torch.Tensor,
                  batch_size: int) -> list[tuple[S.ChannelStats, S.ChannelStats]]:
    """Statistics of the inputs of o and down in every block, on the dense model, one block at a time through the
    sequential engine (each block replayed with its own forward arguments)."""
    from prunekit.weights.engine import capture_block_inputs, run_block

    r = roles(adapter)
    blocks = adapter.block_list(model)
    device = next(model.parameters()).device
    inputs = capture_block_inputs(model, blocks, token_ids, batch_size=batch_size, device=device,
                                  activation_device=device)
    result = []
    for index, (block, lay) in enumerate(zip(blocks, layouts, strict=True)):
        heads = lay.kv_heads * lay.group_size
        o_stats = S.ChannelStats(heads * lay.head_dim, heads)
        down_stats = S.ChannelStats(lay.neurons)
        handles = [block.get_submodule(r.o).register_forward_pre_hook(lambda m, a, s=o_stats: s.add(a[0])),
                   block.get_submodule(r.mlp_out).register_forward_pre_hook(lambda m, a, s=down_stats: s.add(a[0]))]
        try:
            inputs = run_block(block, index, inputs, device)
        finally:
            for handle in handles:
                handle.remove()
        result.append((o_stats, down_stats))
    return result


def block_scores(method: str, model: nn.Module, adapter: Adapter, layouts: list[BlockLayout],
                 stats: list | None, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(KV-group scores, neuron scores) of every block by `method`."""
    r = roles(adapter)
    generator = torch.Generator().manual_seed(seed)
    result = []
    for index, (block, lay) in enumerate(zip(adapter.block_list(model), layouts, strict=True)):
        weight = lambda name: block.get_submodule(name).weight.data.cpu()  # noqa: B023, E731
        if method in ("l1", "l2"):
            result.append(S.group_norm_scores(weight(r.q), weight(r.k), weight(r.v), weight(r.o),
                                              [weight(n) for n in r.mlp_in], weight(r.mlp_out), lay,
                                              p=1 if method == "l1" else 2))
        elif method == "random":
            result.append(S.random_scores(lay, generator))
        elif method == "activation":
            result.append(S.activation_scores(*stats[index], lay))
        elif method == "wanda-sp":
            result.append(S.wanda_sp_scores(weight(r.o), weight(r.mlp_out), *stats[index], lay))
        else:
            result.append(S.flap_scores(weight(r.o), weight(r.mlp_out), *stats[index], lay))
    return result


def _bias_deltas(model: nn.Module, adapter: Adapter, layouts: list[BlockLayout], plans: list[BlockPlan],
                 stats: list, kinds: set[str]) -> None:
    """FLAP's bias compensation (An et al. 2024, Sec. 3.3): the removed channels' mean contribution W[:, removed] ·
    mean(X[:, removed]) over calibration tokens moves into the output projection's bias."""
    r = roles(adapter)
    for block, lay, plan, (o_stats, down_stats) in zip(adapter.block_list(model), layouts, plans, stats,
                                                       strict=True):
        if "attention" in kinds:
            gone, _ = head_channels(removed_indices(plan.kept_heads, lay.kv_heads), lay)
            if len(gone):
                w = block.get_submodule(r.o).weight.data.cpu().double()
                plan.bias_delta["attention"] = w[:, gone] @ o_stats.mean[gone]
        if "mlp" in kinds:
            gone = removed_indices(plan.kept_neurons, lay.neurons)
            if len(gone):
                w = block.get_submodule(r.mlp_out).weight.data.cpu().double()
                plan.bias_delta["mlp"] = w[:, gone] @ down_stats.mean[gone]


def prune_structure(
    model: nn.Module,
    tokenizer=None,
    *,
    method: str = "flap",
    remove: float,
    allocation: str = "uniform",
    units: tuple[str, ...] = UNIT_KINDS,
    round_to: int | None = None,
    min_keep: float = 0.1,
    mode: str = "remove",
    bias_compensation: bool | None = None,
    calibration="wiki-summaries",
    calibration_samples: int = 32,
    calibration_seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    evaluation=None,
    eval_seq_len: int = 512,
    eval_windows: int | None = 64,
    progress: bool = True,
    model_source: str | None = None,
) -> dict | tuple[dict, dict[str, torch.Tensor]]:
    """Remove whole attention KV groups and MLP neurons of a Hugging Face decoder in place; return the record.

    method: l1, l2 (group norms), random (baseline), activation (Minitron), wanda-sp, flap (fluctuation).
    remove: the fraction of the model's parameters (all of them, embeddings included) to remove, in (0, 1).
    allocation: 'uniform' (every block loses the same fraction of its KV groups and neurons) or 'global' (one
        ranking of all blocks' units, scores standardised per kind across layers as in FLAP).
    units: which kinds go: ('heads', 'neurons') or one of them. A KV group is removed with all its query heads.
    round_to: kept neuron counts are multiples of it (it must divide every block's neuron count).
    min_keep: every block keeps at least this fraction of each kind (at least one KV group and `round_to` neurons).
    mode: 'remove' shrinks the tensors (and rewrites the config when every block has the same widths; otherwise
        `prunekit.save` refuses the model, whose widths a config cannot state); 'mask' zeros the same units and
        returns `(record, masks)`, masks being keep-masks per projection weight for `prunekit.training.Masks`.
    bias_compensation: FLAP's (default for flap, where the config has the flag that keeps the added bias:
        Llama and SmolLM3 both kinds, Gemma, Qwen3, OLMo attention only); True insists, False never.
    calibration: as in `prunekit.prune`, for the calibrated methods and compensation.
    evaluation: if given, dense and pruned perplexity are measured on it (as in `prunekit.prune`).

    Every option, and whether the budget is possible, is checked before the model changes.
    """

    units = tuple(units)
    check_structure_options(method, remove, allocation, mode, round_to, min_keep, units, bias_compensation)
    adapter = structure_adapter(model)
    layouts = block_layouts(model, adapter)
    step = round_to or 1
    for index, lay in enumerate(layouts):
        if lay.neurons % step:
            raise PrunekitError(f"round_to={round_to} does not divide block {index}'s {lay.neurons} MLP neurons; "
                                "use a divisor of it")
    if "heads" in units:
        _check_head_norms(model, adapter, layouts)
    floors = [Floors.of(lay, min_keep, step, units) for lay in layouts]
    if bias_compensation is None and method != "flap":
        bias_compensation = False
    kinds = _compensated_kinds(model, adapter, units, bias_compensation)
    before = parameter_counts(model)["total"]
    target = round(before * remove)
    # compensation gives every projection of its kinds a bias; those parameters are paid for by removing more units
    added = missing_bias_parameters(model, adapter, kinds)
    most = removable(layouts, floors)
    if target + added > most:
        raise PrunekitError(f"remove={remove} asks for {target} of {before} parameters (+{added} compensation "
                            f"biases), but at most {most} ({most / before:.1%}) are removable with units={units} "
                            f"and min_keep={min_keep}")
    calibrated = method in S.CALIBRATED
    check_lengths(model, calibration_seq_len=calibration_seq_len if calibrated and not isinstance(
        calibration, torch.Tensor) else None, eval_seq_len=None if evaluation is None or isinstance(
        evaluation, torch.Tensor) else eval_seq_len, batch_size=batch_size)
    calib = None
    if calibrated:
        calib = calibration_set(model, tokenizer, calibration, samples=calibration_samples,
                                seq_len=calibration_seq_len, seed=seed)
    card = model_card(model, model_source)
    device = next(model.parameters()).device
    metrics: dict = {}
    eval_tokens = None
    if evaluation is not None:
        eval_tokens = evaluation_set(tokenizer, evaluation, seq_len=eval_seq_len, windows=eval_windows)
        metrics["dense"] = perplexity(model, eval_tokens.ids, batch_size=4, device=device, progress=progress)

    was_training = model.training
    model.eval()
    try:
        with ResourceMonitor() as monitor:
            stats = collect_stats(model, adapter, layouts, calib.ids, batch_size) if calibrated else None
            if kinds:  # zero biases change no output; the units' costs now include them
                add_bias_flags(model, adapter, kinds)
                layouts = block_layouts(model, adapter)
            scores = block_scores(method, model, adapter, layouts, stats, seed)
            if allocation == "uniform":
                counts = uniform_counts(layouts, floors, target + added, units, step)
            else:
                heads = S.standardize([h for h, _ in scores])
                neurons = S.standardize([n for _, n in scores])
                counts = global_counts(list(zip(heads, neurons, strict=True)), layouts, floors, target + added,
                                       step)
            plans = [BlockPlan(kept_indices(h, kh), kept_indices(n, kn))
                     for (h, n), (kh, kn) in zip(scores, counts, strict=True)]
            if kinds:
                _bias_deltas(model, adapter, layouts, plans, stats, kinds)
            masks = apply_plan(model, adapter, layouts, plans, remove=mode == "remove")
    finally:
        model.train(was_training)

    removed = sum((lay.kv_heads - kh) * lay.head_cost + (lay.neurons - kn) * lay.neuron_cost
                  for lay, (kh, kn) in zip(layouts, counts, strict=True)) - added
    after = parameter_counts(model)
    metrics["removed_fraction"] = {"target": remove, "achieved": removed / before}
    metrics["parameters"] = {
        "before": before, "after": after["total"], "nonzero_after": after["nonzero"],
        "removed": removed, "target_removed": target, "compensation_biases_added": added,
    }
    metrics["widths"] = [{"kv_heads": kh, "heads": kh * lay.group_size, "neurons": kn}
                         for lay, (kh, kn) in zip(layouts, counts, strict=True)]
    if mode == "remove":
        metrics["config_matches_tensors"] = config_mismatch(model, adapter) is None
    if eval_tokens is not None:
        metrics["pruned"] = perplexity(model, eval_tokens.ids, batch_size=4, device=device, progress=progress)
    method_card = {"name": method, "object": "structure", "remove": remove, "allocation": allocation,
                   "units": list(units), "round_to": round_to, "min_keep": min_keep, "mode": mode,
                   "bias_compensation": sorted(kinds), "seed": seed, "batch_size": batch_size}
    record = result_record(model=card, method=method_card, calibration=calib.info if calib else None,
                           evaluation=eval_tokens.info if eval_tokens else None, metrics=metrics,
                           resources={"prune": monitor.as_dict(), "device": str(device),
                                      "threads": torch.get_num_threads()})
    return (record, masks) if mode == "mask" else record


def saved_widths(model: nn.Module) -> list[dict[str, int]] | None:
    """The per-block widths that a saved model's manifest must state, or None when its config states them (a
    model that was not structurally pruned, or pruned to the same widths in every block)."""
    from prunekit.adapters import find_adapter

    adapter = None
    with contextlib.suppress(PrunekitError):  # a model prunekit cannot read is saved as it is
        adapter = find_adapter(model)
    if adapter is None or adapter.intermediate is None or config_mismatch(model, adapter) is None:
        return None
    return block_widths(model, adapter)


def load_widths(model: nn.Module, widths: list[dict[str, int]]) -> None:
    """Shape a model built from its config to the per-block `widths` of a manifest, before its weights load."""
    from prunekit.adapters import adapter_for

    adapter = adapter_for(model)
    if adapter.intermediate is None:
        raise PrunekitError(f"the manifest states per-block widths, but {adapter.family} models have no "
                            "structured-pruning roles")
    resize_to_widths(model, adapter, widths)
