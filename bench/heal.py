"""Benchmark: healing pruned SmolLM2-135M (issue 10) with LoRA (masks re-applied), PERP and distillation, at equal
token budgets.

Pruned models: Wanda and SparseGPT at 50% unstructured and 2:4 (`prunekit.prune`, one-shot protocol: 32 x 512
calibration tokens of the `wiki-summaries` train split, seed 0) and structured `obs` at 20% of the parameters
removed (`prunekit.prune_structure`); and, as the reference, the unpruned model ('none (dense)': healing on the
train split also adapts a model to the evaluation's domain, so a healed model can pass the dense one). Each is
healed from the same pruned weights by `prunekit.heal` on `--tokens` tokens of the train split (sequences of 512,
batch 4, seed 0, each method's default learning rate):
'lora' (rank 8 on every projection, merged, zeros re-applied), 'perp' (biases and norms) and 'kd' (LoRA with
the loss mixed half and half with the KL divergence to the dense model's logits at temperature 2). Perplexity on
the first `--eval-windows` non-overlapping 512-token windows of the held-out split, before and after, with the
sparsity after healing (it must equal the sparsity before).

    nice -n 10 .venv/bin/python bench/heal.py
    nice -n 10 .venv/bin/python bench/heal.py --tokens 131072 --heals lora --only "sparsegpt 50%"   # a larger budget
    nice -n 10 .venv/bin/python bench/heal.py --tokens 65536 --heals lora --only "none (dense)"  # depth.py's budget
    .venv/bin/python bench/heal.py --table

Rows are appended to bench/results/heal_smollm2.jsonl as they finish (a cut run resumes); the table goes to
bench/results/heal_smollm2.md and BENCHMARKS.md.
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

RAW = RESULTS / "heal_smollm2.jsonl"
MODEL = "smollm2-135m"
SEQ_LEN = 512
PRUNED = {"wanda 50%": ("weights", "wanda", dict(sparsity=0.5)),
          "sparsegpt 50%": ("weights", "sparsegpt", dict(sparsity=0.5)),
          "wanda 2:4": ("weights", "wanda", dict(sparsity=0.5, pattern="2:4")),
          "sparsegpt 2:4": ("weights", "sparsegpt", dict(sparsity=0.5, pattern="2:4")),
          "obs 20% removed": ("structures", "obs", dict(remove=0.2)),
          # the reference: the same healing of the unpruned model, which also adapts it to the training text's domain
          "none (dense)": ("none", None, {})}
HEALS = {"lora": dict(method="lora"), "perp": dict(method="perp"),
         "kd": dict(method="lora", distill="logits")}


def _rows() -> list[dict]:
    return read_rows(RAW)


def _append(row: dict) -> None:
    append_row(RAW, row)
    print(json.dumps({k: v for k, v in row.items() if k != "environment"}), file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    import torch

    from prunekit import prune, prune_structure
    from prunekit.assets import load_causal_lm
    from prunekit.corpus import evaluation_windows
    from prunekit.measure import environment, perplexity
    from prunekit.recovery import heal

    torch.set_num_threads(args.threads)
    done = {(r["pruned"], r.get("heal"), r.get("tokens")) for r in _rows()}
    loaded = load_causal_lm(MODEL)
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    windows = evaluation_windows(tokenizer, "wiki-summaries", seq_len=SEQ_LEN, max_windows=args.eval_windows)
    if ("dense", None, None) not in done:
        _append({"pruned": "dense", "perplexity": perplexity(dense, windows.ids, progress=False)["perplexity"],
                 "evaluation": windows.info, "environment": environment()})
    calib = dict(calibration="wiki-summaries", calibration_samples=32, calibration_seq_len=SEQ_LEN, seed=0,
                 batch_size=4, progress=False, model_source=MODEL)
    heals = {h: HEALS[h] for h in args.heals or HEALS}
    for name in args.only or PRUNED:
        if all((name, h, args.tokens) in done for h in heals):
            continue
        kind, method, options = PRUNED[name]
        pruned = copy.deepcopy(dense)
        start = time.perf_counter()
        if kind == "weights":
            prune(pruned, tokenizer, method=method, **options, **calib)
        elif kind == "structures":
            prune_structure(pruned, tokenizer, method=method, **options, **calib)
        prune_s = time.perf_counter() - start
        for heal_name, heal_options in heals.items():
            if (name, heal_name, args.tokens) in done:
                continue
            model = copy.deepcopy(pruned)
            teacher = dense if "distill" in heal_options else None
            start = time.perf_counter()
            record = heal(model, tokenizer, **heal_options, teacher=teacher, tokens=args.tokens, seq_len=SEQ_LEN,
                          batch_size=4, eval_data=windows.ids, eval_windows=None, progress=False, seed=0,
                          model_source=MODEL)
            metrics = record["metrics"]
            _append({"pruned": name, "heal": heal_name, "prune_s": prune_s, "heal_s": time.perf_counter() - start,
                     "before": metrics["before"]["perplexity"], "after": metrics["after"]["perplexity"],
                     "sparsity": metrics["sparsity"], "tokens": args.tokens, "method": record["method"]})


def table(rows: list[dict], args: argparse.Namespace) -> str:
    dense = next(r for r in rows if r["pruned"] == "dense")
    env = dense["environment"]
    healed = [r for r in rows if r["pruned"] != "dense"]
    tokens = healed[0]["tokens"] if healed else args.tokens
    larger = [r for r in healed if r["tokens"] != tokens]
    healed = [r for r in healed if r["tokens"] == tokens]
    lines = [f"SmolLM2-135M (`{MODEL}`), dense perplexity {dense['perplexity']:.2f} on the first "
             f"{dense['evaluation']['windows']} non-overlapping {SEQ_LEN}-token windows of the held-out "
             f"`wiki-summaries` split. Each pruned model healed from the same pruned weights on {tokens:,} tokens "
             f"of the train split (512-token sequences, batch 4, seed 0, default learning rates: LoRA 1e-3, PERP "
             f"1e-3); kd = LoRA with half the loss the KL divergence to the dense logits (T = 2). Gap closed: "
             f"(before − after) / (before − dense). {args.threads} threads on "
             f"{platform.processor() or platform.machine()} ({env['cpu_count']} cores), torch {env['torch']}, "
             f"transformers {env['transformers']}, peft; one process under `nice -n 10`; heal s: wall-clock seconds "
             f"including the two evaluations, for orders of magnitude. "
             f"Regenerate: `.venv/bin/python bench/heal.py`.", "",
             "| pruned model | healing | before | after | gap closed | zeros before → after | heal s |",
             "|---|---|---:|---:|---:|---|---:|"]
    lines += [_row(r, dense) for r in healed]
    if larger:
        lines += ["", "The same healing on other token budgets:", "",
                  "| pruned model | healing | tokens | before | after | gap closed | zeros before → after | heal s |",
                  "|---|---|---:|---:|---:|---:|---|---:|"]
        lines += [_row(r, dense, tokens=True) for r in larger]
    return "\n".join(lines)


def _row(r: dict, dense: dict, tokens: bool = False) -> str:
    gap = r["before"] - dense["perplexity"]
    closed = f"{(r['before'] - r['after']) / gap:.0%}" if abs(gap) > 1e-6 else "—"
    zeros = f"{r['sparsity']['before']['sparsity']:.2%} → {r['sparsity']['after']['sparsity']:.2%}"
    budget = f" {r['tokens']:,} |" if tokens else ""
    return (f"| {r['pruned']} | {r['heal']} |{budget} {r['before']:.2f} | {r['after']:.2f} | {closed} | {zeros} | "
            f"{r['heal_s']:.0f} |")


def write(args: argparse.Namespace) -> None:
    publish("heal_smollm2", table(table_rows(RAW), args), "## Depth pruning and healing (issue 10)")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--only", nargs="*", choices=list(PRUNED), help="pruned models to heal (default: all)")
    parser.add_argument("--heals", nargs="*", choices=list(HEALS), help="healing methods (default: all)")
    run_bench(parser, run, write)


if __name__ == "__main__":
    main()
