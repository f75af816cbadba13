"""`prune_experts`: score, select and remove (or merge) whole experts of a mixture-of-experts model, and measure;
`prune_inside_experts`: prune the weights inside every expert, and measure."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.experts.criteria import (
    CALIBRATED,
    CRITERIA,
    check_criterion,
    random_scores,
    router_norm_scores,
    statistic_scores,
)
from prunekit.experts.inside import (
    INSIDE_METHODS,
    SPARSEGPT_BLOCKSIZE,
    SPARSEGPT_DAMPING,
    check_inside_options,
    prune_expert_weights,
)
from prunekit.experts.remove import removal_count, remove_experts, select_experts
from prunekit.experts.routing import moe_adapter, router_statistics
from prunekit.inputs import (
    calibration_set,
    check_run_lengths,
    compute_device,
    evaluation_set,
    model_card,
)
from prunekit.measure import ResourceMonitor, parameter_counts, perplexity, sparsity_summary
from prunekit.measure.protocol import result_record, weights_sha256


def prune_experts(
    model: nn.Module,
    tokenizer=None,
    *,
    criterion: str = "frequency",
    remove: int | float = 0.25,
    merge: bool = False,
    pretrained: nn.Module | None = None,
    calibration="wiki-summaries",
    calibration_samples: int = 32,
    calibration_seq_len: int = 512,
    seed: int = 0,
    evaluation=None,
    eval_seq_len: int = 512,
    eval_windows: int | None = 64,
    batch_size: int = 8,
    progress: bool = True,
    model_source: str | None = None,
) -> dict:
    """Remove the same number of experts from every MoE layer of `model`, in place, and return the result record.

    criterion: one of `CRITERIA`: 'frequency' (routed-token fraction), 'gate' (mean gate weight over routed tokens),
        'reconstruction' (output change when the expert is dropped), 'router_norm' (router-row norm change from
        `pretrained`, Chowdhury et al. 2024), 'random' (seeded).
    remove: experts per layer, a number (int) or a fraction of the layer's experts (float in [0, 1)); it must leave
        at least top-k experts.
    merge: fold each removed expert into its nearest kept neighbour (weight cosine), weighted by routed-token counts
        when calibration statistics exist, instead of dropping it.
    calibration: text source or a [samples, length] token tensor, for the calibrated criteria and merge weights.
    evaluation: text source or token windows; perplexity is measured before and after.

    Everything is checked before the model changes.
    """
    adapter = moe_adapter(model)
    check_criterion(criterion, pretrained)
    config = model.config
    experts, top_k = getattr(config, adapter.num_experts), getattr(config, adapter.top_k)
    count = removal_count(experts, top_k, remove)
    check_run_lengths(model, calibration, calibration_seq_len, evaluation, eval_seq_len, batch_size)
    calibrated = criterion in CALIBRATED or merge
    calib = calibration_set(model, tokenizer, calibration, samples=calibration_samples, seq_len=calibration_seq_len,
                            seed=seed) if calibrated else None
    card = model_card(model, model_source)
    metrics: dict = {}
    eval_tokens = None
    if evaluation is not None:
        eval_tokens = evaluation_set(tokenizer, evaluation, seq_len=eval_seq_len, windows=eval_windows)
        metrics["dense"] = perplexity(model, eval_tokens.ids, batch_size=4, progress=progress)
    before = parameter_counts(model)

    with ResourceMonitor() as monitor:
        stats = router_statistics(model, calib.ids, batch_size=batch_size, reconstruction=criterion ==
                                  "reconstruction", progress=progress) if calibrated else None
        if criterion in CALIBRATED:
            scores = statistic_scores(stats, criterion)
        elif criterion == "router_norm":
            scores = router_norm_scores(model, pretrained)
        else:
            scores = random_scores(model, seed)
        removed = select_experts(scores, count)
        merged = remove_experts(model, adapter, removed, merge=merge,
                                merge_weights=[s.counts for s in stats] if merge else None)

    layers = [layer.index for layer in adapter.moe_layers(model)]
    metrics["experts"] = {"target": count, "achieved": experts - getattr(model.config, adapter.num_experts),
                          "before": experts, "after": getattr(model.config, adapter.num_experts), "top_k": top_k}
    metrics["removed"] = {str(i): r for i, r in zip(layers, removed, strict=True)}
    metrics["scores"] = {str(i): s.tolist() for i, s in zip(layers, scores, strict=True)}
    if stats is not None:
        metrics["routed_tokens"] = {str(s.index): s.counts.tolist() for s in stats}
    if merge:
        metrics["merged_into"] = {str(i): {str(e): n for e, n in m.items()} for i, m in merged.items()}
    metrics["parameters"] = {"before": before, "after": parameter_counts(model)}
    metrics["pruned_weights_sha256"] = weights_sha256(model)
    if eval_tokens is not None:
        metrics["pruned"] = perplexity(model, eval_tokens.ids, batch_size=4, progress=progress)
    method = {"name": f"experts-{criterion}", "summary": CRITERIA[criterion], "criterion": criterion,
              "remove": remove, "merge": merge, "seed": seed, "batch_size": batch_size,
              "pretrained": model_card(pretrained, None)["source"] if pretrained is not None else None}
    return result_record(
        model=card, method=method, calibration=calib.info if calib else None,
        evaluation=eval_tokens.info if eval_tokens else None, metrics=metrics,
        resources={"prune": monitor.as_dict(), "device": str(next(model.parameters()).device),
                   "threads": torch.get_num_threads()},
    )


def expert_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every MoE layer's 3-D expert weights, by parameter name."""
    adapter = moe_adapter(model)
    prefix = adapter.block_prefix(model)
    return {f"{prefix}.{layer.index}.{adapter.moe}.{adapter.experts}.{name}": getattr(layer.experts, name)
            for layer in adapter.moe_layers(model) for name in ("gate_up_proj", "down_proj")}


