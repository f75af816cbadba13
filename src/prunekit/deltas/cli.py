"""`prunekit delta --base BASE --tuned TUNED --method dare --drop 0.9 --out delta/`: prune the delta between a
fine-tuned model (or a LoRA adapter, `--lora`) and its base; registered by `prunekit.cli`.

A thin layer over `prunekit.deltas.prune_delta`, `save_delta` and `merge_deltas`. Options, the drop rate, that no
output is an input and that outputs do not exist without --overwrite are checked before any model loads, so bad
input exits 2 with one line and writes nothing. The pruned delta is written atomically (delta.safetensors and
delta.json); with --merge-out, base + delta is written as a Hugging Face directory with prunekit.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.artifacts.files import check_distinct, check_output_dir
from prunekit.cli import count, local_path
from prunekit.errors import PrunekitError

METHODS = ("dare", "darex-q", "magnitude", "activation")  # prunekit.deltas.methods.DELTA_METHODS, without torch
CALIBRATED = ("darex-q", "activation")


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `delta` verb on the `prunekit` sub-command set."""
    p = verbs.add_parser("delta", help="prune the delta between a fine-tuned model (or LoRA adapter) and its base: "
                         "DARE, DAREx-q, magnitude, activation-aware; store it sparse, optionally merge it")
    p.add_argument("--base", required=True, help="base model: a local Hugging Face directory or an asset name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tuned", default=None, help="fine-tuned model directory (same architecture as --base)")
    source.add_argument("--lora", default=None, help="peft LoRA adapter directory trained on --base")
    p.add_argument("--method", choices=METHODS, default="dare", help="delta pruning method (default: dare)")
    p.add_argument("--drop", type=float, required=True, help="fraction of the delta's entries removed, in [0, 1)")
    p.add_argument("--seed", type=count(0), default=0, help="seed of the random masks and calibration sampling")
    p.add_argument("--tensors", choices=("linear", "all"), default="linear",
                   help="linear: the projections of the blocks, other deltas kept dense (default); all: every tensor "
                        "(dare, magnitude)")
    p.add_argument("--calib", default=None, help="darex-q, activation: calibration text, asset name or local file "
                   "(default wiki-summaries)")
    p.add_argument("--calib-samples", type=count(1), default=None, help="calibration sequences (default 32)")
    p.add_argument("--calib-seq-len", type=count(2), default=None, help="tokens per calibration sequence (default 512)")
    p.add_argument("--batch-size", type=count(1), default=8, help="calibration sequences per forward (default 8)")
    p.add_argument("--merge-out", default=None,
                   help="also write base + scale·delta here as a Hugging Face directory (atomically)")
    p.add_argument("--scale", type=float, default=None, help="merge scale λ (with --merge-out; default 1)")
    p.add_argument("--out", required=True, help="output directory of the pruned delta (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    p.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run, summary=summary)
    m = verbs.add_parser("delta-merge", help="merge pruned deltas (written by prunekit delta) into their base: task "
                         "arithmetic or TIES")
    m.add_argument("--base", required=True, help="base model the deltas were taken from: directory or asset name")
    m.add_argument("--delta", action="append", required=True, help="a pruned delta directory; repeat for several")
    m.add_argument("--method", choices=("sum", "ties"), default="sum",
                   help="sum: task arithmetic, base + scale·Σ deltas (default); ties: sign election and disjoint mean")
    m.add_argument("--scale", type=float, default=1.0, help="merge scale λ (default 1)")
    m.add_argument("--out", required=True, help="merged model directory (Hugging Face layout, written atomically)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(run=run_merge, summary=summary_merge)
    return p


def _check(args: argparse.Namespace) -> None:
    """Everything that can be refused before loading: options, drop, output paths."""
    from prunekit.deltas.api import check_delta_options

    check_delta_options(args.method, args.drop, args.tensors)
    given = [f"--{name.replace('_', '-')}" for name in ("calib", "calib_samples", "calib_seq_len")
             if getattr(args, name) is not None]
    if given and args.method not in CALIBRATED:
        raise PrunekitError(f"{given[0]} applies to {' and '.join(CALIBRATED)}; {args.method} uses no calibration")
    if args.scale is not None and args.merge_out is None:
        raise PrunekitError("--scale is the merge scale; it needs --merge-out")
    out = Path(args.out)
    check_distinct({"base model": local_path(args.base), "fine-tuned model": local_path(args.tuned),
                    "LoRA adapter": local_path(args.lora), "calibration file": local_path(args.calib)},
                   {"output directory": out, "merge output": args.merge_out})
    check_output_dir(out, args.overwrite)
    if args.merge_out is not None:
        check_output_dir(args.merge_out, args.overwrite)


def run(args: argparse.Namespace) -> dict:
    """Check, load, prune, save the delta (and the merged model); returns the result record."""
    _check(args)
    import torch
    import transformers

    from prunekit.artifacts.io import save_pruned
    from prunekit.deltas.api import delta_record, merge_deltas, prune_delta, save_delta
    from prunekit.deltas.sources import load_model_dir
    from prunekit.inputs import calibration_set, check_lengths
    from prunekit.measure import ResourceMonitor

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    calibrated = args.method in CALIBRATED
    seq_len = args.calib_seq_len or 512
    if calibrated:
        check_lengths(args.base, calibration_seq_len=seq_len, batch_size=args.batch_size)
    with ResourceMonitor() as monitor:
        base, base_tokenizer = load_model_dir(args.base, "base model")
        tuned, tokenizer = load_model_dir(args.tuned, "fine-tuned model") if args.tuned else (None, None)
        tokenizer = tokenizer or base_tokenizer
        calibration = None
        if calibrated:
            if tokenizer is None:
                raise PrunekitError(f"{args.method} tokenizes calibration text, but neither model directory has a "
                                    "tokenizer")
            calibration = calibration_set(base, tokenizer, args.calib or "wiki-summaries",
                                          samples=args.calib_samples or 32, seq_len=seq_len, seed=args.seed)
        pruned = prune_delta(base, tuned, lora=args.lora, method=args.method, drop=args.drop, seed=args.seed,
                             tensors=args.tensors, calibration=calibration, batch_size=args.batch_size,
                             progress=progress)
    pruned.info["sources"] = {"base": args.base, **({"lora": args.lora} if args.lora else {"tuned": args.tuned})}
    record = delta_record(pruned, base, resources={"prune": monitor.as_dict()},
                          calibration=None if calibration is None else calibration.info)
    record["metrics"]["storage"] = save_delta(pruned, args.out, record=record, overwrite=args.overwrite)
    record["output"] = str(args.out)
    if args.merge_out is not None:
        scale = 1.0 if args.scale is None else args.scale
        merge_deltas(base, [pruned], scale=scale)
        record["merge"] = {"scale": scale, "method": "sum"}
        save_pruned(base, tokenizer, args.merge_out, record, overwrite=args.overwrite)
        record["merged_output"] = str(args.merge_out)
    return record


def summary(record: dict) -> str:
    """A few lines for the terminal: sources, method, kept fraction, storage dense vs sparse, time, outputs."""
    method, metrics = record["method"], record["metrics"]
    sources = record["model"]["sources"]
    storage = metrics["storage"]
    lines = [f"delta      {sources.get('tuned') or sources.get('lora')} over {sources['base']}",
             f"method     {method['name']}, drop {method['drop']}" + (f", seed {method['seed']}"
                                                                    if method["seed"] is not None else ""),
             f"kept       {metrics['kept_fraction_overall']:.4f} of {metrics['pruned_numel']:,} delta entries "
             f"({method['tensors']} tensors; the rest kept dense)",
             f"storage    dense {storage['dense_bytes']:,} B, sparse {storage['sparse_bytes']:,} B, file "
             f"{storage['file_bytes']:,} B",
             f"resources  {record['resources']['prune']['wall_s']:.1f} s, peak memory "
             f"{record['resources']['prune']['peak_rss_mb']:.0f} MB",
             f"saved      {record['output']}"]
    if "merged_output" in record:
        lines.append(f"merged     {record['merged_output']} (scale {record['merge']['scale']})")
    return "\n".join(lines)


def run_merge(args: argparse.Namespace) -> dict:
    """Check, load the base and the deltas, merge, save the merged model; returns the result record."""
    from prunekit.deltas.methods import check_scale

    check_scale(args.scale)
    out = Path(args.out)
    check_distinct({"base model": local_path(args.base),
                    **{f"delta '{d}'": local_path(d) for d in args.delta}}, {"output directory": out})
    check_output_dir(out, args.overwrite)
    import torch
    import transformers

    from prunekit.artifacts.io import save_pruned
    from prunekit.deltas.api import check_delta_base, load_delta, merge_deltas
    from prunekit.deltas.sources import load_model_dir
    from prunekit.inputs import model_card
    from prunekit.measure import ResourceMonitor
    from prunekit.measure.protocol import result_record

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    deltas = [load_delta(d) for d in args.delta]
    with ResourceMonitor() as monitor:
        base, tokenizer = load_model_dir(args.base, "base model")
        card = model_card(base, args.base)
        for path, delta in zip(args.delta, deltas, strict=True):
            check_delta_base(delta, card["weights_sha256"], path)
        merge_deltas(base, deltas, scale=args.scale, method=args.method)
    deltas_card = [{"path": path, "method": d.info.get("method"), "drop": d.info.get("drop"),
                    "seed": d.info.get("seed"), "sources": d.info.get("sources")}
                   for path, d in zip(args.delta, deltas, strict=True)]
    record = result_record(model=card, method={"name": "ties" if args.method == "ties" else "task-arithmetic",
                                               "scale": args.scale, "deltas": deltas_card},
                           calibration=None, evaluation=None, metrics={}, resources={"merge": monitor.as_dict()})
    save_pruned(base, tokenizer, out, record, overwrite=args.overwrite)
    record["output"] = str(out)
    return record


def summary_merge(record: dict) -> str:
    """The base, each delta with its method, the merge, the output."""
    method = record["method"]
    lines = [f"base       {record['model']['source']} ({record['model']['parameters']:,} parameters)"]
    lines += [f"delta      {d['path']} ({d['method']}, drop {d['drop']})" for d in method["deltas"]]
    lines.append(f"merge      {method['name']}, scale {method['scale']}, "
                 f"{record['resources']['merge']['wall_s']:.1f} s")
    lines.append(f"saved      {record['output']}")
    return "\n".join(lines)
