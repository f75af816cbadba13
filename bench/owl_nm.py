"""Benchmark: OWL's allocation with N:M patterns on SmolLM2-135M (issue 11), the rounding prunekit uses against the
one it used before stop 19.

`rounded` (prunekit's `owl_nm_patterns`): each block's N is OWL's own block sparsity (moved by up to `owl_limit` from
the target and centred) put on the grid of whole N, so a block moves only when OWL moves it by half a step or more.
`step` (the allocation before stop 19, kept here as `step_patterns` to reproduce it): every block moved by a whole
step (d = max(1, round(limit * M))) between the ends of the family, whatever the limit, with the mean kept. Both
beside `uniform`, the same N:M in every block.

The one-shot protocol of `bench/oneshot_grid.py`: calibration 32 x 512 tokens of the `wiki-summaries` train split
(seed 0), perplexity on the first 64 non-overlapping 512-token windows of its held-out split.

    nice -n 10 .venv/bin/python bench/owl_nm.py
    .venv/bin/python bench/owl_nm.py --table

Rows are appended to bench/results/owl_nm_smollm2.jsonl as they finish (a cut run resumes); the table goes to
bench/results/owl_nm_smollm2.md and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import RESULTS, append_row, bench_parser, publish, read_rows, run_bench, table_rows  # noqa: E402

RAW = RESULTS / "owl_nm_smollm2.jsonl"
MODEL = "smollm2-135m"
# (variant, method, pattern, owl_limit), in the order they are worth measuring
RUNS = [("uniform", "wanda", "2:4", 0.08), ("rounded", "wanda", "2:4", 0.08), ("step", "wanda", "2:4", 0.08),
        ("rounded", "wanda", "2:4", 0.25),
        ("uniform", "wanda", "4:8", 0.08), ("step", "wanda", "4:8", 0.08), ("rounded", "wanda", "4:8", 0.08),
        ("step", "wanda", "4:8", 0.25), ("rounded", "wanda", "4:8", 0.25),
        ("uniform", "sparsegpt", "4:8", 0.08), ("step", "sparsegpt", "4:8", 0.08),
        ("rounded", "sparsegpt", "4:8", 0.08)]


def _name(variant: str, method: str, pattern: str, limit: float) -> str:
    return f"{method}:{pattern}:{variant}" + ("" if variant == "uniform" else f":{limit:g}")


def step_patterns(outlier_ratios: Sequence[float], pattern, limit: float, sizes: Sequence[int] | None = None):
    """The allocation before stop 19: N_b linear in the outlier ratio across N - d .. N + d, d at least one step."""
    import numpy as np

    from prunekit.budget import Pattern

    n, m = pattern.n, pattern.m
    ratios = np.asarray(list(outlier_ratios), dtype=np.float64)
    step = min(max(1, round(limit * m)), n - 1, m - n - 1)
    spread = ratios.max() - ratios.min() if len(ratios) else 0.0
    if step < 1 or spread == 0:
        return [pattern] * len(ratios)
    exact = n - step + 2 * step * (ratios - ratios.min()) / spread
    exact = np.clip(exact + n - exact.mean(), n - step, n + step)
    counts = np.floor(exact).astype(np.int64)
    missing = len(ratios) * n - int(counts.sum())
    while missing:
        room = counts < n + step if missing > 0 else counts > n - step
        gap = np.where(room, exact - counts, -np.inf if missing > 0 else np.inf)
        chosen = int(np.argmax(gap)) if missing > 0 else int(np.argmin(gap))
        counts[chosen] += 1 if missing > 0 else -1
        missing += -1 if missing > 0 else 1
    return [Pattern(int(k), m) for k in counts]


def run(args: argparse.Namespace) -> None:
    import warnings

    import torch

    import prunekit.weights.engine as engine
    from prunekit import prune
    from prunekit.assets import load_causal_lm
    from prunekit.corpus import evaluation_windows
    from prunekit.measure import environment, perplexity

    torch.set_num_threads(args.threads)
    done = {r["name"] for r in read_rows(RAW)}
    loaded = load_causal_lm(MODEL)
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    windows = evaluation_windows(tokenizer, "wiki-summaries", seq_len=512, max_windows=args.eval_windows)
    if "dense" not in done:
        append_row(RAW, {"name": "dense", "perplexity": perplexity(dense, windows.ids, progress=False)["perplexity"],
                         "evaluation": windows.info, "environment": environment()})
    rounded = engine.owl_nm_patterns
    for variant, method, pattern, limit in RUNS:
        name = _name(variant, method, pattern, limit)
        if name in done:
            continue
        engine.owl_nm_patterns = step_patterns if variant == "step" else rounded
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rounded 2:4 at 0.08 warns that it is uniform: the row says so
            record = prune(model, tokenizer, method=method, pattern=pattern,
                           allocation="uniform" if variant == "uniform" else "owl", owl_limit=limit,
                           calibration="wiki-summaries", calibration_samples=32, calibration_seq_len=512, seed=0,
                           batch_size=8, progress=False, model_source=MODEL)
        row = {"name": name, "variant": variant, "method": method, "pattern": pattern, "owl_limit": limit,
               "prune_s": time.perf_counter() - start,
               "perplexity": perplexity(model, windows.ids, progress=False)["perplexity"],
               "patterns": record["method"].get("owl_block_patterns") or [pattern] * model.config.num_hidden_layers}
        append_row(RAW, row)
        print(json.dumps(row), file=sys.stderr)
    engine.owl_nm_patterns = rounded


def _patterns_cell(patterns: list[str]) -> str:
    """The per-block patterns as runs: '2:4 ×1, 1:4 ×8, ...' (block order)."""
    runs: list[list] = []
    for p in patterns:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return ", ".join(f"{p}×{k}" for p, k in runs)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    dense = next(r for r in rows if r["name"] == "dense")
    env = dense["environment"]
    lines = [f"SmolLM2-135M (`{MODEL}`), dense perplexity {dense['perplexity']:.2f}; the one-shot protocol (32 × 512 "
             f"calibration tokens of the `wiki-summaries` train split, seed 0; {args.eval_windows} × 512 held-out "
             f"windows). `rounded`: prunekit's OWL N:M allocation; `step`: the allocation before stop 19 (a whole "
             f"step whatever the limit). Blocks listed in order as pattern×count. {args.threads} threads on "
             f"{platform.processor() or platform.machine()} ({env['cpu_count']} cores), torch {env['torch']}, "
             f"transformers {env['transformers']}. Regenerate: `.venv/bin/python bench/owl_nm.py`.", "",
             "| method | pattern | allocation | owl_limit | perplexity | prune s | blocks 0-29 |",
             "|---|---|---|---:|---:|---:|---|"]
    order = {_name(*run): i for i, run in enumerate(RUNS)}
    for r in sorted((r for r in rows if r["name"] != "dense"), key=lambda r: order.get(r["name"], len(order))):
        limit = "" if r["variant"] == "uniform" else f"{r['owl_limit']:g}"
        lines.append(f"| {r['method']} | {r['pattern']} | {r['variant']} | {limit} | {r['perplexity']:.2f} | "
                     f"{r['prune_s']:.0f} | {_patterns_cell(r['patterns'])} |")
    return "\n".join(lines)


def write(args: argparse.Namespace) -> None:
    publish("owl_nm_smollm2", table(table_rows(RAW), args), "## One-shot pruning beyond SparseGPT (issue 11)")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--eval-windows", type=int, default=64)
    run_bench(parser, run, write)


if __name__ == "__main__":
    main()
