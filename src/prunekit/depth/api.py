"""`prune_depth`: score the blocks of a decoder or an encoder (or a decoder's attention or MLP sublayers) on
calibration data, choose some under a budget, remove them or merge them into their neighbours.

A causal LM's loss-based criteria (SLEB, the perplexity criterion) use its calibration perplexity. An encoder has no
next-token loss: they use the embedding distance instead, 1 − the mean cosine between the dense model's sentence
embeddings of the calibration windows and the embeddings with the chosen blocks skipped, and the result is measured
by the embeddings' fidelity on held-out texts (`prunekit.measure.embedding`)."""

from __future__ import annotations

import contextlib
import math
import sys
from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from prunekit.adapters import adapter_for
from prunekit.depth.merge import merge_blocks
from prunekit.depth.remove import check_removal, remove_blocks, skipped_blocks
from prunekit.depth.scores import (
    angular_distance,
    block_influence,
    choose_lowest,
    choose_run,
    random_blocks,
    reverse_order,
    sleb_greedy,
)
from prunekit.depth.sublayers import (
    SUBLAYERS,
    check_sublayer_family,
    check_sublayer_removal,
    remove_sublayers,
    removed_sublayers,
    skipped_sublayers,
    sublayer_parameters,
)
from prunekit.errors import PrunekitError
from prunekit.inputs import calibration_set, check_lengths, encoder_evaluation_set, evaluation_set, model_card
from prunekit.measure import ResourceMonitor, parameter_counts, perplexity, result_record, weights_sha256
from prunekit.measure.embedding import window_embeddings
from prunekit.weights.engine import capture_block_inputs, refuse_offloaded, run_block

DEPTH_METHODS = {
    "angular": "contiguous run of n blocks with the least angular distance between its input and output "
               "(Gromov et al. 2024)",
    "block-influence": "the n blocks of lowest 1 - cos(input, output) (ShortGPT, Men et al. 2024)",
    "sleb": "greedy: one block at a time, the one whose removal gives the lowest calibration perplexity (for an "
            "encoder: embedding distance) (SLEB, Song et al. 2024)",
    "taylor": "Taylor+: the n blocks of lowest sum of |w * dL/dw| over their weights on the calibration loss, "
              "sparing the first four and last two blocks (Shortened LLaMA, Kim et al. 2024)",
    "perplexity": "one-shot: the n blocks whose removal alone gives the lowest calibration perplexity (for an "
                  "encoder: embedding distance) (Shortened LLaMA's PPL criterion, Kim et al. 2024)",
    "reverse": "baseline: the deepest n blocks, sparing the final block",
    "random": "baseline: n blocks drawn at random with the seed",
}
ANGULAR_TOKENS = ("last", "all")
UNITS = ("block", *SUBLAYERS)
"""What prune_depth removes: whole blocks, or the attention or MLP sublayers of blocks alone."""
TAYLOR_SPARED = (4, 2)
"""How many first and last blocks Taylor+ never removes: the '+' of Kim et al. (2024), a heuristic that keeps the
blocks at both ends, which the plain Taylor criterion may score low but are costly to lose."""


def check_depth_options(method: str, blocks: int | None, remove: float | None, angular_tokens: str | None = None,
                        unit: str = "block", merge: bool = False) -> None:
    """Validate the model-independent options of `prune_depth`, so that callers can fail before loading a model."""
    if method not in DEPTH_METHODS:
        raise PrunekitError(f"depth method '{method}' is unknown; use one of {', '.join(DEPTH_METHODS)}")
    if unit not in UNITS:
        raise PrunekitError(f"unit '{unit}' is unknown; use one of {', '.join(UNITS)}")
    if unit != "block" and method == "angular":
        raise PrunekitError(f"method 'angular' chooses a run of whole blocks, so it cannot remove {unit} sublayers; "
                            "use block-influence, sleb, taylor, perplexity, reverse or random")
    if not isinstance(merge, bool):
        raise PrunekitError(f"merge={merge!r} must be True or False")
    if merge and unit != "block":
        raise PrunekitError(f"merge=True folds whole blocks into their neighbours (LaCo); unit '{unit}' removes "
                            "sublayers, so use merge=False")
    if (blocks is None) == (remove is None):
        raise PrunekitError(f"give exactly one budget: blocks= (a number of blocks) or remove= (a fraction of the "
                            f"parameters); got blocks={blocks!r}, remove={remove!r}")
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0):
        raise PrunekitError(f"blocks={blocks!r} must be an integer >= 0")
    if remove is not None and (isinstance(remove, bool) or not isinstance(remove, int | float)
                               or not 0 <= remove < 1):
        raise PrunekitError(f"remove={remove!r} must be a fraction of the parameters in [0, 1)")
    if angular_tokens is not None and angular_tokens not in ANGULAR_TOKENS:
        raise PrunekitError(f"angular_tokens '{angular_tokens}' is unknown; use one of {', '.join(ANGULAR_TOKENS)}")


