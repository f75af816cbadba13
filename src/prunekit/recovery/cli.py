"""`prunekit heal --model DIR --method lora --tokens 2000000 --out healed/`: heal a pruned causal LM (or an encoder,
by distilling the dense one: `--teacher minilm-l6 --distill embedding`); registered by `prunekit.cli`.

A thin layer over `prunekit.recovery.heal`. Everything checkable is checked before the model loads (options, that
the output is not an input, that it does not exist without --overwrite), so bad input exits 2 with one line and
writes nothing. The output is written atomically through `prunekit.save`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit import names
from prunekit.artifacts.files import check_distinct, check_output_dir, file_sha256
from prunekit.cli import count, local_path
from prunekit.errors import PrunekitError


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `heal` verb on the `prunekit` sub-command set."""
    p = verbs.add_parser("heal", help="recover a pruned causal LM's or encoder's quality: LoRA (merged, zeros kept), "
                         "masked full fine-tuning or PERP, optionally (for an encoder, always) distilling the dense "
                         "model")
    p.add_argument("--model", required=True, help="pruned model: a directory written by prunekit, or an asset name")
    p.add_argument("--method", choices=names.HEAL_METHODS, default="lora", help="what trains (default: lora)")
    p.add_argument("--tokens", type=count(1), default=2_000_000, help="training tokens (default 2000000)")
    p.add_argument("--data", default="wiki-summaries",
                   help="training text: asset name (its train split) or a local file (last 10%% of documents held "
                        "out for evaluation)")
    p.add_argument("--eval-data", default=None, help="evaluation text (default: the held-out part of --data)")
    p.add_argument("--seq-len", type=count(2), default=None,
                   help="tokens per training sequence (default 512; encoders 128)")
    p.add_argument("--batch-size", type=count(1), default=8, help="sequences per micro-batch (default 8)")
    p.add_argument("--accumulation", type=count(1), default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default by method)")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warm-up (default 0.05)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (default 0)")
    p.add_argument("--rank", type=count(1), default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled alpha/rank (default 16)")
    p.add_argument("--perp-head", action="store_true", help="perp: also train the LM head")
    p.add_argument("--teacher", default=None,
                   help="dense model to distill from (asset name or directory; an encoder needs it)")
    p.add_argument("--distill", choices=names.DISTILL_MODES, default=None,
                   help="distillation loss (needs --teacher): logits[+hidden] for causal LMs, embedding[+hidden] for "
                        "encoders")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default 2)")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation terms (default 0.5)")
    p.add_argument("--seed", type=count(0), default=0, help="seed for data order and LoRA initialisation")
    p.add_argument("--eval-seq-len", type=count(2), default=None,
                   help="tokens per evaluation window (default 512); encoders: tokens per text (default 256)")
    p.add_argument("--eval-windows", type=count(0), default=None,
                   help="evaluation windows (0 = all; default 64); encoders: held-out texts embedded (default 200)")
    p.add_argument("--masks", default=None, metavar="FILE",
                   help="keep-masks to hold (a safetensors file of bool tensors, as prunekit prune --save-masks "
                        "writes; default: the exact zeros of the model's weights)")
    p.add_argument("--checkpoint-dir", default=None, help="save resumable checkpoints here")
    p.add_argument("--checkpoint-every", type=count(1), default=None, help="steps between checkpoints (default: end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--device", default=None, help="training device, e.g. cpu or cuda (default: the CPU)")
    p.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run, summary=summary)
    return p


def _layer_map(manifest: dict | None, teacher_blocks: int) -> list[int] | None:
    """The teacher block each student block was, from a depth-pruned model's manifest (`kept_blocks`)."""
    kept = ((manifest or {}).get("metrics") or {}).get("kept_blocks")
    if isinstance(kept, list) and kept and all(isinstance(i, int) and 0 <= i < teacher_blocks for i in kept):
        return kept
    return None


