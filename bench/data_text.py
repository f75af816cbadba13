"""Benchmark: data pruning of BBC News with MiniLM embeddings and a linear classifier (issue 3).

Protocol: the `bbc-news` asset's fixed split (2,003 train / 222 test articles, 5 classes). Every article is embedded
once with all-MiniLM-L6-v2 (mean pooling, L2-normalised, 256 tokens; cached in the prunekit cache). A multinomial
logistic regression (scikit-learn, lbfgs, C=10, max_iter 2000) is trained on the kept subset of the train split and
evaluated on the whole test split. Methods:
- SemDeDup over a sweep of cosine thresholds: the fraction of the train split each removes, and the accuracy;
- self-supervised prototypes (k-means on the train embeddings, k = 5), keeping the easiest or the hardest;
- random subsets of the same sizes.
Seeds 0, 1, 2 (k-means initialisation and random draws). One CPU thread.

    .venv/bin/python bench/data_text.py          # ~5-10 min on 1 thread, mostly the embedding
    .venv/bin/python bench/data_text.py --smoke  # a quick check on 200 articles; writes nothing

Writes bench/results/data_text.json (raw, with the protocol card), data_text.md (table) and data_text.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
THRESHOLDS = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
REMOVED = [0.1, 0.3, 0.5, 0.7, 0.9]
SEEDS = [0, 1, 2]
PROTOTYPE_CLUSTERS = 5


def embeddings(texts: list[str], name: str, progress: bool) -> np.ndarray:
    """MiniLM embeddings of `texts`, cached as `<cache>/work/<name>.npy` (recomputed if the texts change)."""
    import hashlib

    from prunekit.assets import cache_dir
    from prunekit.data.embed import embed_texts
    from prunekit.data.io import ArrayStore

    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    store = ArrayStore(cache_dir() / "work")
    key = f"{name}-minilm-{digest}"
    if key in store:
        return np.asarray(store.open(key))
    out = store.create(key + ".partial", (len(texts), 384))
    embed_texts(texts, "minilm-l6", out=out, progress=progress)
    out.flush()
    (store.directory / f"{key}.partial.npy").rename(store.directory / f"{key}.npy")
    return np.asarray(store.open(key))


def accuracy(x_train: np.ndarray, y_train: np.ndarray, kept: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
             ) -> float:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=10.0, max_iter=2000)
    model.fit(x_train[kept], y_train[kept])
    return float((model.predict(x_test) == y_test).mean())


def run(args: argparse.Namespace) -> dict:
    import torch

    from prunekit.assets import text_records
    from prunekit.data.selectors import select_examples
    from prunekit.data.semantic import prototype_scores, semdedup
    from prunekit.measure.protocol import environment

    torch.set_num_threads(1)
    train = text_records("bbc-news", "train")
    test = text_records("bbc-news", "test")
    if args.smoke:
        train, test = train[::10], test[::2]
    classes = sorted({r["label"] for r in train})
    y_train = np.array([classes.index(r["label"]) for r in train])
    y_test = np.array([classes.index(r["label"]) for r in test])
    t0 = time.perf_counter()
    x_train = embeddings([r["text"] for r in train], "bbc-train" + ("-smoke" if args.smoke else ""), True)
    x_test = embeddings([r["text"] for r in test], "bbc-test" + ("-smoke" if args.smoke else ""), True)
    embed_s = time.perf_counter() - t0
    n = len(train)
    full = accuracy(x_train, y_train, np.arange(n), x_test, y_test)

    def random_accuracy(kept_count: int, seed: int) -> float:
        kept = np.sort(np.random.default_rng(1000 + seed).choice(n, kept_count, replace=False))
        return accuracy(x_train, y_train, kept, x_test, y_test)

    semdedup_rows = []
    for threshold in THRESHOLDS:
        for seed in SEEDS:
            result = semdedup(x_train, threshold=threshold, seed=seed, threads=1, progress=False)
            kept = result.kept
            semdedup_rows.append({
                "threshold": threshold, "seed": seed, "clusters": result.k, "kept": len(kept),
                "removed_fraction": 1 - len(kept) / n,
                "accuracy": accuracy(x_train, y_train, kept, x_test, y_test),
                "random_accuracy": random_accuracy(len(kept), seed),
            })
            print(f"semdedup {threshold}: removed {1 - len(kept) / n:.3f}, acc {semdedup_rows[-1]['accuracy']:.4f}, "
                  f"random {semdedup_rows[-1]['random_accuracy']:.4f}", file=sys.stderr, flush=True)

    prototype_rows = []
    for seed in SEEDS:
        scores = prototype_scores(x_train, PROTOTYPE_CLUSTERS, seed=seed, threads=1)
        for removed in REMOVED:
            keep = 1 - removed
            row = {"removed_fraction": removed, "seed": seed}
            for mode in ("easy", "hard"):
                kept = select_examples(scores, keep, mode=mode)
                row[f"{mode}_accuracy"] = accuracy(x_train, y_train, kept, x_test, y_test)
            row["kept"] = len(kept)
            row["random_accuracy"] = random_accuracy(len(kept), seed)
            prototype_rows.append(row)
            print(f"prototypes removed {removed}: easy {row['easy_accuracy']:.4f} hard {row['hard_accuracy']:.4f} "
                  f"random {row['random_accuracy']:.4f}", file=sys.stderr, flush=True)
    return {
        "benchmark": "data_text",
        "environment": environment(),
        "settings": {
            "data": "bbc-news asset, fixed split", "train": n, "test": len(test), "classes": classes,
            "embedding": "all-MiniLM-L6-v2, mean pooling, L2-normalised, max 256 tokens",
            "classifier": "sklearn LogisticRegression(C=10, max_iter=2000, lbfgs)",
            "thresholds": THRESHOLDS, "removed_fractions": REMOVED, "seeds": SEEDS,
            "prototype_clusters": PROTOTYPE_CLUSTERS, "semdedup_clusters": "default_clusters(N) = min(sqrt N, N/40)",
            "random_seeds": "numpy default_rng(1000 + seed)", "threads": 1, "smoke": args.smoke,
        },
        "embedding_seconds": embed_s,
        "full_accuracy": full,
        "semdedup": semdedup_rows,
        "prototypes": prototype_rows,
    }


def _mean_std(values: list[float]) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


def table(result: dict) -> str:
    lines = [
        f"BBC News, {result['settings']['train']} train / {result['settings']['test']} test articles, MiniLM "
        f"embeddings + logistic regression; test accuracy (%) mean ± std over seeds {result['settings']['seeds']}. "
        f"Full train set: {100 * result['full_accuracy']:.2f}.",
        "",
        "| SemDeDup threshold | removed (%) | SemDeDup | random, same size |",
        "|---:|---:|---:|---:|",
    ]
    for threshold in THRESHOLDS:
        rows = [r for r in result["semdedup"] if r["threshold"] == threshold]
        removed = 100 * np.mean([r["removed_fraction"] for r in rows])
        lines.append(f"| {threshold} | {removed:.1f} | {_mean_std([r['accuracy'] for r in rows])} | "
                     f"{_mean_std([r['random_accuracy'] for r in rows])} |")
    lines += ["", "| removed (%) | prototypes, keep easy | prototypes, keep hard | random |", "|---:|---:|---:|---:|"]
    for removed in REMOVED:
        rows = [r for r in result["prototypes"] if r["removed_fraction"] == removed]
        lines.append(f"| {100 * removed:.0f} | {_mean_std([r['easy_accuracy'] for r in rows])} | "
                     f"{_mean_std([r['hard_accuracy'] for r in rows])} | "
                     f"{_mean_std([r['random_accuracy'] for r in rows])} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for threshold in THRESHOLDS:
        rows = [r for r in result["semdedup"] if r["threshold"] == threshold]
        x = 100 * np.mean([r["removed_fraction"] for r in rows])
        left.errorbar(x, 100 * np.mean([r["accuracy"] for r in rows]), 100 * np.std([r["accuracy"] for r in rows]),
                      fmt="o", color="C0", label="SemDeDup" if threshold == THRESHOLDS[0] else None)
        left.errorbar(x, 100 * np.mean([r["random_accuracy"] for r in rows]),
                      100 * np.std([r["random_accuracy"] for r in rows]), fmt="s", color="C7",
                      label="random" if threshold == THRESHOLDS[0] else None)
        left.annotate(str(threshold), (x, 100 * np.mean([r["accuracy"] for r in rows])), fontsize=7,
                      textcoords="offset points", xytext=(3, 4))
    left.set_title("SemDeDup (labels: threshold)")
    for key, label, style in (("easy_accuracy", "prototypes, keep easy", "o-"),
                              ("hard_accuracy", "prototypes, keep hard", "^-"), ("random_accuracy", "random", "s--")):
        xs = [100 * r for r in REMOVED]
        means = [100 * np.mean([row[key] for row in result["prototypes"] if row["removed_fraction"] == r])
                 for r in REMOVED]
        right.plot(xs, means, style, label=label)
    right.set_title("Self-supervised prototypes (k = 5)")
    for ax in (left, right):
        ax.axhline(100 * result["full_accuracy"], color="k", lw=0.8, ls=":", label="full train set")
        ax.set_xlabel("train examples removed (%)")
        ax.legend(fontsize=8)
    left.set_ylabel("test accuracy (%)")
    fig.suptitle("BBC News, MiniLM embeddings + logistic regression")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="200 articles; print the table, write nothing")
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    if args.smoke:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_text.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "data_text.md").write_text(table(result))
    plot(result, RESULTS / "data_text.png")


if __name__ == "__main__":
    main()
