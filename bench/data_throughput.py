"""Benchmark: SemDeDup at scale and MiniLM embedding throughput (issue 3). Timing-sensitive: run it alone.

1. SemDeDup over N synthetic 384-dimensional unit embeddings (default N = 1,000,000): a mixture of 1,000 topics
   (within-topic cosine about 0.5), with planted duplicates: 0.5% of the rows overwritten by exact copies of other
   rows and 0.5% by near copies (cosine about 0.98). SemDeDup (threshold 0.9, k = default ~ sqrt(N)) must put each
   planted pair in one group. Reported: recall (planted pairs grouped), precision (removed examples that belong to a
   planted pair), wall time and peak resident memory of the SemDeDup call (`prunekit.measure.ResourceMonitor`; the
   1.5 GB embedding array is part of the process, and its size is reported as the entry memory).
2. MiniLM (all-MiniLM-L6-v2) embedding throughput on BBC News train articles (truncated at 256 tokens), in texts per
   second, over a batch-size sweep, after a warm-up batch.

    .venv/bin/python bench/data_throughput.py --threads 2                     # the full run, alone, ~8 min
    .venv/bin/python bench/data_throughput.py --smoke                         # small sizes; writes nothing

Writes bench/results/data_throughput.json (raw, with the protocol card) and data_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DIM = 384
TOPICS = 1000


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit embeddings and planted (duplicate row, source row) pairs: exact ones, then near ones."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 65536):
        rows = min(65536, n - start)
        block = centres[rng.integers(0, TOPICS, rows)] + rng.standard_normal((rows, DIM), dtype=np.float32)
        x[start : start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    planted = max(2, n // 100)
    chosen = rng.choice(n, 2 * planted, replace=False)  # distinct rows: no row is both a source and a copy
    copies, sources = chosen[:planted], chosen[planted:]
    x[copies] = x[sources]
    near = copies[planted // 2 :]
    noisy = x[near] + 0.007 * rng.standard_normal((len(near), DIM), dtype=np.float32)
    x[near] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return x, copies, sources, near


def semdedup_run(n: int, threads: int, seed: int) -> dict:
    from prunekit.data.semantic import semdedup
    from prunekit.measure import ResourceMonitor

    t0 = time.perf_counter()
    x, copies, sources, near = synthetic(n, seed)
    generate_s = time.perf_counter() - t0
    similarity = np.sum(x[copies] * x[sources], axis=1)
    with ResourceMonitor() as monitor:
        result = semdedup(x, threshold=0.9, seed=seed, threads=threads, progress=False)
    groups = result.groups
    found = groups[copies] == groups[sources]
    removed = np.flatnonzero(groups != np.arange(n))
    in_pair = np.zeros(n, dtype=bool)
    in_pair[copies] = in_pair[sources] = True
    exact = ~np.isin(copies, near)
    return {
        "examples": n, "dim": DIM, "topics": TOPICS, "threshold": 0.9, "clusters": result.k, "seed": seed,
        "threads": threads, "planted_pairs": len(copies), "exact_pairs": int(exact.sum()),
        "near_pairs": int((~exact).sum()), "near_pair_cosine_min": float(similarity[~exact].min()),
        "found_exact": int(found[exact].sum()), "found_near": int(found[~exact].sum()),
        "recall": float(found.mean()), "removed": len(removed),
        "precision": float(in_pair[removed].mean()) if len(removed) else 1.0,
        "wall_s": monitor.wall_s, "peak_rss_mb": monitor.peak_rss_mb, "entry_rss_mb": monitor.entry_rss_mb,
        "embeddings_mb": x.nbytes / 2**20, "generate_s": generate_s,
    }


def embedding_sweep(texts: int, batch_sizes: list[int], threads: int, rounds: int) -> list[dict]:
    """Texts per second at each batch size: the median of `rounds` rounds that visit the batch sizes in turn, so that
    a passing change in machine load does not favour one batch size."""
    import torch

    from prunekit.assets import text_records
    from prunekit.data.embed import embed_texts, load_encoder

    torch.set_num_threads(threads)
    records = text_records("bbc-news", "train")[:texts]
    sample = [r["text"] for r in records]
    encoder = load_encoder("minilm-l6")
    embed_texts(sample[: max(batch_sizes)], encoder, batch_size=max(batch_sizes), progress=False)  # warm-up
    seconds: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for _ in range(rounds):
        for batch_size in batch_sizes:
            start = time.perf_counter()
            embed_texts(sample, encoder, batch_size=batch_size, progress=False)
            seconds[batch_size].append(time.perf_counter() - start)
            print(f"batch {batch_size}: {len(sample) / seconds[batch_size][-1]:.1f} texts/s", flush=True)
    return [{"batch_size": b, "texts": len(sample), "seconds": seconds[b], "threads": threads,
             "texts_per_s": len(sample) / float(np.median(seconds[b]))} for b in batch_sizes]


def table(result: dict) -> str:
    s = result["semdedup"]
    lines = [
        f"SemDeDup over {s['examples']:,} synthetic {s['dim']}-d embeddings ({s['clusters']} clusters, threshold "
        f"{s['threshold']}, {s['threads']} threads):",
        "",
        "| planted pairs (exact / near) | found exact | found near | recall | precision | wall time (s) | "
        "peak memory (MB) | of which embeddings (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['planted_pairs']:,} ({s['exact_pairs']:,} / {s['near_pairs']:,}) | {s['found_exact']:,} | "
        f"{s['found_near']:,} | {s['recall']:.4f} | {s['precision']:.4f} | {s['wall_s']:.1f} | "
        f"{s['peak_rss_mb']:.0f} | {s['embeddings_mb']:.0f} |",
        "",
        f"MiniLM embedding throughput on BBC News ({result['embedding'][0]['texts']} train articles, 256 tokens, "
        f"{result['embedding'][0]['threads']} threads):",
        "",
        "| batch size | texts/s (median of interleaved rounds) |",
        "|---:|---:|",
    ]
    best = max(result["embedding"], key=lambda r: r["texts_per_s"])
    for row in result["embedding"]:
        mark = " (best)" if row is best else ""
        lines.append(f"| {row['batch_size']}{mark} | {row['texts_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from prunekit.measure.protocol import environment

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1_000_000, help="synthetic embeddings for SemDeDup")
    parser.add_argument("--texts", type=int, default=256, help="BBC News articles for the embedding sweep")
    parser.add_argument("--batch-sizes", default="4,8,16,32,64", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the batch-size sweep")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch, FAISS, BLAS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="20,000 embeddings and 64 texts; writes nothing")
    args = parser.parse_args()
    if args.smoke:
        args.examples, args.texts, args.rounds = 20_000, 64, 1
    result = {
        "benchmark": "data_throughput",
        "environment": environment(),
        "settings": vars(args),
        "semdedup": semdedup_run(args.examples, args.threads, args.seed),
    }
    print(json.dumps(result["semdedup"], indent=1), flush=True)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    result["embedding"] = embedding_sweep(args.texts, batch_sizes, args.threads, args.rounds)
    result["environment"] = environment()  # after torch.set_num_threads
    print(table(result))
    if args.smoke:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "data_throughput.md").write_text(table(result))


if __name__ == "__main__":
    main()
