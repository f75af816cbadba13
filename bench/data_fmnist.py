"""Benchmark: static and dynamic data pruning on Fashion-MNIST (issue 3).

Static pruning: score a fixed training subset of Fashion-MNIST, keep {10, 30, 50, 70, 90}% of it by each method,
train `tiny-cnn` from scratch on the kept examples and measure accuracy on the full 10k test set; 3 seeds (each
seed scores, selects and trains anew). Methods: random, EL2N, GraNd, forgetting, AUM, prototypes (keep hardest),
CCS on −AUM; plus training on the whole subset.

Dynamic pruning: InfoBatch on the whole subset against full training (fraction of example-passes saved, accuracy
change), and RS2 at the same number of example-passes.

    .venv/bin/python bench/data_fmnist.py            # ~40 min at 1 thread
    .venv/bin/python bench/data_fmnist.py --quick    # smoke run (~1 min), writes nothing under bench/results

A full run writes bench/results/data_fmnist.{json,md,png} and bench/results/infobatch.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prunekit.assets import load_images
from prunekit.data.dynamics import (
    el2n_scores,
    grand_scores,
    random_scores,
    record_dynamics,
)
from prunekit.data.embed import embed_with
from prunekit.data.samplers import RS2, InfoBatch
from prunekit.data.selectors import ccs_select, keep_count, select_examples
from prunekit.data.semantic import prototype_scores
from prunekit.measure import accuracy, environment
from prunekit.nets import build_net
from prunekit.training.loop import ClassificationData, train

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
METHODS = ("random", "el2n", "grand", "forgetting", "aum", "prototypes", "ccs")
# CCS hard-cut ratio by kept fraction: none up to 50% pruned, more as the budget shrinks (our reading of the
# CIFAR-10 settings of Zheng et al. 2023; not tuned here).
CCS_HARD_CUT = {0.9: 0.0, 0.7: 0.0, 0.5: 0.0, 0.3: 0.1, 0.1: 0.3}


def settings(args: argparse.Namespace) -> dict:
    return dict(net="tiny-cnn", train_subset=args.subset, subset_seed=0, test_examples=args.test, epochs=args.epochs,
                min_steps=args.min_steps, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                batch_size=128, lr_schedule=args.lr_schedule, scorer_lr_schedule="constant",
                fractions=args.fractions, seeds=args.seeds,
                el2n=dict(epochs=2, runs=3), grand=dict(epochs=0, runs=3),
                dynamics=dict(epochs=args.record_epochs, runs=1, evaluation="every example after every epoch"),
                prototypes=dict(embedding="penultimate features (64-d) of the dynamics-recording model",
                                k=10, distance="cosine to own spherical k-means centroid"),
                ccs=dict(score="-AUM", strata=50, hard_cut=CCS_HARD_CUT),
                infobatch=dict(epochs=args.ib_epochs, prune_ratio=0.5, anneal=0.875), threads=args.threads)


def make_model():
    return build_net("tiny-cnn")


def train_eval(x, y, test, args: argparse.Namespace, *, seed: int, epochs: int, sampler=None) -> float:
    model = build_net("tiny-cnn", seed=seed)
    train(model, ClassificationData(x, y), epochs=epochs, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4,
          lr_schedule=args.lr_schedule, seed=seed, sampler=sampler, progress=False)
    return accuracy(model, test.images, test.labels)["accuracy"]


def epochs_for(kept: int, args: argparse.Namespace) -> int:
    """`epochs` passes over the kept set, but at least `min_steps` optimizer steps, so tiny subsets still train."""
    return max(args.epochs, math.ceil(args.min_steps / math.ceil(kept / 128)))


def all_scores(x, y, seed: int, args: argparse.Namespace) -> dict[str, np.ndarray]:
    common = dict(seed=seed, batch_size=128, lr=0.05, progress=False)
    dynamics, model = record_dynamics(make_model, x, y, epochs=args.record_epochs, **{k: v for k, v in common.items()
                                                                                      if k != "progress"})
    features = embed_with(model, x, batch_size=1024, normalize=True, progress=False)
    scores = {
        "random": random_scores(None, x, y, seed=seed),
        "el2n": el2n_scores(make_model, x, y, epochs=2, runs=3, **common),
        "grand": grand_scores(make_model, x, y, epochs=0, runs=3, **common),
        "forgetting": dynamics.forgetting(),
        "aum": -dynamics.aum(),
        "prototypes": prototype_scores(features, 10, seed=seed, threads=args.threads),
    }
    scores["ccs"] = scores["aum"]
    return scores


def select(method: str, scores: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    if method == "ccs":
        return ccs_select(scores, fraction, hard_cut=CCS_HARD_CUT.get(fraction, 0.1), strata=50, seed=seed)
    return select_examples(scores, fraction, mode="hard")


def static(train, test, args: argparse.Namespace) -> dict:
    x, y = train.images, train.labels
    runs, score_time = [], {}
    for seed in args.seeds:
        start = time.time()
        scores = all_scores(x, y, seed, args)
        score_time[seed] = time.time() - start
        print(f"seed {seed}: scores in {score_time[seed]:.0f} s", file=sys.stderr, flush=True)
        acc = train_eval(x, y, test, args, seed=seed, epochs=args.epochs)
        runs.append(dict(method="full", fraction=1.0, seed=seed, kept=len(y), epochs=args.epochs, accuracy=acc))
        for fraction in args.fractions:
            for method in METHODS:
                kept = select(method, scores[method], fraction, seed)
                epochs = epochs_for(len(kept), args)
                acc = train_eval(x[kept], y[kept], test, args, seed=seed, epochs=epochs)
                runs.append(dict(method=method, fraction=fraction, seed=seed, kept=len(kept), epochs=epochs,
                                 accuracy=acc, class_counts=np.bincount(y[kept].numpy(), minlength=10).tolist()))
                print(f"seed {seed} {method:>10} keep {fraction:.1f}: {acc:.4f} ({time.time() - start:.0f} s)",
                      file=sys.stderr, flush=True)
    return dict(runs=runs, scoring_seconds=score_time)


def dynamic(train, test, args: argparse.Namespace) -> dict:
    x, y = train.images, train.labels
    n, epochs, runs = len(y), args.ib_epochs, []
    for seed in args.seeds:
        full = train_eval(x, y, test, args, seed=seed, epochs=epochs)
        sampler = InfoBatch(n, epochs=epochs, prune_ratio=0.5, anneal=0.875, seed=seed)
        info = train_eval(x, y, test, args, seed=seed, epochs=epochs, sampler=sampler)
        # RS2 at the same budget: the per-epoch subset size that gives InfoBatch's total example-passes
        rs2 = RS2(n, keep_count(n, sampler.passes / (epochs * n)), seed=seed)
        rs2_acc = train_eval(x, y, test, args, seed=seed, epochs=epochs, sampler=rs2)
        runs.append(dict(seed=seed, full=full, infobatch=info, rs2=rs2_acc, passes_full=epochs * n,
                         passes_infobatch=sampler.passes, passes_rs2=len(rs2) * epochs))
        print(f"seed {seed}: full {full:.4f} infobatch {info:.4f} rs2 {rs2_acc:.4f} "
              f"saved {1 - sampler.passes / (epochs * n):.3f}", file=sys.stderr, flush=True)
    return dict(runs=runs)


def _mean_std(values: list[float]) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


def static_table(result: dict, args: argparse.Namespace) -> str:
    runs = result["runs"]
    head = "| method | " + " | ".join(f"{int(100 * f)}% kept" for f in args.fractions) + " |"
    lines = [head, "|---" * (len(args.fractions) + 1) + "|"]
    for method in METHODS:
        cells = [_mean_std([r["accuracy"] for r in runs if r["method"] == method and r["fraction"] == f])
                 for f in args.fractions]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    full = [r["accuracy"] for r in runs if r["method"] == "full"]
    lines.append(f"| full data (100%) | {_mean_std(full)} |" + " |" * (len(args.fractions) - 1))
    s = settings(args)
    lines += ["", f"Test accuracy (%) on the full Fashion-MNIST test set ({args.test} images), mean ± std over seeds "
              f"{args.seeds}. Training set: a fixed random subset of {args.subset} of the 60k training images. Net "
              f"`tiny-cnn`; SGD (lr 0.05, {args.lr_schedule} schedule, momentum 0.9, weight decay 5e-4), batch 128, "
              f"{args.epochs} epochs over the kept set but at least {args.min_steps} steps. Scores per seed (constant "
              "lr): EL2N after 2 epochs "
              f"(3 runs), GraNd at initialisation (3 runs, full per-example gradient), forgetting and −AUM over "
              f"{args.record_epochs} epochs (1 run, every example evaluated after each epoch), prototypes = cosine "
              "distance to the nearest of 10 spherical k-means centroids of that run's penultimate features (a "
              "supervised stand-in for Sorscher et al.'s self-supervised embedding). All score methods keep the "
              f"hardest; CCS stratifies −AUM into 50 strata with hard cut {s['ccs']['hard_cut']}."]
    return "\n".join(lines) + "\n"


def dynamic_table(result: dict, args: argparse.Namespace) -> str:
    runs = result["runs"]
    saved = [1 - r["passes_infobatch"] / r["passes_full"] for r in runs]
    saved_rs2 = [1 - r["passes_rs2"] / r["passes_full"] for r in runs]
    lines = ["| training | example-passes saved | test accuracy (%) | change vs full (points) |", "|---|---|---|---|",
             f"| full data | 0 | {_mean_std([r['full'] for r in runs])} | 0 |"]
    for name, frac in (("infobatch", saved), ("rs2", saved_rs2)):
        delta = [r[name] - r["full"] for r in runs]
        label = "InfoBatch (prune 0.5, anneal 0.875)" if name == "infobatch" else "RS2 (same passes, no replacement)"
        lines.append(f"| {label} | {100 * np.mean(frac):.1f}% | {_mean_std([r[name] for r in runs])} | "
                     f"{100 * np.mean(delta):+.2f} ± {100 * np.std(delta):.2f} |")
    lines += ["", f"`tiny-cnn` on the same {args.subset}-image Fashion-MNIST subset, {args.ib_epochs} epochs, SGD "
              f"(lr 0.05, {args.lr_schedule} schedule, momentum 0.9, weight decay 5e-4), batch 128; seeds "
              f"{args.seeds}; test on {args.test} images. "
              "Accuracy change is paired per seed (same initialisation)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        acc = np.array([[r["accuracy"] for r in runs if r["method"] == method and r["fraction"] == f]
                        for f in args.fractions])
        ax.errorbar(100 * np.array(args.fractions), 100 * acc.mean(1), yerr=100 * acc.std(1), label=method,
                    marker="o", capsize=3, linestyle="--" if method == "random" else "-")
    full = 100 * np.mean([r["accuracy"] for r in runs if r["method"] == "full"])
    ax.axhline(full, color="black", linewidth=0.8, label="full data")
    ax.set_xlabel("kept fraction of the training subset (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST, tiny-cnn, {args.subset}-image subset, {len(args.seeds)} seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _write(path: Path, text: str) -> None:
    """Write to a temporary sibling, then rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on tiny sizes; writes nothing")
    parser.add_argument("--only", choices=("static", "infobatch", "all"), default="all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--min-steps", type=int, default=240)
    parser.add_argument("--record-epochs", type=int, default=10)
    parser.add_argument("--ib-epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                        help="learning-rate schedule of the evaluated trainings (the scorers' short runs use constant)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    args = parser.parse_args()
    if args.quick:
        args.subset, args.test, args.epochs, args.min_steps, args.record_epochs, args.ib_epochs = 600, 500, 1, 5, 2, 2
        args.seeds, args.fractions = [0], [0.1, 0.5]
    torch.set_num_threads(args.threads)
    full_train, test = load_images("fashion-mnist", "train"), load_images("fashion-mnist", "test")
    train = full_train.subset(np.sort(np.random.default_rng(0).permutation(len(full_train))[:args.subset]))
    test = test.subset(np.arange(args.test))
    card = dict(environment=environment(), settings=settings(args), data="fashion-mnist")
    for part, run, table_of, name in (("static", static, static_table, "data_fmnist"),
                                      ("infobatch", dynamic, dynamic_table, "infobatch")):
        if args.only not in (part, "all"):
            continue
        start = time.time()
        result = run(train, test, args)
        result["wall_seconds"] = time.time() - start
        table = table_of(result, args)
        print(table)
        if not args.quick:
            _write(RESULTS / f"{name}.json", json.dumps({**card, **result}, indent=1))
            _write(RESULTS / f"{name}.md", table)
            if part == "static":
                plot(result, args, RESULTS / f"{name}.png")

if __name__ == "__main__":
    main()
