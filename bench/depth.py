"""Benchmark: depth pruning of SmolLM2-135M (and Gemma-3-270M, `--model`) (issue 10), every block scorer against
reverse order and random.

At 2, 4, 6 and 8 of its blocks removed (30 in SmolLM2, 18 in Gemma-3-270M), with `prunekit.prune_depth`: each
method of `DEPTH_METHODS` (or of `--methods`; random with three seeds), one-shot (no healing), perplexity on the
first `--eval-windows` non-overlapping 512-token windows of the held-out `wiki-summaries` split; scorers calibrated
on `--calibration-samples` x 512 tokens of its train split (seed 0). SLEB re-scores every remaining block by
calibration perplexity after each removal, which costs about 30 perplexity passes per removed block, so it is
calibrated on `--sleb-samples` sequences and run once to the largest budget: being greedy, its first n removals are
exactly its choice at budget n.

Speed depends only on how many blocks go, so it is measured once per budget (on the reverse-order model), in turns
with a dense copy in the same process: greedy generation tokens/s at batch 1 with the KV cache and prefill
tokens/s at batch 16.

Healing (`--heal`): LoRA (rank 8, on every projection; `prunekit.heal`) on `--heal-tokens` tokens of the train
split for the best informed method and for reverse order at each budget of `--heal-blocks`, perplexity before and
after on the same windows.

    .venv/bin/python bench/depth.py             # scores, perplexities, speed (about 2 hours on 2 idle cores)
    .venv/bin/python bench/depth.py --heal      # then healing of the rows written by the first run
    .venv/bin/python bench/depth.py --table                # rebuild the tables and plot from the JSON lines
    .venv/bin/python bench/depth.py --model gemma3-270m --methods angular block-influence taylor reverse random

Rows are appended to bench/results/depth_<model>.jsonl (depth_smollm2, depth_gemma3) as they finish (a cut run keeps
them and resumes where it stopped); the tables go to bench/results/depth_<model>.md and BENCHMARKS.md, the plot to
depth_<model>.png.
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
from tables import RESULTS, append_row, bench_parser, median_cell, publish, read_rows, table_rows  # noqa: E402

MODELS = {"smollm2-135m": ("SmolLM2-135M", "depth_smollm2"), "gemma3-270m": ("Gemma-3-270M", "depth_gemma3")}
BUDGETS = (2, 4, 6, 8)
RANDOM_SEEDS = (0, 1, 2)
SEQ_LEN = 512
PROMPT, NEW_TOKENS, PREFILL_BATCH = 64, 16, 16
BASELINES = ("reverse", "random")


def _raw(args: argparse.Namespace) -> Path:
    return RESULTS / f"{MODELS[args.model][1]}.jsonl"


def _key(row: dict) -> tuple:
    return row["kind"], row.get("method"), row.get("blocks"), row.get("seed")


class Bench:
    """The model, its tokens and the dense copy, loaded once for every run of this process."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from prunekit.assets import load_causal_lm
        from prunekit.corpus import evaluation_windows

        torch.set_num_threads(args.threads)
        self.args = args
        loaded = load_causal_lm(args.model)
        self.dense, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.windows = evaluation_windows(self.tokenizer, "wiki-summaries", seq_len=SEQ_LEN,
                                          max_windows=args.eval_windows)
        self.done = {_key(row) for row in self.rows()}

    def rows(self) -> list[dict]:
        return read_rows(_raw(self.args))

    def append(self, row: dict) -> None:
        append_row(_raw(self.args), row)
        print(json.dumps({k: row[k] for k in ("kind", "method", "blocks", "seed") if k in row}
                         | {k: row[k] for k in ("perplexity", "healed_perplexity") if k in row}), file=sys.stderr)

    def perplexity(self, model) -> float:
        from prunekit.measure import perplexity

        return perplexity(model, self.windows.ids, batch_size=4, progress=False)["perplexity"]

    def prune(self, method: str, blocks: int, seed: int = 0, samples: int | None = None):
        from prunekit.depth import prune_depth

        model = copy.deepcopy(self.dense)
        record = prune_depth(model, self.tokenizer, method=method, blocks=blocks, seed=seed, progress=False,
                             calibration_samples=samples or self.args.calibration_samples,
                             calibration_seq_len=SEQ_LEN, batch_size=4, model_source=self.args.model)
        return model, record

    def row(self, model, record: dict, method: str, blocks: int, seed: int | None, prune_s: float) -> dict:
        metrics = record["metrics"]
        return {"kind": "depth", "method": method, "blocks": blocks, "seed": seed,
                "removed_blocks": metrics["removed_blocks"], "removal_order": metrics["removal_order"],
                "removed_fraction": metrics["removed_fraction"]["achieved"], "perplexity": self.perplexity(model),
                "prune_s": prune_s, "calibration": record["calibration"], "block_scores": metrics["block_scores"]}


