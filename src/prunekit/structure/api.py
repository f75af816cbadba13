"""`prune_structure`: score coupled groups, select them under a parameter budget, remove or mask them, measure."""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn

from prunekit.adapters import Adapter
from prunekit.allocation import check_allocation
from prunekit.errors import PrunekitError
from prunekit.inputs import (
    calibration_set,
    check_lengths,
    encoder_evaluation_set,
    evaluation_set,
    max_positions,
    model_card,
)
from prunekit.measure import ResourceMonitor, parameter_counts, perplexity, result_record
from prunekit.measure.speed import speed_record
from prunekit.names import STRUCTURE_ALLOCATIONS, STRUCTURE_METHODS
from prunekit.structure import scores as S
from prunekit.structure.groups import (
    BlockLayout,
    block_layout,
    block_layouts,
    head_channels,
    mac_layouts,
    roles,
    structure_adapter,
)
from prunekit.structure.reconstruct import Gram, obs_keep, refit
from prunekit.structure.remove import (
    BlockPlan,
    add_bias_flags,
    apply_block_plan,
    apply_plan,
    block_widths,
    config_mismatch,
    missing_bias_parameters,
    removed_indices,
    resize_to_widths,
    sync_config,
)
from prunekit.structure.select import (
    UNIT_KINDS,
    Floors,
    check_selection_options,
    global_counts,
    kept_indices,
    removable,
    uniform_counts,
)
from prunekit.weights.engine import refuse_offloaded


def check_structure_options(method: str, remove: float, allocation: str = "uniform", mode: str = "remove",
                            round_to: int | None = None, min_keep: float = 0.1,
                            units: tuple[str, ...] = UNIT_KINDS, bias_compensation: bool | None = None,
                            reconstruct: bool | None = None, remove_macs: float | None = None) -> None:
    """Validate the model-independent options of `prune_structure`, so that callers can fail before loading."""
    if method not in STRUCTURE_METHODS:
        raise PrunekitError(f"structured method {method!r} is unknown; choose one of {', '.join(STRUCTURE_METHODS)}")
    if (remove is None) == (remove_macs is None):
        raise PrunekitError(f"give exactly one budget: remove= (a fraction of the parameters) or remove_macs= (a "
                            f"fraction of the MACs); got remove={remove!r}, remove_macs={remove_macs!r}")
    name, value, of = (("remove", remove, "parameters") if remove is not None
                       else ("remove_macs", remove_macs, "MACs"))
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise PrunekitError(f"{name}={value!r} must be a fraction of the model's {of} in (0, 1)")
    check_allocation(allocation, STRUCTURE_ALLOCATIONS, "structured pruning")
    check_selection_options(mode, round_to, min_keep, "each block's units")
    if not units or any(u not in UNIT_KINDS for u in units) or len(set(units)) != len(units):
        raise PrunekitError(f"units={units!r} must name some of {', '.join(UNIT_KINDS)}, each once")
    if method == "obs" and reconstruct is False:
        raise PrunekitError("method 'obs' selects units by re-fitting the others, so it cannot run with "
                            "reconstruct=False; use another method")
    if method == "obs" and allocation != "uniform":
        raise PrunekitError("method 'obs' chooses units within each block; use allocation='uniform'")
    if reconstruct is not None and not isinstance(reconstruct, bool):
        raise PrunekitError(f"reconstruct={reconstruct!r} must be True, False or None (the method's default)")
    if bias_compensation and method not in S.CALIBRATED and not reconstruct:
        raise PrunekitError(f"bias compensation needs calibration statistics, which {method!r} does not gather; "
                            f"use one of {', '.join(S.CALIBRATED)}, or reconstruct=True")


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
    """The roles ('attention', 'mlp') whose config can hold an output bias, among those being pruned (every role
    whose projections all have biases already, as in BERT, can)."""
    flags = dict(adapter.bias_flags)
    pruned = {"heads": "attention", "neurons": "mlp"}
    wanted = {pruned[u] for u in units}
    able = {kind for kind in wanted if kind in flags and hasattr(model.config, flags[kind])
            or missing_bias_parameters(model, adapter, {kind}) == 0}
    if requested and able != wanted:
        missing = sorted(wanted - able)
        raise PrunekitError(f"{type(model.config).__name__} has no config flag for {', '.join(missing)} biases, so "
                            "compensation could not be saved; pass bias_compensation=False or units without them")
    return able if requested is not False else set()


