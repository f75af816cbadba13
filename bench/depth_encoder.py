"""Benchmark: depth pruning and healing of an encoder (issue 10), all-MiniLM-L6-v2 judged by its sentence embeddings.

Every depth method that applies to an encoder removes 1, 2 and 3 of MiniLM's 6 blocks: `angular` (every token),
`block-influence`, `perplexity` and `sleb` (both minimising the embedding distance to the dense model on the
calibration windows), `reverse`, and `random` with three seeds. Calibration: 16 x 128 tokens of the
`wiki-summaries` train split (seed 0). Quality: the mean cosine between the pruned and the dense model's sentence
embeddings (mean-pooled, normalised) of the first 200 texts of the BBC News test split, truncated to 128 tokens, so
the measure is out of the calibration domain. Healing (`prunekit.heal`, LoRA rank 8 on every projection, merged,
distilling the dense model's embeddings: 1 - cosine of each mean-pooled window) on `--heal-tokens` (65,536) tokens
of the wiki-summaries train split (128-token windows, batch 8, seed 0) for the best informed method and reverse
order at each budget.

    nice -n 10 .venv/bin/python bench/depth_encoder.py         # resumes from the rows already written
    .venv/bin/python bench/depth_encoder.py --table

Rows go to bench/results/depth_minilm.jsonl as they finish; the table to bench/results/depth_minilm.md and
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import (  # noqa: E402
    RESULTS,
    append_row,
    bench_parser,
    median_cell,
    publish,
    read_rows,
    run_bench,
    table_rows,
)

RAW = RESULTS / "depth_minilm.jsonl"
MODEL = "minilm-l6"
METHODS = ("angular", "block-influence", "perplexity", "sleb", "reverse", "random")
BUDGETS = (1, 2, 3)
SEEDS = (0, 1, 2)
CALIBRATION = dict(calibration="wiki-summaries", calibration_samples=16, calibration_seq_len=128, seed=0)
TEXTS, TOKENS = 200, 128


def _key(row: dict) -> tuple:
    return row["kind"], row.get("method"), row.get("blocks"), row.get("seed")


def run(args: argparse.Namespace) -> None:
    import torch

    import prunekit
    from prunekit.data.embed import load_encoder
    from prunekit.depth import remove_blocks
    from prunekit.inputs import encoder_evaluation_set
    from prunekit.measure import environment
    from prunekit.recovery import heal

    torch.set_num_threads(args.threads)
    done = {_key(r) for r in read_rows(RAW)}
    encoder = load_encoder(MODEL)
    dense, tokenizer = encoder.model, encoder.tokenizer
    evaluation = encoder_evaluation_set(dense, tokenizer, "bbc-news", texts=TEXTS, max_length=TOKENS)
    if ("dense", None, None, None) not in done:
        append_row(RAW, {"kind": "dense", "blocks": 0, "evaluation": evaluation.info, "environment": environment(),
                         "parameters": sum(p.numel() for p in dense.parameters())})
    for blocks in BUDGETS:
        for method in METHODS:
            for seed in SEEDS if method == "random" else (0,):
                if ("depth", method, blocks, seed) in done:
                    continue
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                record = prunekit.prune_depth(model, tokenizer, method=method, blocks=blocks, progress=False,
                                              **{**CALIBRATION, "seed": seed})
                prune_s = time.perf_counter() - start
                metrics = record["metrics"]
                row = {"kind": "depth", "method": method, "blocks": blocks, "seed": seed,
                       "removed_blocks": metrics["removed_blocks"], "removal_order": metrics["removal_order"],
                       "removed_fraction": metrics["removed_fraction"]["achieved"], "prune_s": prune_s,
                       **evaluation.fidelity(model, tokenizer)}
                append_row(RAW, row)
                print(f"{method} n={blocks} seed={seed}: {row['mean_cosine']:.4f}", file=sys.stderr)
    rows = read_rows(RAW)
    for blocks in BUDGETS:
        at = [r for r in rows if r["kind"] == "depth" and r["blocks"] == blocks]
        best = max((r for r in at if r["method"] not in ("reverse", "random")), key=lambda r: r["mean_cosine"])
        reverse = next(r for r in at if r["method"] == "reverse")
        for source in (best, reverse):
            if ("heal", source["method"], blocks, None) in done:
                continue
            model = copy.deepcopy(dense)
            remove_blocks(model, source["removal_order"])
            start = time.perf_counter()
            record = heal(model, tokenizer, method="lora", tokens=args.heal_tokens, seq_len=TOKENS, batch_size=8,
                          teacher=dense, distill="embedding", eval_data="bbc-news", eval_windows=TEXTS,
                          eval_seq_len=TOKENS, progress=False, seed=0, model_source=MODEL)
            metrics = record["metrics"]
            append_row(RAW, {"kind": "heal", "method": source["method"], "blocks": blocks, "seed": None,
                             "before": metrics["before"]["mean_cosine"], "after": metrics["after"]["mean_cosine"],
                             "tokens": metrics["tokens"]["achieved"], "heal_s": time.perf_counter() - start})
            print(f"heal {source['method']} n={blocks}: {metrics['before']['mean_cosine']:.4f} -> "
                  f"{metrics['after']['mean_cosine']:.4f}", file=sys.stderr)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    dense = next(r for r in rows if r["kind"] == "dense")
    env = dense["environment"]
    depth = [r for r in rows if r["kind"] == "depth"]
    lines = [f"all-MiniLM-L6-v2 (`{MODEL}`, 6 blocks, {dense['parameters']:,} parameters). Each cell: mean cosine of "
             f"the pruned model's sentence embeddings to the dense model's on the first {TEXTS} texts of the BBC "
             f"News test split ({TOKENS} tokens each; 1.0 = unchanged), then the share of all parameters removed. "
             f"Scorers calibrated on 16 × 128 tokens of the `wiki-summaries` train split (seed 0); perplexity and "
             f"sleb minimise the embedding distance to the dense model on those windows; random: median of seeds "
             f"0, 1, 2 (min–max). {env['torch_threads']} torch thread(s) on "
             f"{platform.processor() or platform.machine()} ({env['cpu_count']} cores), torch {env['torch']}, "
             f"transformers {env['transformers']}. "
             f"Regenerate: `.venv/bin/python bench/depth_encoder.py`.", "",
             "| method | " + " | ".join(f"n = {n}" for n in BUDGETS) + " | blocks removed at n = 2 |",
             "|---|" + "---:|" * len(BUDGETS) + "---|"]
    for method in METHODS:
        cells, chosen = [], "—"
        for n in BUDGETS:
            at = [r for r in depth if r["method"] == method and r["blocks"] == n]
            if not at:
                cells.append("")
                continue
            cells.append(f"{median_cell([r['mean_cosine'] for r in at], '{:.3f}'.format)} · "
                         f"{at[0]['removed_fraction']:.1%}")
            if n == 2 and method != "random":
                chosen = ", ".join(map(str, at[0]["removed_blocks"]))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {chosen} |")
    healed = [r for r in rows if r["kind"] == "heal"]
    if healed:
        lines += ["", f"LoRA healing (rank 8, every projection, merged; distilling the dense embeddings on "
                  f"{healed[0]['tokens']:,} wiki-summaries tokens): mean cosine before → after, and the share of the "
                  f"gap to 1.0 closed.", "", "| n | method | before | after | gap closed | heal s |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in healed:
            closed = (r["after"] - r["before"]) / (1.0 - r["before"])
            lines.append(f"| {r['blocks']} | {r['method']} | {r['before']:.3f} | {r['after']:.3f} | {closed:.0%} | "
                         f"{r['heal_s']:.0f} |")
    return "\n".join(lines)


def write(args: argparse.Namespace) -> None:
    publish("depth_minilm", table(table_rows(RAW), args), "## Depth pruning and healing (issue 10)")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--heal-tokens", type=int, default=65_536)
    run_bench(parser, run, write)


if __name__ == "__main__":
    main()