# Methods whose choice at budget n is the n lowest of one score per block, computed without regard to n: their
# choice at a smaller budget is the lowest-scored part of their choice at the largest one, so they are scored once.
RANKED = ("block-influence", "taylor", "perplexity")


def _lowest_of(row: dict, n: int) -> list[int]:
    """The n lowest-scored blocks among those `row` removed (ties to the lower index): the method's choice at n."""
    scores = next(v for k, v in row["block_scores"].items() if k != "spared")  # the one score per block
    return sorted(sorted(row["removed_blocks"], key=lambda b: (scores[b], b))[:n])


def run_depth(bench: Bench) -> None:
    from prunekit.depth import DEPTH_METHODS, remove_blocks
    from prunekit.measure import environment, parameter_counts

    args = bench.args
    if ("dense", None, None, None) not in bench.done:
        bench.append({"kind": "dense", "perplexity": bench.perplexity(bench.dense), "evaluation": bench.windows.info,
                      "layers": len(bench.dense.model.layers),
                      "parameters": parameter_counts(bench.dense)["total"], "environment": environment()})
    # the budget of the target (6 blocks) first, so that a run cut short has the comparison that matters
    for blocks in sorted(BUDGETS, key=lambda b: (b != 6, b)):
        for method in (m for m in DEPTH_METHODS if m != "sleb" and m in args.methods):
            for seed in (RANDOM_SEEDS if method == "random" else (None,)):
                if ("depth", method, blocks, seed) in bench.done:
                    continue
                if method in RANKED and blocks != max(BUDGETS):
                    bench.append(_ranked_row(bench, method, blocks))
                    continue
                start = time.perf_counter()
                model, record = bench.prune(method, blocks, seed=seed or 0)
                bench.append(bench.row(model, record, method, blocks, seed, time.perf_counter() - start))
                bench.done.add(("depth", method, blocks, seed))
    if "sleb" in args.methods and any(("depth", "sleb", b, None) not in bench.done for b in BUDGETS):
        start = time.perf_counter()
        model, record = bench.prune("sleb", max(BUDGETS), samples=args.sleb_samples)
        seconds = time.perf_counter() - start
        order = record["metrics"]["removal_order"]
        for blocks in BUDGETS:
            if ("depth", "sleb", blocks, None) in bench.done:
                continue
            prefix = copy.deepcopy(bench.dense)
            remove_blocks(prefix, order[:blocks])
            row = bench.row(prefix, record, "sleb", blocks, None, seconds)
            # the greedy choice at `blocks` is the first `blocks` removals of the run to the largest budget
            row.update(removed_blocks=sorted(order[:blocks]), removal_order=order[:blocks],
                       removed_fraction=1 - parameter_counts(prefix)["total"] / parameter_counts(bench.dense)["total"],
                       prune_s_note=f"one greedy run to {max(BUDGETS)} blocks")
            bench.append(row)