def _observe(block: nn.Module, index: int, inputs: list, device: torch.device,
             observers: dict[str, tuple]) -> list:
    """Forward every batch through block `index`, each named module's input fed to its observers (objects with
    `add(x)`); return the block's outputs."""
    from prunekit.weights.engine import run_block

    def feed(accumulators, module, args):
        for accumulator in accumulators:
            accumulator.add(args[0])

    handles = [block.get_submodule(name).register_forward_pre_hook(partial(feed, accumulators))
               for name, accumulators in observers.items()]
    try:
        return run_block(block, index, inputs, device)
    finally:
        for handle in handles:
            handle.remove()


def _stats_pair(lay: BlockLayout) -> tuple[S.ChannelStats, S.ChannelStats]:
    heads = lay.kv_heads * lay.group_size
    return S.ChannelStats(heads * lay.head_dim, heads), S.ChannelStats(lay.neurons)


def collect_stats(model: nn.Module, adapter: Adapter, layouts: list[BlockLayout], token_ids: torch.Tensor,
                  batch_size: int) -> list[tuple[S.ChannelStats, S.ChannelStats]]:
    """Statistics of the inputs of o and down in every block, on the dense model, one block at a time through the
    sequential engine (each block replayed with its own forward arguments)."""
    from prunekit.weights.engine import capture_block_inputs

    r = roles(adapter)
    blocks = adapter.block_list(model)
    device = next(model.parameters()).device
    inputs = capture_block_inputs(model, blocks, token_ids, batch_size=batch_size, device=device,
                                  activation_device=device)
    result = []
    for index, (block, lay) in enumerate(zip(blocks, layouts, strict=True)):
        o_stats, down_stats = _stats_pair(lay)
        inputs = _observe(block, index, inputs, device, {r.o: (o_stats,), r.mlp_out: (down_stats,)})
        result.append((o_stats, down_stats))
    return result


def unit_scores(method: str, block: nn.Module, adapter: Adapter, lay: BlockLayout,
                stats: tuple[S.ChannelStats, S.ChannelStats] | None,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV-group scores, neuron scores) of one block by `method` (any but 'obs', which selects by re-fitting)."""
    r = roles(adapter)

    def weight(name: str) -> torch.Tensor:
        return block.get_submodule(name).weight.data.cpu()

    if method in ("l1", "l2"):
        return S.group_norm_scores(weight(r.q), weight(r.k), weight(r.v), weight(r.o), [weight(n) for n in r.mlp_in],
                                   weight(r.mlp_out), lay, p=1 if method == "l1" else 2)
    if method == "random":
        return S.random_scores(lay, generator)
    if method == "activation":
        return S.activation_scores(*stats, lay)
    if method == "wanda-sp":
        return S.wanda_sp_scores(weight(r.o), weight(r.mlp_out), *stats, lay)
    return S.flap_scores(weight(r.o), weight(r.mlp_out), *stats, lay)


def block_scores(method: str, model: nn.Module, adapter: Adapter, layouts: list[BlockLayout],
                 stats: list | None, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(KV-group scores, neuron scores) of every block by `method`."""
    generator = torch.Generator().manual_seed(seed)
    return [unit_scores(method, block, adapter, lay, stats[index] if stats else None, generator)
            for index, (block, lay) in enumerate(zip(adapter.block_list(model), layouts, strict=True))]


