"""Benchmark: expert pruning of a small mixture-of-experts model trained in the repository (issue 13).

Model (`train` stage): a Mixtral-architecture decoder (`transformers.MixtralConfig`: 4 layers, hidden 256, 8
experts of intermediate width 512 routing top-2, 4 query / 2 KV heads, SmolLM2-135M's tokenizer and vocabulary,
tied embeddings), trained from scratch, seed 0, with AdamW (peak learning rate 2e-3, 5% linear warm-up then cosine
to a tenth, weight decay 0.1, gradient clip 1) on `--train-tokens` tokens of the `wiki-summaries` train split (its
non-overlapping 256-token windows in a seeded random order, batch 16), with the router load-balancing auxiliary
loss (Switch Transformer's, coefficient 0.01 per MoE layer, computed layer by layer: see `balance_loss`) so that
every expert is used. Saved as a safetensors Hugging Face directory with its
training record (`train.json`) in `prunekit.assets.cache_dir() / "bench" / "moe-wiki"`; training is skipped when it
exists.

Router-norm pruning (Chowdhury et al. 2024) compares a pretrained checkpoint with its fine-tuned continuation on a
downstream task; more pretraining on the same text is not such a fine-tune, so the trained model is fine-tuned on
`--finetune-tokens` tokens of the `shakespeare` train split (learning rate 3e-4, same loss) into `moe-wiki-
shakespeare`, and router_norm is measured on that pair, on held-out Shakespeare, beside the calibrated criteria and
random on the same fine-tuned model.

Bench (`bench` stage): perplexity on the first `--eval-windows` non-overlapping 256-token windows of the held-out
split of: the dense model; `prunekit.experts.prune_experts` removing 25% and 50% of each layer's experts by
frequency, gate, reconstruction and random (seeds 0, 1, 2), and merging instead of dropping for the best informed
criterion; `prune_inside_experts` by MoE-Pruner, Wanda and SparseGPT at 50% and 70% sparsity of the expert weights.
Calibration: 32 x 256 tokens of the train split of the evaluated text (`wiki-summaries` or `shakespeare`), seed 0.

    nice -n 10 .venv/bin/python bench/moe.py            # train (about 20 minutes on 2 cores), fine-tune, bench
    .venv/bin/python bench/moe.py --table               # rebuild the table and plot from the JSON lines

Rows are appended to bench/results/moe_wiki.jsonl as they finish (a cut run resumes); the table goes to
bench/results/moe_wiki.md, the plot to bench/results/moe_wiki.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import append_row, read_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RAW = RESULTS / "moe_wiki.jsonl"
TOKENIZER = "smollm2-135m"
SEQ_LEN, BATCH = 256, 16
EXPERTS, TOP_K = 8, 2
FRACTIONS = (0.25, 0.5)
INFORMED = ("frequency", "gate", "reconstruction")
RANDOM_SEEDS = (0, 1, 2)
INSIDE = ("moe_pruner", "wanda", "sparsegpt")
INSIDE_SPARSITIES = (0.5, 0.7)
CALIBRATION = dict(calibration_samples=32, calibration_seq_len=SEQ_LEN, seed=0, batch_size=8, progress=False)
TRAIN_LR, FINETUNE_LR = 2e-3, 3e-4
COLORS = {"frequency": "C0", "gate": "C1", "reconstruction": "C2", "router_norm": "C3", "random": "grey"}


def _model_dir(name: str) -> Path:
    from prunekit.assets import cache_dir

    return cache_dir() / "bench" / name


def _rows() -> list[dict]:
    return read_rows(RAW)


def _append(row: dict) -> None:
    append_row(RAW, row)
    print(json.dumps({k: row[k] for k in ("data", "kind", "criterion", "fraction", "seed", "merge", "perplexity")
                      if k in row}), file=sys.stderr)


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("data", "kind", "criterion", "fraction", "seed", "merge"))


def _tokenizer():
    from transformers import AutoTokenizer

    from prunekit.assets import model_path

    return AutoTokenizer.from_pretrained(model_path(TOKENIZER), local_files_only=True)


def new_model(tokenizer):
    """The untrained Mixtral-architecture model, initialised under seed 0."""
    import torch
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
        max_position_embeddings=SEQ_LEN, tie_word_embeddings=True, output_router_logits=False,
        router_aux_loss_coef=0.01, router_jitter_noise=0.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _learning_rate(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine from `peak` to `peak` / 10."""
    ramp = max(1, round(warmup * steps))
    if step < ramp:
        return peak * (step + 1) / ramp
    progress = (step - ramp) / max(1, steps - ramp)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def balance_loss(router_logits, top_k: int):
    """Switch Transformer's load-balancing loss of one MoE layer (Fedus et al. 2022, Eq. 4): experts x the sum over
    experts of (fraction of the layer's top-k assignments that go to e) x (mean router probability of e); 1 when
    balanced. Computed per layer: transformers' `load_balancing_loss_func` pools the counts of every layer before
    multiplying, so an expert dead in one layer is hidden by the same index being busy in another."""
    import torch

    probs = torch.softmax(router_logits.float(), dim=-1)
    experts = probs.shape[-1]
    chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
    share = torch.bincount(chosen, minlength=experts).float() / chosen.numel()
    return experts * (share * probs.mean(0)).sum()