def _ranked_row(bench: Bench, method: str, blocks: int) -> dict:
    """A RANKED method's row at a budget below the largest, from its run at the largest budget (run first if
    missing)."""
    from prunekit.depth import remove_blocks
    from prunekit.measure import parameter_counts

    largest = max(BUDGETS)
    full = next((r for r in bench.rows() if _key(r) == ("depth", method, largest, None)), None)
    if full is None:
        start = time.perf_counter()
        model, record = bench.prune(method, largest)
        full = bench.row(model, record, method, largest, None, time.perf_counter() - start)
        bench.append(full)
        bench.done.add(("depth", method, largest, None))
    removed = _lowest_of(full, blocks)
    model = copy.deepcopy(bench.dense)
    remove_blocks(model, removed)
    fraction = 1 - parameter_counts(model)["total"] / parameter_counts(bench.dense)["total"]
    return {**full, "blocks": blocks, "removed_blocks": removed, "removal_order": removed, "removed_fraction": fraction,
            "perplexity": bench.perplexity(model), "prune_s_note": f"scored once, at {largest} blocks"}


def run_speed(bench: Bench) -> None:
    from structure import _interleaved

    from prunekit.depth import remove_blocks, reverse_order
    from prunekit.measure import generation_speed, parameter_counts, prefill_speed

    prompt = bench.windows.ids[:PREFILL_BATCH, :PROMPT]
    measures = {"generation": lambda m: generation_speed(m, prompt[:1], new_tokens=NEW_TOKENS, warmup=0, repeats=1),
                "prefill": lambda m: prefill_speed(m, prompt, warmup=0, repeats=1)}
    for blocks in BUDGETS:
        if ("speed", None, blocks, None) in bench.done:
            continue
        model = copy.deepcopy(bench.dense)
        remove_blocks(model, reverse_order(len(model.model.layers), blocks))
        row = {"kind": "speed", "blocks": blocks, "removed_fraction": 1 - parameter_counts(model)["total"]
               / parameter_counts(bench.dense)["total"]}
        for kind, measure in measures.items():
            runs = _interleaved(measure, {"dense": bench.dense, "pruned": model}, bench.args.repeats)
            row[kind] = {"dense": runs["dense"]["tokens_per_s"], "pruned": runs["pruned"]["tokens_per_s"],
                         "dense_runs": runs["dense"]["runs"], "pruned_runs": runs["pruned"]["runs"]}
        bench.append(row)


def _best_informed(rows: list[dict], blocks: int) -> dict:
    informed = [r for r in rows if r["kind"] == "depth" and r["blocks"] == blocks and r["method"] not in BASELINES]
    return min(informed, key=lambda r: r["perplexity"])


def run_heal(bench: Bench) -> None:
    from prunekit.depth import remove_blocks
    from prunekit.recovery import heal

    rows = bench.rows()
    for blocks in bench.args.heal_blocks:
        best = _best_informed(rows, blocks)
        reverse = next(r for r in rows if r["kind"] == "depth" and r["blocks"] == blocks and r["method"] == "reverse")
        for source in (best, reverse):
            if ("heal", source["method"], blocks, None) in bench.done:
                continue
            model = copy.deepcopy(bench.dense)
            remove_blocks(model, source["removal_order"])
            start = time.perf_counter()
            record = heal(model, bench.tokenizer, method="lora", tokens=bench.args.heal_tokens, seq_len=SEQ_LEN,
                          batch_size=4, eval_windows=None, eval_data=bench.windows.ids, progress=False,
                          model_source=bench.args.model)
            bench.append({"kind": "heal", "method": source["method"], "blocks": blocks, "seed": None,
                          "removed_blocks": source["removed_blocks"], "perplexity": source["perplexity"],
                          "healed_perplexity": record["metrics"]["after"]["perplexity"],
                          "heal_s": time.perf_counter() - start,
                          "tokens": record["metrics"].get("tokens", bench.args.heal_tokens)})


def _fmt(x: float) -> str:
    return f"{x:,.1f}" if x < 1e5 else f"{x:.2e}"