def prune_sequentially(model: nn.Module, adapter: Adapter, layouts: list[BlockLayout],
                       counts: list[tuple[int, int]], method: str, token_ids: torch.Tensor, *, batch_size: int,
                       kinds: set[str], remove: bool, seed: int,
                       progress: bool) -> tuple[list[BlockPlan], dict[str, torch.Tensor]]:
    """Prune block after block on the calibration activations of the already pruned blocks before it, re-fitting
    each output projection to the dense one by least squares (`structure.reconstruct`); inside a block the heads
    go first and the MLP is calibrated on the pruned attention (true-sequential, as SparseGPT's reference code
    does for weights). `counts` fixes how many units of each kind every block keeps; which ones is chosen here,
    on these activations, by `method` ('obs': structured OBS). Returns the plans (kept indices) and, when
    masking, the masks."""
    from tqdm.auto import tqdm

    from prunekit.weights.engine import capture_block_inputs, run_block

    r = roles(adapter)
    blocks = adapter.block_list(model)
    device = next(model.parameters()).device
    head_dim = adapter.head_layout(model.config)["head_dim"]
    prefix = adapter.block_prefix(model)
    generator = torch.Generator().manual_seed(seed)
    inputs = capture_block_inputs(model, blocks, token_ids, batch_size=batch_size, device=device,
                                  activation_device=device)
    plans, masks = [], {}
    for index, (block, lay, (kh, kn)) in enumerate(tqdm(list(zip(blocks, layouts, counts, strict=True)),
                                                        desc="structure", unit="block", disable=not progress)):
        name = f"{prefix}.{index}"
        o, down = block.get_submodule(r.o), block.get_submodule(r.mlp_out)
        kept_heads, kept_neurons = torch.arange(lay.kv_heads), torch.arange(lay.neurons)
        if kh < lay.kv_heads:
            stats, gram = _stats_pair(lay), Gram(o.in_features)
            _observe(block, index, inputs, device, {r.o: (stats[0], gram), r.mlp_out: (stats[1],)})
            if method == "obs":
                channels = torch.stack([head_channels(torch.tensor([g]), lay)[0] for g in range(lay.kv_heads)])
                kept_heads = obs_keep(o.weight.data, o.bias, gram, channels, kh, with_bias="attention" in kinds)
            else:
                kept_heads = kept_indices(unit_scores(method, block, adapter, lay, stats, generator)[0], kh)
            fitted = refit(o.weight.data, o.bias, gram, head_channels(kept_heads, lay)[0],
                           with_bias="attention" in kinds)
            masks.update(apply_block_plan(adapter, block, name, lay, BlockPlan(
                kept_heads, torch.arange(lay.neurons), refit={"attention": fitted}), remove=remove))
        # the MLP sees the pruned attention; with removal the block now has fewer heads than `lay` states
        now = block_layout(adapter, block, head_dim) if remove else lay
        heads_now = torch.arange(now.kv_heads) if remove else kept_heads
        if kn < lay.neurons:
            stats, gram = _stats_pair(now), Gram(lay.neurons)
            _observe(block, index, inputs, device, {r.o: (stats[0],), r.mlp_out: (stats[1], gram)})
            if method == "obs":
                kept_neurons = obs_keep(down.weight.data, down.bias, gram, torch.arange(lay.neurons)[:, None], kn,
                                        with_bias="mlp" in kinds)
            else:
                kept_neurons = kept_indices(unit_scores(method, block, adapter, now, stats, generator)[1], kn)
            fitted = refit(down.weight.data, down.bias, gram, kept_neurons, with_bias="mlp" in kinds)
            masks.update(apply_block_plan(adapter, block, name, now, BlockPlan(
                heads_now, kept_neurons, refit={"mlp": fitted}), remove=remove))
        plans.append(BlockPlan(kept_heads, kept_neurons))
        inputs = run_block(block, index, inputs, device)
    if remove:
        sync_config(model, adapter)
    return plans, masks