def block_count(num_blocks: int, block_parameters: float, total_parameters: int, *, blocks: int | None,
                remove: float | None, unit: str = "block") -> int:
    """The number of units (blocks, or sublayers of one kind) a budget removes: `blocks` as given, or the fraction
    `remove` of all parameters in whole units of `block_parameters` each (the mean unit size), rounded half up. At
    least one unit must stay of the `num_blocks` there are."""
    count = blocks if blocks is not None else math.floor(remove * total_parameters / block_parameters + 0.5)
    noun = "blocks" if unit == "block" else f"{unit} sublayers"
    if count >= num_blocks:
        what = f"blocks={blocks}" if blocks is not None else f"remove={remove} ({count} {noun})"
        raise PrunekitError(f"{what} would remove all {num_blocks} {noun}; remove at most {num_blocks - 1}")
    return count


def boundary_states(model: nn.Module, token_ids: torch.Tensor, *, batch_size: int) -> Iterator[torch.Tensor]:
    """The hidden states x_0, ..., x_L of every calibration token at each block boundary ([samples, seq, hidden]):
    x_l enters block l, x_L leaves the last block. Computed one block at a time by the sequential engine, each
    block with its own arguments (Gemma's sliding and full layers differ), so only one boundary is held here."""
    blocks = adapter_for(model).block_list(model)
    device = next(model.parameters()).device
    inputs = capture_block_inputs(model, blocks, token_ids, batch_size=batch_size, device=device,
                                  activation_device=device)
    yield torch.cat([item.hidden for item in inputs])
    for index, block in enumerate(blocks):
        inputs = run_block(block, index, inputs, device)
        yield torch.cat([item.hidden for item in inputs])


def angular_distances(model: nn.Module, token_ids: torch.Tensor, n: int, *, tokens: str,
                      batch_size: int) -> list[float]:
    """d(x_l, x_{l+n}) for every start l = 0..L-n. `tokens="last"` compares each sample's last token, as Gromov
    et al. (2024, section 3.2) do; "all" averages over every token."""
    window: deque[torch.Tensor] = deque(maxlen=n + 1)
    distances = []
    for state in boundary_states(model, token_ids, batch_size=batch_size):
        window.append(state[:, -1] if tokens == "last" else state)
        if len(window) == n + 1:
            distances.append(angular_distance(window[0], window[-1]))
    return distances


def block_influences(model: nn.Module, token_ids: torch.Tensor, *, batch_size: int) -> list[float]:
    """ShortGPT's block influence of every block, over all calibration tokens."""
    influences, previous = [], None
    for state in boundary_states(model, token_ids, batch_size=batch_size):
        if previous is not None:
            influences.append(block_influence(previous, state))
        previous = state
    return influences


def sublayer_influences(model: nn.Module, token_ids: torch.Tensor, kind: str, *, batch_size: int) -> list[float]:
    """Block influence of every block's `kind` sublayer: 1 - cos between the residual stream before and after it.
    The stream between the sublayers, x_l + attention, is the block's output with its MLP skipped."""
    blocks = adapter_for(model).block_list(model)
    device = next(model.parameters()).device
    inputs = capture_block_inputs(model, blocks, token_ids, batch_size=batch_size, device=device,
                                  activation_device=device)
    influences = []
    for index, block in enumerate(blocks):
        with skipped_sublayers(model, "mlp", [index]):
            middle = run_block(block, index, inputs, device)
        outputs = run_block(block, index, inputs, device)
        before, after = (inputs, middle) if kind == "attention" else (middle, outputs)
        influences.append(block_influence(torch.cat([item.hidden for item in before]),
                                          torch.cat([item.hidden for item in after])))
        inputs = outputs
    return influences


def unit_modules(model: nn.Module, unit: str) -> list[nn.Module]:
    """The module of every unit: each block, or each block's attention or MLP sublayer."""
    blocks = adapter_for(model).block_list(model)
    return list(blocks) if unit == "block" else [block.get_submodule(SUBLAYERS[unit]) for block in blocks]


