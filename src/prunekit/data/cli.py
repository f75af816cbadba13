"""`prunekit data`: static data pruning from the command line, a thin layer over `prunekit.data.api.prune_data`.

```
prunekit data --input data.jsonl --text-field text --method semdedup --threshold 0.9 --out kept.jsonl
prunekit data --input x.parquet --method el2n --label-field label --keep 0.5 --out kept.parquet
```
"""

from __future__ import annotations

import argparse

from prunekit import names
from prunekit.cli import count, count_or_fraction
from prunekit.errors import PrunekitError


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `data` verb to the `prunekit` command's sub-parsers."""
    p = verbs.add_parser("data", help="static data pruning: score examples, keep a subset, write it in the same format")
    p.add_argument("--input", required=True, help="jsonl, json, csv, parquet, txt, npy or npz file, or a "
                   "save_to_disk directory")
    p.add_argument("--method", required=True, help=f"one of {', '.join(names.DATA_METHODS)}")
    p.add_argument("--keep", type=count_or_fraction("not a fraction in (0, 1] or a count"), default=None,
                   help="fraction in (0, 1] (0.5) or count (100) of examples kept")
    p.add_argument("--threshold", type=float, default=None, help="SemDeDup cosine similarity threshold in (0, 1)")
    p.add_argument("--semdedup-rule", default="paper", help="SemDeDup: remove an example similar to any earlier one "
                   "(paper, default) or to an earlier kept one (greedy)")
    p.add_argument("--semdedup-keep", default="central", help="SemDeDup: keep the duplicate nearest its cluster "
                   "centroid (central, default) or farthest from it (farthest, the reference code's keep_hard)")
    p.add_argument("--text-field", default=None, help="field or column holding the text (default: text)")
    p.add_argument("--label-field", default=None, help="field holding class labels (training-dynamics methods)")
    p.add_argument("--id-field", default=None, help="field holding example ids (default: id if present, else row)")
    p.add_argument("--feature-field", default=None, help="numeric feature array or column instead of text")
    p.add_argument("--mode", default="hard",
                   help=f"which examples to keep: {', '.join(names.DATA_MODES)} (default: hard)")
    p.add_argument("--band-start", type=float, default=0.0, help="band mode: hardest fraction skipped")
    p.add_argument("--class-balanced", action="store_true", help="per-class quotas proportional to class sizes")
    p.add_argument("--random-fraction", type=float, default=0.0, help="share of the kept examples drawn at random")
    p.add_argument("--hard-cut", type=float, default=0.1, help="ccs mode: hardest fraction removed first")
    p.add_argument("--clusters", type=count(1), default=None, help="k-means clusters (default: about sqrt(N))")
    p.add_argument("--encoder", default="minilm-l6", help="sentence encoder: asset name or local directory")
    p.add_argument("--reference-lm", default="smollm2-135m", help="perplexity: causal LM asset or local directory")
    p.add_argument("--batch-size", type=count(1), default=None, help="examples per forward pass")
    p.add_argument("--max-length", type=count(2), default=None, help="tokens per text (default: 256)")
    p.add_argument("--backend", default="local", help="local (default) or ray (Ray Data map_batches)")
    p.add_argument("--work-dir", default=None, help="directory for memory-mapped embeddings")
    p.add_argument("--seed", type=count(0), default=0, help="seed for k-means, training runs and random choices")
    p.add_argument("--out", default=None, help="kept subset, in the input's format (written atomically)")
    p.add_argument("--scores-out", default=None, help="parquet of id, index, score, keep (and group)")
    p.add_argument("--report", default=None, help="JSON result record with the protocol card")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--threads", type=count(1), default=None, help="torch, FAISS and BLAS threads")
    p.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run, summary=summary)
    return p


def run(args: argparse.Namespace) -> dict:
    """Run `prunekit data` with parsed arguments; returns the result record."""
    from prunekit.data.api import prune_data

    if args.out is None and args.scores_out is None and args.report is None:
        raise PrunekitError("nothing to write: give --out, --scores-out or --report")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    return prune_data(
        args.input, method=args.method, keep=args.keep, threshold=args.threshold, text_field=args.text_field,
        label_field=args.label_field, id_field=args.id_field, feature_field=args.feature_field, mode=args.mode,
        band_start=args.band_start, class_balanced=args.class_balanced, random_fraction=args.random_fraction,
        hard_cut=args.hard_cut, clusters=args.clusters, semdedup_rule=args.semdedup_rule,
        semdedup_keep=args.semdedup_keep, seed=args.seed, out=args.out, scores_out=args.scores_out,
        report_out=args.report, overwrite=args.overwrite, progress=not args.quiet, backend=args.backend,
        encoder=args.encoder, reference_lm=args.reference_lm, batch_size=args.batch_size,
        max_length=args.max_length, work_dir=args.work_dir, threads=args.threads,
    )


def summary(record: dict) -> str:
    """A few human-readable lines about a data-pruning record."""
    metrics, method = record["metrics"], record["method"]
    target = metrics["keep_fraction"]["target"]
    achieved = metrics["keep_fraction"]["achieved"]
    lines = [
        f"input      {record['input']['source']} ({metrics['examples']:,} examples, {record['input']['format']})",
        f"method     {method['name']}" + (f", threshold {method['threshold']}" if method["threshold"] is not None
                                         else f", mode {method['mode']}"),
        f"kept       {metrics['kept']:,} of {metrics['examples']:,} (removed {metrics['removed']:,}); keep fraction "
        + (f"target {target:.4f}, " if target is not None else "") + f"achieved {achieved:.4f}",
        f"resources  {record['resources']['wall_s']:.1f} s, peak memory {record['resources']['peak_rss_mb']:.0f} MB",
    ]
    for name, path in record["outputs"].items():
        if path is not None:
            lines.append(f"wrote      {path} ({name})")
    return "\n".join(lines)