def model_speed(model: nn.Module, *, timed: bool, seq_len: int = 128) -> dict:
    """MACs of one sequence of `seq_len` tokens (fewer if the model's positions end sooner) and, if `timed`, forward
    latency at batch 1 and 16 (the current thread count); token values change neither, so the ids are fixed
    pseudo-random ones."""
    from prunekit.measure.speed import count_macs, latency

    seq_len = min(seq_len, max_positions(model.config) or seq_len)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(
        next(model.parameters()).device)
    result = {"macs": count_macs(model, {"input_ids": ids}), "seq_len": seq_len}
    if timed:
        result["latency"] = latency(model, {"input_ids": ids}, batch_sizes=(1, 16), warmup=2, repeats=7)
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
    inputs=None,
    *,
    method: str | None = None,
    remove: float | None = None,
    remove_macs: float | None = None,
    ignore=(),
    allocation: str = "uniform",
    units: tuple[str, ...] = UNIT_KINDS,
    round_to: int | None = None,
    min_keep: float = 0.1,
    mode: str = "remove",
    bias_compensation: bool | None = None,
    reconstruct: bool | None = None,
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
    loss_fn=None,
    speed: bool = False,
) -> dict | tuple[dict, dict[str, torch.Tensor]]:
    """Remove coupled structures of a model in place; return the record (and the masks, with mode='mask').

    A Hugging Face model (Llama-style decoders, BERT encoders) loses whole attention KV groups and MLP neurons, the
    groups its adapter declares; `inputs` is its tokenizer. Any other module is traced with torch.fx into a
    dependency graph (`structure.graph`) and loses channels; `inputs` are its example inputs, and the options are
    those of `structure.graph_prune.prune_graph` (method, remove or remove_macs, ignore, allocation, round_to,
    min_keep, mode, calibration, loss_fn, seed, progress).

    method: l1, l2 (group norms), random (baseline), activation (Minitron), wanda-sp, flap (fluctuation), obs (the
        default: structured Optimal Brain Surgeon, the units whose removal the re-fitted others compensate best go
        first; see BENCHMARKS.md); for traced models l1, l2 (the default), bn-scale, taylor, activation, random.
    remove: the fraction of the model's parameters (all of them, embeddings included) to remove, in (0, 1).
    remove_macs: instead of `remove`, the fraction of the MACs of one forward pass to remove (the sequence of the
        speed record, `metrics["speed"]["seq_len"]` tokens: 128, or fewer if the model's positions end sooner);
        the LM head and embeddings count but cannot shrink.
    ignore, loss_fn: traced models only (see `prune_graph`).
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
    reconstruct: prune block after block on the pruned model's own activations and re-fit each output projection
        (o, down) and, where the config can hold one, its bias, by least squares to the dense layer's output
        (`structure.reconstruct`); default True for obs (which needs it), False otherwise; any method may use it.
    calibration: as in `prunekit.prune`, for the calibrated methods, compensation and reconstruction.
    evaluation: if given, dense and pruned perplexity are measured on it (as in `prunekit.prune`); for an encoder,
        the mean cosine of its sentence embeddings to the dense ones on `eval_windows` held-out texts.
    speed: also time a forward pass (batch 1 and 16 × 128 tokens) before and after; MACs are always counted.
        `metrics["speed"]` holds both, the ideal speedup and a warning when the model is not measurably faster.

    Every option, and whether the budget is possible, is checked before the model changes.
    """
    refuse_offloaded(model, "structured pruning")
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return _prune_traced(model, inputs, locals())  # every option, by name, as given
    if loss_fn is not None or tuple(ignore):
        raise PrunekitError("ignore and loss_fn apply to traced models; a Hugging Face model's units are chosen "
                            "with units=")
    tokenizer = inputs
    method = method or "obs"
    units = tuple(units)
    check_structure_options(method, remove, allocation, mode, round_to, min_keep, units, bias_compensation,
                            reconstruct, remove_macs)
    if reconstruct is None:
        reconstruct = method == "obs"
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
    if bias_compensation is None and method != "flap" and not reconstruct:
        bias_compensation = False
    kinds = _compensated_kinds(model, adapter, units, bias_compensation)
    before = parameter_counts(model)["total"]
    dense_speed = model_speed(model, timed=False)  # MACs; the timed record, if asked for, comes right before pruning
    if remove_macs is None:
        target = round(before * remove)
        # compensation gives every projection of its kinds a bias, paid for by removing more units
        added = missing_bias_parameters(model, adapter, kinds)
        most = removable(layouts, floors)
        budget = f"remove={remove} asks for {target} of {before} parameters (+{added} compensation biases)"
        whole = before
    else:  # the same allocation, with every unit's cost in MACs of the speed record's sequence (biases cost none)
        whole, added = dense_speed["macs"], 0
        target = round(whole * remove_macs)
        most = removable(mac_layouts(layouts, dense_speed["seq_len"]), floors)
        budget = f"remove_macs={remove_macs} asks for {target} of {whole} MACs per {dense_speed['seq_len']} tokens"
    if target + added > most:
        raise PrunekitError(f"{budget}, but at most {most} ({most / whole:.1%}) are removable with units={units} "
                            f"and min_keep={min_keep}")
    calibrated = method in S.CALIBRATED or reconstruct
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
    eval_tokens = eval_texts = None
    if evaluation is not None and not adapter.causal:
        # perplexity does not apply to an encoder: its sentence embeddings are compared with the dense ones
        eval_texts = encoder_evaluation_set(model, tokenizer, evaluation, texts=eval_windows, max_length=eval_seq_len)
    elif evaluation is not None:
        eval_tokens = evaluation_set(tokenizer, evaluation, seq_len=eval_seq_len, windows=eval_windows)
        metrics["dense"] = perplexity(model, eval_tokens.ids, batch_size=4, device=device, progress=progress)

    if speed:
        dense_speed = model_speed(model, timed=True)
    was_training = model.training
    model.eval()
    try:
        with ResourceMonitor() as monitor:
            # the sequential path gathers its own statistics on the pruned blocks' outputs; a global ranking still
            # needs the dense model's, to decide how many units each block keeps
            needs_dense_stats = method in S.CALIBRATED and (not reconstruct or allocation == "global")
            stats = collect_stats(model, adapter, layouts, calib.ids, batch_size) if needs_dense_stats else None
            if kinds:  # zero biases change no output; the units' costs now include them
                add_bias_flags(model, adapter, kinds)
                layouts = block_layouts(model, adapter)
            costs = layouts if remove_macs is None else mac_layouts(layouts, dense_speed["seq_len"])
            if allocation == "uniform":
                counts = uniform_counts(costs, floors, target + added, units, step)
            else:
                scores = block_scores(method, model, adapter, layouts, stats, seed)
                heads = S.standardize([h for h, _ in scores])
                neurons = S.standardize([n for _, n in scores])
                counts = global_counts(list(zip(heads, neurons, strict=True)), costs, floors, target + added,
                                       step)
            if reconstruct:
                plans, masks = prune_sequentially(model, adapter, layouts, counts, method, calib.ids,
                                                  batch_size=batch_size, kinds=kinds, remove=mode == "remove",
                                                  seed=seed, progress=progress)
            else:
                if allocation == "uniform":
                    scores = block_scores(method, model, adapter, layouts, stats, seed)
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
    if remove_macs is not None:
        # counted from the units removed, so that mode='mask' (whose zeros still cost MACs) states it too; after a
        # removal it equals the measured count in metrics['speed'] (a test holds the two equal)
        removed_macs = sum((lay.kv_heads - kh) * lay.head_cost + (lay.neurons - kn) * lay.neuron_cost
                           for lay, (kh, kn) in zip(costs, counts, strict=True))
        metrics["macs_removed_fraction"] = {"target": remove_macs, "achieved": removed_macs / dense_speed["macs"],
                                            "seq_len": dense_speed["seq_len"]}
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
    metrics["speed"] = speed_record(dense_speed, model_speed(model, timed=speed))
    if eval_texts is not None:
        metrics["embedding_fidelity"] = eval_texts.fidelity(model, tokenizer)
    method_card = {"name": method, "object": "structure", "remove": remove, "remove_macs": remove_macs,
                   "allocation": allocation,
                   "units": list(units), "round_to": round_to, "min_keep": min_keep, "mode": mode,
                   "bias_compensation": sorted(kinds), "reconstruct": reconstruct, "seed": seed,
                   "batch_size": batch_size}
    record = result_record(model=card, method=method_card, calibration=calib.info if calib else None,
                           evaluation=eval_tokens.info if eval_tokens else eval_texts and eval_texts.info,
                           metrics=metrics,
                           resources={"prune": monitor.as_dict(), "device": str(device),
                                      "threads": torch.get_num_threads()})
    return (record, masks) if mode == "mask" else record