def train_lm(model, windows, *, tokens: int, lr: float, warmup: float, progress: bool = True) -> dict:
    """Train `model` in place on `tokens` tokens drawn from the rows of `windows` [n, SEQ_LEN] (a fresh seeded
    permutation per pass), batch `BATCH`, minimising the next-token loss plus `router_aux_loss_coef` times the sum
    over MoE layers of `balance_loss`; returns the training record (losses every few steps, time, throughput)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    steps = max(1, tokens // (BATCH * SEQ_LEN))
    generator = torch.Generator().manual_seed(0)
    order = torch.empty(0, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    coef, top_k = model.config.router_aux_loss_coef, model.config.num_experts_per_tok
    model.train()
    curve, start = [], time.perf_counter()
    for step in tqdm(range(steps), desc="train", unit="step", disable=not progress):
        if len(order) < BATCH:
            order = torch.cat([order, torch.randperm(len(windows), generator=generator)])
        batch, order = windows[order[:BATCH]], order[BATCH:]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr, warmup)
        out = model(input_ids=batch, use_cache=False, output_router_logits=True)
        lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        balance = torch.stack([balance_loss(logits, top_k) for logits in out.router_logits])
        optimizer.zero_grad(set_to_none=True)
        (lm + coef * balance.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            curve.append({"step": step, "loss": lm.item(), "balance_per_layer": balance.tolist()})
    model.eval()
    seconds = time.perf_counter() - start
    return {"steps": steps, "tokens": steps * BATCH * SEQ_LEN, "batch": BATCH, "seq_len": SEQ_LEN, "lr": lr,
            "warmup": warmup, "balance_coefficient_per_layer": coef, "seconds": seconds,
            "tokens_per_s": steps * BATCH * SEQ_LEN / seconds, "windows_available": len(windows), "curve": curve}


def _save(model, tokenizer, record: dict, out: Path) -> None:
    from prunekit.artifacts.io import atomic_directory

    with atomic_directory(out, overwrite=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "train.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def run_train(args: argparse.Namespace) -> None:
    """Train the model on wiki-summaries, then fine-tune a copy on Shakespeare; each skipped if already saved."""
    import torch

    from prunekit.assets import load_causal_lm
    from prunekit.corpus import evaluation_windows
    from prunekit.measure import environment

    torch.set_num_threads(args.threads)
    tokenizer = _tokenizer()
    base, tuned = _model_dir("moe-wiki"), _model_dir("moe-wiki-shakespeare")
    if not base.exists():
        windows = evaluation_windows(tokenizer, "wiki-summaries", seq_len=SEQ_LEN, split="train")
        model = new_model(tokenizer)
        record = train_lm(model, windows.ids, tokens=args.train_tokens, lr=TRAIN_LR, warmup=0.05,
                          progress=not args.quiet)
        record |= {"data": windows.info, "seed": 0, "environment": environment(),
                   "parameters": sum(p.numel() for p in model.parameters())}
        _save(model, tokenizer, record, base)
    if not tuned.exists():
        windows = evaluation_windows(tokenizer, "shakespeare", seq_len=SEQ_LEN, split="train")
        model = load_causal_lm(base).model
        record = train_lm(model, windows.ids, tokens=args.finetune_tokens, lr=FINETUNE_LR, warmup=0.1,
                          progress=not args.quiet)
        record |= {"data": windows.info, "seed": 0, "started_from": str(base), "environment": environment()}
        _save(model, tokenizer, record, tuned)


class Bench:
    """One evaluated text: its dense model (and the one it was fine-tuned from), tokens and windows."""

    def __init__(self, data: str, model_dir: Path, args: argparse.Namespace, pretrained_dir: Path | None = None):
        from prunekit.assets import load_causal_lm
        from prunekit.corpus import evaluation_windows

        self.data, self.args, self.source = data, args, model_dir.name
        loaded = load_causal_lm(model_dir)
        self.dense, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.pretrained = load_causal_lm(pretrained_dir).model.eval() if pretrained_dir else None
        self.windows = evaluation_windows(self.tokenizer, data, seq_len=SEQ_LEN, max_windows=args.eval_windows)

    def perplexity(self, model) -> float:
        from prunekit.measure import perplexity

        return perplexity(model, self.windows.ids, batch_size=8, progress=False)["perplexity"]

    def row(self, model, record: dict, kind: str, criterion: str, fraction: float, seed: int | None,
            merge: bool | None, seconds: float) -> dict:
        from prunekit.measure import parameter_counts

        metrics = record["metrics"]
        row = {"data": self.data, "kind": kind, "criterion": criterion, "fraction": fraction, "seed": seed,
               "merge": merge, "perplexity": self.perplexity(model), "seconds": seconds,
               "experts_per_layer": model.config.num_local_experts, "parameters": parameter_counts(model),
               "calibration": record["calibration"]}
        if kind == "experts":
            row |= {"removed": metrics["removed"], "merged_into": metrics.get("merged_into"),
                    "routed_tokens": metrics.get("routed_tokens")}
        else:
            row["sparsity"] = metrics["sparsity"]["achieved"]
        return row

    def experts(self, done: set, criterion: str, fraction: float, seed: int | None = None, merge: bool = False):
        from prunekit.experts import prune_experts

        key = (self.data, "experts", criterion, fraction, seed, merge)
        if key in done:
            return
        model = copy.deepcopy(self.dense)
        start = time.perf_counter()
        record = prune_experts(model, self.tokenizer, criterion=criterion, remove=fraction, merge=merge,
                               pretrained=self.pretrained if criterion == "router_norm" else None,
                               calibration=self.data, **(CALIBRATION | {"seed": seed or 0}),
                               model_source=self.source)
        _append(self.row(model, record, "experts", criterion, fraction, seed, merge, time.perf_counter() - start))

    def inside(self, done: set, method: str, sparsity: float) -> None:
        from prunekit.experts import prune_inside_experts

        if (self.data, "inside", method, sparsity, None, None) in done:
            return
        model = copy.deepcopy(self.dense)
        start = time.perf_counter()
        record = prune_inside_experts(model, self.tokenizer, method=method, sparsity=sparsity,
                                      calibration=self.data, **CALIBRATION, model_source=self.source)
        _append(self.row(model, record, "inside", method, sparsity, None, None, time.perf_counter() - start))

    def dense_row(self, done: set, kind: str = "dense") -> None:
        from prunekit.measure import environment, parameter_counts

        if (self.data, kind, None, None, None, None) not in done:
            _append({"data": self.data, "kind": kind, "perplexity": self.perplexity(self.dense),
                     "experts_per_layer": self.dense.config.num_local_experts,
                     "parameters": parameter_counts(self.dense), "evaluation": self.windows.info,
                     "environment": environment()})


def _best(rows: list[dict], data: str) -> str:
    """The informed criterion with the lowest mean perplexity over the removal fractions."""
    def mean(criterion: str) -> float:
        values = [r["perplexity"] for r in rows if r["data"] == data and r["kind"] == "experts"
                  and r["criterion"] == criterion and not r["merge"]]
        return sum(values) / len(values)

    return min(INFORMED, key=mean)


def run_bench(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    done = {_key(r) for r in _rows()}
    wiki = Bench("wiki-summaries", _model_dir("moe-wiki"), args)
    wiki.dense_row(done)
    for fraction in FRACTIONS:
        for criterion in INFORMED:
            wiki.experts(done, criterion, fraction)
        for seed in RANDOM_SEEDS:
            wiki.experts(done, "random", fraction, seed)
    best = _best(_rows(), wiki.data)
    for fraction in FRACTIONS:
        wiki.experts(done, best, fraction, merge=True)
    for sparsity in INSIDE_SPARSITIES:
        for method in INSIDE:
            wiki.inside(done, method, sparsity)
    del wiki
    # router_norm: the wiki model (pretrained) against its Shakespeare fine-tune, beside the other criteria there
    shakespeare = Bench("shakespeare", _model_dir("moe-wiki"), args)
    shakespeare.dense_row(done, "pretrained")
    shakespeare = Bench("shakespeare", _model_dir("moe-wiki-shakespeare"), args, _model_dir("moe-wiki"))
    shakespeare.dense_row(done)
    for fraction in FRACTIONS:
        for criterion in ("router_norm", *INFORMED):
            shakespeare.experts(done, criterion, fraction)
        for seed in RANDOM_SEEDS:
            shakespeare.experts(done, "random", fraction, seed)


def _fmt(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def _balance(rows: list[dict], data: str) -> str:
    """How evenly the dense router spread the calibration tokens: each expert's share relative to uniform."""
    row = next((r for r in rows if r["data"] == data and r.get("criterion") == "frequency" and not r["merge"]),
               None)
    if row is None:
        return ""
    shares = [c * EXPERTS / sum(counts) for counts in row["routed_tokens"].values() for c in counts]
    return (f"; on the calibration tokens the dense router gives each expert {min(shares):.2f}–{max(shares):.2f} "
            f"times the uniform share")


