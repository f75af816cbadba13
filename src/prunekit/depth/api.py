"""`prune_depth`: score the blocks of a decoder on calibration data, choose some under a budget, remove them."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import torch
from torch import nn

from prunekit.adapters import adapter_for
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
from prunekit.errors import PrunekitError
from prunekit.inputs import calibration_set, check_lengths, evaluation_set, model_card
from prunekit.measure import ResourceMonitor, parameter_counts, perplexity, result_record, weights_sha256
from prunekit.weights.engine import capture_block_inputs, run_block

DEPTH_METHODS = {
    "angular": "contiguous run of n blocks with the least angular distance between its input and output "
               "(Gromov et al. 2024)",
    "block-influence": "the n blocks of lowest 1 - cos(input, output) (ShortGPT, Men et al. 2024)",
    "sleb": "greedy: one block at a time, the one whose removal gives the lowest calibration perplexity "
            "(SLEB, Song et al. 2024)",
    "reverse": "baseline: the deepest n blocks, sparing the final block",
    "random": "baseline: n blocks drawn at random with the seed",
}
ANGULAR_TOKENS = ("last", "all")


def check_depth_options(method: str, blocks: int | None, remove: float | None, angular_tokens: str = "last") -> None:
    """Validate the model-independent options of `prune_depth`, so that callers can fail before loading a model."""
    if method not in DEPTH_METHODS:
        raise PrunekitError(f"depth method '{method}' is unknown; use one of {', '.join(DEPTH_METHODS)}")
    if (blocks is None) == (remove is None):
        raise PrunekitError(f"give exactly one budget: blocks= (a number of blocks) or remove= (a fraction of the "
                            f"parameters); got blocks={blocks!r}, remove={remove!r}")
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0):
        raise PrunekitError(f"blocks={blocks!r} must be an integer >= 0")
    if remove is not None and (isinstance(remove, bool) or not isinstance(remove, int | float)
                               or not 0 <= remove < 1):
        raise PrunekitError(f"remove={remove!r} must be a fraction of the parameters in [0, 1)")
    if angular_tokens not in ANGULAR_TOKENS:
        raise PrunekitError(f"angular_tokens '{angular_tokens}' is unknown; use one of {', '.join(ANGULAR_TOKENS)}")


def block_count(num_blocks: int, block_parameters: float, total_parameters: int, *, blocks: int | None,
                remove: float | None) -> int:
    """The number of blocks a budget removes: `blocks` as given, or the fraction `remove` of all parameters in whole
    blocks of `block_parameters` each (the mean block size), rounded half up. At least one block must stay."""
    count = blocks if blocks is not None else math.floor(remove * total_parameters / block_parameters + 0.5)
    if count >= num_blocks:
        what = f"blocks={blocks}" if blocks is not None else f"remove={remove} ({count} blocks)"
        raise PrunekitError(f"{what} would remove all {num_blocks} blocks; remove at most {num_blocks - 1}")
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


def _choose(model: nn.Module, method: str, n: int, token_ids: torch.Tensor | None, *, seed: int, angular_tokens: str,
            batch_size: int) -> tuple[list[int], dict | None]:
    """The blocks to remove (in removal order for SLEB) and the scores they were chosen by."""
    num_blocks = len(adapter_for(model).block_list(model))
    if method == "reverse":
        return reverse_order(num_blocks, n), None
    if method == "random":
        return random_blocks(num_blocks, n, seed), None
    if method == "angular":
        distances = angular_distances(model, token_ids, n, tokens=angular_tokens, batch_size=batch_size)
        return choose_run(distances, n), {"angular_distance_by_start": distances}
    if method == "block-influence":
        influences = block_influences(model, token_ids, batch_size=batch_size)
        return choose_lowest(influences, n), {"block_influence": influences}

    def perplexity_without(removed: list[int]) -> float:
        with skipped_blocks(model, removed):
            return perplexity(model, token_ids, batch_size=batch_size, progress=False)["perplexity"]

    order, steps = sleb_greedy(num_blocks, n, perplexity_without)
    return order, {"calibration_perplexity_by_step": steps}


def prune_depth(
    model: nn.Module,
    tokenizer=None,
    *,
    method: str,
    blocks: int | None = None,
    remove: float | None = None,
    calibration="wiki-summaries",
    calibration_samples: int = 32,
    calibration_seq_len: int = 512,
    seed: int = 0,
    angular_tokens: str = "last",
    evaluation=None,
    eval_seq_len: int = 512,
    eval_windows: int | None = 64,
    batch_size: int = 8,
    progress: bool = True,
    model_source: str | None = None,
) -> dict:
    """Remove whole transformer blocks from a causal LM in place and return the result record.

    method: 'angular', 'block-influence', 'sleb' (scored on the calibration data), or the baselines 'reverse'
        (the deepest blocks, sparing the final one) and 'random' (drawn with `seed`); see `DEPTH_METHODS`.
    blocks / remove: exactly one budget, a number of blocks, or a fraction of all the model's parameters rounded
        half up to whole blocks (target beside achieved in the record). At least one block stays.
    calibration: as in `prunekit.prune` (asset name, file, list of strings, or a token tensor used as given).
    angular_tokens: 'last' (the paper's choice) or 'all' tokens for the angular distance.
    evaluation: if given, dense and pruned perplexity on it (`eval_windows` windows of `eval_seq_len` tokens).

    The model computes where it is. Everything is checked before the model changes; SLEB skips blocks only while
    it scores them. The model keeps working with the KV cache and saves as a standard Hugging Face directory.
    """
    check_depth_options(method, blocks, remove, angular_tokens)
    given_ids = isinstance(calibration, torch.Tensor)
    calibrated = method not in ("reverse", "random")
    check_lengths(model, calibration_seq_len=None if given_ids or not calibrated else calibration_seq_len,
                  eval_seq_len=None if evaluation is None or isinstance(evaluation, torch.Tensor) else eval_seq_len,
                  batch_size=batch_size)
    block_list = adapter_for(model).block_list(model)
    num_blocks = len(block_list)
    block_parameters = sum(p.numel() for p in block_list.parameters()) / num_blocks
    before = parameter_counts(model)
    n = block_count(num_blocks, block_parameters, before["total"], blocks=blocks, remove=remove)
    check_removal(model, list(range(num_blocks - n, num_blocks)))  # the deepest blocks: renumbers nothing
    calib = None
    if n > 0 and calibrated:
        calib = calibration_set(model, tokenizer, calibration, samples=calibration_samples,
                                seq_len=calibration_seq_len, seed=seed)
    eval_ids = evaluation_info = None
    if evaluation is not None:
        windows = evaluation_set(tokenizer, evaluation, seq_len=eval_seq_len, windows=eval_windows)
        eval_ids, evaluation_info = windows.ids, windows.info
    card = model_card(model, model_source)

    metrics: dict = {}
    was_training = model.training
    model.eval()
    try:
        if eval_ids is not None:
            metrics["dense"] = perplexity(model, eval_ids, progress=progress)
        with ResourceMonitor() as monitor:
            order, scores = _choose(model, method, n, calib.ids if calib else None, seed=seed,
                                    angular_tokens=angular_tokens, batch_size=batch_size) if n else ([], None)
            remove_blocks(model, order)  # checks the chosen blocks before it changes anything
    finally:
        model.train(was_training)
    removed = sorted(order)
    after = parameter_counts(model)
    metrics.update(
        removed_blocks=removed, removal_order=order,
        kept_blocks=[i for i in range(num_blocks) if i not in removed], block_scores=scores,
        blocks={"target": n, "achieved": len(removed), "before": num_blocks, "after": len(block_list)},
        removed_fraction={"target": remove, "achieved": 1 - after["total"] / before["total"]},
        parameters={"before": before["total"], "after": after["total"], "nonzero_after": after["nonzero"]},
        pruned_weights_sha256=weights_sha256(model),
    )
    if eval_ids is not None:
        metrics["pruned"] = perplexity(model, eval_ids, progress=progress)
    method_card = {"name": method, "summary": DEPTH_METHODS[method], "blocks": blocks, "remove": remove,
                   "seed": seed, "batch_size": batch_size}
    if method == "angular":
        method_card["angular_tokens"] = angular_tokens
    return result_record(model=card, method=method_card, calibration=calib.info if calib else None,
                         evaluation=evaluation_info, metrics=metrics,
                         resources={"prune": monitor.as_dict(), "device": str(next(model.parameters()).device),
                                    "threads": torch.get_num_threads()})
