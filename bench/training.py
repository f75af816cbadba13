"""Benchmark: training-time pruning (issue 4) on two small vision settings, 3 seeds, five sparsities.

Settings (training subsets and few epochs, so that the whole accuracy benchmark takes ~30 min at 1 thread):
- `lenet`: LeNet-300-100 on MNIST, a fixed 10k-example training subset, the full 10k test set, 5 epochs of
  batches of 128 (395 steps).
- `resnet`: the small ResNet (`resnet-small`) on Fashion-MNIST, a fixed 4k-example training subset, a fixed 2k
  test subset, 2 epochs of batches of 64 (126 steps), weight decay 5e-4.
Both: SGD, momentum 0.9, lr 0.05, cosine schedule. Seeds vary the
initialisation, the batch order and the random scores; the subsets are the same for every seed (subset_seed 0).

Methods, each at sparsities 50/80/90/95/98% of the prunable (Linear/Conv) weights:
- `random`: random scores at initialisation with ERK allocation (Liu et al. 2022's strong random baseline), then
  train sparse for E epochs.
- `snip`, `grasp`, `synflow`: pruning at initialisation (SNIP and GraSP on one batch of 128 training examples,
  SynFlow data-free over 100 rounds), global allocation, then E epochs.
- `one-shot`: E dense epochs, global magnitude pruning, F fine-tuning epochs (E + F in all; F = 2 and 1).
- `gmp`: gradual magnitude pruning (cubic schedule from step 0 to 75% of training, 20 pruning steps), global, E.
- `imp`: iterative magnitude pruning with weight rewinding to 5% of a round (Frankle et al. 2020), global,
  5 rounds of E epochs after a dense round: ONE run per seed, whose successive rounds land at 54.3, 79.1, 90.4,
  95.6 and 98.0% (1 - 0.02^(r/5)); the budget at round r counts all r + 1 trainings.
- `rigl`: RigL (Evci et al. 2020), ERK, drop fraction 0.3 cosine-decayed, 10 updates until 75% of training, E.
- allocation at 98% for one-shot magnitude: `one-shot` (global) against `one-shot-uniform` and `one-shot-lamp`.
All use the one loop of `prunekit.training` through `prunekit.training.recipes.execute` (the code `prunekit train`
runs); one-shot runs of a seed share their (deterministic) dense pre-training, which is counted in each budget.

    .venv/bin/python bench/training.py                   # everything, ~30 min at 1 thread; writes the results
    .venv/bin/python bench/training.py --resume --report # write the results of the runs finished so far
    .venv/bin/python bench/training.py --quick           # smoke run in ~1 min; prints, writes nothing
    .venv/bin/python bench/training.py --only lenet:gmp resnet:imp   # prints, writes nothing
    .venv/bin/python bench/training.py --overhead        # mask overhead per training step: run alone, quiet machine

A full run writes bench/results/training.json (raw, with the protocol card), training.md and training.png;
`--overhead` writes bench/results/training.overhead.json and training.overhead.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PARTIAL = RESULTS / "training.partial.jsonl"
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
SEEDS = (0, 1, 2)
IMP_ROUNDS = 5
SETTINGS = {
    "lenet": dict(net="lenet-300-100", data="mnist", train_subset=10000, test_subset=None, epochs=5, finetune=2,
                  batch_size=128, weight_decay=0.0),
    "resnet": dict(net="resnet-small", data="fashion-mnist", train_subset=4000, test_subset=2000, epochs=2,
                   finetune=1, batch_size=64, weight_decay=5e-4),
}
QUICK = dict(train_subset=512, test_subset=500, epochs=1, finetune=1)
METHODS = ("random", "snip", "grasp", "synflow", "one-shot", "gmp", "imp", "rigl", "one-shot-uniform",
           "one-shot-lamp")
LABELS = {"random": "random (ERK) at init", "snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow",
          "one-shot": "one-shot magnitude + fine-tune", "gmp": "GMP", "imp": "IMP, weight rewinding",
          "rigl": "RigL (ERK)", "one-shot-uniform": "one-shot, uniform", "one-shot-lamp": "one-shot, LAMP"}


def _base(setting: dict, seed: int, quick: bool):
    from prunekit.training.recipes import Recipe

    s = {**setting, **(QUICK if quick else {})}
    return Recipe(net=s["net"], data=s["data"], schedule="dense", train_subset=s["train_subset"],
                  test_subset=s["test_subset"], subset_seed=0, optimizer="sgd", lr=0.05, momentum=0.9,
                  weight_decay=s["weight_decay"], lr_schedule="cosine", epochs=s["epochs"], batch_size=s["batch_size"],
                  eval_every=10**9, seed=seed), s  # eval_every beyond the run: evaluate once, at the end


def _recipes(method: str, base, s: dict, sparsities: tuple[float, ...], quick: bool) -> list:
    """The recipes of one method at every sparsity (IMP: one recipe reaching the highest sparsity)."""
    steps = s["epochs"] * math.ceil(base.train_subset / base.batch_size)
    init = {"random": {"scorer": "random", "seed": base.seed}, "snip": {"scorer": "snip"},
            "grasp": {"scorer": "grasp"}, "synflow": {"scorer": "synflow", "rounds": 10 if quick else 100}}
    if method in init:
        allocation = "erk" if method == "random" else "global"
        return [replace(base, schedule="prune-at-init", schedule_args=init[method], sparsity=x, allocation=allocation)
                for x in sparsities]
    if method == "one-shot":
        return [replace(base, schedule="one-shot", sparsity=x, allocation="global", pretrain_epochs=s["epochs"],
                        epochs=s["finetune"]) for x in sparsities]
    if method.startswith("one-shot-"):
        return [replace(base, schedule="one-shot", sparsity=max(sparsities), allocation=method.split("-")[-1],
                        pretrain_epochs=s["epochs"], epochs=s["finetune"])]
    if method == "gmp":
        return [replace(base, schedule="gradual-magnitude", sparsity=x, allocation="global") for x in sparsities]
    if method == "imp":
        return [replace(base, schedule="iterative-magnitude", sparsity=max(sparsities), allocation="global",
                        schedule_args={"rounds": len(sparsities), "rewind_step": max(1, steps // 20),
                                       "rewind": "weights"})]
    if method == "rigl":
        return [replace(base, schedule="rigl", sparsity=x, allocation="erk") for x in sparsities]
    raise SystemExit(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def _runs(result, recipe, wall_s: float, key: dict) -> list[dict]:
    """Rows of the raw results: one per reached sparsity (IMP: one per round after the dense one)."""
    common = {**key, "allocation": result.pruner_args.get("allocation"), "pruner_args": result.pruner_args}
    if result.rounds:
        rows, wall = [], 0.0
        phases = result.phases
        for r, phase in zip(result.rounds, phases, strict=True):
            wall += phase["wall_s"]
            if r["round"] == 0:
                continue
            rows.append({**common, "target": round(r["sparsity"], 4), "achieved": r["sparsity"],
                         "test_accuracy": r["test_accuracy"], "example_passes": r["example_passes_so_far"],
                         "epochs_equivalent": r["example_passes_so_far"] / recipe.train_subset,
                         "trainings": r["round"] + 1, "wall_s": wall})
        return rows
    reused = sum(p["wall_s"] for p in result.phases if p.get("reused"))
    return [{**common, "target": recipe.sparsity, "achieved": result.sparsity["achieved"],
             "test_accuracy": result.test["accuracy"], "example_passes": result.example_passes,
             "epochs_equivalent": result.example_passes / recipe.train_subset, "trainings": 1,
             "wall_s": wall_s + reused,
             **({"dense_test_accuracy": result.phases[0]["rows"][-1]["test_accuracy"]}
                if recipe.pretrain_epochs else {})}]


def run_accuracy(args: argparse.Namespace) -> list[dict]:
    import torch

    from prunekit.training.recipes import execute, recipe_data

    torch.set_num_threads(args.threads)
    sparsities = (0.5, 0.9) if args.quick else SPARSITIES
    seeds = (0,) if args.quick else SEEDS
    done = {}
    if args.resume and PARTIAL.exists():
        for line in PARTIAL.read_text().splitlines():
            row = json.loads(line)
            done.setdefault((row["setting"], row["method"], row["seed"]), []).append(row)
        # a method cut short is run again in full
        done = {k: v for k, v in done.items() if len(v) == (1 if k[1].startswith("one-shot-") else len(sparsities))}
        PARTIAL.write_text("".join(json.dumps(r) + "\n" for group in done.values() for r in group))
    rows = [r for group in done.values() for r in group]
    selected = [(name, method) for name in SETTINGS for method in METHODS
                if not args.only or any(sel in (name, method, f"{name}:{method}") for sel in args.only)]
    if not selected:
        raise SystemExit(f"--only {args.only} selects nothing; use settings {list(SETTINGS)}, methods {METHODS} "
                         "or setting:method")
    for seed in seeds:  # seed by seed, so that a run cut short still holds every method for its first seeds
        for name, setting in SETTINGS.items():
            base, s = _base(setting, seed, args.quick)
            data = recipe_data(base)
            pretrained = None
            for setting_name, method in selected:
                if setting_name != name or (name, method, seed) in done:
                    continue
                for recipe in _recipes(method, base, s, sparsities, args.quick):
                    began = time.perf_counter()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        result = execute(recipe, data, progress=False, pretrained=pretrained)
                    wall = time.perf_counter() - began
                    pretrained = result.pretrained or pretrained
                    new = _runs(result, recipe, wall, {"setting": name, "method": method, "seed": seed})
                    for row in new:  # e.g. the layer-collapse warning of pruning at initialization
                        row["warnings"] = sorted({str(w.message) for w in caught})
                    rows.extend(new)
                    for row in new:
                        print(f"{name:6s} {method:16s} seed {seed} sparsity {row['achieved']:.4f} "
                              f"accuracy {row['test_accuracy']:.4f} passes {row['example_passes']:>8,} "
                              f"{row['wall_s']:6.1f} s", file=sys.stderr, flush=True)
                        if args.write:
                            with PARTIAL.open("a") as f:
                                f.write(json.dumps(row) + "\n")
    return rows


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cells(rows: list[dict]) -> dict:
    """(setting, method, target) -> rows over seeds."""
    cells = {}
    for row in rows:
        cells.setdefault((row["setting"], row["method"], row["target"]), []).append(row)
    return cells


def _fmt(rows: list[dict] | None) -> str:
    """Mean ± std over seeds; † when a layer collapsed (was emptied) in any seed."""
    if not rows:
        return "—"
    mean, std = _stats([100 * r["test_accuracy"] for r in rows])
    collapsed = any("layer collapse" in w for r in rows for w in r.get("warnings", []))
    return f"{mean:.2f} ± {std:.2f}" + (" †" if collapsed else "")


def _budget(setting: str, method: str, quick: bool) -> str:
    s = {**SETTINGS[setting], **(QUICK if quick else {})}
    e, f = s["epochs"], s["finetune"]
    if method.startswith("one-shot"):
        return f"{e} dense + {f} fine-tune = {e + f} epochs"
    if method == "imp":
        return f"{e} epochs × (1 dense + r rounds): {2 * e}…{(IMP_ROUNDS + 1) * e} epochs"
    return f"{e} epochs"


def table(rows: list[dict], quick: bool) -> str:
    cells = _cells(rows)
    lines = []
    for setting in SETTINGS:
        s = {**SETTINGS[setting], **(QUICK if quick else {})}
        mine = [r for r in rows if r["setting"] == setting]
        if not mine:
            continue
        targets = sorted({r["target"] for r in mine if r["method"] != "imp"} | set(SPARSITIES if not quick else ()))
        targets = [t for t in targets if any(r["target"] == t for r in mine)]
        dense = [r["dense_test_accuracy"] for r in mine if "dense_test_accuracy" in r]
        dense_by_seed = {r["seed"]: r["dense_test_accuracy"] for r in mine if "dense_test_accuracy" in r}
        test = "full 10k test set" if s["test_subset"] is None else f"{s['test_subset']:,}-example test subset"
        lines += [f"### {s['net']} on {s['data']} ({s['train_subset']:,} training examples, {test}, "
                  f"{len({r['seed'] for r in mine})} seeds)", ""]
        if dense:
            mean, std = _stats([100 * v for v in dense_by_seed.values()])
            lines += [f"Dense, {s['epochs']} epochs: {mean:.2f} ± {std:.2f}% test accuracy.", ""]
        lines += ["| method | training budget | " + " | ".join(f"{100 * t:g}%" for t in targets)
                  + " | wall s per run |", "|---|---|" + "---:|" * (len(targets) + 1)]
        for method in METHODS:
            if method.startswith("one-shot-"):
                continue
            method_rows = [r for r in mine if r["method"] == method]
            if not method_rows:
                continue
            if method == "imp":
                by_round = {}
                for r in method_rows:
                    by_round.setdefault(r["trainings"], []).append(r)
                ordered = [by_round[k] for k in sorted(by_round)]
                values = [f"{_fmt(g)} (at {100 * g[0]['achieved']:.1f}%)" for g in ordered]
                values += ["—"] * (len(targets) - len(values))
                wall = statistics.mean(r["wall_s"] for r in by_round[max(by_round)])
                wall_text = f"{wall:.1f} (whole run)"
            else:
                values = [_fmt(cells.get((setting, method, t))) for t in targets]
                wall_text = f"{statistics.mean(r['wall_s'] for r in method_rows):.1f}"
            lines.append(f"| {LABELS[method]} | {_budget(setting, method, quick)} | " + " | ".join(values)
                         + f" | {wall_text} |")
        top = max(targets)
        alloc = [(m, cells.get((setting, m, top))) for m in ("one-shot-uniform", "one-shot", "one-shot-lamp")]
        if any(v for _, v in alloc):
            lines += ["", f"One-shot magnitude + fine-tune at {100 * top:g}%, by allocation: "
                      + ", ".join(f"{n}: {_fmt(v)}" for n, v in zip(("uniform", "global", "LAMP"),
                                                                     [v for _, v in alloc], strict=True))]
        lines.append("")
    lines.append("Test accuracy (%), mean ± std over seeds. † a layer was emptied (layer collapse) in at least one "
                 "seed. IMP's columns are its successive rounds, at the sparsity given in brackets.")
    return "\n".join(lines)


def preface(rows: list[dict], threads: int) -> str:
    """What was run, and how small it is: said beside the tables."""
    seeds = sorted({r["seed"] for r in rows})
    return (f"`.venv/bin/python bench/training.py`, {threads} thread, wall time per run in the tables. A "
            f"deliberately small scale: training subsets, few epochs, seeds {seeds}; every method runs through "
            "`prunekit.training.recipes.execute`, the code of `prunekit train`. SGD (momentum 0.9, lr 0.05, cosine), "
            "evaluation once at the end of each run. Random and RigL use ERK allocation; SNIP, GraSP, SynFlow, "
            "one-shot, GMP and IMP use global allocation. The training budget is stated per row (IMP: all its "
            "rounds so far; one-shot: pre-training + fine-tuning).\n\n")


def _mean(cells: dict, setting: str, method: str, target: float) -> float | None:
    rows = cells.get((setting, method, target))
    return None if not rows else statistics.mean(100 * r["test_accuracy"] for r in rows)


def _imp_at(rows: list[dict], setting: str, index: int) -> tuple[float, float] | None:
    """IMP's (mean accuracy, mean achieved sparsity) after round `index` (1-based)."""
    mine = [r for r in rows if r["setting"] == setting and r["method"] == "imp" and r["trainings"] == index + 1]
    if not mine:
        return None
    return statistics.mean(100 * r["test_accuracy"] for r in mine), statistics.mean(r["achieved"] for r in mine)


