"""`prunekit train RECIPE`: run a training-time pruning recipe; registered by `prunekit.cli`.

The verb is a thin layer over `load_recipe` and `run_recipe`. Everything checkable is checked before training
(recipe keys and values, the output directory), so a bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import argparse

from prunekit.artifacts.files import check_distinct
from prunekit.cli import count
from prunekit.errors import PrunekitError


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `train` verb on the `prunekit` sub-command set."""
    p = verbs.add_parser("train", help="run a training-time pruning recipe (TOML or YAML): train, prune, measure, save")
    p.add_argument("recipe", help="recipe file (.toml, or .yaml/.yml); see examples/recipes/")
    p.add_argument("--out", default=None, help="output directory (default: the recipe's 'out'); written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run, summary=summary)
    return p


def run(args: argparse.Namespace) -> dict:
    """Load and validate the recipe, then train and write (after checking the output); returns the result record."""
    import torch

    from prunekit.training.recipes import load_recipe, run_recipe

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    out = args.out if args.out is not None else recipe.out
    if out is None:
        raise PrunekitError(f"recipe '{args.recipe}' has no 'out' directory; pass --out DIR")
    check_distinct({"recipe": args.recipe}, {"output directory": out})
    # run_recipe refuses an existing output (or a file in its place) before loading data or training.
    return run_recipe(recipe, out, overwrite=args.overwrite, progress=not args.quiet)


def summary(record: dict) -> str:
    """A few lines for the terminal: schedule, sparsity target vs achieved, accuracy, budget, time, output."""
    metrics, method = record["metrics"], record["method"]
    sparsity, budget = metrics["sparsity"], metrics["budget"]
    train = record["resources"]["train"]
    lines = [
        f"model      {record['model']['source']} on {record['data']['source']} "
        f"({record['data']['train_examples']:,} training examples)",
        f"schedule   {method['name']}" + (f", allocation {method['arguments']['allocation']}"
                                         if "allocation" in method["arguments"] else ""),
        f"sparsity   target {sparsity['target']:.4f}, achieved {sparsity['achieved']:.4f} of "
        f"{sparsity['numel']:,} prunable weights",
        f"accuracy   {metrics['test_accuracy']:.4f} on {record['evaluation']['examples']:,} test examples",
    ]
    for r in metrics["rounds"]:
        lines.append(f"  round {r['round']}  sparsity {r['sparsity']:.4f}  accuracy {r['test_accuracy']:.4f}")
    lines.append(f"budget     {budget['steps']:,} steps, {budget['example_passes']:,} example passes "
                 f"({budget['epochs_equivalent']:.1f} epochs)")
    lines.append(f"resources  {train['wall_s']:.1f} s, peak memory {train['peak_rss_mb']:.0f} MB")
    if "output" in record:
        lines.append(f"saved      {record['output']}")
    return "\n".join(lines)