# prune_structure's options that only Hugging Face models take, with their defaults
_TRANSFORMER_ONLY = {"units": UNIT_KINDS, "bias_compensation": None, "reconstruct": None,
                     "calibration_samples": 32, "calibration_seq_len": 512, "batch_size": 8, "evaluation": None,
                     "eval_seq_len": 512, "eval_windows": 64, "model_source": None, "speed": False}


def _prune_traced(model: nn.Module, example_inputs, options: dict) -> dict | tuple[dict, dict[str, torch.Tensor]]:
    """`prune_structure` of a model that is not a Hugging Face one: through the traced dependency graph."""
    from prunekit.structure.graph_prune import prune_graph

    given = sorted(name for name, default in _TRANSFORMER_ONLY.items()
                   if options[name] != default and not (name == "units" and tuple(options[name]) == default))
    if given:
        raise PrunekitError(f"{', '.join(given)} apply to Hugging Face models; {type(model).__name__} is pruned "
                            "through its traced graph")
    if example_inputs is None:
        raise PrunekitError(f"{type(model).__name__} is traced on example inputs: pass them as the second argument")
    calibration = options["calibration"]
    record, masks = prune_graph(
        model, example_inputs, method=options["method"] or "l2", remove=options["remove"],
        remove_macs=options["remove_macs"], ignore=options["ignore"], allocation=options["allocation"],
        round_to=options["round_to"], min_keep=options["min_keep"], mode=options["mode"],
        calibration=None if calibration == "wiki-summaries" else calibration, loss_fn=options["loss_fn"],
        seed=options["seed"], progress=options["progress"])
    return (record, masks) if options["mode"] == "mask" else record


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


