"""Causal-LM perplexity over fixed, non-overlapping windows of token ids."""

import math
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from prunekit.adapters import find_adapter
from prunekit.errors import PrunekitError
from prunekit.weights.engine import block_weights, blockwise_forward

_IGNORE_INDEX = -100


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _same_device(requested: torch.device, actual: torch.device) -> bool:
    """`cuda` names whichever CUDA device the model is on; `cuda:1` only that one."""
    return requested.type == actual.type and requested.index in (None, actual.index)


def _logits(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
            progress: bool) -> Iterator[torch.Tensor]:
    """Logits of each batch of windows: a normal forward on the model's device, else block by block on `device`."""
    home = _model_device(model)
    if _same_device(device, home) and not block_weights(model).offloaded:
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", file=sys.stderr,
                          disable=not progress):
            yield model(input_ids=windows[start : start + batch_size].to(device), use_cache=False).logits
        return
    adapter = find_adapter(model)
    if adapter is None:
        raise PrunekitError(f"evaluating on {device} a model that lives on {home} goes block by block, which needs "
                            f"a decoder that prunekit.adapters supports; or move the model to {device} first")
    blocks = adapter.block_list(model)
    # activations wait where pruning keeps them: on the CPU when the model lives there
    activations = torch.device("cpu") if home.type == "cpu" else device
    for output in blockwise_forward(model, blocks, windows, batch_size=batch_size, device=device,
                                    activation_device=activations, progress=progress):
        yield output.logits


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of `model` on `windows`, an int64 tensor [n_windows, seq_len] of token ids.

    Every token but the first of each window is predicted from the tokens before it in the same window;
    the mean negative log-likelihood is taken over all predicted tokens, so the result does not depend on
    `batch_size`. Only one batch of logits exists at a time. The model runs in eval mode (restored after)
    so that dropout cannot change the number.

    `device=None` (or the model's device) runs the model as it is. Another device is used as pruning uses it:
    the model stays where it is and one block at a time is computed on `device` (`weights.engine.
    blockwise_forward`), the activations of all windows waiting on the CPU between blocks when the model lives
    there; the result is the same as on the model's device. This needs a decoder that `prunekit.adapters`
    supports. An offloaded model (`prunekit.weights.offload`) always goes block by block.

    Returns `{"perplexity", "nll", "tokens", "windows", "seq_len"}`.
    """
    if windows.dtype != torch.int64 or windows.dim() != 2:
        raise PrunekitError(
            f"windows must be an int64 tensor [n_windows, seq_len], got {windows.dtype} of shape "
            f"{tuple(windows.shape)}"
        )
    n_windows, seq_len = windows.shape
    if n_windows < 1 or seq_len < 2:
        raise PrunekitError(
            f"windows of shape {tuple(windows.shape)} predict no tokens; "
            "need at least 1 window of length >= 2"
        )
    if batch_size < 1:
        raise PrunekitError(f"batch_size {batch_size} is not a positive integer; use e.g. 4")
    adapter = find_adapter(model)
    if adapter is not None and not adapter.causal:
        raise PrunekitError(f"perplexity needs a causal language model, but {type(model).__name__} is a "
                            f"bidirectional {adapter.family} encoder; measure it with prunekit.measure.embedding")
    device = torch.device(device) if device is not None else _model_device(model)

    was_training = model.training
    model.eval()
    total_nll = 0.0
    try:
        with torch.inference_mode():
            for start, logits in zip(range(0, n_windows, batch_size),
                                     _logits(model, windows, batch_size, device, progress), strict=True):
                batch = windows[start : start + batch_size].to(logits.device)
                # min and max propagate NaN and reach any inf without a copy the size of the logits
                lowest, highest = torch.aminmax(logits, dim=-1)
                finite = (torch.isfinite(lowest) & torch.isfinite(highest)).all(dim=1)
                if not finite.all():
                    bad = start + int((~finite).nonzero()[0])
                    raise PrunekitError(
                        f"non-finite logits in perplexity window {bad}: the model produces NaN/inf"
                    )
                # position t predicts token t+1; the last position predicts nothing and is ignored,
                # which avoids copying a shifted slice of the logits
                targets = torch.full_like(batch, _IGNORE_INDEX)
                targets[:, :-1] = batch[:, 1:]
                total_nll += F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=_IGNORE_INDEX,
                    reduction="sum",
                ).item()
    finally:
        model.train(was_training)

    tokens = n_windows * (seq_len - 1)
    nll = total_nll / tokens
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": tokens,
        "windows": n_windows,
        "seq_len": seq_len,
    }
