"""`prunekit <verb>`: the command line, a thin layer over `prunekit.api`.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 internal error. Progress bars go to stderr; `--json`
prints the result record on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prunekit import api
from prunekit.data import cli as data_cli
from prunekit.errors import PrunekitError
from prunekit.training import cli as training_cli


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="asset name (smollm2-135m) or a local Hugging Face directory")
    parser.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument(f"--{prefix}seq-len", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument(f"--{prefix}windows", type=int, default=64,
                        help="number of non-overlapping windows evaluated (0 = all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune neural networks and measure the result.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("prune", help="one-shot weight pruning of a causal LM, saved as a Hugging Face directory")
    _common(p)
    p.add_argument("--method", default="wanda", help=f"one of {', '.join(api.METHODS)} (default: wanda)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights removed, in [0, 1)")
    p.add_argument("--pattern", default=None, help="'unstructured' (default) or N:M, e.g. 2:4")
    p.add_argument("--allocation", default="uniform", help=f"per-block sparsity: {', '.join(api.ALLOCATIONS)}")
    p.add_argument("--owl-threshold", type=float, default=5.0, help="OWL outlier multiple M (default 5)")
    p.add_argument("--owl-limit", type=float, default=0.08, help="OWL largest per-block deviation (default 0.08)")
    p.add_argument("--calib", default="wiki-summaries", help="calibration text: asset name or local file")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and random scores")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT lazy-update block (default 128)")
    p.add_argument("--damping", type=float, default=0.01, help="SparseGPT Hessian dampening (default 0.01)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward (default 8)")
    p.add_argument("--eval-data", default="wiki-summaries", help="perplexity text before and after pruning")
    p.add_argument("--no-eval", action="store_true", help="skip the dense and pruned perplexity")
    _eval_options(p, "eval-")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    e = verbs.add_parser("eval", help="perplexity of a causal LM with a stated protocol")
    _common(e)
    e.add_argument("--data", default="wiki-summaries", help="text asset name or local file (default wiki-summaries)")
    _eval_options(e, "")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")

    training_cli.add_parser(verbs)
    data_cli.add_parser(verbs)
    return parser


def _check_out(out: Path, model: str, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists or that would overwrite the input model."""
    source = Path(model)
    if source.exists() and (out.resolve() == source.resolve() or source.resolve() in out.resolve().parents):
        raise PrunekitError(f"output directory '{out}' is the input model or inside it; choose another --out")
    if out.exists() and not overwrite:
        raise PrunekitError(f"output directory '{out}' exists; pass --overwrite to replace it")


def _windows(n: int) -> int | None:
    if n < 0:
        raise PrunekitError(f"window count {n} is negative; use 0 for all windows or a positive number")
    return n or None


def _run(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from prunekit.assets import load_causal_lm

    if args.threads is not None:
        if args.threads < 1:
            raise PrunekitError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    if args.verb == "prune":
        out = Path(args.out)
        _check_out(out, args.model, args.overwrite)
        api.check_prune_options(args.method, args.sparsity, args.pattern, args.allocation, args.blocksize,
                                args.damping)
        loaded = load_causal_lm(args.model)
        record = api.prune(
            loaded.model, loaded.tokenizer, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
            allocation=args.allocation, calibration=args.calib, calibration_samples=args.calib_samples,
            calibration_seq_len=args.calib_seq_len, seed=args.seed, owl_threshold=args.owl_threshold,
            owl_limit=args.owl_limit, blocksize=args.blocksize, damping=args.damping,
            evaluation=None if args.no_eval else args.eval_data, eval_seq_len=args.eval_seq_len,
            eval_windows=_windows(args.eval_windows), batch_size=args.batch_size, device=args.device,
            progress=progress, model_source=args.model,
        )
        api.save(loaded.model, loaded.tokenizer, out, record, overwrite=args.overwrite)
        record["output"] = str(out)
        return record
    loaded = load_causal_lm(args.model)
    return api.evaluate(loaded.model, loaded.tokenizer, data=args.data, seq_len=args.seq_len,
                        windows=_windows(args.windows), batch_size=args.batch_size, device=args.device,
                        progress=progress, model_source=args.model)


def _summary(record: dict) -> str:
    metrics, method = record["metrics"], record["method"]
    lines = [f"model      {record['model']['source']} ({record['model']['parameters']:,} parameters)"]
    if method["name"] != "none":
        sparsity = metrics["sparsity"]
        lines.append(f"method     {method['name']}, {method['pattern']}, allocation {method['allocation']}")
        lines.append(f"sparsity   target {sparsity['target']:.4f}, achieved {sparsity['achieved']:.4f} "
                     f"of {sparsity['numel']:,} block weights")
        prune_res = record["resources"]["prune"]
        lines.append(f"pruning    {prune_res['wall_s']:.1f} s, peak memory {prune_res['peak_rss_mb']:.0f} MB")
        evaluation = record.get("evaluation")
        if evaluation:
            lines.append(f"perplexity dense {metrics['dense']['perplexity']:.2f} -> pruned "
                         f"{metrics['pruned']['perplexity']:.2f} ({evaluation['windows']} windows × "
                         f"{evaluation['seq_len']} tokens of {evaluation['source']})")
        if "output" in record:
            lines.append(f"saved      {record['output']}")
    else:
        lines.append(f"perplexity {metrics['perplexity']:.2f} ({metrics['windows']} windows × {metrics['seq_len']} "
                     f"tokens of {record['evaluation']['source']}), sparsity {metrics['sparsity']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = args.run(args) if "run" in args else _run(args)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: say so in one line, keep the traceback out of the user's way
        print(f"prunekit: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    summary = args.summary if "summary" in args else _summary
    print(json.dumps(record, indent=2) if args.json else summary(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
