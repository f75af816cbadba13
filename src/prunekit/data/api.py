"""Static data pruning end to end: read → score → select → write, with the protocol card.

`prune_data` is the one public entry point (the `prunekit data` command mirrors it). The steps are visible as
functions of their own: `score_examples` (a scorer never knows how its scores are selected), `select_kept` (a
selector never knows where scores came from), and the writers of `prunekit.data.io`.

Methods and what they need:
- `random`: uniform scores under `seed` (any input).
- `semdedup`: SemDeDup groups from embeddings (`threshold`, no `keep`); keeps one example per duplicate group.
- `prototypes`: cosine distance to the nearest k-means centroid of the embeddings.
- `perplexity`: perplexity under a reference causal LM (text only).
- `loss`, `el2n`, `grand`, `forgetting`, `aum`, `entropy`, `margin`: training dynamics of a linear probe on the
  embeddings (needs `label_field`).
Embeddings are MiniLM sentence embeddings of the text field for text inputs, or the numeric features themselves
(flattened; L2-normalised for the k-means methods) for array inputs.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet
import torch
from torch import nn

from prunekit.artifacts.files import Staging, check_distinct, check_output, check_output_file
from prunekit.data import dynamics, selectors
from prunekit.data.io import (
    ArrayStore,
    DataTable,
    output_format,
    read_data,
    scores_table,
    write_table,
)
from prunekit.errors import PrunekitError
from prunekit.measure import ResourceMonitor
from prunekit.measure.protocol import result_record

DEDUP_METHODS = ("semdedup",)
EMBEDDING_METHODS = ("prototypes",)
TEXT_METHODS = ("perplexity",)
PROBE_METHODS = tuple(name for name in dynamics.TRAINING_SCORERS if name != "random")
DATA_METHODS = ("random", *DEDUP_METHODS, *EMBEDDING_METHODS, *TEXT_METHODS, *PROBE_METHODS)
MODES = (*selectors.MODES, "ccs")
BACKENDS = ("local", "ray")
# Embeddings of more examples than this go to a memory-mapped file rather than anonymous memory.
MEMMAP_ROWS = 100_000


@dataclass
class ScoreResult:
    """One score per example (float64, higher = harder; for SemDeDup the largest cosine similarity to an earlier
    example of its cluster, which decides removal, lowest for the kept member of a group), SemDeDup's `groups` where
    it applies, and how they were made."""

    scores: np.ndarray
    groups: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def check_options(
    method: str,
    *,
    keep: float | int | None,
    threshold: float | None,
    mode: str,
    label_field: str | None,
    class_balanced: bool,
    backend: str,
    semdedup_rule: str = "paper",
    semdedup_keep: str = "central",
) -> None:
    """Everything about the options that can be checked before reading the data."""
    if method not in DATA_METHODS:
        raise PrunekitError(f"data pruning method {method!r} is unknown; use one of {', '.join(DATA_METHODS)}")
    if backend not in BACKENDS:
        raise PrunekitError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if method in DEDUP_METHODS:
        if threshold is None:
            raise PrunekitError(f"{method} needs a cosine similarity threshold in (0, 1), e.g. --threshold 0.9")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1:
            raise PrunekitError(f"SemDeDup threshold must be a cosine similarity in (0, 1), got {threshold!r}")
        if keep is not None:
            raise PrunekitError(f"{method} keeps one example per duplicate group; give --threshold, not --keep")
        from prunekit.data.semantic import KEEP_ORDERS, RULES

        if semdedup_rule not in RULES:
            raise PrunekitError(f"SemDeDup rule {semdedup_rule!r} is unknown; use one of {', '.join(RULES)}")
        if semdedup_keep not in KEEP_ORDERS:
            raise PrunekitError(f"SemDeDup keep order {semdedup_keep!r} is unknown; use one of "
                                f"{', '.join(KEEP_ORDERS)}")
        return
    if threshold is not None:
        raise PrunekitError(f"--threshold applies to {', '.join(DEDUP_METHODS)} only, not to {method}")
    if keep is None:
        raise PrunekitError(f"{method} needs a keep budget: a fraction in (0, 1] or a count, e.g. --keep 0.5")
    if mode not in MODES:
        raise PrunekitError(f"selection mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if method in PROBE_METHODS and label_field is None:
        raise PrunekitError(f"{method} trains a classifier on the examples and needs labels; give --label-field")
    if class_balanced and label_field is None:
        raise PrunekitError("class-balanced selection needs labels; give --label-field")


def _is_text(table: DataTable, text_field: str, feature_field: str | None) -> bool:
    """Whether the examples are texts (else numeric features)."""
    if feature_field is not None or table.arrays is not None:
        return False
    table.texts(text_field)  # raises a clear error for a missing text field
    return True


def _check_fields(table: DataTable, method: str, text_field: str, text_field_given: bool,
                  feature_field: str | None) -> None:
    """Every field the caller named must exist, whether or not `method` reads it (a typo is never ignored)."""
    if feature_field is not None:
        table.features(feature_field)
    if text_field_given and (feature_field is not None or table.arrays is not None):
        raise PrunekitError(f"'{table.source}' holds numeric arrays; text field {text_field!r} does not apply to it")
    if text_field_given or method != "random":
        _is_text(table, text_field, feature_field)  # a missing text field fails before any scoring


def _work_store(work_dir: str | os.PathLike | None, n: int, stack: list) -> ArrayStore | None:
    if work_dir is not None:
        return ArrayStore(work_dir)
    if n <= MEMMAP_ROWS:
        return None
    tmp = tempfile.TemporaryDirectory(prefix="prunekit-data-")
    stack.append(tmp)
    return ArrayStore(tmp.name)


def _embeddings(
    table: DataTable,
    *,
    text_field: str,
    feature_field: str | None,
    encoder: str,
    batch_size: int | None,
    max_length: int | None,
    backend: str,
    store: ArrayStore | None,
    progress: bool,
) -> tuple[np.ndarray, dict]:
    from prunekit.data import embed

    if not _is_text(table, text_field, feature_field):
        return table.features(feature_field), {"embeddings": "numeric features, flattened", "field": feature_field}
    texts = table.texts(text_field)
    batch_size = batch_size or embed.DEFAULT_BATCH_SIZE
    max_length = max_length or embed.MAX_LENGTH
    info = {"embeddings": "mean-pooled, L2-normalised sentence embeddings", "encoder": str(encoder),
            "field": text_field, "batch_size": batch_size, "max_length": max_length}
    if backend == "ray":
        from prunekit.data.distributed import ray_embed_texts

        return ray_embed_texts(texts, encoder, batch_size=batch_size, max_length=max_length, progress=progress), info
    out = None if store is None else store.create("embeddings", (len(texts), embed.EMBEDDING_DIM), np.float32)
    return embed.embed_texts(texts, encoder, batch_size=batch_size, max_length=max_length, out=out,
                             progress=progress), info


def score_examples(
    table: DataTable,
    method: str,
    *,
    text_field: str = "text",
    label_field: str | None = None,
    feature_field: str | None = None,
    threshold: float | None = None,
    clusters: int | None = None,
    semdedup_rule: str = "paper",
    semdedup_keep: str = "central",
    seed: int = 0,
    encoder: str = "minilm-l6",
    reference_lm: str = "smollm2-135m",
    batch_size: int | None = None,
    max_length: int | None = None,
    backend: str = "local",
    work_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> ScoreResult:
    """Score every example of `table` with `method` (see the module docstring)."""
    from prunekit.data import semantic

    n = len(table)
    if n == 0:
        raise PrunekitError(f"input '{table.source}' has no examples; give at least one")
    labels = table.labels(label_field) if label_field is not None else None
    keepalive: list = []
    if method == "random":
        return ScoreResult(np.random.default_rng(seed).random(n), info={"scores": "uniform in [0, 1) under seed"})
    if method == "perplexity":
        if not _is_text(table, text_field, feature_field):
            raise PrunekitError(f"perplexity scores texts; '{table.source}' holds numeric arrays")
        texts = table.texts(text_field)
        length = max_length or 256
        size = batch_size or 8
        if backend == "ray":
            from prunekit.data.distributed import ray_perplexity_scores

            scores = ray_perplexity_scores(texts, reference_lm, max_length=length, batch_size=size, progress=progress)
        else:
            from prunekit.data.lm_scores import perplexity_scores

            scores = perplexity_scores(texts, reference_lm, max_length=length, batch_size=size, progress=progress)
        return ScoreResult(scores, info={"reference_lm": str(reference_lm), "max_length": length, "batch_size": size})
    store = _work_store(work_dir, n, keepalive)
    embeddings, info = _embeddings(table, text_field=text_field, feature_field=feature_field, encoder=encoder,
                                   batch_size=batch_size, max_length=max_length, backend=backend, store=store,
                                   progress=progress)
    semantic.check_embeddings(embeddings)
    if method == "semdedup":
        result = semantic.semdedup(embeddings, threshold=threshold, k=clusters, rule=semdedup_rule,
                                   keep=semdedup_keep, seed=seed, threads=threads, progress=progress)
        info.update(clusters=result.k, duplicates=result.duplicates, rule=result.rule, keep=result.keep)
        return ScoreResult(result.similarity, groups=result.groups, info=info)
    if method == "prototypes":
        k = semantic.default_clusters(n) if clusters is None else clusters
        info.update(clusters=k)
        return ScoreResult(semantic.prototype_scores(embeddings, k, seed=seed, threads=threads), info=info)
    # Training dynamics of a linear probe (softmax regression) on the embeddings or features.
    inputs = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    classes = int(labels.max()) + 1
    scorer = dynamics.TRAINING_SCORERS[method]
    scores = scorer(lambda: nn.Linear(inputs.shape[1], classes), inputs, torch.from_numpy(labels), seed=seed,
                    progress=progress)
    info.update(probe=f"linear {inputs.shape[1]} -> {classes} classes", classes=classes)
    return ScoreResult(np.asarray(scores, dtype=np.float64), info=info)


def select_kept(
    scores: ScoreResult,
    keep: float | int | None,
    *,
    mode: str = "hard",
    band_start: float = 0.0,
    labels: np.ndarray | None = None,
    class_balanced: bool = False,
    random_fraction: float = 0.0,
    hard_cut: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Sorted int64 indices of the kept examples: one per group for dedup scores, else by `mode` under `keep`."""
    if scores.groups is not None:  # the lowest score of a group is the member the dedup method keeps
        return selectors.dedup_select(scores.groups, scores.scores)
    if mode == "ccs":
        return selectors.ccs_select(scores.scores, keep, hard_cut=hard_cut, labels=labels if class_balanced else None,
                                    seed=seed)
    return selectors.select_examples(scores.scores, keep, mode=mode, band_start=band_start, labels=labels,
                                     class_balanced=class_balanced, random_fraction=random_fraction, seed=seed)


