"""Benchmark: token pruning and merging at inference (issue 12), quality against speed at equal kept tokens.

Three parts, each against the same model unpruned and a random-token baseline (`prunekit.tokens.apply`):

- minilm: all-MiniLM-L6-v2 on BBC News, the texts that fill all 256 tokens (so that every method keeps exactly the
  same tokens per block: 256 - r·(l+1) after block l, checked against `handle.kept`). ToMe, Zero-TPrune,
  CLS-attention pruning and random dropping, each at the same r (tokens removed per block). Quality: the mean
  cosine of the size-weighted mean-pooled sentence embedding (`TokenHandle.pool`) to the unpruned model's on the
  held-out split, and the accuracy of a logistic regression (scikit-learn, on L2-normalised embeddings) fitted on
  `--train-texts` train-split embeddings of the same model and method, tested on the held-out split.
- vit: a `prunekit.nets.VisionTransformer` (patch 4: 49 tokens and CLS; 4 blocks of width 64) trained here on
  Fashion-MNIST (Adam, cosine schedule; weights cached as safetensors under `prunekit.assets.cache_dir()/bench`),
  the same four methods at r = 1..8 (never clamped, so again the same kept tokens): test accuracy on all 10k test
  images, images/s at batch 256.
- fastv: SmolLM2-135M, prompts of 1,024 and 2,048 tokens of the held-out `wiki-summaries` split, each followed by a
  64-token continuation read through the cache of the (pruned) prefill (`prunekit.tokens.evaluate`'s
  protocol): FastV at K in {2, 8} and keep in {0.25, 0.5, 0.75}, with FEATHER's un-rotated criterion, and random
  dropping at the same K and keep. Quality: next-token agreement with the unpruned model on the continuation and the
  perplexity of the true continuation; speed: prefill latency at batch 1.

Timing is the same everywhere: in one process, an unpruned and a pruned copy of the model run in turns (A B A B ...)
over the same batches, after one untimed warm-up pass of each; the speedup is the ratio of the median seconds per
batch, so load that changes during the run hits both alike. Threads: `--threads` (default 2), stated in the tables.

    nice -n 10 .venv/bin/python bench/tokens.py --part all          # resumes; full run on an idle machine
    .venv/bin/python bench/tokens.py --part minilm --quick          # smoke run (minutes), tokens_*_quick files
    .venv/bin/python bench/tokens.py --table                        # rebuild tables and plots from the rows

Rows are appended to bench/results/tokens_<part>.jsonl as they finish (a cut run resumes where it stopped); the
tables go to bench/results/tokens_<part>.md and BENCHMARKS.md, the plots to tokens_<part>.png. A `--quick` run
writes tokens_<part>_quick.* and leaves BENCHMARKS.md alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import RESULTS, append_row, place, read_rows  # noqa: E402

HEADING = "## Token pruning and merging (issue 12)"
PARTS = ("minilm", "vit", "fastv")
ENCODER_METHODS = ("tome", "zero-tprune", "cls-attention", "random")
BASELINE = "random"

SEQ_LEN, TEXT_BATCH = 256, 32
MINILM_R = (4, 8, 12, 16, 24, 32)  # at 32 the 6 blocks leave 64 of 256 tokens; ToMe's limit is never reached
VIT = {"patch": 4, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2}
VIT_R = (1, 2, 4, 6, 8)  # at 8: 50 -> 42 -> 34 -> 26 -> 18 tokens, below ToMe's limit (half the tokens) each block
VIT_BATCH = 256
DECODER = "smollm2-135m"
PROMPTS, CONTINUATION = (1024, 2048), 64
FASTV_LAYERS, FASTV_KEEP = (2, 8), (0.25, 0.5, 0.75)
DECODER_VARIANTS = (("fastv", False), ("fastv", True), ("random", False))  # (method, feather)


def _raw(part: str, quick: bool) -> Path:
    return RESULTS / f"tokens_{part}{'_quick' if quick else ''}.jsonl"


def _median(values: list[float]) -> float:
    return statistics.median(values)


def alternated(calls: dict[str, Callable], inputs: list, rounds: int) -> dict:
    """Seconds per input of each call (first: the unpruned model, second: the pruned one), timed in turns over the
    same inputs after one untimed warm-up each (`prunekit.measure.in_turns`): the medians, their ratio (`speedup`)
    and the median of the ratios of the pairs timed back to back."""
    import torch

    from prunekit.measure import in_turns

    with torch.inference_mode():
        dense, pruned = in_turns(calls, inputs, rounds=rounds)["seconds"].values()
    dense_s, pruned_s = _median(dense), _median(pruned)
    pairs = [d / p for d, p in zip(dense, pruned, strict=True)]
    return {"dense_median_s": dense_s, "pruned_median_s": pruned_s, "speedup": dense_s / pruned_s,
            "pair_speedup_median": _median(pairs), "passes": len(pairs), "threads": torch.get_num_threads()}


def continuations(model, prompts, targets, after_prefill=None) -> dict:
    """`prunekit.tokens.evaluate.continue_prompt` over the prompts one at a time, joined: mean NLL, predictions."""
    import torch

    from prunekit.tokens.evaluate import continue_prompt, join_continuations

    with torch.inference_mode():
        parts = [continue_prompt(model, prompts[i:i + 1], targets[i:i + 1], after_prefill) for i in range(len(prompts))]
    return join_continuations(parts, targets.numel())


# --------------------------------------------------------------------------------------------------- minilm


class MiniLM:
    """MiniLM, the full-length BBC News texts tokenized in batches, and the unpruned embeddings, once per process."""

    def __init__(self, args: argparse.Namespace):
        import numpy as np

        from prunekit.assets import text_records
        from prunekit.data.embed import load_encoder
        from prunekit.tokens.evaluate import mean_pooled

        self.args = args
        encoder = load_encoder("minilm-l6")
        self.dense, self.tokenizer = encoder.model, encoder.tokenizer
        self.batch = args.text_batch
        train = self._full_length(text_records("bbc-news", split="train"))
        test = self._full_length(text_records("bbc-news", split="test"))
        # Records are sorted by id, i.e. by class: a seeded permutation gives every class its share of the train texts.
        order = np.random.default_rng(0).permutation(len(train))[:args.train_texts]
        train = [train[i] for i in order]
        test = test[:args.test_texts] if args.test_texts else test
        self.labels = sorted({r["label"] for r in train + test})
        self.y_train = np.array([self.labels.index(r["label"]) for r in train])
        self.y_test = np.array([self.labels.index(r["label"]) for r in test])
        self.train_batches, self.test_batches = self._batches(train), self._batches(test)
        self.timing = self.test_batches[:args.timing_batches]
        self.info = {"train_texts": len(train), "test_texts": len(test), "seq_len": SEQ_LEN, "batch_size": self.batch,
                     "attention": self.dense.config._attn_implementation}
        self.train_dense = self.embed(self.dense, self.train_batches, mean_pooled)
        self.test_dense = self.embed(self.dense, self.test_batches, mean_pooled)

    def _full_length(self, records: list[dict]) -> list[dict]:
        """The texts of at least SEQ_LEN tokens (truncated to it), so that no batch is padded."""
        lengths = self.tokenizer([r["text"] for r in records], truncation=True, max_length=SEQ_LEN,
                                 return_length=True)["length"]
        return [r for r, n in zip(records, lengths, strict=True) if n == SEQ_LEN]

    def _batches(self, records: list[dict]) -> list[dict]:
        return [dict(self.tokenizer([r["text"] for r in records[i:i + self.batch]], truncation=True,
                                    max_length=SEQ_LEN, return_tensors="pt"))
                for i in range(0, len(records), self.batch)]

    def embed(self, model, batches: list[dict], pool: Callable, after: Callable | None = None):
        import torch
        from tqdm import tqdm

        out = []
        with torch.inference_mode():
            for batch in tqdm(batches, desc="embedding", leave=False, disable=not self.args.progress):
                out.append(pool(batch, model(**batch).last_hidden_state))
                if after is not None:
                    after()
        return torch.cat(out)

    def probe(self, train, test) -> float:
        """Held-out accuracy of a logistic regression on L2-normalised embeddings."""
        from sklearn.linear_model import LogisticRegression
        from torch.nn.functional import normalize

        classifier = LogisticRegression(C=10.0, max_iter=5000)
        classifier.fit(normalize(train, dim=1).numpy(), self.y_train)
        return float(classifier.score(normalize(test, dim=1).numpy(), self.y_test))


def _encoder_pending(raw: Path, rs: list[int]) -> tuple[set, list | None]:
    """The (kind, method, r) rows already in `raw`, and the (method, r) runs still to do; None when the dense row and
    every run are there."""
    done = {(r["kind"], r.get("method"), r.get("r")) for r in read_rows(raw)}
    todo = [(m, r) for r in rs for m in ENCODER_METHODS if ("pruned", m, r) not in done]
    return done, None if ("dense", None, None) in done and not todo else todo


def run_minilm(args: argparse.Namespace) -> None:
    import torch

    from prunekit.measure import count_macs, environment
    from prunekit.measure.embedding import embedding_fidelity
    from prunekit.tokens import apply

    raw = _raw("minilm", args.quick)
    done, todo = _encoder_pending(raw, args.minilm_r)
    if todo is None:
        return
    torch.set_num_threads(args.threads)
    bench = MiniLM(args)
    if ("dense", None, None) not in done:
        _append(raw, {"kind": "dense", "accuracy": bench.probe(bench.train_dense, bench.test_dense),
                      "macs": count_macs(bench.dense, bench.timing[0]), **bench.info, "environment": environment()})
    pruned = copy.deepcopy(bench.dense)
    for method, r in todo:
        handle = apply(pruned, method=method, r=r, seed=0)
        try:
            kept = []

            def record_kept(handle=handle, kept=kept) -> None:
                kept.append(handle.kept)

            def pool(batch: dict, hidden, handle=handle):  # size-weighted: a merged token counts for its inputs
                return handle.pool(hidden)

            train = bench.embed(pruned, bench.train_batches, pool, record_kept)
            test = bench.embed(pruned, bench.test_batches, pool, record_kept)
            expected = torch.tensor([SEQ_LEN - r * (layer + 1) for layer in range(len(kept[0]))])
            if any(not (k == expected.unsqueeze(1)).all() for k in kept):  # equal kept tokens is the comparison
                raise RuntimeError(f"{method} r={r} did not keep {expected.tolist()} tokens per block")
            timing = alternated({"dense": lambda b: bench.dense(**b), "pruned": lambda b: pruned(**b)},
                                bench.timing, args.rounds)
            macs = count_macs(pruned, bench.timing[0])
        finally:
            handle.remove()
        fidelity = embedding_fidelity(bench.test_dense, test)
        _append(raw, {"kind": "pruned", "method": method, "r": r, "kept_per_layer": expected.tolist(),
                      "mean_cosine": fidelity["mean_cosine"], "min_cosine": fidelity["min_cosine"],
                      "accuracy": bench.probe(train, test), "macs": macs, "timing": timing,
                      "dense_texts_per_s": bench.batch / timing["dense_median_s"],
                      "pruned_texts_per_s": bench.batch / timing["pruned_median_s"]})


def _speed_cell(row: dict, unit: str) -> str:
    rate = row[f"pruned_{unit}_per_s"]
    return f"{rate:,.1f} ({row[f'dense_{unit}_per_s']:,.1f})"


def minilm_table(rows: list[dict], args: argparse.Namespace) -> str:
    dense = next(r for r in rows if r["kind"] == "dense")
    pruned = [r for r in rows if r["kind"] == "pruned"]
    env = dense["environment"]
    speed = pruned[0]["timing"] if pruned else {"threads": args.threads, "passes": 0}
    text = (f"all-MiniLM-L6-v2 (`minilm-l6`, 6 blocks, {dense['attention']} attention) on BBC News: the texts that "
            f"fill {SEQ_LEN} tokens, {dense['train_texts']} train-split texts (seeded sample) for the probe and "
            f"{dense['test_texts']} held-out texts. Every method removes the same r tokens per block (kept after "
            f"block l: {SEQ_LEN} − r·(l+1), checked); CLS is never removed. Cosine: of the size-weighted mean-pooled "
            f"embedding to the unpruned one (held-out texts). Probe: logistic regression (C = 10, L2-normalised "
            f"embeddings) fitted on the same model's train embeddings; unpruned {dense['accuracy']:.3f}. Speed: "
            f"texts/s at batch {dense['batch_size']} × {SEQ_LEN}, pruned (unpruned) timed in turns in one process, "
            f"median of {speed['passes']} batches each; speedup = ratio of the medians. {speed['threads']} threads "
            f"on {platform.processor() or platform.machine()} ({env['cpu_count']} cores), torch {env['torch']}, "
            f"transformers {env['transformers']}. Regenerate: `.venv/bin/python bench/tokens.py --part minilm`.\n\n"
            "| method | r | tokens after the last block | MACs | mean cosine (min) | probe accuracy | "
            "texts/s (unpruned) | speedup |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in sorted(pruned, key=lambda r: (ENCODER_METHODS.index(r["method"]), r["r"])):
        text += (f"\n| {row['method']} | {row['r']} | {row['kept_per_layer'][-1]} | "
                 f"{row['macs'] / dense['macs']:.0%} | {row['mean_cosine']:.3f} ({row['min_cosine']:.3f}) | "
                 f"{row['accuracy']:.3f} | {_speed_cell(row, 'texts')} | {row['timing']['speedup']:.2f}× |")
    return text + _beats_random(pruned, "r", "mean_cosine", "cosine")


def _beats_random(rows: list[dict], key: str | tuple, metric: str, label: str) -> str:
    """A line per informed method: at how many budgets it beats random dropping at the same kept tokens."""
    keyed = (lambda r: tuple(r[k] for k in key)) if isinstance(key, tuple) else (lambda r: r[key])
    baseline = {keyed(r): r[metric] for r in rows if r["method"] == BASELINE}
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != BASELINE):
        pairs = [(r[metric], baseline[keyed(r)]) for r in rows if r["method"] == method and keyed(r) in baseline]
        if pairs:
            lines.append(f"{method} {sum(a > b for a, b in pairs)}/{len(pairs)}")
    return f"\n\nBeats random on {label} at equal kept tokens: {', '.join(lines)}." if lines else ""


def minilm_plot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    pruned = [r for r in rows if r["kind"] == "pruned"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in ENCODER_METHODS:
        own = sorted((r for r in pruned if r["method"] == method), key=lambda r: r["r"])
        if not own:
            continue
        style = "--" if method == BASELINE else "-"
        speed = [r["timing"]["speedup"] for r in own]
        axes[0].plot(speed, [r["mean_cosine"] for r in own], style, marker="o", label=method)
        axes[1].plot(speed, [r["accuracy"] for r in own], style, marker="o", label=method)
    dense = next(r for r in rows if r["kind"] == "dense")
    axes[1].axhline(dense["accuracy"], color="grey", linewidth=0.8, label="unpruned")
    axes[0].axhline(0.95, color="grey", linewidth=0.8, linestyle=":", label="target cosine 0.95")
    for ax, label in zip(axes, ("mean cosine to unpruned", "probe accuracy"), strict=True):
        ax.set_xlabel(f"speedup (texts/s over unpruned, batch {dense['batch_size']} × {SEQ_LEN})")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("MiniLM on BBC News: token reduction at equal kept tokens (r = 4 … 32 per block)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------- vit


def _vit_weights(args: argparse.Namespace, train_set, test_set):
    """The Fashion-MNIST ViT, trained once and cached (safetensors weights, JSON facts) under the asset cache."""
    import torch
    from safetensors.torch import load_file, save_file

    from prunekit.assets import cache_dir
    from prunekit.measure import accuracy
    from prunekit.nets import VisionTransformer
    from prunekit.training.loop import ClassificationData, train

    name = (f"tokens_vit_p{VIT['patch']}_d{VIT['dim']}_l{VIT['depth']}_e{args.vit_epochs}"
            f"_n{len(train_set)}")
    path = cache_dir() / "bench" / f"{name}.safetensors"
    torch.manual_seed(0)
    model = VisionTransformer(**VIT)
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval(), json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    start = time.perf_counter()
    train(model, ClassificationData(train_set.images, train_set.labels), epochs=args.vit_epochs, batch_size=128,
          optimizer="adam", lr=2e-3, lr_schedule="cosine", seed=0, progress=args.progress)
    with torch.inference_mode():
        test_accuracy = accuracy(model, test_set.images, test_set.labels)["accuracy"]
    facts = {"config": VIT, "epochs": args.vit_epochs, "train_examples": len(train_set), "optimizer": "adam",
             "lr": 2e-3, "schedule": "cosine", "batch_size": 128, "seed": 0, "train_s": time.perf_counter() - start,
             "test_accuracy": test_accuracy, "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    path.with_suffix(".json").write_text(json.dumps(facts, indent=1), encoding="utf-8")
    return model.eval(), facts


def run_vit(args: argparse.Namespace) -> None:
    import torch

    from prunekit.assets import load_images
    from prunekit.measure import accuracy, count_macs, environment
    from prunekit.tokens import apply

    raw = _raw("vit", args.quick)
    done, todo = _encoder_pending(raw, args.vit_r)
    if todo is None:
        return
    torch.set_num_threads(args.threads)
    train_set, test_set = load_images("fashion-mnist", "train"), load_images("fashion-mnist", "test")
    if args.quick:
        train_set, test_set = train_set.subset(range(4096)), test_set.subset(range(1024))
    dense, facts = _vit_weights(args, train_set, test_set)
    images, labels = test_set.images, test_set.labels
    timing_batches = [images[i:i + VIT_BATCH] for i in range(0, VIT_BATCH * args.timing_batches, VIT_BATCH)]
    torch.set_grad_enabled(False)
    if ("dense", None, None) not in done:
        _append(raw, {"kind": "dense", "accuracy": accuracy(dense, images, labels)["accuracy"], "training": facts,
                      "test_images": len(labels), "macs": count_macs(dense, timing_batches[0]),
                      "environment": environment()})
    pruned = copy.deepcopy(dense)
    tokens = 1 + (28 // VIT["patch"]) ** 2
    for method, r in todo:
        handle = apply(pruned, method=method, r=r, seed=0)
        try:
            result = accuracy(pruned, images, labels)
            kept = handle.kept[:, 0].tolist()
            expected = [tokens - r * (layer + 1) for layer in range(VIT["depth"])]
            if kept != expected:
                raise RuntimeError(f"{method} r={r} kept {kept} tokens per block, not {expected}")
            timing = alternated({"dense": dense, "pruned": pruned}, timing_batches, args.rounds)
            macs = count_macs(pruned, timing_batches[0])
        finally:
            handle.remove()
        _append(raw, {"kind": "pruned", "method": method, "r": r, "kept_per_layer": kept,
                      "accuracy": result["accuracy"], "macs": macs, "timing": timing,
                      "dense_images_per_s": VIT_BATCH / timing["dense_median_s"],
                      "pruned_images_per_s": VIT_BATCH / timing["pruned_median_s"]})


def vit_table(rows: list[dict], args: argparse.Namespace) -> str:
    dense = next(r for r in rows if r["kind"] == "dense")
    pruned = [r for r in rows if r["kind"] == "pruned"]
    facts, env = dense["training"], dense["environment"]
    speed = pruned[0]["timing"] if pruned else {"threads": args.threads, "passes": 0}
    tokens = 1 + (28 // VIT["patch"]) ** 2
    text = (f"`prunekit.nets.VisionTransformer` (patch {VIT['patch']}: {tokens - 1} tokens and CLS, {VIT['depth']} "
            f"blocks, width {VIT['dim']}, {VIT['heads']} heads) trained here on {facts['train_examples']:,} "
            f"Fashion-MNIST images ({facts['epochs']} epochs, Adam lr {facts['lr']}, cosine, batch "
            f"{facts['batch_size']}, seed 0; {facts['train_s'] / 60:.1f} min on {facts['threads']} threads): "
            f"unpruned test accuracy {dense['accuracy']:.4f} on {dense['test_images']:,} images. Every method "
            f"removes r tokens per block (kept after block l: {tokens} − r·(l+1), checked). Speed: images/s at batch "
            f"{VIT_BATCH}, pruned (unpruned) timed in turns, median of {speed['passes']} batches each; "
            f"{speed['threads']} threads, torch {env['torch']}. Regenerate: `.venv/bin/python bench/tokens.py "
            "--part vit`.\n\n| method | r | tokens after the last block | MACs | accuracy | images/s (unpruned) | "
            "speedup |\n|---|---:|---:|---:|---:|---:|---:|")
    for row in sorted(pruned, key=lambda r: (ENCODER_METHODS.index(r["method"]), r["r"])):
        text += (f"\n| {row['method']} | {row['r']} | {row['kept_per_layer'][-1]} | {row['macs'] / dense['macs']:.0%} "
                 f"| {row['accuracy']:.4f} | {_speed_cell(row, 'images')} | {row['timing']['speedup']:.2f}× |")
    return text + _beats_random(pruned, "r", "accuracy", "accuracy")


def vit_plot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    dense = next(r for r in rows if r["kind"] == "dense")
    pruned = [r for r in rows if r["kind"] == "pruned"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in ENCODER_METHODS:
        own = sorted((r for r in pruned if r["method"] == method), key=lambda r: r["r"])
        if own:
            ax.plot([r["pruned_images_per_s"] for r in own], [r["accuracy"] for r in own],
                    "--" if method == BASELINE else "-", marker="o", label=method)
    if pruned:  # the unpruned rate measured alongside each row; its median marks the curve's start
        rate = _median([r["dense_images_per_s"] for r in pruned])
        ax.plot([rate], [dense["accuracy"]], "k*", markersize=10, label="unpruned")
    ax.set_xlabel(f"images/s (batch {VIT_BATCH})")
    ax.set_ylabel("test accuracy")
    ax.set_title("Fashion-MNIST ViT: accuracy against throughput, r = 1 … 8 per block")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------- fastv


def run_fastv(args: argparse.Namespace) -> None:
    import torch

    from prunekit.assets import load_causal_lm
    from prunekit.inputs import evaluation_set
    from prunekit.measure import count_macs, environment
    from prunekit.tokens import apply

    raw = _raw("fastv", args.quick)
    done = {_fastv_key(r) for r in read_rows(raw)}
    configs = [(p, m, k, keep, f) for p in args.prompts for k in args.fastv_layers for keep in args.fastv_keep
               for m, f in DECODER_VARIANTS]
    todo = [c for c in configs if ("pruned", *c) not in done]
    if all(("dense", p, None, None, None, None) in done for p in args.prompts) and not todo:
        return
    torch.set_num_threads(args.threads)
    loaded = load_causal_lm(DECODER)
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    pruned = copy.deepcopy(dense)
    for prompt_len in args.prompts:
        token_set = evaluation_set(tokenizer, "wiki-summaries", seq_len=prompt_len + args.continuation,
                                   windows=args.windows)
        prompts, targets = token_set.ids[:, :prompt_len], token_set.ids[:, prompt_len:]
        timing_inputs = [prompts[i:i + 1] for i in range(args.timing_windows)]
        reference = continuations(dense, prompts, targets)
        if ("dense", prompt_len, None, None, None, None) not in done:
            _append(raw, {"kind": "dense", "prompt": prompt_len, "perplexity": _perplexity(reference["nll"]),
                          "macs": count_macs(dense, {"input_ids": prompts[:1]}), "evaluation": token_set.info,
                          "continuation": args.continuation, "environment": environment()})
        for _, method, layer, keep, feather in (c for c in todo if c[0] == prompt_len):
            handle = apply(pruned, method=method, layer=layer, keep=keep, feather=feather, seed=0)
            try:
                kept = []
                result = continuations(pruned, prompts, targets,
                                       after_prefill=lambda handle=handle, kept=kept: kept.append(handle.kept))
                timing = alternated({"dense": lambda ids: dense(ids, use_cache=True),
                                     "pruned": lambda ids: pruned(ids, use_cache=True)}, timing_inputs, args.rounds)
                macs = count_macs(pruned, {"input_ids": prompts[:1]})
            finally:
                handle.remove()
            agreement = float((result["predictions"] == reference["predictions"]).double().mean())
            _append(raw, {"kind": "pruned", "prompt": prompt_len, "method": method, "layer": layer, "keep": keep,
                          "feather": feather, "kept_tokens": float(torch.cat(kept).double().mean()),
                          "agreement": agreement, "perplexity": _perplexity(result["nll"]),
                          "dense_perplexity": _perplexity(reference["nll"]), "macs": macs, "timing": timing})


def _fastv_key(row: dict) -> tuple:
    return row["kind"], row["prompt"], row.get("method"), row.get("layer"), row.get("keep"), row.get("feather")


def _perplexity(nll: float) -> float:
    import math

    return math.exp(nll)


def _decoder_label(row: dict) -> str:
    return "feather" if row["feather"] else row["method"]


def fastv_table(rows: list[dict], args: argparse.Namespace) -> str:
    dense_rows = {r["prompt"]: r for r in rows if r["kind"] == "dense"}
    pruned = [r for r in rows if r["kind"] == "pruned"]
    first = next(iter(dense_rows.values()))
    env, info = first["environment"], first["evaluation"]
    speed = pruned[0]["timing"] if pruned else {"threads": args.threads, "passes": 0}
    text = (f"SmolLM2-135M (`{DECODER}`, 30 blocks) on the first {info['windows']} non-overlapping windows of the "
            f"held-out `wiki-summaries` split per prompt length: the prompt, then its {first['continuation']}-token "
            "continuation read through the cache of the (pruned) prefill. FastV prunes the prompt once, after "
            "block K, keeping the tokens the last prompt token attends to most in block K−1; feather: the same "
            "without the rotary term (FEATHER's criterion); random: random prompt tokens at the same K and keep, "
            "one seeded draw by position (seed 0), so the same positions at every K and in every window (the last "
            "prompt token always kept). "
            "Agreement: greedy next-token predictions on the continuation equal to the unpruned model's; "
            "perplexity of the true continuation. Prefill latency at batch 1, pruned (unpruned) timed in turns, "
            f"median of {speed['passes']} prefills each; {speed['threads']} threads on "
            f"{platform.processor() or platform.machine()} ({env['cpu_count']} cores), torch {env['torch']}, "
            f"transformers {env['transformers']}. Regenerate: `.venv/bin/python bench/tokens.py --part fastv`.")
    for prompt_len, dense in sorted(dense_rows.items()):
        own = sorted((r for r in pruned if r["prompt"] == prompt_len),
                     key=lambda r: (r["layer"], r["keep"], [v[0] for v in DECODER_VARIANTS].index(r["method"]),
                                    r["feather"]))
        text += (f"\n\n{prompt_len}-token prompts (unpruned continuation perplexity {dense['perplexity']:.2f}):\n\n"
                 "| K | keep | method | prompt tokens kept | MACs | agreement | perplexity | prefill ms (unpruned) "
                 "| speedup |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for row in own:
            timing = row["timing"]
            text += (f"\n| {row['layer']} | {row['keep']:g} | {_decoder_label(row)} | {row['kept_tokens']:.0f} | "
                     f"{row['macs'] / dense['macs']:.0%} | {row['agreement']:.3f} | {row['perplexity']:.2f} | "
                     f"{timing['pruned_median_s'] * 1e3:,.0f} ({timing['dense_median_s'] * 1e3:,.0f}) | "
                     f"{timing['speedup']:.2f}× |")
    labelled = [{**r, "method": _decoder_label(r)} for r in pruned]
    return text + _beats_random(labelled, ("prompt", "layer", "keep"), "agreement", "agreement")


def fastv_plot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    pruned = [r for r in rows if r["kind"] == "pruned"]
    prompts = sorted({r["prompt"] for r in pruned})
    fig, axes = plt.subplots(1, max(len(prompts), 1), figsize=(6 * max(len(prompts), 1), 4), squeeze=False)
    for ax, prompt_len in zip(axes[0], prompts, strict=True):
        for layer in sorted({r["layer"] for r in pruned}):
            for label, marker in (("fastv", "o"), ("feather", "s"), ("random", "x")):
                own = sorted((r for r in pruned if r["prompt"] == prompt_len and r["layer"] == layer
                              and _decoder_label(r) == label), key=lambda r: r["keep"])
                if own:
                    ax.plot([r["timing"]["speedup"] for r in own], [r["agreement"] for r in own],
                            "--" if label == "random" else "-", marker=marker, label=f"{label} K={layer}")
        ax.set_xlabel("prefill speedup over unpruned (batch 1)")
        ax.set_ylabel("next-token agreement with unpruned")
        ax.set_title(f"SmolLM2-135M, {prompt_len}-token prompts")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------- output


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _append(path: Path, row: dict) -> None:
    append_row(path, row)
    print(json.dumps({k: v for k, v in row.items() if isinstance(v, (str, int, float, bool))}), file=sys.stderr)


TABLES = {"minilm": (minilm_table, minilm_plot), "vit": (vit_table, vit_plot), "fastv": (fastv_table, fastv_plot)}
TITLES = {"minilm": "MiniLM on BBC News", "vit": "Fashion-MNIST vision transformer",
          "fastv": "FastV on SmolLM2-135M"}


def write(part: str, args: argparse.Namespace) -> None:
    raw = _raw(part, args.quick)
    rows = read_rows(raw)
    if not any(r["kind"] == "dense" for r in rows):
        print(f"tokens: no rows in {raw.name} yet", file=sys.stderr)
        return
    table, plot = TABLES[part]
    text = table(rows, args)
    print(text)
    stem = raw.with_suffix("")
    stem.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    plot(rows, stem.with_suffix(".png"))
    if not args.quick:  # a smoke run's numbers never reach BENCHMARKS.md
        place(f"tokens_{part}", f"### {TITLES[part]}\n\n{text}\n\n![{TITLES[part]}](bench/results/{stem.name}.png)",
              HEADING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds over the timing batches")
    parser.add_argument("--timing-batches", type=int, default=4, help="minilm and vit batches timed per round")
    parser.add_argument("--text-batch", type=int, default=TEXT_BATCH)
    parser.add_argument("--train-texts", type=int, default=1000, help="train-split texts for the minilm probe")
    parser.add_argument("--test-texts", type=int, default=0, help="held-out minilm texts (0: all full-length ones)")
    parser.add_argument("--minilm-r", type=int, nargs="+", default=list(MINILM_R))
    parser.add_argument("--vit-r", type=int, nargs="+", default=list(VIT_R))
    parser.add_argument("--vit-epochs", type=int, default=5)
    parser.add_argument("--prompts", type=int, nargs="+", default=list(PROMPTS), help="fastv prompt lengths")
    parser.add_argument("--continuation", type=int, default=CONTINUATION)
    parser.add_argument("--windows", type=int, default=8, help="fastv windows per prompt length")
    parser.add_argument("--timing-windows", type=int, default=1, help="fastv prompts timed per round")
    parser.add_argument("--fastv-layers", type=int, nargs="+", default=list(FASTV_LAYERS))
    parser.add_argument("--fastv-keep", type=float, nargs="+", default=list(FASTV_KEEP))
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke configuration; writes tokens_<part>_quick.* and not BENCHMARKS.md")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--table", action="store_true", help="only rebuild tables and plots from the JSON lines")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.timing_batches, args.text_batch = 1, 1, 16
        args.train_texts, args.test_texts, args.minilm_r, args.vit_r, args.vit_epochs = 48, 16, [16], [4], 1
        args.prompts, args.continuation, args.windows, args.fastv_layers, args.fastv_keep = [256], 16, 2, [2], [0.5]
    parts = PARTS if args.part == "all" else (args.part,)
    runners = {"minilm": run_minilm, "vit": run_vit, "fastv": run_fastv}
    for part in parts:
        if not args.table:
            runners[part](args)
        write(part, args)


if __name__ == "__main__":
    main()