def run(args: argparse.Namespace) -> dict:
    """Check everything, load the model (and teacher), heal, save atomically; returns the result record."""
    out = Path(args.out)
    check_distinct({"input model": local_path(args.model), "teacher": local_path(args.teacher),
                    "training text": local_path(args.data), "evaluation text": local_path(args.eval_data),
                    "masks file": args.masks},
                   {"output directory": out, "checkpoint directory": args.checkpoint_dir})
    check_output_dir(out, args.overwrite)
    if (args.distill is None) != (args.teacher is None):
        raise PrunekitError("--distill and --teacher go together: give both or neither")
    if args.resume and args.checkpoint_dir is None:
        raise PrunekitError("--resume needs --checkpoint-dir")

    import torch
    import transformers

    from prunekit import api
    from prunekit.assets import is_encoder, load_causal_lm
    from prunekit.data.embed import load_encoder
    from prunekit.recovery.api import check_heal_options, heal

    encoder = is_encoder(args.model)
    # an encoder trains on short windows and is judged by its embeddings of held-out texts, as `prunekit prune` does
    defaults = (dict(seq_len=128, eval_seq_len=256, eval_windows=200) if encoder
                else dict(seq_len=512, eval_seq_len=512, eval_windows=64))
    for option, value in defaults.items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    if encoder and args.teacher is None:
        raise PrunekitError(f"{args.model} is an encoder: it heals by distilling the dense model's embeddings; give "
                            "--teacher (the dense encoder) and --distill embedding")

    check_heal_options(args.method, args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                       accumulation=args.accumulation, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                       lora_rank=args.rank, lora_alpha=args.alpha, lora_roles=("attention", "mlp"),
                       distill=args.distill, has_teacher=args.teacher is not None,
                       temperature=args.temperature, distill_alpha=args.distill_alpha,
                       checkpoint_every=args.checkpoint_every)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    api.check_lengths(args.model, calibration_seq_len=args.seq_len, eval_seq_len=args.eval_seq_len)
    masks = api.load_masks(args.masks) if args.masks is not None else None
    load = load_encoder if encoder else load_causal_lm
    loaded = load(args.model)
    manifest = None
    if local_path(args.model) and (Path(args.model) / "prunekit.json").is_file():
        from prunekit.artifacts.io import MANIFEST_LIMIT, read_json_file

        manifest = read_json_file(Path(args.model) / "prunekit.json", limit=MANIFEST_LIMIT, what="manifest")
    teacher, layer_map = None, None
    if args.teacher is not None:
        teacher = load(args.teacher).model
        if args.distill.endswith("+hidden"):
            layer_map = _layer_map(manifest, teacher.config.num_hidden_layers)
    record = heal(loaded.model, loaded.tokenizer, method=args.method, tokens=args.tokens, data=args.data, masks=masks,
                  eval_data=args.eval_data, seq_len=args.seq_len, batch_size=args.batch_size,
                  accumulation=args.accumulation, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                  seed=args.seed, lora_rank=args.rank, lora_alpha=args.alpha, perp_head=args.perp_head,
                  distill=args.distill, teacher=teacher, temperature=args.temperature,
                  distill_alpha=args.distill_alpha, layer_map=layer_map, eval_seq_len=args.eval_seq_len,
                  eval_windows=args.eval_windows or None, checkpoint_dir=args.checkpoint_dir,
                  checkpoint_every=args.checkpoint_every, resume=args.resume, device=args.device,
                  progress=progress, model_source=args.model)
    if manifest is not None:
        record["pruning"] = manifest.get("method")
    if masks is not None:
        record["method"].update(masks_file=args.masks, masks_sha256=file_sha256(args.masks))
    api.save(loaded.model, loaded.tokenizer, out, record, overwrite=args.overwrite)
    record["output"] = str(out)
    return record


def summary(record: dict) -> str:
    """A few lines for the terminal: method, budget, perplexity (encoders: embedding fidelity) before and after,
    sparsity, time, output."""
    metrics, method, evaluation = record["metrics"], record["method"], record["evaluation"]
    tokens, heal_res = metrics["tokens"], record["resources"]["heal"]
    sparsity = metrics["sparsity"]
    if "mean_cosine" in metrics["before"]:
        quality = (f"embeddings mean cosine to dense {metrics['before']['mean_cosine']:.4f} -> "
                   f"{metrics['after']['mean_cosine']:.4f} ({evaluation['texts']} held-out texts of "
                   f"{evaluation['source']})")
    else:
        quality = (f"perplexity {metrics['before']['perplexity']:.2f} -> {metrics['after']['perplexity']:.2f} "
                   f"({evaluation['windows']} held-out windows × {evaluation['seq_len']} tokens)")
    lines = [
        f"model      {record['model']['source']} ({record['model']['parameters']:,} parameters)",
        f"method     {method['name']}" + (f", distilled ({method['distill']})" if method["distill"] else "")
        + f", {metrics['trainable_parameters']:,} trainable parameters",
        f"tokens     target {tokens['target']:,}, trained {tokens['achieved']:,} ({metrics['steps']} steps)",
        quality,
        f"sparsity   {sparsity['before']['sparsity']:.4f} -> {sparsity['after']['sparsity']:.4f}",
        f"resources  {heal_res['wall_s']:.1f} s, peak memory {heal_res['peak_rss_mb']:.0f} MB",
    ]
    if "output" in record:
        lines.append(f"saved      {record['output']}")
    return "\n".join(lines)
