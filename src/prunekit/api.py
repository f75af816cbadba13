"""The public Python API. The command line (`prunekit.cli`) is a thin layer over these functions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from prunekit.adapters import adapter_for, projection_weight
from prunekit.adapters.moe import MoeAdapter
from prunekit.allocation import ALLOCATIONS, ONESHOT_ALLOCATIONS, block_sparsities, check_allocation
from prunekit.artifacts import load_masks, load_pruned, save_masks, save_module, save_pruned
from prunekit.budget import WeightBudget, parse_pattern, weight_budget
from prunekit.depth import prune_depth, removed_sublayers
from prunekit.errors import PrunekitError
from prunekit.inputs import (
    calibration_set,
    check_lengths,
    check_run_lengths,
    compute_device,
    evaluation_set,
    model_card,
)
from prunekit.measure import ResourceMonitor, perplexity
from prunekit.measure.protocol import result_record, weight_facts
from prunekit.structure import prune_structure, saved_widths
from prunekit.targets import mask_target, projection_weights, target_weights
from prunekit.weights.admm import resolve_ramp_dtype
from prunekit.weights.ecoflap import check_ecoflap_options, ecoflap_plan
from prunekit.weights.engine import (
    BlockPlan,
    block_weights,
    capture_block_inputs,
    owl_plan,
    prune_sequentially,
)
from prunekit.weights.gradients import calibration_gradients
from prunekit.weights.methods import METHODS, PruneOptions, WeightMethod, get_method
from prunekit.weights.offload import check_offload_support, load_offloaded, save_offloaded
from prunekit.weights.scores import magnitude_scores

__all__ = ["ALLOCATIONS", "METHODS", "ONESHOT_ALLOCATIONS", "check_lengths", "check_prune_options", "evaluate", "load",
           "load_masks", "load_offloaded", "prune", "prune_depth", "prune_structure", "save", "save_masks",
           "target_weights"]


def evaluate(
    model: nn.Module,
    tokenizer=None,
    *,
    data="wiki-summaries",
    seq_len: int = 512,
    windows: int | None = 64,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_source: str | None = None,
) -> dict:
    """Perplexity of a causal LM on non-overlapping `seq_len` windows of `data` (held-out split for assets).

    `data` is a text asset name, a local file, a list of strings, or a tensor of token ids [windows, seq_len]
    used as given. `device` (default: where the model is) is placed as in `prune`: another device computes one
    block at a time while the model stays where it is. Returns a result record with the protocol card.
    """
    check_lengths(model, eval_seq_len=None if isinstance(data, torch.Tensor) else seq_len, batch_size=batch_size)
    device = compute_device(model, device)
    with ResourceMonitor() as monitor:
        tokens = evaluation_set(tokenizer, data, seq_len=seq_len, windows=windows)
        metrics = perplexity(model, tokens.ids, batch_size=batch_size, device=device, progress=progress)
    facts = weight_facts(model, target_weights(model), counts=False)  # one read of each offloaded block
    metrics["sparsity"] = facts["sparsity"]["overall"]
    return result_record(
        model=model_card(model, model_source, weights_sha256=facts["weights_sha256"]), method={"name": "none"},
        calibration=None, evaluation=tokens.info, metrics=metrics, resources=monitor.as_dict(),
    )


def _given_mask_plan(model: nn.Module, adapter,
                     masks: Mapping[str, torch.Tensor]) -> tuple[dict, BlockPlan, float]:
    """The given keep-masks checked against the target weights (names, shapes, bool), each block's sparsity (the
    share of its target weights they remove) and the share of all target weights they remove."""
    targets = target_weights(model)
    checked = {}
    for name, keep in masks.items():
        weight = mask_target(targets, name)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != weight.shape:
            shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise PrunekitError(f"mask for {name!r} must be a bool tensor of the weight's shape "
                                f"{tuple(weight.shape)}, got {getattr(keep, 'dtype', '')} {shape}")
        checked[name] = keep
    prefix = adapter.block_prefix(model)
    sparsities, removed_total, numel_total = [], 0, 0
    for index, block in enumerate(adapter.block_list(model)):
        names = [f"{prefix}.{index}.{n}.weight" for n in adapter.projections(block)]
        numel = sum(targets[n].numel() for n in names)
        removed = sum(int((~checked[n]).sum()) for n in names if n in checked)
        sparsities.append(removed / numel if numel else 0.0)
        removed_total, numel_total = removed_total + removed, numel_total + numel
    return checked, BlockPlan(sparsities), removed_total / numel_total


def check_prune_options(
    method: str, sparsity: float | None, pattern: str | None, allocation: str, blocksize: int = 128,
    damping: float = 0.01, *, admm_rho: float = 1.0, admm_iterations: int = 20, admm_ramp_dtype: str = "auto",
    dsnot_cycles: int = 50, ecoflap_directions: int = 2, ecoflap_epsilon: float = 1e-3, true_sequential: bool = False,
) -> tuple[WeightMethod, WeightBudget]:
    """Validate the model-independent options of `prune`, so that callers can fail before loading a model. For a
    method whose masks are given (`given+admm`) the budget's sparsity is a placeholder: `prune` takes it from the
    masks."""
    method_spec = get_method(method)
    if method_spec.given_masks:
        if sparsity is not None or parse_pattern(pattern).is_nm or allocation != "uniform":
            raise PrunekitError(f"method '{method_spec.name}' removes what the masks given (masks=) remove; leave "
                                f"sparsity, pattern and allocation unset")
        budget = WeightBudget(0.0, parse_pattern(None))
    else:
        budget = weight_budget(sparsity, pattern)
    check_allocation(allocation, ONESHOT_ALLOCATIONS, "one-shot pruning (erk and er depend only on shapes, equal "
                     "in every block; global-min is for training-time pruning)")
    if allocation not in ("uniform", "owl") and budget.pattern.is_nm:
        raise PrunekitError(f"{allocation.upper()} allocates a different sparsity to each block, but pattern "
                            f"{budget.pattern} fixes every layer at the same sparsity; use an unstructured sparsity "
                            f"with --allocation {allocation}")
    if blocksize < 1 or not 0 <= damping < 1:
        raise PrunekitError(f"blocksize {blocksize} must be >= 1 and damping {damping} in [0, 1)")
    PruneOptions(admm_rho=admm_rho, admm_iterations=admm_iterations, admm_ramp_dtype=admm_ramp_dtype,
                 dsnot_cycles=dsnot_cycles)
    if true_sequential and method_spec.statistics not in ("norms", "hessian"):
        raise PrunekitError(f"true-sequential calibration changes only methods calibrated on activations; "
                            f"'{method}' does not use them")
    check_ecoflap_options(ecoflap_directions, ecoflap_epsilon)
    return method_spec, budget


def prune(
    model: nn.Module,
    tokenizer=None,
    *,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str | None = None,
    allocation: str = "uniform",
    calibration="wiki-summaries",
    calibration_samples: int = 32,
    calibration_seq_len: int = 512,
    seed: int = 0,
    owl_threshold: float = 5.0,
    owl_limit: float = 0.08,
    blocksize: int = 128,
    damping: float = 0.01,
    admm_rho: float = 1.0,
    admm_iterations: int = 20,
    admm_ramp_dtype: str = "auto",
    dsnot_cycles: int = 50,
    ecoflap_directions: int = 2,
    ecoflap_epsilon: float = 1e-3,
    true_sequential: bool = False,
    evaluation=None,
    eval_seq_len: int = 512,
    eval_windows: int | None = 64,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_source: str | None = None,
    return_masks: bool = False,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict | tuple[dict, dict[str, torch.Tensor]]:
    """Prune the weights of a causal LM in place, one transformer block at a time, and return the result record.

    method: one of `prunekit.names.ONESHOT_METHODS`: magnitude, random, wanda, ria, sparsegpt, admm, or a scored
        method followed by the ADMM weight update ('wanda+admm'); `admm_rho` and `admm_iterations` set ADMM's
        penalty and number of iterations. 'given+admm' removes what `masks` say and updates the kept weights by
        ADMM. `admm_ramp_dtype` is the precision of the gradual ADMM's iterations while its mask ramps up:
        'auto' (bfloat16 where the compute device multiplies it natively, else float32; the record says which),
        'float32' or 'bfloat16'.
    masks: for 'given+admm' only: keep-masks {parameter name: bool tensor in the parameter's layout} of the
        target weights, from any source (`return_masks=True` of another method, `prune_structure(...,
        mode="mask")` for a structured mask); a weight without one stays whole. Sparsity, pattern and allocation
        follow from them and are left unset.
    sparsity: fraction of each targeted weight matrix set to zero, in [0, 1). With an N:M `pattern` it may be
        omitted (it is 1 - N/M).
    pattern: 'unstructured' (default) or 'N:M' (keep N of every M consecutive weights along the input dimension).
    allocation: the sparsity of each block (`prunekit.allocation`), whose parameter-weighted mean is `sparsity`:
        'uniform' (every block at `sparsity`); 'owl' (outlier-weighted, from the dense model's Wanda scores on the
        calibration data; `owl_threshold` is the outlier multiple M, `owl_limit` the largest deviation lambda);
        'global' or 'lamp' (each block loses the share that a global ranking of the dense weights' magnitudes, or
        of their LAMP scores, removes from it). Within a block, `method` selects the weights.
    calibration: asset name, local file, list of strings, or a tensor of token ids [samples, length] used
        exactly as given; `calibration_samples` windows of `calibration_seq_len` tokens are drawn with `seed`.
    true_sequential: calibrate each input group of a block on the outputs of the groups pruned before it
        (attention projections pruned before the MLP inputs are recorded) instead of all on the dense block;
        for methods calibrated on activations.
    evaluation: if given (same forms as calibration), dense and pruned perplexity are measured on it.
    device: where each block is computed (default: where the model is); activations stay on the CPU when the
        model lives there. Evaluation is placed the same way (see `prunekit.measure.perplexity`).
        A model from `load_offloaded` (blocks in files, larger than memory) is pruned one block at a time from
        its files; `save` then writes it. The global, lamp and ecoflap allocations and pruner-zero need the whole
        model at once and are refused for it.
    return_masks: also return the keep-masks, `(record, masks)`: {parameter name: bool tensor in the parameter's
        layout} for every targeted weight, which `prunekit.training.Masks` holds through fine-tuning
        (`held = Masks(model, masks); held.update(masks)`). For SparseGPT they are the masks its kernel selected.
        Off by default: one bool per targeted weight (about 100 MB for a 135M-parameter model).

    Every option is checked before any weight changes. An error found while pruning (non-finite activations
    in a later block) leaves the blocks before it pruned: reload the model before retrying.
    """
    method_spec, budget = check_prune_options(method, sparsity, pattern, allocation, blocksize, damping,
                                              admm_rho=admm_rho, admm_iterations=admm_iterations,
                                              admm_ramp_dtype=admm_ramp_dtype,
                                              dsnot_cycles=dsnot_cycles, ecoflap_directions=ecoflap_directions,
                                              ecoflap_epsilon=ecoflap_epsilon, true_sequential=true_sequential)
    check_run_lengths(model, calibration, calibration_seq_len, evaluation, eval_seq_len, batch_size)
    check_offload_support(model, allocation=allocation, statistics=method_spec.statistics)
    if method_spec.given_masks != (masks is not None):
        raise PrunekitError(f"method '{method_spec.name}' needs masks= (the keep-masks to apply)"
                            if method_spec.given_masks else
                            f"masks= are applied by method 'given+admm'; method '{method_spec.name}' chooses its own")
    adapter = adapter_for(model)
    if isinstance(adapter, MoeAdapter):
        raise PrunekitError(f"prune reaches only plain Linear projections, not the experts of this {adapter.family} "
                            "model (3-D parameters, each seeing only its routed tokens); prune weights inside the "
                            "experts with prunekit.experts.prune_inside_experts (moe_pruner, wanda) or "
                            "`prunekit experts --inside`")
    for name, weight in projection_weights(model).items():
        budget.pattern.check_width(weight.shape[1], name)
        if weight.device.type != "meta" and not torch.isfinite(weight).all():  # offloaded: checked as read
            raise PrunekitError(f"weight '{name}' holds NaN or inf; prunekit will not prune a broken model")
    compute = compute_device(model, device)
    activations = torch.device("cpu") if next(model.parameters()).device.type == "cpu" else compute
    options = PruneOptions(seed=seed, blocksize=blocksize, damping=damping, admm_rho=admm_rho,
                           admm_iterations=admm_iterations,
                           admm_ramp_dtype=resolve_ramp_dtype(admm_ramp_dtype, compute),
                           dsnot_cycles=dsnot_cycles, true_sequential=true_sequential)
    needs_calibration = method_spec.statistics is not None or allocation in ("owl", "ecoflap")
    calibrated = method_spec.statistics in ("norms", "hessian")
    calib = None
    if needs_calibration:
        calib = calibration_set(model, tokenizer, calibration, samples=calibration_samples,
                                seq_len=calibration_seq_len, seed=seed)
    card = model_card(model, model_source)

    metrics: dict = {}
    eval_tokens = None
    if evaluation is not None:
        eval_tokens = evaluation_set(tokenizer, evaluation, seq_len=eval_seq_len, windows=eval_windows)
        metrics["dense"] = perplexity(model, eval_tokens.ids, batch_size=4, device=compute, progress=progress)

    was_training = model.training
    model.eval()
    plan = BlockPlan([budget.sparsity] * len(adapter.block_list(model)))
    given = None
    if masks is not None:
        given, plan, mean = _given_mask_plan(model, adapter, masks)
        budget = WeightBudget(mean, budget.pattern)

    def block_inputs():
        # Captured afresh for each pass (only the embeddings run) and never held here, so that the engine can
        # free each block's activations as soon as the next block's exist.
        return capture_block_inputs(model, adapter.block_list(model), calib.ids, batch_size=batch_size,
                                    device=compute, activation_device=activations)

    try:
        with ResourceMonitor() as monitor:
            if allocation == "owl":
                plan = owl_plan(model, adapter, block_inputs(), sparsity=budget.sparsity, threshold=owl_threshold,
                                limit=owl_limit, device=compute, progress=progress, pattern=budget.pattern)
            elif allocation == "ecoflap":
                plan = ecoflap_plan(model, adapter, calib.ids, sparsity=budget.sparsity, limit=owl_limit,
                                    directions=ecoflap_directions, epsilon=ecoflap_epsilon, seed=seed,
                                    batch_size=batch_size, progress=progress)
            elif allocation != "uniform":
                magnitudes = [{n: magnitude_scores(projection_weight(m)) for n, m in adapter.projections(b).items()}
                              for b in adapter.block_list(model)]
                plan = BlockPlan(block_sparsities(magnitudes, budget.sparsity, allocation))
            gradients = (calibration_gradients(model, adapter, calib.ids, progress=progress)
                         if method_spec.statistics == "gradients" else None)
            masks = prune_sequentially(model, adapter, method_spec, sparsities=plan.sparsities,
                                       pattern=plan.patterns or budget.pattern,
                                       inputs=block_inputs() if calibrated else None,
                                       options=options, device=compute, progress=progress, keep_masks=return_masks,
                                       gradients=gradients, given_masks=given)
    finally:
        model.train(was_training)

    facts = weight_facts(model, target_weights(model))  # one read of each offloaded block
    summary = facts["sparsity"]
    prefix = adapter.block_prefix(model) + "."
    for name, layer in summary["per_layer"].items():
        layer["target"] = plan.sparsities[int(name[len(prefix):].split(".", 1)[0])]
    metrics["sparsity"] = {"target": budget.sparsity, "achieved": summary["overall"],
                           "zeros": summary["zeros"], "numel": summary["numel"], "per_layer": summary["per_layer"]}
    metrics["parameters"] = facts["parameters"]
    metrics["pruned_weights_sha256"] = facts["weights_sha256"]
    if eval_tokens is not None:
        metrics["pruned"] = perplexity(model, eval_tokens.ids, batch_size=4, device=compute, progress=progress)

    method_card = {
        "name": method_spec.name, "summary": method_spec.summary, "sparsity": budget.sparsity,
        "pattern": str(budget.pattern), "allocation": allocation, "comparison_group": method_spec.comparison,
        **options.as_dict(), "batch_size": batch_size,
    }
    if given is not None:
        method_card.update(masks="given", masked_weights=len(given), block_sparsities=plan.sparsities)
    if allocation == "owl":
        method_card.update(owl_threshold=owl_threshold, owl_limit=owl_limit,
                           owl_block_sparsities=plan.sparsities, owl_outlier_ratios=plan.outlier_ratios)
        if plan.patterns:
            method_card["owl_block_patterns"] = [str(p) for p in plan.patterns]
    elif allocation == "ecoflap":
        method_card.update(owl_limit=owl_limit, ecoflap_directions=ecoflap_directions,
                           ecoflap_epsilon=ecoflap_epsilon, block_sparsities=plan.sparsities,
                           ecoflap_block_scores=plan.block_scores)
    elif allocation != "uniform":
        method_card["block_sparsities"] = plan.sparsities
    record = result_record(
        model=card, method=method_card, calibration=calib.info if calib else None,
        evaluation=eval_tokens.info if eval_tokens else None, metrics=metrics,
        resources={"prune": monitor.as_dict(), "device": str(compute), "threads": torch.get_num_threads()},
    )
    return (record, masks) if return_masks else record


def save(model: nn.Module, tokenizer, out_dir: str | Path, record: dict, *, overwrite: bool = False) -> Path:
    """Write a Hugging Face model directory (safetensors) with `prunekit.json` beside it, atomically.

    A structurally pruned model whose blocks differ in width keeps its config (which cannot state per-block widths)
    and lists every block's widths in the manifest (`block_widths`): `prunekit.load` rebuilds it from them, while
    `from_pretrained` refuses its shapes rather than loading it wrongly.

    Any other module (a graph-pruned CNN) is written as `model.safetensors` with the geometry of its resizable
    layers in the manifest (`prunekit.artifacts.modules`); `tokenizer` must then be None."""
    from transformers import PreTrainedModel

    if block_weights(model).offloaded:
        return save_offloaded(model, tokenizer, out_dir, record, overwrite=overwrite)
    if not isinstance(model, PreTrainedModel):
        if tokenizer is not None:
            raise PrunekitError(f"a tokenizer is saved with Hugging Face models only; {type(model).__name__} is "
                                "saved with tokenizer=None")
        return save_module(model, out_dir, record, overwrite=overwrite)
    sublayers = removed_sublayers(model)
    if sublayers:  # attention or MLP sublayers removed by prune_depth: `prunekit.load` removes them again
        record = {**record, "removed_sublayers": sublayers}
    widths = None if sublayers else saved_widths(model)
    if widths is not None:
        record = {**record, "block_widths": widths}
    return save_pruned(model, tokenizer, out_dir, record, overwrite=overwrite)


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu", model: nn.Module | None = None):
    """Load a directory written by `save`: (model, tokenizer, record). Nothing is unpickled.

    A prunekit network (`prunekit.nets`) is rebuilt by name; a network of your own class needs `model=`, a freshly
    built dense instance, which is reshaped to the saved geometry and returned."""
    return load_pruned(path, dtype=dtype, device=device, model=model)

