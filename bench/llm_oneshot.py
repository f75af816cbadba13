"""Benchmark: one-shot weight pruning of SmolLM2-135M (issue 2) and Gemma-3-270M (issue 8).

Protocol: calibration 32 x 512 tokens from the train split of `wiki-summaries` (seed 0); perplexity on the first
`--eval-windows` non-overlapping 512-token windows of its held-out split; 2 CPU threads. Each configuration runs in
a fresh process, so that its peak memory is its own. The pruning time is reported as a ratio to one dense forward
pass (with the LM head) over the same calibration set, timed in the same process just before pruning (`--one` also
times it after pruning, `forward_after_s`, which `bench/oneshot_grid.py` averages with it).

    .venv/bin/python bench/llm_oneshot.py                        # SmolLM2, all configurations, ~40 min on 2 cores
    .venv/bin/python bench/llm_oneshot.py --model gemma3-270m    # Gemma 3: 50% and 2:4, no OWL
    .venv/bin/python bench/llm_oneshot.py --only wanda:0.5 sparsegpt:2:4

A full run writes bench/results/<results>.json, .md and .png (`llm_oneshot` for SmolLM2, `llm_oneshot_gemma3` for
Gemma 3) and the model's table in BENCHMARKS.md; a run with --only prints its table and writes nothing, so that the
committed results stay whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CALIBRATION = dict(calibration="wiki-summaries", calibration_samples=32, calibration_seq_len=512, seed=0)


def _configs(budgets: tuple[str, ...], owl: bool) -> list[tuple[str, str, str]]:
    methods = [("magnitude", "uniform"), ("wanda", "uniform"), ("sparsegpt", "uniform")]
    methods += [("wanda", "owl"), ("sparsegpt", "owl")] if owl else []
    return [(m, a, b) for b in budgets for m, a in methods if not (a == "owl" and ":" in b)]


@dataclass(frozen=True)
class BenchModel:
    """A model asset, the configurations it is benchmarked in, and where its results go."""

    title: str
    results: str  # bench/results/<results>.* and the <!-- <results>:begin/end --> block of BENCHMARKS.md
    configs: list[tuple[str, str, str]]


MODELS = {
    "smollm2-135m": BenchModel("SmolLM2-135M", "llm_oneshot", _configs(("0.5", "2:4", "4:8"), owl=True)),
    "gemma3-270m": BenchModel("Gemma-3-270M", "llm_oneshot_gemma3", _configs(("0.5", "2:4"), owl=False)),
}


def _name(method: str, allocation: str, budget: str) -> str:
    return f"{method}{'+owl' if allocation == 'owl' else ''}:{budget}"


def _label(record: dict) -> str:
    return record["method"]["name"] + ("+OWL" if record["method"]["allocation"] == "owl" else "")


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process: load, (dense forward timing), prune, evaluate."""
    import torch

    import prunekit
    from prunekit.assets import load_causal_lm
    from prunekit.corpus import calibration_tokens
    from prunekit.measure import ResourceMonitor

    torch.set_num_threads(args.threads)
    loaded = load_causal_lm(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    # The denominator of the speed ratio: one dense forward pass (with the LM head) over the calibration set,
    # after a one-batch warm-up, timed in the same process just before pruning (and again after it, below).
    calib = calibration_tokens(tokenizer, CALIBRATION["calibration"], samples=CALIBRATION["calibration_samples"],
                               seq_len=CALIBRATION["calibration_seq_len"], seed=CALIBRATION["seed"])
    def timed_forward() -> float:
        with torch.inference_mode():
            model(input_ids=calib.ids[:8], use_cache=False)
            with ResourceMonitor() as forward:
                for batch in calib.ids.split(8):
                    model(input_ids=batch, use_cache=False)
        return forward.wall_s

    dense_forward_s = timed_forward()
    if args.one == "dense":
        record = prunekit.evaluate(model, tokenizer, data="wiki-summaries", seq_len=512, windows=args.eval_windows,
                                   progress=False, model_source=args.model)
        record["dense_forward_s"] = dense_forward_s
        return record
    method, allocation, budget = args.one.split(":", 2)
    pattern = budget if ":" in budget else None
    sparsity = None if pattern else float(budget)
    record = prunekit.prune(model, tokenizer, method=method, sparsity=sparsity, pattern=pattern,
                            allocation=allocation, batch_size=8, progress=False, model_source=args.model,
                            **CALIBRATION)
    # The same forward again after pruning (the pruned weights are dense tensors, so it costs what the dense one
    # does): the machine's speed drifts within a run, and the mean of the two brackets the pruning.
    forward_after_s = timed_forward()
    pruned = prunekit.evaluate(model, tokenizer, data="wiki-summaries", seq_len=512, windows=args.eval_windows,
                               progress=False)
    record["metrics"]["pruned"] = pruned["metrics"]
    record["evaluation"] = pruned["evaluation"]
    record["dense_forward_s"] = dense_forward_s
    record["forward_after_s"] = forward_after_s
    return record


def _table(rows: list[dict], dense: dict) -> str:
    lines = [
        "| method | pattern | perplexity | pruning s | dense forward s | × dense forward | peak memory MB "
        "| achieved sparsity |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| dense | — | {dense['metrics']['perplexity']:.2f} | — | {dense['dense_forward_s']:.1f} | 1.00 | — | "
        f"{dense['metrics']['sparsity']:.4f} |",
    ]
    for row in rows:
        prune = row["resources"]["prune"]
        pattern = row["method"]["pattern"] if ":" in row["method"]["pattern"] else "50% unstructured"
        lines.append(
            f"| {_label(row)} | {pattern} | "
            f"{row['metrics']['pruned']['perplexity']:.2f} | {prune['wall_s']:.1f} | {row['dense_forward_s']:.1f} | "
            f"{prune['wall_s'] / row['dense_forward_s']:.2f} | {prune['peak_rss_mb']:.0f} | "
            f"{row['metrics']['sparsity']['achieved']:.4f} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], dense: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["method"]["pattern"] for r in rows}, key=["unstructured", "2:4", "4:8"].index)
    methods = sorted({_label(r) for r in rows},
                     key=lambda m: ["magnitude", "wanda", "sparsegpt", "wanda+OWL", "sparsegpt+OWL"].index(m))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = []
        for budget in budgets:
            match = [r["metrics"]["pruned"]["perplexity"] for r in rows
                     if _label(r) == method and r["method"]["pattern"] == budget]
            values.append(match[0] if match else float("nan"))
        ax.bar([b + i * width for b in range(len(budgets))], values, width, label=method)
    ax.axhline(dense["metrics"]["perplexity"], color="black", linestyle="--", label="dense")
    ax.set_xticks([b + width * (len(methods) - 1) / 2 for b in range(len(budgets))],
                  ["50% unstructured" if b == "unstructured" else b for b in budgets])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{title}, wiki-summaries held-out, 512-token windows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _write_benchmarks(results: str, table: str, meta: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    begin, end = f"<!-- {results}:begin -->", f"<!-- {results}:end -->"
    block = f"{begin}\n{meta}\n\n{table}\n{end}"
    text = path.read_text() if path.exists() else "# prunekit benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m")
    parser.add_argument("--only", nargs="*", help="configurations such as wanda:0.5, sparsegpt+owl:0.5, magnitude:2:4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=64)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    bench = MODELS[args.model]
    known = [_name(*c) for c in bench.configs]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    configs = [c for c in bench.configs if not args.only or _name(*c) in args.only]

    def child(one: str) -> dict:
        cmd = [sys.executable, __file__, "--one", one, "--model", args.model, "--threads", str(args.threads),
               "--eval-windows", str(args.eval_windows)]
        start = time.perf_counter()
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        print(f"{one}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return json.loads(out.strip().splitlines()[-1])

    dense = child("dense")
    rows = [child(f"{m}:{a}:{b}") for m, a, b in configs]
    table = _table(rows, dense)
    print(table)
    if args.only:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{bench.results}.json").write_text(json.dumps({"dense": dense, "runs": rows}, indent=1))
    _plot(rows, dense, bench.title, RESULTS / f"{bench.results}.png")
    env_card = dense["environment"]
    command = "bench/llm_oneshot.py" + ("" if args.model == "smollm2-135m" else f" --model {args.model}")
    meta = (
        f"{bench.title} (`{args.model}`), calibration 32 × 512 tokens of the `wiki-summaries` train split (seed 0), "
        f"perplexity on the first {dense['evaluation']['windows']} non-overlapping 512-token windows of its held-out "
        f"split ({dense['metrics']['tokens']:,} predicted tokens). {args.threads} threads on "
        f"{platform.processor() or platform.machine()} ({env_card.get('cpu_count')} cores), torch "
        f"{env_card['torch']}, transformers {env_card['transformers']}. Each row is a fresh process; peak memory is "
        f"its resident set while pruning (model included). Regenerate: `.venv/bin/python {command}`."
    )
    (RESULTS / f"{bench.results}.md").write_text(f"{meta}\n\n{table}\n")
    _write_benchmarks(bench.results, table, f"{meta}\n\n![perplexity by method](bench/results/{bench.results}.png)")


if __name__ == "__main__":
    main()