def taylor_importance(model: nn.Module, token_ids: torch.Tensor, units: list[nn.Module], *, batch_size: int,
                      progress: bool = False) -> list[float]:
    """Taylor importance of each unit (Kim et al. 2024): sum over its parameters w of |w * dL/dw|, L
    the mean next-token loss over all calibration tokens (samples of equal length), its gradient accumulated over
    one backward pass per batch. Only the units' parameters take gradients, and these are freed (set to None)
    before returning; the model's weights, other gradients and `requires_grad` flags are left as they were."""
    device = next(model.parameters()).device
    groups = [list(unit.parameters()) for unit in units]
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        for p in (p for group in groups for p in group):
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for batch in tqdm(token_ids.split(batch_size), desc="taylor gradients", unit="batch", file=sys.stderr,
                              disable=not progress):
                batch = batch.to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss * (len(batch) / len(token_ids))).backward()  # weighted so the sum is the mean loss's gradient
        return [float(sum((p.detach() * p.grad).abs().sum(dtype=torch.float64) for p in group
                          if p.grad is not None)) for group in groups]
    finally:
        for p in (p for group in groups for p in group):
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _skipping(model: nn.Module, unit: str) -> Callable[[list[int]], contextlib.AbstractContextManager]:
    """A context that skips the given units: blocks, or sublayers of one kind."""
    if unit == "block":
        return lambda removed: skipped_blocks(model, removed)
    return lambda removed: skipped_sublayers(model, unit, removed)


def candidates(method: str, unit: str, num_blocks: int) -> list[int]:
    """The blocks whose unit `method` may remove: Taylor+ spares the first and last blocks of `TAYLOR_SPARED`;
    block 0 keeps its sublayers (`check_sublayer_removal`); 'reverse' spares the final block."""
    first, last = TAYLOR_SPARED if method == "taylor" else (0 if unit == "block" else 1, 0)
    allowed = list(range(first, num_blocks - last))
    return [b for b in allowed if b != num_blocks - 1] if method == "reverse" else allowed


def _choose(model: nn.Module, method: str, n: int, token_ids: torch.Tensor | None, *, unit: str, seed: int,
            angular_tokens: str, batch_size: int, progress: bool) -> tuple[list[int], dict | None]:
    """The units to remove (in removal order for SLEB) and the scores they were chosen by."""
    num_blocks = len(adapter_for(model).block_list(model))
    allowed = candidates(method, unit, num_blocks)
    if method == "reverse":
        return reverse_order(num_blocks, n), None  # never block 0 here: _check_units refused n > len(allowed)
    if method == "random":
        return [allowed[i] for i in random_blocks(len(allowed), n, seed)], None

    def lowest(scores: list[float]) -> list[int]:
        return choose_lowest([s if i in allowed else math.inf for i, s in enumerate(scores)], n)

    if method == "angular":
        distances = angular_distances(model, token_ids, n, tokens=angular_tokens, batch_size=batch_size)
        return choose_run(distances, n), {"angular_distance_by_start": distances}
    if method == "block-influence":
        influences = (block_influences(model, token_ids, batch_size=batch_size) if unit == "block"
                      else sublayer_influences(model, token_ids, unit, batch_size=batch_size))
        return lowest(influences), {"block_influence": influences}
    if method == "taylor":
        importance = taylor_importance(model, token_ids, unit_modules(model, unit), batch_size=batch_size,
                                       progress=progress)
        return lowest(importance), {"taylor_importance": importance,
                                    "spared": sorted(set(range(num_blocks)) - set(allowed))}
    loss, loss_without = _calibration_loss(model, token_ids, unit, batch_size=batch_size)
    if method == "perplexity":
        alone = [loss_without([b]) for b in tqdm(range(num_blocks), desc=f"{loss} without each {unit}", unit=unit,
                                                 file=sys.stderr, disable=not progress)]
        return lowest(alone), {f"calibration_{loss}_without": alone}
    order, steps = sleb_greedy(num_blocks, n, loss_without, allowed)
    return order, {f"calibration_{loss}_by_step": steps}


