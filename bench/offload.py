"""Benchmark: pruning SmolLM2-135M or Gemma-3-270M with its blocks offloaded to disk (issue 11), against the
in-memory engine.

Each row is a fresh process that imports prunekit, resets the kernel's peak-resident-memory mark
(`/proc/self/clear_refs`), then loads the model (in memory with `load_causal_lm`, or offloaded with
`prunekit.load_offloaded`: blocks stay in the safetensors file, the embedding is mapped from it), prunes it with the
one-shot protocol (32 x 512 calibration tokens of the `wiki-summaries` train split, seed 0; no evaluation inside the
run, whose logits over the vocabulary would dominate the memory) and saves it. Reported: the peak resident memory of
the whole process (VmHWM, file pages included) and its peak above the memory right after the imports, the peak of its
anonymous memory (RssAnon sampled every 50 ms: what the kernel cannot reclaim without swap), the wall time, and the
SHA-256 of the pruned weights, which must be equal in both engines.

The pruned models are then evaluated (perplexity on the first 64 non-overlapping 512-token windows of the held-out
split) in the parent process.

`--cap-mb N` runs Wanda with each engine again, each child inside a fresh memory cgroup (v1 or v2; creating one needs
the right to write under /sys/fs/cgroup) whose hard limit is N MB: the kernel reclaims the page cache and, with no
swap, kills the process when its own memory would pass the limit. Reported: whether the run finished, the cgroup's
peak usage (page cache included) and the OOM kills it counted; a finished run's pruned weights must hash as the
uncapped run's. A capped run that has not finished after `--timeout-s` (default 900 s) is stopped: under a cap
that leaves no room for its anonymous memory and its code, a process can crawl for hours re-reading the file pages
the kernel keeps dropping (reported: the file pages the group read again).

    .venv/bin/python bench/offload.py
    .venv/bin/python bench/offload.py --cap-mb 850 --batch-size 2
    .venv/bin/python bench/offload.py --model gemma3-270m --methods wanda
    .venv/bin/python bench/offload.py --model gemma3-270m --cap-mb 1000 --batch-size 2
    .venv/bin/python bench/offload.py --table

Rows go to bench/results/offload_<model>.jsonl (`offload_smollm2`, `offload_gemma3`; a cut run resumes), the table
to bench/results/offload_<model>.md and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import RESULTS, append_row, bench_parser, publish, read_rows, table_rows  # noqa: E402

# model -> (results name, display name, dense perplexity under this protocol, from the one-shot tables)
MODELS = {"smollm2-135m": ("offload_smollm2", "SmolLM2-135M", 15.17),
          "gemma3-270m": ("offload_gemma3", "Gemma-3-270M", 30.14)}
SEQ_LEN = 512
ENGINES = ("in-memory", "offloaded")


def _raw(model: str) -> Path:
    return RESULTS / f"{MODELS[model][0]}.jsonl"


def _status(key: str) -> float:
    """A VmXXX line of /proc/self/status, in MB."""
    text = Path("/proc/self/status").read_text()
    return int(text.split(f"{key}:")[1].split()[0]) / 1024


class MemoryCap:
    """A fresh memory cgroup with a hard limit of `mb` MB for one child process (cgroup v1's memory controller, or
    v2's where it is enabled); `enter` is the child's pre-exec hook, `close` removes the group."""

    V1, V2 = Path("/sys/fs/cgroup/memory"), (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))

    def __init__(self, mb: int):
        name = f"prunekit-bench-{os.getpid()}-{mb}"
        if (self.V1 / "memory.limit_in_bytes").is_file():
            self.version, self.path = 1, self.V1 / name
        else:
            roots = [r for r in self.V2 if "memory" in _read(r / "cgroup.subtree_control").split()]
            if not roots:
                raise SystemExit("offload.py: no memory cgroup here (neither v1's controller nor v2's with memory "
                                 "enabled); --cap-mb needs one")
            self.version, self.path = 2, roots[0] / name
        try:
            self.path.mkdir()
            limit = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
            (self.path / limit).write_text(str(mb * 2**20))
        except OSError as error:
            raise SystemExit(f"offload.py: cannot make a memory cgroup at {self.path}: {error.strerror}") from None

    def enter(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mb(self) -> float | None:
        text = _read(self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"))
        return int(text) / 2**20 if text.strip() else None

    def oom_kills(self) -> int:
        text = _read(self.path / ("memory.oom_control" if self.version == 1 else "memory.events"))
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)

    def refaults_mb(self) -> float | None:
        """File pages read again after the group's reclaim dropped them (thrashing), in MB."""
        text = _read(self.path / "memory.stat")
        pages = next((int(line.split()[1]) for line in text.splitlines()
                      if line.startswith("workingset_refault_file ")), None)
        return None if pages is None else pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def close(self) -> None:
        self.path.rmdir()


def _drop_caches() -> bool:
    """Write back and drop the kernel's clean page cache; False where this process may not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError:
        return False
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def child(args: argparse.Namespace) -> None:
    """One run, in this process: prints one JSON line."""
    import time

    import torch

    import prunekit
    from prunekit.assets import load_causal_lm

    torch.set_num_threads(args.threads)
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark now restarts from the current memory
    anonymous = [_status("RssAnon")]

    def sample() -> None:
        while True:
            anonymous.append(_status("RssAnon"))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    row = {"engine": args.engine, "method": args.method, "baseline_mb": baseline, "batch_size": args.batch_size,
           "anon_baseline_mb": anonymous[0]}
    if args.engine == "offloaded":
        model, tokenizer = prunekit.load_offloaded(args.model)
    else:
        loaded = load_causal_lm(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
    record = prunekit.prune(model, tokenizer, method=args.method, sparsity=0.5, calibration="wiki-summaries",
                            calibration_samples=32, calibration_seq_len=SEQ_LEN, seed=0, batch_size=args.batch_size,
                            progress=False, model_source=args.model)
    prunekit.save(model, tokenizer, args.out, record)
    row.update(ok=True, pruned_sha256=record["metrics"]["pruned_weights_sha256"],
               sparsity=record["metrics"]["sparsity"]["achieved"], calibration=record["calibration"])
    row.update(wall_s=time.perf_counter() - start, peak_mb=_status("VmHWM"), anon_peak_mb=max(anonymous))
    row["peak_above_baseline_mb"] = row["peak_mb"] - baseline
    print(json.dumps(row))


def run(args: argparse.Namespace) -> None:
    import torch

    from prunekit.assets import load_causal_lm
    from prunekit.corpus import evaluation_windows
    from prunekit.measure import environment, perplexity

    done = {(r["engine"], r["method"], r.get("cap_mb"), r.get("batch_size", 8)) for r in read_rows(_raw(args.model))}
    torch.set_num_threads(args.threads)
    windows = None
    runs = ([(e, m, None) for m in args.methods for e in ENGINES] if args.cap_mb is None else
            [(e, "wanda", args.cap_mb) for e in reversed(ENGINES)])  # the offloaded run first
    for engine, method, cap_mb in runs:
        if (engine, method, cap_mb, args.batch_size) in done:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pruned"
            command = [sys.executable, __file__, "--child", "--model", args.model, "--engine", engine,
                       "--method", method, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                       "--out", str(out)]
            cap = MemoryCap(cap_mb) if cap_mb is not None else None
            # file pages already cached are charged to whoever read them first, not to the capped group: a capped
            # run starts from a cold cache where this process may drop it (root), and the row says which
            cold = cap is not None and _drop_caches()
            try:
                child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         preexec_fn=cap.enter if cap else None)
                timed_out = False
                try:
                    stdout, stderr = child.communicate(timeout=args.timeout_s if cap else None)
                except subprocess.TimeoutExpired:  # a capped run that thrashes the page cache can crawl for hours
                    child.kill()
                    stdout, stderr = child.communicate()
                    timed_out = True
                result = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
                capped = {"cap_mb": cap_mb, "cgroup_peak_mb": cap.peak_mb(), "oom_kills": cap.oom_kills(),
                          "returncode": result.returncode, "cold_cache": cold, "timed_out": timed_out,
                          "timeout_s": args.timeout_s, "file_refaults_mb": cap.refaults_mb()} if cap else {}
            finally:
                if cap:
                    cap.close()
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            if not lines and not cap:
                raise SystemExit(f"run {engine} {method} printed no row: {result.stderr[-2000:]}")
            row = {**(json.loads(lines[-1]) if lines else {"engine": engine, "method": method, "ok": False,
                                                            "batch_size": args.batch_size}),
                   **capped}
            if row["ok"] and not cap:  # a capped run is checked by the hash of its pruned weights instead
                loaded = load_causal_lm(out)
                windows = windows or evaluation_windows(loaded.tokenizer, "wiki-summaries", seq_len=SEQ_LEN,
                                                        max_windows=64)
                row["perplexity"] = perplexity(loaded.model, windows.ids, progress=False)["perplexity"]
                row["evaluation"] = windows.info
        row["environment"] = environment()
        append_row(_raw(args.model), row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("environment", "calibration")}), file=sys.stderr)


def _facts(model: str) -> dict:
    """Sizes from the model's files and config: float32 weight bytes, blocks, one block's bytes, hidden width."""
    from prunekit.artifacts.files import check_safetensors
    from prunekit.assets import model_path

    path = model_path(model)
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config)
    sizes = {}
    for file in path.glob("*.safetensors"):
        header, _ = check_safetensors(file)
        sizes |= {name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in header.items()
                  if name != "__metadata__"}
    blocks = config["num_hidden_layers"]
    return {"mb": sum(sizes.values()) / 1e6, "blocks": blocks, "hidden": config["hidden_size"],
            "block_mb": sum(v for k, v in sizes.items() if ".layers." in k) / blocks / 1e6}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    env = rows[0]["environment"]
    _, title, dense = MODELS[args.model]
    facts = _facts(args.model)
    activations = 32 * SEQ_LEN * facts["hidden"] * 4 / 1e6
    lines = [f"{title} (`{args.model}`, {facts['mb']:.0f} MB of float32 weights, {facts['blocks']} blocks of "
             f"{facts['block_mb']:.0f} MB), 50% unstructured, one-shot protocol (32 × {SEQ_LEN} calibration tokens of "
             f"`wiki-summaries`, seed 0; calibration activations 32 × {SEQ_LEN} × {facts['hidden']} × 4 B = "
             f"{activations:.0f} MB), load + prune + save in a fresh process per row. Peak = the kernel's resident "
             f"high-water mark (VmHWM) of the process, file pages included; above imports = minus the resident memory "
             f"right after `import prunekit, torch` (the mark is reset there); anonymous = the largest RssAnon sampled "
             f"every 50 ms, the memory the kernel cannot reclaim without swap (— for rows measured before it was "
             f"sampled). The in-memory peak includes the model file's pages that `from_pretrained` maps; the offloaded "
             f"engine reads one block at a time and maps the embedding from the file (only touched pages become "
             f"resident, as reclaimable file cache). Perplexity of the saved model on 64 non-overlapping "
             f"{SEQ_LEN}-token held-out windows (dense {dense:.2f}). Wall seconds on a machine shared with other "
             f"benchmarks. "
             f"{args.threads} threads on {platform.processor() or platform.machine()} ({env['cpu_count']} cores), "
             f"torch {env['torch']}, transformers {env['transformers']}. Regenerate: "
             f"`.venv/bin/python bench/offload.py{'' if args.model == 'smollm2-135m' else ' --model ' + args.model}`.",
             "",
             "| engine | method | peak MB | above imports MB | anonymous MB | wall s | perplexity | pruned weights "
             "SHA-256 |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in rows if r.get("cap_mb") is None):
        lines.append(f"| {r['engine']} | {r['method']} | {r['peak_mb']:.0f} | {r['peak_above_baseline_mb']:.0f} | "
                     f"{_mb(r.get('anon_peak_mb'))} | {r['wall_s']:.0f} | {r['perplexity']:.2f} | "
                     f"`{r['pruned_sha256'][:12]}` |")
    capped = [r for r in rows if r.get("cap_mb") is not None]
    if capped:
        uncapped = {(r["engine"], r["method"]): r["pruned_sha256"] for r in rows if r.get("cap_mb") is None}
        lines += ["", "Under a memory cap: the child in a fresh memory cgroup with that hard limit (no swap on this "
                  "machine), started from a cold page cache where the row says so (cold cache: the kernel's cache "
                  "dropped first, so that the model file's pages are charged to the capped group). Cgroup peak: its "
                  "high-water usage, page cache included (reclaimed under the limit); "
                  "process peak: VmHWM, and anonymous peak, as above. Same weights: the pruned weights hash as the "
                  "uncapped run's.", "",
                  "| engine | method | calibration batch | cap MB | cold cache | outcome | cgroup peak MB | process "
                  "peak MB | anonymous MB | wall s | same weights |",
                  "|---|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
        for r in capped:
            refaults = r.get("file_refaults_mb")
            thrash = "" if not refaults else f", {refaults / 1024:,.0f} GB of file pages read again"
            outcome = ("finished" if r["ok"] else
                       f"killed by the OOM killer (exit {r['returncode']})" if r["oom_kills"] else
                       f"stopped at the {r['timeout_s']:.0f} s limit{thrash}" if r.get("timed_out") else
                       f"failed (exit {r['returncode']})")
            same = ("yes" if r.get("pruned_sha256") == uncapped.get((r["engine"], r["method"])) else "no") \
                if r["ok"] else "—"
            peak = f"{r['peak_mb']:.0f}" if r["ok"] else "—"
            wall = f"{r['wall_s']:.0f}" if r["ok"] else "—"
            cgroup = f"{r['cgroup_peak_mb']:.0f}" if r.get("cgroup_peak_mb") is not None else "—"
            cold = {True: "yes", False: "no"}.get(r.get("cold_cache"), "—")
            lines.append(f"| {r['engine']} | {r['method']} | {r['batch_size']} | {r['cap_mb']} | {cold} | {outcome} "
                         f"| {cgroup} "
                         f"| {peak} | {_mb(r.get('anon_peak_mb'))} | {wall} | {same} |")
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def write(args: argparse.Namespace) -> None:
    publish(MODELS[args.model][0], table(table_rows(_raw(args.model)), args),
            "## One-shot pruning beyond SparseGPT (issue 11)")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--cap-mb", type=int, help="run Wanda with both engines under this memory cap (a cgroup)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size of the runs")
    parser.add_argument("--model", choices=tuple(MODELS), default="smollm2-135m")
    parser.add_argument("--timeout-s", type=float, default=900,
                        help="stop a capped run after this many seconds (default 900)")
    parser.add_argument("--methods", nargs="+", choices=("wanda", "sparsegpt"), default=["wanda", "sparsegpt"],
                        help="methods of the uncapped runs (a capped run is Wanda)")
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
