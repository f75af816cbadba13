"""Benchmark: pruning SmolLM2-135M with its blocks offloaded to disk (issue 11), against the in-memory engine.

Each row is a fresh process that imports prunekit, resets the kernel's peak-resident-memory mark
(`/proc/self/clear_refs`), then loads the model (in memory with `load_causal_lm`, or offloaded with
`prunekit.load_offloaded`: blocks stay in the safetensors file), prunes it with the one-shot protocol (32 x 512
calibration tokens of the `wiki-summaries` train split, seed 0; no evaluation inside the run, whose 49k-word logits
would dominate the memory) and saves it. Reported: the peak resident memory of the whole process (VmHWM) and its
peak above the memory right after the imports, the wall time, and the SHA-256 of the pruned weights, which must be
equal in both engines.

The pruned models are then evaluated (perplexity on the first 64 non-overlapping 512-token windows of the held-out
split) in the parent process.

    .venv/bin/python bench/offload.py
    .venv/bin/python bench/offload.py --table

Rows go to bench/results/offload_smollm2.jsonl (a cut run resumes), the table to bench/results/offload_smollm2.md
and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import RESULTS, append_row, publish, read_rows, table_rows  # noqa: E402

RAW = RESULTS / "offload_smollm2.jsonl"
MODEL = "smollm2-135m"
SEQ_LEN = 512
RUNS = [("in-memory", "wanda"), ("offloaded", "wanda"), ("in-memory", "sparsegpt"), ("offloaded", "sparsegpt")]


def _status(key: str) -> float:
    """A VmXXX line of /proc/self/status, in MB."""
    text = Path("/proc/self/status").read_text()
    return int(text.split(f"{key}:")[1].split()[0]) / 1024


def child(args: argparse.Namespace) -> None:
    """One run, in this process: prints one JSON line."""
    import time

    import torch

    import prunekit
    from prunekit.assets import load_causal_lm

    torch.set_num_threads(args.threads)
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark now restarts from the current memory
    start = time.perf_counter()
    row = {"engine": args.engine, "method": args.method, "baseline_mb": baseline}
    if args.engine == "offloaded":
        model, tokenizer = prunekit.load_offloaded(MODEL)
    else:
        loaded = load_causal_lm(MODEL)
        model, tokenizer = loaded.model, loaded.tokenizer
    record = prunekit.prune(model, tokenizer, method=args.method, sparsity=0.5, calibration="wiki-summaries",
                            calibration_samples=32, calibration_seq_len=SEQ_LEN, seed=0, batch_size=8,
                            progress=False, model_source=MODEL)
    prunekit.save(model, tokenizer, args.out, record)
    row.update(ok=True, pruned_sha256=record["metrics"]["pruned_weights_sha256"],
               sparsity=record["metrics"]["sparsity"]["achieved"], calibration=record["calibration"])
    row.update(wall_s=time.perf_counter() - start, peak_mb=_status("VmHWM"))
    row["peak_above_baseline_mb"] = row["peak_mb"] - baseline
    print(json.dumps(row))


def run(args: argparse.Namespace) -> None:
    import torch

    from prunekit.assets import load_causal_lm
    from prunekit.corpus import evaluation_windows
    from prunekit.measure import environment, perplexity

    done = {(r["engine"], r["method"]) for r in read_rows(RAW)}
    torch.set_num_threads(args.threads)
    windows = None
    for engine, method in RUNS:
        if (engine, method) in done:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pruned"
            command = [sys.executable, __file__, "--child", "--engine", engine, "--method", method,
                       "--threads", str(args.threads), "--out", str(out)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            if not lines:
                raise SystemExit(f"run {engine} {method} printed no row: {result.stderr[-2000:]}")
            row = json.loads(lines[-1])
            if row["ok"]:
                loaded = load_causal_lm(out)
                windows = windows or evaluation_windows(loaded.tokenizer, "wiki-summaries", seq_len=SEQ_LEN,
                                                        max_windows=64)
                row["perplexity"] = perplexity(loaded.model, windows.ids, progress=False)["perplexity"]
                row["evaluation"] = windows.info
        row["environment"] = environment()
        append_row(RAW, row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("environment", "calibration")}), file=sys.stderr)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    env = rows[0]["environment"]
    lines = [f"SmolLM2-135M (`{MODEL}`, 538 MB of float32 weights, 30 blocks of 14 MB), 50% unstructured, one-shot "
             f"protocol (32 × {SEQ_LEN} calibration tokens of `wiki-summaries`, seed 0; calibration activations "
             f"32 × {SEQ_LEN} × 576 × 4 B = 38 MB), load + prune + save in a fresh process per row. Peak = the "
             f"kernel's resident high-water mark (VmHWM) of the process; above imports = minus the resident memory "
             f"right after `import prunekit, torch` (the mark is reset there). The in-memory peak includes the "
             f"model file's pages that `from_pretrained` maps (resident, but reclaimable); the offloaded engine reads "
             f"each tensor's bytes and maps nothing. Perplexity of the saved model on 64 non-overlapping {SEQ_LEN}-"
             f"token held-out windows (dense 15.17). Wall seconds on a machine shared with other benchmarks. "
             f"{args.threads} threads on {platform.processor() or platform.machine()} ({env['cpu_count']} cores), "
             f"torch {env['torch']}, "
             f"transformers {env['transformers']}. Regenerate: "
             f"`.venv/bin/python bench/offload.py`.", "",
             "| engine | method | peak MB | above imports MB | wall s | perplexity | pruned weights SHA-256 |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['method']} | {r['peak_mb']:.0f} | {r['peak_above_baseline_mb']:.0f} | "
                     f"{r['wall_s']:.0f} | {r['perplexity']:.2f} | `{r['pruned_sha256'][:12]}` |")
    return "\n".join(lines)


def write(args: argparse.Namespace) -> None:
    publish("offload_smollm2", table(table_rows(RAW), args), "## One-shot pruning beyond SparseGPT (issue 11)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the JSON lines")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=("in-memory", "offloaded"), help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not args.table:
        run(args)
    write(args)


if __name__ == "__main__":
    main()