def prune_inside_experts(
    model: nn.Module,
    tokenizer=None,
    *,
    method: str = "moe_pruner",
    sparsity: float = 0.5,
    calibration="wiki-summaries",
    calibration_samples: int = 32,
    calibration_seq_len: int = 512,
    seed: int = 0,
    evaluation=None,
    eval_seq_len: int = 512,
    eval_windows: int | None = 64,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_source: str | None = None,
    return_masks: bool = False,
):
    """Zero `sparsity` of each output row of every expert's weights (gate, up, down), scored on the expert's
    routed calibration tokens by `method` ('moe_pruner' or 'wanda', see `prunekit.experts.inside`), in place;
    'sparsegpt' zeroes `sparsity` of each projection of every expert and updates the weights it keeps.

    Returns the result record, or `(record, masks)` with `return_masks` (keep-masks by parameter name, in the 3-D
    parameters' layout; `prunekit.training.Masks` cannot hold them yet, as the experts are not among
    `prunekit.targets`). Attention and shared experts are not touched (prune them with `prunekit.prune`).
    Every option is checked before any weight changes.
    """
    check_inside_options(method, sparsity)
    moe_adapter(model)
    check_run_lengths(model, calibration, calibration_seq_len, evaluation, eval_seq_len, batch_size)
    calib = calibration_set(model, tokenizer, calibration, samples=calibration_samples, seq_len=calibration_seq_len,
                            seed=seed)
    card = model_card(model, model_source)
    metrics: dict = {}
    eval_tokens = None
    if evaluation is not None:
        eval_tokens = evaluation_set(tokenizer, evaluation, seq_len=eval_seq_len, windows=eval_windows)
        metrics["dense"] = perplexity(model, eval_tokens.ids, batch_size=4, progress=progress)
    with ResourceMonitor() as monitor:
        masks = prune_expert_weights(model, calib.ids, method=method, sparsity=sparsity, batch_size=batch_size,
                                     device=device, progress=progress)
    summary = sparsity_summary(expert_tensors(model))
    metrics["sparsity"] = {"target": sparsity, "achieved": summary["overall"], "zeros": summary["zeros"],
                           "numel": summary["numel"], "per_layer": summary["per_layer"]}
    metrics["parameters"] = parameter_counts(model)
    metrics["pruned_weights_sha256"] = weights_sha256(model)
    if eval_tokens is not None:
        metrics["pruned"] = perplexity(model, eval_tokens.ids, batch_size=4, progress=progress)
    method_card = {"name": f"experts-inside-{method}", "summary": INSIDE_METHODS[method], "sparsity": sparsity,
                   "pattern": "per output row", "seed": seed, "batch_size": batch_size}
    if method == "sparsegpt":
        method_card.update(pattern="per projection, by blocks of columns", blocksize=SPARSEGPT_BLOCKSIZE,
                           damping=SPARSEGPT_DAMPING)
    record = result_record(
        model=card, method=method_card,
        calibration=calib.info, evaluation=eval_tokens.info if eval_tokens else None, metrics=metrics,
        resources={"prune": monitor.as_dict(), "device": str(compute_device(model, device)),
                   "threads": torch.get_num_threads()},
    )
    return (record, masks) if return_masks else record