def _experts_table(rows: list[dict], data: str) -> list[str]:
    dense = next(r for r in rows if r["data"] == data and r["kind"] == "dense")
    lines = ["| criterion | experts removed | experts kept / layer | perplexity | vs dense | parameters | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    pretrained = [r for r in rows if r["data"] == data and r["kind"] == "pretrained"]
    for r in pretrained:
        lines.append(f"| wiki model before the fine-tune | 0 | {r['experts_per_layer']} | {_fmt(r['perplexity'])} | "
                     f"| {r['parameters']['total'] / 1e6:.2f}M | |")
    lines.append(f"| dense | 0 | {dense['experts_per_layer']} | {_fmt(dense['perplexity'])} | 1.00x | "
                 f"{dense['parameters']['total'] / 1e6:.2f}M | |")
    experts = [r for r in rows if r["data"] == data and r["kind"] == "experts"]
    groups: dict[tuple, list[dict]] = {}
    for r in experts:
        groups.setdefault((r["criterion"], r["merge"], r["fraction"]), []).append(r)
    order = ["router_norm", *INFORMED, "random"]
    for (criterion, merge, fraction), group in sorted(groups.items(), key=lambda g: (g[0][2], g[0][1],
                                                                                    order.index(g[0][0]))):
        ppl = [r["perplexity"] for r in group]
        mean = sum(ppl) / len(ppl)
        value = _fmt(mean) if len(ppl) == 1 else f"{_fmt(mean)} ({_fmt(min(ppl))}–{_fmt(max(ppl))}, {len(ppl)} seeds)"
        name = f"{criterion} + merge" if merge else criterion
        r = group[0]
        lines.append(f"| {name} | {fraction:.0%} ({EXPERTS - r['experts_per_layer']}) | {r['experts_per_layer']} | "
                     f"{value} | {mean / dense['perplexity']:.2f}x | {r['parameters']['total'] / 1e6:.2f}M | "
                     f"{sum(x['seconds'] for x in group) / len(group):.1f} |")
    return lines


def _inside_table(rows: list[dict]) -> list[str]:
    dense = next(r for r in rows if r["data"] == "wiki-summaries" and r["kind"] == "dense")
    lines = ["| method | expert-weight sparsity | perplexity | vs dense | nonzero parameters | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "inside":
            lines.append(f"| {r['criterion']} | {r['sparsity']:.1%} | {_fmt(r['perplexity'])} | "
                         f"{r['perplexity'] / dense['perplexity']:.2f}x | {r['parameters']['nonzero'] / 1e6:.2f}M | "
                         f"{r['seconds']:.1f} |")
    return lines


def _mean_ppl(rows: list[dict], data: str, criterion: str, fraction: float, merge: bool = False) -> float | None:
    values = [r["perplexity"] for r in rows if r["data"] == data and r["kind"] == "experts"
              and r["criterion"] == criterion and r["fraction"] == fraction and r["merge"] == merge]
    return sum(values) / len(values) if values else None


def reading(rows: list[dict]) -> str:
    """The comparisons the table answers, stated from the numbers (so they stay true when the rows change)."""
    sentences = []
    for data in ("wiki-summaries", "shakespeare"):
        names = [c for c in ("router_norm", *INFORMED) if any(r["data"] == data and r.get("criterion") == c
                                                               for r in rows)]
        for fraction in FRACTIONS:
            informed = {c: _mean_ppl(rows, data, c, fraction) for c in names}
            informed = {c: v for c, v in informed.items() if v is not None}
            randoms = [r["perplexity"] for r in rows if r["data"] == data and r.get("criterion") == "random"
                       and r["fraction"] == fraction]
            if not informed or not randoms:
                continue
            best = min(informed, key=informed.get)
            beaten = [c for c, v in informed.items() if v < min(randoms)]
            sentences.append(
                f"{data}, {fraction:.0%} removed: best {best} ({_fmt(informed[best])}; random "
                f"{_fmt(sum(randoms) / len(randoms))} mean, {_fmt(min(randoms))} at best); below every random seed: "
                f"{', '.join(beaten) or 'none'}.")
            merged = [(c, _mean_ppl(rows, data, c, fraction, True)) for c in names]
            for c, value in merged:
                if value is not None:
                    sentences.append(f"Merging instead of dropping ({c}, {fraction:.0%}): {_fmt(value)} against "
                                     f"{_fmt(informed[c])}.")
    for sparsity in INSIDE_SPARSITIES:
        inside = {r["criterion"]: r["perplexity"] for r in rows if r["kind"] == "inside" and r["fraction"] == sparsity}
        if inside:
            sentences.append(f"Inside the experts at {sparsity:.0%}: "
                             + ", ".join(f"{m} {_fmt(v)}" for m, v in inside.items()) + ".")
    return "Reading (computed from the rows): " + " ".join(sentences)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    dense = next(r for r in rows if r["data"] == "wiki-summaries" and r["kind"] == "dense")
    env = dense["environment"]
    train = json.loads((_model_dir("moe-wiki") / "train.json").read_text(encoding="utf-8"))
    tune = json.loads((_model_dir("moe-wiki-shakespeare") / "train.json").read_text(encoding="utf-8"))
    first, last = train["curve"][0], train["curve"][-1]
    windows = dense["evaluation"]["windows"]
    lines = [
        f"A Mixtral-architecture MoE trained here from scratch (`bench/moe.py`): 4 layers, hidden 256, {EXPERTS} "
        f"experts of width 512, top-{TOP_K}, SmolLM2's tokenizer (vocabulary 49,152, tied embeddings), "
        f"{dense['parameters']['total'] / 1e6:.1f}M parameters. Trained on {train['tokens']:,} tokens of the "
        f"`wiki-summaries` train split ({train['steps']} AdamW steps of 16 x 256 tokens, seed 0, load-balancing "
        f"loss 0.01 per layer; LM loss {first['loss']:.2f} → {last['loss']:.2f}, {train['seconds'] / 60:.0f} min at "
        f"{train['tokens_per_s']:,.0f} tokens/s); fine-tuned for router_norm on {tune['tokens']:,} tokens of the "
        f"`shakespeare` train split ({tune['seconds'] / 60:.1f} min, learning rate {tune['lr']:g}). Perplexity on "
        f"the first {windows} non-overlapping 256-token windows of each text's held-out split. Experts removed "
        f"from every layer by `prunekit.prune_experts` (dropped, or merged into the nearest kept expert by weight "
        f"cosine, weighted by routed tokens), weights inside the experts by `prunekit.prune_inside_experts`; "
        f"calibration 32 x 256 tokens of the evaluated text's train split, seed 0 (random: seeds 0–2, mean and "
        f"range). Parameters include the 12.6M of the embedding. {args.threads} threads on "
        f"{platform.processor() or platform.machine()} ({env['cpu_count']} cores, shared, under `nice -n 10`), "
        f"torch {env['torch']}, transformers {env['transformers']}. Regenerate: `nice -n 10 .venv/bin/python "
        f"bench/moe.py` (training is skipped when the model exists in the cache).", "",
        f"**Held-out `wiki-summaries`** (the training text{_balance(rows, 'wiki-summaries')}):", "",
        *_experts_table(rows, "wiki-summaries"), "",
        "**Weights inside the experts at 50% and 70% (per output row; SparseGPT per projection, with its weight "
        "update), "
        "held-out `wiki-summaries`:**", "",
        *_inside_table(rows)]
    if any(r["data"] == "shakespeare" and r["kind"] == "dense" for r in rows):
        lines += ["", "**Held-out `shakespeare`**, on the model fine-tuned on Shakespeare (router_norm compares it "
                  f"with the wiki model it started from; the other criteria calibrate on Shakespeare"
                  f"{_balance(rows, 'shakespeare')}):", "",
                  *_experts_table(rows, "shakespeare")]
    return "\n".join([*lines, "", reading(rows)])


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in ("wiki-summaries", "shakespeare") if any(r["data"] == d and r["kind"] == "dense"
                                                                    for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, data in zip(axes[0], datasets, strict=True):
        dense = next(r for r in rows if r["data"] == data and r["kind"] == "dense")
        curves: dict[str, dict[float, list[float]]] = {}
        for r in rows:
            if r["data"] == data and r["kind"] == "experts":
                name = f"{r['criterion']} + merge" if r["merge"] else r["criterion"]
                curves.setdefault(name, {}).setdefault(r["fraction"], []).append(r["perplexity"])
        for name, points in curves.items():
            color = COLORS[name.split(" ")[0]]
            xs = [0.0, *sorted(points)]
            ys = [dense["perplexity"], *[sum(points[x]) / len(points[x]) for x in xs[1:]]]
            ax.plot(xs, ys, marker="o", label=name, color=color,
                    linestyle="--" if name == "random" or "merge" in name else "-")
        ax.set_yscale("log")
        ax.set_xticks([0.0, *FRACTIONS])
        ax.set_xlabel(f"fraction of the {EXPERTS} experts removed per layer")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title(f"MoE expert pruning, held-out {data}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "moe_wiki.png", dpi=120)


def write(args: argparse.Namespace) -> None:
    rows = _rows()
    if not any(r["kind"] == "dense" for r in rows):
        print("moe: no benchmark rows yet; run the bench stage", file=sys.stderr)
        return
    text = table(rows, args)
    print(text)
    (RESULTS / "moe_wiki.md").write_text(text + "\n", encoding="utf-8")
    plot(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-tokens", type=int, default=524_288,
                        help="training tokens (default 128 steps of 16 x 256: about 20 minutes on 2 shared cores)")
    parser.add_argument("--finetune-tokens", type=int, default=65_536,
                        help="Shakespeare fine-tuning tokens (default 16 steps)")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--stage", choices=("train", "bench", "all"), default="all")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--table", action="store_true", help="only rebuild the table and plot from the JSON lines")
    args = parser.parse_args()
    if not args.table:
        if args.stage in ("train", "all"):
            run_train(args)
        if args.stage in ("bench", "all"):
            run_bench(args)
    write(args)


if __name__ == "__main__":
    main()
