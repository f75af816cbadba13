"""The per-example steps (embedding, perplexity) as Ray Data batch maps, when `ray` is installed.

The same batch functions as the in-process path (`prunekit.data.embed.encode_batch`,
`prunekit.data.lm_scores.sequence_nll`) run inside `ray.data.Dataset.map_batches` on actors that load the model
once. Rows carry their input index, so results come back in input order whatever order Ray finishes batches in.
Texts are fed longest first (as `length_batches` orders them locally), so batches pad as little as in-process.
Global steps (k-means, SemDeDup, selection, training a probe) then run on the driver, so a `backend="ray"` run writes
the same ids, keep flags and (to float rounding of differently padded batches) the same scores as a local run.

Without a running cluster, `ensure_ray` starts a local one: `ray.init(num_cpus=..., include_dashboard=False)`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from prunekit.data.embed import DEFAULT_BATCH_SIZE, MAX_LENGTH
from prunekit.errors import PrunekitError


def ray_available() -> bool:
    """Whether `ray` (with Ray Data) can be imported."""
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the running Ray instance, or start a local one with `num_cpus` CPUs (default: this machine's)."""
    if not ray_available():
        raise PrunekitError("backend 'ray' needs Ray Data: pip install 'ray[data]' (or use backend 'local')")
    import ray

    if not ray.is_initialized():
        # Workers inherit the offline flags so that no model hub is ever contacted.
        flags = {k: os.environ.get(k, "1") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {**flags, "OMP_NUM_THREADS": "1"}})


class _Embedder:
    """A Ray actor's state: one encoder, loaded once, embedding batches of rows {index, text}."""

    def __init__(self, model: str, max_length: int) -> None:
        import torch

        from prunekit.data.embed import load_encoder

        torch.set_num_threads(1)
        self.encoder = load_encoder(model)
        self.max_length = max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from prunekit.data.embed import encode_batch

        vectors = encode_batch(self.encoder, [str(t) for t in batch["text"]], self.max_length)
        return {"index": batch["index"], "embedding": vectors}


class _Perplexity:
    """A Ray actor's state: one causal LM, scoring batches of rows {index, ids} (token ids, BOS included)."""

    def __init__(self, model: str) -> None:
        import torch

        from prunekit.assets import load_causal_lm

        torch.set_num_threads(1)
        self.loaded = load_causal_lm(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from prunekit.data.lm_scores import sequence_nll

        tokenizer = self.loaded.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        nll = sequence_nll(self.loaded.model, [list(map(int, row)) for row in batch["ids"]], pad_id)
        return {"index": batch["index"], "score": np.exp(nll)}


def _collect(rows: list[dict[str, Any]], column: str, n: int) -> np.ndarray:
    index = np.asarray([row["index"] for row in rows], dtype=np.int64)
    if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
        raise RuntimeError(f"Ray returned {len(index)} rows for {n} inputs")
    values = np.stack([np.asarray(row[column]) for row in rows])
    out = np.empty_like(values)
    out[index] = values
    return out


def _map(rows: list[dict[str, Any]], actor: type, args: tuple, batch_size: int, concurrency: int | None,
         progress: bool) -> list[dict]:
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress
    if concurrency is None:
        concurrency = max(1, int(ray.cluster_resources().get("CPU", 1)))
    dataset = ray.data.from_items(rows)
    mapped = dataset.map_batches(actor, fn_constructor_args=args, batch_size=batch_size, batch_format="numpy",
                                 concurrency=concurrency, num_cpus=1)
    return mapped.take_all()


def _longest_first(lengths: Sequence[int]) -> np.ndarray:
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


def ray_embed_texts(
    texts: Sequence[str],
    model: str = "minilm-l6",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    num_cpus: int | None = None,
    concurrency: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """`prunekit.data.embed.embed_texts` as a Ray Data `map_batches` over `concurrency` actors (default: one per
    CPU of the cluster); float32 (N, dim)."""
    if len(texts) == 0:
        raise PrunekitError("no texts to embed: the input is empty")
    ensure_ray(num_cpus)
    order = _longest_first([len(t) for t in texts])
    rows = [{"index": int(i), "text": texts[i]} for i in order]
    result = _map(rows, _Embedder, (str(model), max_length), batch_size, concurrency, progress)
    return _collect(result, "embedding", len(texts)).astype(np.float32)


def ray_perplexity_scores(
    texts: Sequence[str],
    model: str = "smollm2-135m",
    *,
    max_length: int = 256,
    batch_size: int = 8,
    num_cpus: int | None = None,
    concurrency: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """`prunekit.data.lm_scores.perplexity_scores` as a Ray Data `map_batches` over `concurrency` actors (default:
    one per CPU of the cluster); float64 (N,)."""
    from transformers import AutoTokenizer

    from prunekit.assets import model_asset_names, model_path
    from prunekit.data.lm_scores import token_ids

    if len(texts) == 0:
        raise PrunekitError("no texts to score: the input is empty")
    path = model_path(model) if model in model_asset_names() else model
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = token_ids(tokenizer, texts, max_length)  # tokenized once, on the driver
    ensure_ray(num_cpus)
    order = _longest_first([len(row) for row in ids])
    # Token rows differ in length, so they travel as object arrays of lists.
    rows = [{"index": int(i), "ids": np.asarray(ids[i], dtype=np.int64)} for i in order]
    result = _map(rows, _Perplexity, (str(model),), batch_size, concurrency, progress)
    return _collect(result, "score", len(texts)).astype(np.float64)