def tables(rows: list[dict], args: argparse.Namespace) -> str:
    import statistics

    dense = next(r for r in rows if r["kind"] == "dense")
    depth = [r for r in rows if r["kind"] == "depth"]
    methods = list(dict.fromkeys(r["method"] for r in depth))
    layers = dense["layers"]
    lines = [f"Dense perplexity {dense['perplexity']:.2f}. Perplexity after removing n of {layers} blocks (no "
             "healing); "
             "random: median of three seeds (min–max); ratio: to reverse order's at the same n.", "",
             "| method | " + " | ".join(f"n = {b}" for b in BUDGETS) + " | blocks removed at n = 6 | prune s (n = 6) |",
             "|---|" + "---:|" * len(BUDGETS) + "---|---:|"]
    reverse = {r["blocks"]: r["perplexity"] for r in depth if r["method"] == "reverse"}
    for method in methods:
        cells, at6 = [], None
        for blocks in BUDGETS:
            found = [r for r in depth if r["method"] == method and r["blocks"] == blocks]
            if not found:
                cells.append("—")
                continue
            ppl = statistics.median(r["perplexity"] for r in found)
            cell = median_cell([r["perplexity"] for r in found], _fmt)
            if method != "reverse" and blocks in reverse:
                cell += f" · {ppl / reverse[blocks]:.2g}×"
            cells.append(cell)
            if blocks == 6:
                at6 = found[0]
        removed = ", ".join(map(str, at6["removed_blocks"])) if at6 and method != "random" else "—"
        seconds = f"{at6['prune_s']:.0f}" + ("†" if at6 and "prune_s_note" in at6 else "") if at6 else "—"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {removed} | {seconds} |")
    text = "\n".join(lines)
    from prunekit.depth import DEPTH_METHODS

    missing = [m for m in DEPTH_METHODS if m not in methods]
    gaps = sum(1 for m in methods for b in BUDGETS if not any(r["method"] == m and r["blocks"] == b for r in depth))
    speed = [r for r in rows if r["kind"] == "speed"]
    if missing or gaps or not speed:
        text += (f"\n\nNot measured yet: {gaps} cells (—), the methods {', '.join(missing) or 'none'}"
                 f"{'' if speed else ' and the speed rows'}; `bench/depth.py` resumes from the JSON lines.")
    if speed:
        text += ("\n\nSpeed by blocks removed (any method; measured on the reverse-order model in turns with a dense "
                 "copy, medians of the rounds):\n\n| n | params removed | generation tok/s b=1 (dense → pruned) | "
                 f"speedup | prefill tok/s b=16 (dense → pruned) | speedup | ideal {layers}/({layers}−n) |\n"
                 "|---:|---:|---:|---:|---:|---:|---:|")
        # every depth row at n removes the same parameters (the blocks are equal); speed rows carry their own
        fraction = {r["blocks"]: r["removed_fraction"] for r in [*depth, *speed] if "removed_fraction" in r}
        for r in speed:
            g, p, n = r["generation"], r["prefill"], r["blocks"]
            text += (f"\n| {n} | {fraction.get(n, float('nan')):.1%} | {g['dense']:.1f} → {g['pruned']:.1f} | "
                     f"{g['pruned'] / g['dense']:.2f} | {p['dense']:.0f} → {p['pruned']:.0f} | "
                     f"{p['pruned'] / p['dense']:.2f} | {layers / (layers - n):.2f} |")
    healed = sorted((r for r in rows if r["kind"] == "heal"), key=lambda r: (r["blocks"], r["method"] == "reverse"))
    if healed:
        tokens = healed[0]["tokens"]
        tokens = tokens["achieved"] if isinstance(tokens, dict) else tokens  # heal's record: target and achieved
        text += (f"\n\nLoRA healing (rank 8, every projection, {tokens:,} train tokens, merged): "
                 f"perplexity before → after, and the share of the gap to dense ({dense['perplexity']:.2f}) "
                 "closed.\n\n| n | method | before | after | gap closed | heal s |\n|---:|---|---:|---:|---:|---:|")
        for r in healed:
            closed = (r["perplexity"] - r["healed_perplexity"]) / (r["perplexity"] - dense["perplexity"])
            text += (f"\n| {r['blocks']} | {r['method']} | {_fmt(r['perplexity'])} | {_fmt(r['healed_perplexity'])} "
                     f"| {closed:.0%} | {r['heal_s']:.0f} |")
    return text