def prune_data(
    input: Any,
    *,
    method: str,
    keep: float | int | None = None,
    threshold: float | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    id_field: str | None = None,
    feature_field: str | None = None,
    mode: str = "hard",
    band_start: float = 0.0,
    class_balanced: bool = False,
    random_fraction: float = 0.0,
    hard_cut: float = 0.1,
    clusters: int | None = None,
    semdedup_rule: str = "paper",
    semdedup_keep: str = "central",
    seed: int = 0,
    out: str | os.PathLike | None = None,
    scores_out: str | os.PathLike | None = None,
    report_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    backend: str = "local",
    encoder: str = "minilm-l6",
    reference_lm: str = "smollm2-135m",
    batch_size: int | None = None,
    max_length: int | None = None,
    work_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> dict:
    """Prune a data set: score its examples with `method`, keep a subset, write it, return the result record.

    `input` is anything `prunekit.data.io.read_data` reads. `keep` is a fraction in (0, 1] or a count; `mode` is
    hard / easy / band (skipping the hardest `band_start`) / ccs (coverage-centric, `hard_cut`); `class_balanced`
    keeps per-class quotas; `random_fraction` of the kept examples are drawn uniformly. SemDeDup takes `threshold`
    instead of `keep`, and `semdedup_rule` / `semdedup_keep` (see `prunekit.data.semantic.semdedup`). `clusters` is
    k for the k-means methods (default about sqrt(N)).

    Outputs, each optional and all written together or not at all: `out` the kept subset in the input's format,
    `scores_out` a parquet of id, index, score, keep (and group for SemDeDup), `report_out` the record as JSON. An
    existing output is refused unless `overwrite`. Bad input raises `PrunekitError` before anything is written.
    """
    check_options(method, keep=keep, threshold=threshold, mode=mode, label_field=label_field,
                  class_balanced=class_balanced, backend=backend, semdedup_rule=semdedup_rule,
                  semdedup_keep=semdedup_keep)
    outputs = {"out": out, "scores_out": scores_out, "report_out": report_out}
    source = input if isinstance(input, str | os.PathLike) else None
    # the work directory receives memory-mapped embeddings: that file must not be the input either
    embeddings_file = None if work_dir is None else Path(work_dir) / "embeddings.npy"
    check_distinct({"input": source}, {"output": out, "scores output": scores_out, "report": report_out,
                                       "work directory's embeddings file": embeddings_file})
    if out is not None:
        check_output(out, overwrite)  # a file or, for a saved Hugging Face dataset, a directory
    for path, what, example in ((scores_out, "scores output", "scores.parquet"), (report_out, "report", "report.json")):
        if path is not None:
            check_output_file(path, overwrite, what=what, example=example)
    if scores_out is not None and Path(scores_out).suffix.lower() != ".parquet":
        raise PrunekitError(f"scores output '{scores_out}' must be a .parquet file")
    text_field_given = text_field is not None
    text_field = "text" if text_field is None else text_field
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PrunekitError(f"threads must be an integer >= 1, got {threads!r}")
    # The caller's torch thread count is restored afterwards: `threads` limits this call, not the process.
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with ResourceMonitor() as monitor:
            table = read_data(input, id_field=id_field, text_field=text_field)
            n = len(table)
            if n == 0:
                raise PrunekitError(f"input '{table.source}' has no examples; give at least one")
            out_format = None if out is None else output_format(table, out)
            if keep is not None:
                selectors.keep_count(n, keep)
            _check_fields(table, method, text_field, text_field_given, feature_field)
            labels = table.labels(label_field) if label_field is not None else None
            scored = score_examples(table, method, text_field=text_field, label_field=label_field,
                                    feature_field=feature_field, threshold=threshold, clusters=clusters,
                                    semdedup_rule=semdedup_rule, semdedup_keep=semdedup_keep, seed=seed,
                                    encoder=encoder, reference_lm=reference_lm, batch_size=batch_size,
                                    max_length=max_length, backend=backend, work_dir=work_dir, threads=threads,
                                    progress=progress)
            kept = select_kept(scored, keep, mode=mode, band_start=band_start, labels=labels,
                               class_balanced=class_balanced, random_fraction=random_fraction, hard_cut=hard_cut,
                               seed=seed)
    finally:
        torch.set_num_threads(previous_threads)
    keep_mask = np.zeros(n, dtype=bool)
    keep_mask[kept] = True
    target = None
    if keep is not None:
        target = keep / n if isinstance(keep, int | np.integer) else float(keep)
    record = result_record(
        model={"encoder": scored.info.get("encoder"), "reference_lm": scored.info.get("reference_lm"),
               "probe": scored.info.get("probe")},
        method={"name": method, "keep": keep, "threshold": threshold, "mode": mode if scored.groups is None else None,
                "band_start": band_start, "class_balanced": class_balanced, "random_fraction": random_fraction,
                "hard_cut": hard_cut, "clusters": clusters, "text_field": text_field, "label_field": label_field,
                "id_field": id_field, "feature_field": feature_field, "backend": backend, "scoring": scored.info},
        calibration=None,
        evaluation=None,
        metrics={"examples": n, "kept": len(kept), "removed": n - len(kept),
                 "keep_fraction": {"target": target, "achieved": len(kept) / n}},
        resources=monitor.as_dict(),
        extra={"input": {"source": table.source, "format": table.format, "examples": n}, "seed": seed,
               "outputs": {k: (None if v is None else str(v)) for k, v in outputs.items()}},
    )
    # All outputs appear together or not at all; the resources above cover reading, scoring and selection.
    with Staging(overwrite=overwrite) as stage:
        if out is not None:
            write_table(table.take(kept), stage.path(out, directory=out_format == "hf-disk"), out_format)
        if scores_out is not None:
            pyarrow.parquet.write_table(scores_table(table.ids, scored.scores, keep_mask, scored.groups),
                                        stage.path(scores_out))
        if report_out is not None:
            stage.path(report_out).write_text(json.dumps(record, indent=2) + "\n")
    return record