def _calibration_loss(model: nn.Module, token_ids: torch.Tensor, unit: str, *,
                      batch_size: int) -> tuple[str, Callable[[list[int]], float]]:
    """The name of the loss the loss-based criteria minimise and the loss with given units skipped: a causal LM's
    calibration perplexity, or an encoder's embedding distance to its dense self (1 − mean cosine of the
    calibration windows' sentence embeddings)."""
    skipping = _skipping(model, unit)
    if adapter_for(model).causal:
        def perplexity_without(removed: list[int]) -> float:
            with skipping(removed):
                return perplexity(model, token_ids, batch_size=batch_size, progress=False)["perplexity"]

        return "perplexity", perplexity_without
    dense = window_embeddings(model, token_ids, batch_size=batch_size).double()

    def distance_without(removed: list[int]) -> float:
        with skipping(removed):
            embeddings = window_embeddings(model, token_ids, batch_size=batch_size).double()
        return float(1.0 - (embeddings * dense).sum(-1).mean())

    return "embedding_distance", distance_without


def _check_units(model: nn.Module, method: str, unit: str, n: int) -> None:
    """Refuse, before the model changes, what this model cannot do with `n` units of `unit` removed by `method`."""
    num_blocks = len(adapter_for(model).block_list(model))
    if unit == "block":
        check_removal(model, list(range(num_blocks - n, num_blocks)))  # the deepest blocks: renumbers nothing
    else:
        check_sublayer_family(model)
        before = removed_sublayers(model).get(unit, [])
        if before:
            raise PrunekitError(f"the {unit} sublayers of blocks {before} were removed before; prune_depth removes "
                                f"the {unit} sublayers of a model once")
        check_sublayer_removal(model, unit, list(range(num_blocks - n, num_blocks)))
    allowed = candidates(method, unit, num_blocks)
    if n > len(allowed):
        noun = "blocks" if unit == "block" else f"{unit} sublayers"
        spared = sorted(set(range(num_blocks)) - set(allowed))
        raise PrunekitError(f"{method} spares blocks {spared} of {num_blocks}, so it removes at most {len(allowed)} "
                            f"{noun}; asked for {n}")


