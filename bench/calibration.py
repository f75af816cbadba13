"""Benchmark: how much the calibration data changes one-shot pruning of SmolLM2-135M (issue 11; Williams &
Aletras 2024, "On the impact of calibration data in post-training quantization and pruning").

Wanda and SparseGPT at 50% unstructured, calibrated on 32 x 512 tokens (seed 0) of the train split of each text
asset (`wiki-summaries`, the evaluation's own domain; `bbc-news`; `shakespeare`) and on uniformly random token ids,
then with 8 and 128 sequences of `wiki-summaries`, 128 sequences of 128 tokens (the same token count as 32 x 512),
and with true-sequential calibration (each projection group calibrated on the outputs of the groups already pruned
in its block). Perplexity on the first 64 non-overlapping 512-token windows of the held-out `wiki-summaries` split
(the one-shot protocol), and, for the source rows, on 64 windows of held-out `bbc-news`.

    nice -n 10 .venv/bin/python bench/calibration.py
    .venv/bin/python bench/calibration.py --table

Rows are appended to bench/results/calibration_smollm2.jsonl as they finish (a cut run resumes); the table goes to
bench/results/calibration_smollm2.md and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import RESULTS, append_row, bench_parser, publish, read_rows, run_bench, table_rows  # noqa: E402

RAW = RESULTS / "calibration_smollm2.jsonl"
MODEL = "smollm2-135m"
SEQ_LEN = 512
SOURCES = ("wiki-summaries", "bbc-news", "shakespeare", "random tokens")
# (name, method, source, samples, length, true_sequential), the comparison that matters first
RUNS = [(f"{method} {source}", method, source, 32, SEQ_LEN, False) for source in SOURCES
        for method in ("wanda", "sparsegpt")]
RUNS += [(f"{method} true-sequential", method, "wiki-summaries", 32, SEQ_LEN, True)
         for method in ("wanda", "sparsegpt")]
RUNS += [(f"{method} {samples} x {length}", method, "wiki-summaries", samples, length, False)
         for samples, length in ((8, SEQ_LEN), (128, SEQ_LEN), (128, 128)) for method in ("wanda", "sparsegpt")]


def run(args: argparse.Namespace) -> None:
    import torch

    from prunekit import prune
    from prunekit.assets import load_causal_lm
    from prunekit.corpus import evaluation_windows
    from prunekit.measure import environment, perplexity

    torch.set_num_threads(args.threads)
    done = {r["name"] for r in read_rows(RAW)}
    loaded = load_causal_lm(MODEL)
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    evals = {data: evaluation_windows(tokenizer, data, seq_len=SEQ_LEN, max_windows=args.eval_windows)
             for data in ("wiki-summaries", "bbc-news")}
    if "dense" not in done:
        append_row(RAW, {"name": "dense", **{data: perplexity(dense, w.ids, progress=False)["perplexity"]
                                             for data, w in evals.items()},
                         "evaluation": {d: w.info for d, w in evals.items()}, "environment": environment()})
    for name, method, source, samples, length, true_sequential in RUNS:
        if name in done:
            continue
        calibration = source
        if source == "random tokens":  # the same shape, ids uniform over the vocabulary
            generator = torch.Generator().manual_seed(0)
            calibration = torch.randint(0, len(tokenizer), (samples, length), generator=generator)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        record = prune(model, tokenizer, method=method, sparsity=0.5, calibration=calibration,
                       calibration_samples=samples, calibration_seq_len=length, seed=0, batch_size=8,
                       true_sequential=true_sequential, progress=False, model_source=MODEL)
        row = {"name": name, "method": method, "source": source, "samples": samples, "length": length,
               "true_sequential": true_sequential, "prune_s": time.perf_counter() - start,
               "calibration": record["calibration"]}
        for data, windows in evals.items():
            if data == "wiki-summaries" or name.endswith(SOURCES):
                row[data] = perplexity(model, windows.ids, progress=False)["perplexity"]
        append_row(RAW, row)
        print(json.dumps({k: v for k, v in row.items() if k != "calibration"}), file=sys.stderr)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    dense = next(r for r in rows if r["name"] == "dense")
    env = dense["environment"]
    lines = [f"SmolLM2-135M (`{MODEL}`), 50% unstructured. Perplexity on the first {args.eval_windows} "
             f"non-overlapping {SEQ_LEN}-token windows of the held-out split of `wiki-summaries` (and of `bbc-news` "
             f"for the source rows); dense {dense['wiki-summaries']:.2f} and {dense['bbc-news']:.2f}. Calibration "
             f"from the train split of each asset (seed 0); random tokens: ids uniform over the 49,152-token "
             f"vocabulary. {args.threads} threads on {platform.processor() or platform.machine()} "
             f"({env['cpu_count']} cores), torch {env['torch']}, transformers {env['transformers']}; prune seconds on "
             f"a shared machine. Regenerate: `.venv/bin/python bench/calibration.py`.", "",
             "| method | calibration | sequences × tokens | wiki-summaries ppl | bbc-news ppl | prune s |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if r["name"] == "dense":
            continue
        source = r["source"] + (", true-sequential" if r["true_sequential"] else "")
        news = f"{r['bbc-news']:.2f}" if "bbc-news" in r else ""
        lines.append(f"| {r['method']} | {source} | {r['samples']} × {r['length']} | {r['wiki-summaries']:.2f} | "
                     f"{news} | {r['prune_s']:.0f} |")
    return "\n".join(lines)


def write(args: argparse.Namespace) -> None:
    publish("calibration_smollm2", table(table_rows(RAW), args), "## One-shot pruning beyond SparseGPT (issue 11)")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--eval-windows", type=int, default=64)
    run_bench(parser, run, write)


if __name__ == "__main__":
    main()
