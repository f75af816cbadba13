"""`prunekit experts --model DIR --criterion frequency --remove 0.25 --out pruned/`: remove (or merge) whole experts
of a mixture-of-experts causal LM; `prunekit experts --model DIR --inside moe_pruner --sparsity 0.5 --out pruned/`:
prune the weights inside every expert instead. Registered by `prunekit.cli`.

A thin layer over `prunekit.experts.prune_experts` and `prune_inside_experts`. Options, the output directory and
that it is not an input are checked before the model loads; the rest (budget against the model's experts and top-k)
before the model changes, so bad input exits 2 with one line and writes nothing. The output is written atomically
through `prunekit.save`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.artifacts.files import check_distinct, check_output_dir
from prunekit.cli import count, count_or_fraction, local_path
from prunekit.names import EXPERT_CRITERIA as CRITERIA
from prunekit.names import EXPERT_INSIDE_METHODS as INSIDE_METHODS


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `experts` verb on the `prunekit` sub-command set."""
    p = verbs.add_parser("experts", help="remove or merge whole experts of a mixture-of-experts model (Mixtral, "
                         "Qwen2/3-MoE, OLMoE), the same number in every layer")
    p.add_argument("--model", required=True, help="a local Hugging Face MoE model directory, or an asset name")
    p.add_argument("--criterion", choices=CRITERIA, default="frequency",
                   help="expert importance (default frequency); router_norm needs --pretrained")
    p.add_argument("--remove", type=count_or_fraction("neither a number of experts nor a fraction"), default=None,
                   help="experts removed per layer: a number (2) or a fraction of the experts (0.25); at least top-k "
                        "must remain")
    p.add_argument("--inside", choices=INSIDE_METHODS, default=None,
                   help="instead of removing experts, prune the weights inside each expert by this method on its "
                        "routed tokens (with --sparsity)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="--inside: fraction of each expert's weights zeroed in every output row (sparsegpt: in "
                        "each projection, with the kept weights updated)")
    p.add_argument("--merge", action="store_true",
                   help="fold each removed expert into its nearest kept expert (weight cosine) instead of dropping it")
    p.add_argument("--pretrained", default=None,
                   help="router_norm: the pretrained model the fine-tuned --model started from")
    p.add_argument("--calib", default="wiki-summaries", help="calibration text: asset name or local file")
    p.add_argument("--calib-samples", type=count(1), default=32, help="calibration sequences (default 32)")
    p.add_argument("--calib-seq-len", type=count(2), default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=count(0), default=0, help="seed for calibration sampling and random scores")
    p.add_argument("--batch-size", type=count(1), default=8, help="calibration sequences per forward (default 8)")
    p.add_argument("--eval-data", default="wiki-summaries", help="perplexity text before and after (default "
                   "wiki-summaries)")
    p.add_argument("--no-eval", action="store_true", help="skip the dense and pruned perplexity")
    p.add_argument("--eval-seq-len", type=count(2), default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--eval-windows", type=count(0), default=64, help="evaluation windows (0 = all; default 64)")
    p.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run, summary=summary)
    return p


def run(args: argparse.Namespace) -> dict:
    """Check, load the model (and the pretrained one), prune its experts, save atomically; returns the record."""
    from prunekit.errors import PrunekitError

    if (args.remove is None) == (args.inside is None):
        raise PrunekitError("give either --remove (whole experts) or --inside with --sparsity (weights inside them)")
    if (args.sparsity is None) != (args.inside is None):
        raise PrunekitError("--sparsity goes with --inside, and --inside needs --sparsity")
    if args.inside is not None and (args.merge or args.pretrained is not None):
        raise PrunekitError("--merge and --pretrained apply to removing whole experts, not to --inside")
    out = Path(args.out)
    evaluation = None if args.no_eval else args.eval_data
    check_distinct({"input model": local_path(args.model), "pretrained model": local_path(args.pretrained),
                    "calibration file": local_path(args.calib), "evaluation file": local_path(evaluation)},
                   {"output directory": out})
    check_output_dir(out, args.overwrite)

    import torch
    import transformers

    from prunekit import api
    from prunekit.assets import load_causal_lm
    from prunekit.experts import prune_experts, prune_inside_experts
    from prunekit.experts.criteria import check_criterion
    from prunekit.experts.inside import check_inside_options

    if args.inside is not None:
        check_inside_options(args.inside, args.sparsity)
    else:
        check_criterion(args.criterion, args.pretrained)  # the path stands in for the model until it loads
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    api.check_lengths(args.model, calibration_seq_len=args.calib_seq_len,
                      eval_seq_len=None if evaluation is None else args.eval_seq_len)
    loaded = load_causal_lm(args.model)
    common = dict(calibration=args.calib, calibration_samples=args.calib_samples,
                  calibration_seq_len=args.calib_seq_len, seed=args.seed, evaluation=evaluation,
                  eval_seq_len=args.eval_seq_len, eval_windows=args.eval_windows or None, batch_size=args.batch_size,
                  progress=progress, model_source=args.model)
    if args.inside is not None:
        record = prune_inside_experts(loaded.model, loaded.tokenizer, method=args.inside, sparsity=args.sparsity,
                                      **common)
    else:
        pretrained = load_causal_lm(args.pretrained).model if args.pretrained is not None else None
        record = prune_experts(loaded.model, loaded.tokenizer, criterion=args.criterion, remove=args.remove,
                               merge=args.merge, pretrained=pretrained, **common)
    api.save(loaded.model, loaded.tokenizer, out, record, overwrite=args.overwrite)
    record["output"] = str(out)
    return record


def summary(record: dict) -> str:
    """A few lines for the terminal: what was pruned (target and achieved), perplexity, parameters, time, output."""
    metrics, method = record["metrics"], record["method"]
    lines = [f"model      {record['model']['source']} ({record['model']['parameters']:,} parameters)"]
    if "experts" in metrics:
        experts, parameters = metrics["experts"], metrics["parameters"]
        lines += [
            f"criterion  {method['criterion']}" + (" (merged into nearest experts)" if method["merge"] else ""),
            f"experts    {experts['before']} -> {experts['after']} per layer (target {experts['target']} removed, "
            f"top-k {experts['top_k']})",
            f"parameters {parameters['before']['total']:,} -> {parameters['after']['total']:,}",
        ]
    else:
        sparsity = metrics["sparsity"]
        lines += [f"method     {method['name']}",
                  f"sparsity   target {sparsity['target']:.4f}, achieved {sparsity['achieved']:.4f} of "
                  f"{sparsity['numel']:,} expert weights"]
    if "pruned" in metrics:
        lines.append(f"perplexity {metrics['dense']['perplexity']:.2f} -> {metrics['pruned']['perplexity']:.2f}")
    lines.append(f"resources  {record['resources']['prune']['wall_s']:.1f} s")
    if "output" in record:
        lines.append(f"saved      {record['output']}")
    return "\n".join(lines)