def prune_depth(
    model: nn.Module,
    tokenizer=None,
    *,
    method: str,
    blocks: int | None = None,
    remove: float | None = None,
    unit: str = "block",
    merge: bool = False,
    calibration="wiki-summaries",
    calibration_samples: int = 32,
    calibration_seq_len: int = 512,
    seed: int = 0,
    angular_tokens: str | None = None,
    evaluation=None,
    eval_seq_len: int = 512,
    eval_windows: int | None = 64,
    batch_size: int = 8,
    progress: bool = True,
    model_source: str | None = None,
) -> dict:
    """Remove whole transformer blocks (or their attention or MLP sublayers) from a causal LM or an encoder in place
    and return the result record.

    method: 'angular', 'block-influence', 'sleb', 'taylor', 'perplexity' (scored on the calibration data), or the
        baselines 'reverse' (the deepest blocks, sparing the final one) and 'random' (drawn with `seed`); see
        `DEPTH_METHODS`. On an encoder, 'sleb' and 'perplexity' minimise the embedding distance to the dense model
        (see the module docstring), and 'taylor', which needs a next-token loss, is refused.
    blocks / remove: exactly one budget, a number of units, or a fraction of all the model's parameters rounded
        half up to whole units (target beside achieved in the record). At least one unit stays.
    unit: 'block' (whole blocks), 'attention' or 'mlp' (that sublayer of the chosen blocks alone, replaced by a
        parameter-free stand-in; Llama-style families only, every method but 'angular').
    merge: fold each contiguous run of chosen blocks into the block before it (LaCo) instead of deleting it.
    calibration: as in `prunekit.prune` (asset name, file, list of strings, or a token tensor used as given).
    angular_tokens: 'last' or 'all' tokens for the angular distance; default 'last' (the paper's choice) for a
        causal LM, whose last token has read the whole window, and 'all' for an encoder.
    evaluation: if given, dense and pruned perplexity on it (`eval_windows` windows of `eval_seq_len` tokens); for
        an encoder, the mean cosine of its sentence embeddings to the dense ones on `eval_windows` held-out texts
        of at most `eval_seq_len` tokens (`metrics["embedding_fidelity"]`).

    The model computes where it is. Everything is checked before the model changes; SLEB and the perplexity
    criterion skip units only while they score them, Taylor+ frees its gradients. The model keeps working with the
    KV cache; with blocks removed it saves as a standard Hugging Face directory, with sublayers removed
    `prunekit.save` lists them in the manifest (`removed_sublayers`), from which `prunekit.load` rebuilds it.
    """
    refuse_offloaded(model, "depth pruning")
    check_depth_options(method, blocks, remove, angular_tokens, unit, merge)
    given_ids = isinstance(calibration, torch.Tensor)
    calibrated = method not in ("reverse", "random")
    check_lengths(model, calibration_seq_len=None if given_ids or not calibrated else calibration_seq_len,
                  eval_seq_len=None if evaluation is None or isinstance(evaluation, torch.Tensor) else eval_seq_len,
                  batch_size=batch_size)
    adapter = adapter_for(model)
    if method == "taylor" and not adapter.causal:
        raise PrunekitError("taylor scores blocks by the gradient of the next-token loss, which an encoder does not "
                            "have; use angular, block-influence, perplexity or sleb (embedding distance), reverse or "
                            "random")
    if angular_tokens is None:
        angular_tokens = "last" if adapter.causal else "all"
    if unit != "block":
        check_sublayer_family(model)
    block_list = adapter.block_list(model)
    num_blocks = len(block_list)
    unit_sizes = ([sum(p.numel() for p in block.parameters()) for block in block_list] if unit == "block"
                  else sublayer_parameters(model, unit))
    before = parameter_counts(model)
    n = block_count(num_blocks, sum(unit_sizes) / num_blocks, before["total"], blocks=blocks, remove=remove,
                    unit=unit)
    _check_units(model, method, unit, n)
    calib = None
    if n > 0 and calibrated:
        calib = calibration_set(model, tokenizer, calibration, samples=calibration_samples,
                                seq_len=calibration_seq_len, seed=seed)
    eval_ids = evaluation_info = eval_texts = None
    if evaluation is not None and not adapter.causal:
        eval_texts = encoder_evaluation_set(model, tokenizer, evaluation, texts=eval_windows, max_length=eval_seq_len)
        evaluation_info = eval_texts.info
    elif evaluation is not None:
        windows = evaluation_set(tokenizer, evaluation, seq_len=eval_seq_len, windows=eval_windows)
        eval_ids, evaluation_info = windows.ids, windows.info
    card = model_card(model, model_source)

    metrics: dict = {}
    merged = None
    was_training = model.training
    model.eval()
    try:
        if eval_ids is not None:
            metrics["dense"] = perplexity(model, eval_ids, progress=progress)
        with ResourceMonitor() as monitor:
            order, scores = _choose(model, method, n, calib.ids if calib else None, unit=unit, seed=seed,
                                    angular_tokens=angular_tokens, batch_size=batch_size,
                                    progress=progress) if n else ([], None)
            # each removal checks the chosen units before it changes anything
            if unit != "block":
                remove_sublayers(model, {unit: order})
            elif merge:
                merged = [{"into": base, "run": run} for base, run in merge_blocks(model, order).items()]
            else:
                remove_blocks(model, order)
    finally:
        model.train(was_training)
    removed = sorted(order)
    after = parameter_counts(model)
    sublayers = removed_sublayers(model)
    metrics.update(
        unit=unit, removed_blocks=removed if unit == "block" else [], removal_order=order,
        kept_blocks=[i for i in range(num_blocks) if unit != "block" or i not in removed], block_scores=scores,
        blocks={"target": n if unit == "block" else 0, "achieved": num_blocks - len(block_list),
                "before": num_blocks, "after": len(block_list)},
        removed_fraction={"target": remove, "achieved": 1 - after["total"] / before["total"]},
        parameters={"before": before["total"], "after": after["total"], "nonzero_after": after["nonzero"]},
        removed_sublayers=sublayers,
        pruned_weights_sha256=weights_sha256(model),
    )
    if unit != "block":
        metrics["sublayers"] = {"kind": unit, "target": n, "achieved": len(removed), "removed": removed}
    if merged is not None:
        metrics["merged_into"] = merged
    if eval_ids is not None:
        metrics["pruned"] = perplexity(model, eval_ids, progress=progress)
    if eval_texts is not None:
        metrics["embedding_fidelity"] = eval_texts.fidelity(model, tokenizer)
    method_card = {"name": method, "summary": DEPTH_METHODS[method], "blocks": blocks, "remove": remove,
                   "unit": unit, "merge": merge, "seed": seed, "batch_size": batch_size}
    if method == "angular":
        method_card["angular_tokens"] = angular_tokens
    if method == "taylor":
        method_card["spared_first_last"] = list(TAYLOR_SPARED)
    return result_record(model=card, method=method_card, calibration=calib.info if calib else None,
                         evaluation=evaluation_info, metrics=metrics,
                         resources={"prune": monitor.as_dict(), "device": str(next(model.parameters()).device),
                                    "threads": torch.get_num_threads()})