def describe_structure(model: nn.Module, example_inputs=None) -> list[str]:
    """The coupled groups `prune_structure` removes together, one printable line per group: for a Hugging Face
    model, each block's KV groups and neurons with the slices and parameters every unit owns (adapter-declared);
    for any other module, the groups of its traced dependency graph on `example_inputs`."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        from prunekit.structure.graph import DependencyGraph

        if example_inputs is None:
            raise PrunekitError(f"{type(model).__name__} is traced on example inputs: pass them")
        return DependencyGraph(model, example_inputs).summary_lines()
    adapter = structure_adapter(model)
    r = roles(adapter)
    lines = []
    for index, lay in enumerate(block_layouts(model, adapter)):
        width = lay.group_size * lay.head_dim
        heads = (f"{lay.kv_heads} KV groups of {lay.group_size} query head(s) × {lay.head_dim}: rows of {r.q} "
                 f"({width}), {r.k} and {r.v} ({lay.head_dim} each), columns of {r.o} ({width}); "
                 f"{lay.head_cost:,} parameters each")
        neurons = (f"{lay.neurons} neurons: one row of {' and '.join(r.mlp_in)}, one column of {r.mlp_out}; "
                   f"{lay.neuron_cost:,} parameters each")
        lines.append(f"block {index}: {heads} | {neurons}")
    return lines
