"""Embeddings of examples: sentence embeddings of texts from all-MiniLM-L6-v2, or features from any torch model.

`embed_texts` follows the sentence-transformers recipe for all-MiniLM-L6-v2: WordPiece tokens truncated to 256,
the encoder's last hidden states mean-pooled over the attention mask, then L2-normalised; float32. Texts are
batched in order of length (so a batch pads little) and returned in input order. Large outputs go to a
memory-mapped array (`out=`, e.g. from `prunekit.data.io.ArrayStore`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError

# The fastest batch size in a sweep over 4-64 on 256 BBC News articles (256 tokens each), 2 threads, interleaved
# rounds (bench/results/data_throughput.md): 17.5 texts/s at 16, 15.6-17.2 at the others. Once a batch holds a few
# full-length texts the matrix products are large enough; bigger batches only grow the attention buffers.
DEFAULT_BATCH_SIZE = 16
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers
EMBEDDING_DIM = 384


@dataclass
class Encoder:
    """A text encoder (a Hugging Face AutoModel) with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str


def load_encoder(model: str | os.PathLike = "minilm-l6") -> Encoder:
    """Load a sentence encoder: the asset `minilm-l6` or a local Hugging Face directory, in eval mode on the CPU."""
    from transformers import AutoModel, AutoTokenizer

    from prunekit.artifacts.io import check_model_dir
    from prunekit.assets import model_asset_names, model_path

    name = os.fspath(model)
    if name in model_asset_names():
        path = model_path(name)
    elif os.path.isdir(name):
        path = name
        check_model_dir(Path(path))  # config readable, safetensors weights sound, nothing pickled
    else:
        raise PrunekitError(f"encoder {name!r} is neither a model asset (minilm-l6) nor a local directory")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32, use_safetensors=True).eval()
    return Encoder(model=encoder, tokenizer=tokenizer, source=name)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrunekitError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
    """Indices in batches of `batch_size`, longest first, so that each batch holds texts of similar length.

    The order is stable (ties keep input order), so batches are the same on every run and in every backend.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def encode_batch(encoder: Encoder, texts: list[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """L2-normalised mean-pooled embeddings of one batch of texts, float32 (len(texts), dim)."""
    batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = encoder.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    # Mean over real tokens only (sentence-transformers' mean pooling), then unit length for cosine similarity.
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, p=2, dim=1).numpy().astype(np.float32, copy=False)


def _check_texts(texts: Sequence[str]) -> None:
    if len(texts) == 0:
        raise PrunekitError("no texts to embed: the input is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise PrunekitError(f"text {i} is a {type(text).__name__}, not a string")


def embed_texts(
    texts: Sequence[str],
    model: str | os.PathLike | Encoder = "minilm-l6",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    out: np.ndarray | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Sentence embeddings of `texts`, float32 (N, dim), L2-normalised, in input order.

    `model` is an asset name, a local directory or a loaded `Encoder`. `out`, if given, is filled and returned
    (a memory-mapped array keeps a million embeddings out of anonymous memory).
    """
    _check_texts(texts)
    _check_batch_size(batch_size)
    encoder = model if isinstance(model, Encoder) else load_encoder(model)
    dim = encoder.model.config.hidden_size
    if out is None:
        out = np.empty((len(texts), dim), dtype=np.float32)
    elif out.shape != (len(texts), dim):
        raise PrunekitError(f"output array has shape {out.shape}; expected {(len(texts), dim)}")
    # Character length is a cheap stand-in for token length when ordering texts into batches.
    batches = list(length_batches([len(t) for t in texts], batch_size))
    for idx in tqdm(batches, desc="embedding", unit="batch", disable=not progress):
        out[idx] = encode_batch(encoder, [texts[i] for i in idx], max_length)
    return out


def _last_parametrised_leaf(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """The last leaf module with parameters that runs in a forward pass (typically the classifier head)."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda module, args, output: order.append(module))
        for m in model.modules()
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    try:
        model(sample)
    finally:
        for hook in hooks:
            hook.remove()
    if not order:
        raise PrunekitError(f"model {type(model).__name__} has no module with parameters to take features before")
    return order[-1]


@torch.no_grad()
def embed_with(
    model: nn.Module,
    inputs: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 256,
    layer: nn.Module | None = None,
    normalize: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """Features of `inputs` from any torch model: the input of `layer` (default: the penultimate features, i.e.
    the input of the last parametrised module to run, such as the classifier head), flattened to float32 (N, D).

    The model runs in eval mode (its mode is restored afterwards); `normalize` makes rows unit length.
    """
    _check_batch_size(batch_size)
    inputs = torch.as_tensor(inputs)
    if len(inputs) == 0:
        raise PrunekitError("no inputs to embed: the input is empty")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    try:
        target = layer or _last_parametrised_leaf(model, inputs[:1].to(device))
        hook = target.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
        chunks = []
        try:
            for start in tqdm(range(0, len(inputs), batch_size), desc="features", unit="batch", disable=not progress):
                captured.clear()
                model(inputs[start : start + batch_size].to(device))
                chunks.append(captured[-1].flatten(1).float().cpu())
        finally:
            hook.remove()
    finally:
        model.train(was_training)
    features = torch.cat(chunks)
    if normalize:
        features = nn.functional.normalize(features, p=2, dim=1)
    return features.numpy().astype(np.float32, copy=False)
