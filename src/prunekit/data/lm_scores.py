"""Perplexity of each text under a reference causal language model: higher = harder (less predictable) text.

Each text is tokenized on its own, with the tokenizer's BOS token in front when it has one (so the first real token
is predicted too), and truncated to `max_length` tokens in all; its perplexity is exp of the mean next-token
negative log-likelihood over its predicted tokens. Texts are batched in order of length, right-padded, and scored in
input order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.assets import LoadedModel, load_causal_lm
from prunekit.data.embed import length_batches
from prunekit.errors import PrunekitError


def token_ids(tokenizer: object, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text: BOS (if the tokenizer has one) then the text's tokens, at most `max_length` in all."""
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if bos is not None else []
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    ids = [(prefix + list(e))[:max_length] for e in encoded]
    for i, row in enumerate(ids):
        if len(row) < 2:
            raise PrunekitError(
                f"text {i} has {len(row)} token(s) after truncation; perplexity needs at least 2 (it is empty?)"
            )
    return ids


@torch.no_grad()
def sequence_nll(model: nn.Module, batch: list[list[int]], pad_id: int) -> np.ndarray:
    """Mean next-token negative log-likelihood of each sequence of a batch, float64."""
    width = max(len(row) for row in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target, valid = ids[:, 1:], mask[:, 1:].bool()
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return ((nll * valid).sum(1) / valid.sum(1)).double().numpy()


def perplexity_scores(
    texts: Sequence[str],
    model: str | os.PathLike | LoadedModel = "smollm2-135m",
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> np.ndarray:
    """Perplexity of each text (float64, (N,)) under a causal LM: an asset name, local directory or `LoadedModel`."""
    if len(texts) == 0:
        raise PrunekitError("no texts to score: the input is empty")
    for name, value, low in (("max_length", max_length, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PrunekitError(f"{name} must be an integer >= {low}, got {value!r}")
    loaded = model if isinstance(model, LoadedModel) else load_causal_lm(model)
    tokenizer = loaded.tokenizer
    ids = token_ids(tokenizer, texts, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padded positions are masked
    nll = np.empty(len(ids), dtype=np.float64)
    batches = list(length_batches([len(row) for row in ids], batch_size))
    loaded.model.eval()
    for idx in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        nll[idx] = sequence_nll(loaded.model, [ids[i] for i in idx], pad_id)
    return np.exp(nll)