def orderings(rows: list[dict]) -> list[str]:
    """The published orderings, checked on the means (with the spread of the seeds beside them)."""
    cells, out = _cells(rows), []

    def verdict(a: float | None, b: float | None) -> str:
        if a is None or b is None:
            return "not measured"
        return f"{'holds' if a > b else 'does NOT hold'} ({a:.2f} vs {b:.2f}, Δ {a - b:+.2f} points)"

    for setting in SETTINGS:
        for target, index in ((0.95, 4), (0.98, 5)):
            one = _mean(cells, setting, "one-shot", target)
            gmp = _mean(cells, setting, "gmp", target)
            imp = _imp_at(rows, setting, index)
            out.append(f"- {setting}, {100 * target:g}%: GMP ahead of one-shot: {verdict(gmp, one)}; IMP (at "
                       f"{100 * imp[1]:.1f}%) ahead of one-shot: {verdict(imp[0] if imp else None, one)}"
                       if imp else f"- {setting}, {100 * target:g}%: GMP ahead of one-shot: {verdict(gmp, one)}")
        uniform = _mean(cells, setting, "one-shot-uniform", 0.98)
        out.append(f"- {setting}, 98%, one-shot magnitude: global ahead of uniform: "
                   f"{verdict(_mean(cells, setting, 'one-shot', 0.98), uniform)}; LAMP ahead of uniform: "
                   f"{verdict(_mean(cells, setting, 'one-shot-lamp', 0.98), uniform)}")
        for method in ("random", "snip", "grasp", "synflow"):
            wins, compared = 0, 0
            for index, target in enumerate(SPARSITIES, start=1):
                imp, other = _imp_at(rows, setting, index), _mean(cells, setting, method, target)
                if imp is None or other is None:
                    continue
                compared += 1
                wins += imp[0] > other
            if compared:
                out.append(f"- {setting}: IMP ahead of {LABELS[method]} at {wins} of {compared} sparsities")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        mine = [r for r in rows if r["setting"] == setting]
        for method in METHODS:
            if method.startswith("one-shot-"):
                continue
            groups = {}
            for r in mine:
                if r["method"] == method:
                    groups.setdefault(r["trainings"] if method == "imp" else r["target"], []).append(r)
            if not groups:
                continue
            keys = sorted(groups)
            xs = [statistics.mean(r["achieved"] for r in groups[k]) for k in keys]
            stats = [_stats([100 * r["test_accuracy"] for r in groups[k]]) for k in keys]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        label=LABELS[method], linestyle="--" if method in ("random", "snip", "grasp", "synflow")
                        else "-")
        dense = {r["seed"]: r["dense_test_accuracy"] for r in mine if "dense_test_accuracy" in r}
        if dense:
            ax.axhline(100 * statistics.mean(dense.values()), color="black", linewidth=0.8, label="dense")
        s = SETTINGS[setting]
        ax.set_xscale("logit")
        ax.set_xticks(list(SPARSITIES), [f"{100 * x:g}%" for x in SPARSITIES])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("sparsity (logit scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{s['net']} on {s['data']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_overhead(args: argparse.Namespace) -> dict:
    """Median time of one training step (batch 128) with and without the mask mechanism, after warm-up."""
    import torch

    from prunekit.measure import environment
    from prunekit.nets import build_net
    from prunekit.training import OneShot

    torch.set_num_threads(args.threads)
    results = {}
    for net in ("lenet-300-100", "resnet-small"):
        x = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(1))
        dense, masked = build_net(net, seed=0), build_net(net, seed=0)
        pruner = OneShot(masked, 0.9)  # masks, gradient hooks and the re-zeroing after every step

        def make_step(model, step_pruner, x=x, y=y):
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

            def one() -> float:
                began = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                if step_pruner is not None:
                    step_pruner.step()
                return time.perf_counter() - began
            return one

        steps = {"dense": make_step(dense, None), "masked": make_step(masked, pruner)}
        times = {"dense": [], "masked": []}
        for kind in steps:
            for _ in range(args.warmup):
                steps[kind]()
        for _ in range(args.repeats // args.block):
            for kind in steps:  # alternating blocks, so that a slow spell of the machine hits both
                times[kind] += [steps[kind]() for _ in range(args.block)]
        dense_ms, masked_ms = (1000 * statistics.median(times[k]) for k in ("dense", "masked"))
        results[net] = {"dense_ms": dense_ms, "masked_ms": masked_ms, "overhead_pct": 100 * (masked_ms / dense_ms - 1),
                        "steps_timed": len(times["dense"]), "sparsity": pruner.sparsity()}
        print(f"{net}: dense {dense_ms:.2f} ms, masked {masked_ms:.2f} ms, overhead "
              f"{results[net]['overhead_pct']:+.1f}%", file=sys.stderr)
    return {"environment": environment(), "settings": {"batch_size": 128, "warmup": args.warmup,
                                                       "repeats": args.repeats, "block": args.block,
                                                       "threads": args.threads, "masked": "OneShot at 90%, global"},
            "results": results}


def overhead_table(report: dict) -> str:
    lines = ["| network | dense step ms | masked step ms | overhead |", "|---|---:|---:|---:|"]
    for net, r in report["results"].items():
        lines.append(f"| {net} | {r['dense_ms']:.2f} | {r['masked_ms']:.2f} | {r['overhead_pct']:+.1f}% |")
    s = report["settings"]
    lines.append(f"\nMedian of {s['repeats']} timed SGD steps (batch {s['batch_size']}, forward + backward + "
                 f"optimizer step [+ `pruner.step()`]) after {s['warmup']} warm-up steps, dense and masked "
                 f"alternating in blocks of {s['block']}, {s['threads']} thread(s). Masked: {s['masked']} "
                 "(gradient hooks zero pruned gradients; `step()` re-zeroes pruned weights).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, 1 seed, 2 sparsities; prints")
    parser.add_argument("--only", nargs="+", help="settings, methods or setting:method to run; prints only")
    parser.add_argument("--resume", action="store_true", help="skip runs already in training.partial.jsonl")
    parser.add_argument("--report", action="store_true",
                        help="write the runs of training.partial.jsonl (or re-render training.json)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overhead", action="store_true", help="time the mask mechanism per step (run alone)")
    parser.add_argument("--repeats", type=int, default=300, help="timed steps per variant (--overhead)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (--overhead)")
    parser.add_argument("--block", type=int, default=10, help="steps per alternating block (--overhead)")
    args = parser.parse_args()
    args.write = not (args.quick or args.only)
    if args.overhead:
        report = run_overhead(args)
        text = overhead_table(report)
        print(text)
        if not args.quick:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "training.overhead.json").write_text(json.dumps(report, indent=2) + "\n")
            (RESULTS / "training.overhead.md").write_text(text + "\n")
        return
    from prunekit.measure import environment

    began, env = time.perf_counter(), None
    if args.report and PARTIAL.exists():  # the runs finished so far
        rows, wall_s = [json.loads(line) for line in PARTIAL.read_text().splitlines()], None
    elif args.report:  # re-render the last complete run
        previous = json.loads((RESULTS / "training.json").read_text())
        rows, wall_s, env = previous["runs"], previous["wall_s"], previous["environment"]
    else:
        rows = run_accuracy(args)
        wall_s = time.perf_counter() - began
    text = (preface(rows, args.threads) + table(rows, args.quick)
            + "\n\n**Published orderings at this scale** (on the means; compare the differences with the seeds' "
            "spread above)\n\n" + "\n".join(orderings(rows)))
    print(text)
    if args.write:
        settings = {"settings": SETTINGS, "sparsities": SPARSITIES, "seeds": SEEDS, "imp_rounds": IMP_ROUNDS,
                    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "lr_schedule": "cosine"},
                    "threads": args.threads}
        report = {"environment": env or environment(), "settings": settings, "wall_s": wall_s, "runs": rows}
        (RESULTS / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "training.md").write_text(text + "\n")
        plot(rows, RESULTS / "training.png")
        if not args.report:
            PARTIAL.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