def meta(rows: list[dict], args: argparse.Namespace) -> str:
    dense = next(r for r in rows if r["kind"] == "dense")
    env, calib = dense["environment"], next((r["calibration"] for r in rows if r.get("calibration")), None)
    samples = calib["samples"] if calib and "samples" in calib else args.calibration_samples
    return (f"{MODELS[args.model][0]} (`{args.model}`, {dense['layers']} blocks). Perplexity on the first "
            f"{dense['evaluation']['windows']} non-overlapping {SEQ_LEN}-token windows of the held-out "
            f"`wiki-summaries` split; scorers calibrated on "
            f"{samples} × {SEQ_LEN} tokens of its train split (seed 0); SLEB on {args.sleb_samples} sequences, "
            f"one greedy run to {max(BUDGETS)} blocks († its time) whose first n removals are its choice at n. "
            f"Speed: greedy generation, batch 1, KV cache, {NEW_TOKENS} tokens after a {PROMPT}-token prompt; "
            f"prefill batch {PREFILL_BATCH} × {PROMPT}; {args.repeats} rounds. {args.threads} threads on "
            f"{platform.processor() or platform.machine()} ({env['cpu_count']} cores), torch {env['torch']}, "
            f"transformers {env['transformers']}; one process on a machine shared with other work (prune "
            f"times are wall-clock under that load, for orders of magnitude only). Block-influence, taylor and "
            f"perplexity score every block once, without regard to n: they are run at {max(BUDGETS)} blocks and "
            f"their choice at smaller n is the n lowest-scored of it. Regenerate: `.venv/bin/python "
            f"bench/depth.py{_model_flag(args)} && .venv/bin/python bench/depth.py{_model_flag(args)} --heal`.")


def _model_flag(args: argparse.Namespace) -> str:
    return "" if args.model == "smollm2-135m" else f" --model {args.model}"


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["kind"] == "dense")
    depth = [r for r in rows if r["kind"] == "depth"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(r["method"] for r in depth):
        points = {}
        for r in depth:
            if r["method"] == method:
                points.setdefault(r["blocks"], []).append(r["perplexity"])
        xs = sorted(points)
        ax.plot(xs, [sorted(points[x])[len(points[x]) // 2] for x in xs], marker="o", label=method,
                linestyle="--" if method in BASELINES else "-")
    ax.axhline(dense["perplexity"], color="grey", linewidth=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel(f"blocks removed (of {dense['layers']})")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"{MODELS[args.model][0]} depth pruning, no healing")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{MODELS[args.model][1]}.png", dpi=120)


def write(args: argparse.Namespace) -> None:
    rows = table_rows(_raw(args))
    plot(rows, args)
    publish(MODELS[args.model][1], f"{meta(rows, args)}\n\n{tables(rows, args)}",
            "## Depth pruning and healing (issue 10)", f"depth pruning of {MODELS[args.model][0]}")


def main() -> None:
    from prunekit.names import DEPTH_METHODS

    parser = bench_parser(__doc__)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", choices=DEPTH_METHODS, default=list(DEPTH_METHODS),
                        help="the depth methods to run (default: all; SLEB costs about 30 perplexity passes a block)")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--sleb-samples", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heal", action="store_true", help="heal the best informed and the reverse-order model")
    parser.add_argument("--heal-tokens", type=int, default=65_536)
    parser.add_argument("--heal-blocks", type=int, nargs="+", choices=BUDGETS, default=list(BUDGETS),
                        help="the budgets whose models are healed")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the speed rows (they need an otherwise idle machine; the perplexity cells do not)")
    args = parser.parse_args()
    if not args.table:
        bench = Bench(args)
        if args.heal:
            run_heal(bench)
        else:
            if not args.speed_only:
                run_depth(bench)
            if not args.skip_speed:
                run_speed(bench)
    write(args)


if __name__ == "__main__":
    main()
