"""Benchmark: delta-parameter pruning of two SmolLM2-135M fine-tunes, and merging them (issue 13).

Two full fine-tunes of SmolLM2-135M are made here (float32, AdamW, seed 0) and cached in
`prunekit.assets.cache_dir() / "bench" / "delta-<task>"`:
- news: BBC News topic labelling as text. The prompt is an article's first 48 tokens followed by "\\nTopic:", the
  answer one of the tokens " business", " entertainment", " politics", " sport", " tech"; the loss is on the answer
  only. Metric: accuracy over the 222 articles of the test split, the answer being the label token with the highest
  logit at the end of the prompt.
- shakespeare: continuation of Shakespeare's text, 128-token sequences of the train split, loss on every token.
  Metric: perplexity on 32 windows of 128 tokens of the held-out plays.

Each delta (fine-tuned minus base, the projections inside the blocks; embeddings, norms and head stay whole) is then
pruned with DARE, DAREx-q (label-free: each layer's q minimises its output change on 16 × 128 calibration tokens of
the task's own training text) and magnitude at drop rates 0.5 to 0.99, merged back into the base alone, and merged
with the other task's delta pruned the same way (task arithmetic, scale 1). DAREx-q with q tuned on held-out
validation loss is run at the extreme rates.

    nice -n 10 .venv/bin/python bench/delta.py
    .venv/bin/python bench/delta.py --table

Rows are appended to bench/results/delta_smollm2.jsonl as they finish (a cut run resumes); the table and plot go to
bench/results/delta_smollm2.md/.png and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import RESULTS, append_row, bench_parser, publish, read_rows, run_bench, table_rows  # noqa: E402

RAW = RESULTS / "delta_smollm2.jsonl"
MODEL = "smollm2-135m"
HEADING = "## Experts and deltas (issue 13)"
LABELS = {"business": " business", "entertainment": " entertainment", "politics": " politics", "sports": " sport",
          "tech": " tech"}
PROMPT_TOKENS, SHAKESPEARE_LEN = 48, 128
DROPS = (0.5, 0.7, 0.9, 0.95, 0.99)
METHODS = ("dare", "darex-q", "magnitude")
VALIDATED = (0.95, 0.99)  # DAREx-q with q chosen on validation loss
TRAIN = {"news": dict(examples=800, batch=16, lr=3e-5, epochs=1),
         "shakespeare": dict(examples=384, batch=8, lr=2e-5, epochs=1)}


def cache(name: str) -> Path:
    from prunekit.assets import cache_dir

    return cache_dir() / "bench" / name


class News:
    """BBC News topics as next-token prediction: prompts, answer token ids, labels."""

    def __init__(self, tokenizer) -> None:
        from prunekit.assets import text_records

        self.tokenizer = tokenizer
        self.label_ids = [tokenizer(word)["input_ids"][0] for word in LABELS.values()]
        train = text_records("bbc-news", "train")
        random.Random(0).shuffle(train)
        self.train = [self.encode(r) for r in train[:TRAIN["news"]["examples"]]]
        self.validation = [self.encode(r) for r in train[-64:]]
        self.test = [self.encode(r) for r in text_records("bbc-news", "test")]

    def encode(self, record: dict) -> tuple[list[int], int]:
        ids = self.tokenizer(record["text"])["input_ids"][:PROMPT_TOKENS]
        return ids + self.tokenizer("\nTopic:")["input_ids"], list(LABELS).index(record["label"])

    def batch(self, examples):
        """Left-padded prompts (the answer is read at the last position), attention mask and labels."""
        import torch

        width = max(len(ids) for ids, _ in examples)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(i)) + i for i, _ in examples])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in examples])
        return ids, mask, torch.tensor([label for _, label in examples])

    def label_logits(self, model, examples, batch_size: int = 32):
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(examples), batch_size):
                ids, mask, labels = self.batch(examples[start:start + batch_size])
                hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
                out.append((model.lm_head(hidden)[:, self.label_ids], labels))
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    def loss(self, model, examples) -> float:
        import torch

        logits, labels = self.label_logits(model, examples)
        return torch.nn.functional.cross_entropy(logits.double(), labels).item()

    def accuracy(self, model) -> float:
        logits, labels = self.label_logits(model, self.test)
        return (logits.argmax(-1) == labels).double().mean().item()


class Shakespeare:
    """Shakespeare continuation: training sequences, validation and test windows."""

    def __init__(self, tokenizer) -> None:
        from prunekit.corpus import calibration_tokens, evaluation_windows

        n = TRAIN["shakespeare"]["examples"]
        self.train = calibration_tokens(tokenizer, "shakespeare", samples=n + 32, seq_len=SHAKESPEARE_LEN, seed=0).ids
        self.train, self.validation = self.train[:n], self.train[n:]
        self.test = evaluation_windows(tokenizer, "shakespeare", seq_len=SHAKESPEARE_LEN, max_windows=32).ids

    def loss(self, model, ids) -> float:
        from prunekit.measure import perplexity

        return math.log(perplexity(model, ids, progress=False)["perplexity"])

    def perplexity(self, model) -> float:
        return math.exp(self.loss(model, self.test))


def finetune(base, task: str, data, seed: int = 0):
    """A full fine-tune of a copy of `base` (AdamW, linear decay), cached as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM

    path = cache(f"delta-{task}")
    if (path / "train.json").exists():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), json.loads(
            (path / "train.json").read_text())
    settings = TRAIN[task]
    torch.manual_seed(seed)
    model = copy.deepcopy(base).train()
    examples = list(data.train) if task == "news" else list(data.train.split(1))
    random.Random(seed).shuffle(examples)
    steps = math.ceil(len(examples) / settings["batch"]) * settings["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        chunk = examples[(step * settings["batch"]) % len(examples):][:settings["batch"]]
        if task == "news":
            ids, mask, labels = data.batch(chunk)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), torch.tensor(data.label_ids)[labels])
        else:
            ids = torch.cat(chunk)
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"{task} step {step}/{steps} loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    record = {"task": task, **settings, "steps": steps, "seed": seed, "seconds": time.perf_counter() - start,
              "loss_first10": sum(losses[:10]) / len(losses[:10]), "loss_last10": sum(losses[-10:]) / 10}
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "train.json").write_text(json.dumps(record))
    return model, record


def run(args: argparse.Namespace) -> None:
    import torch

    from prunekit.assets import load_causal_lm
    from prunekit.corpus import calibration_tokens
    from prunekit.deltas import merge_deltas, prune_delta, storage_bytes
    from prunekit.measure import environment

    torch.set_num_threads(args.threads)
    done = {r["name"] for r in read_rows(RAW)}
    loaded = load_causal_lm(MODEL)
    base, tokenizer = loaded.model.eval(), loaded.tokenizer
    news, plays = News(tokenizer), Shakespeare(tokenizer)
    tuned = {}
    for task, data in (("news", news), ("shakespeare", plays)):
        tuned[task] = finetune(base, task, data)
    metrics = {"news": news.accuracy, "shakespeare": plays.perplexity}

    def measure(model, tasks=("news", "shakespeare")) -> dict:
        return {task: metrics[task](model) for task in tasks}

    if "base" not in done:
        append_row(RAW, {"name": "base", **measure(base), "environment": environment(),
                         "training": {t: r for t, (_, r) in tuned.items()}})
    for task in tuned:
        if f"tuned {task}" not in done:
            append_row(RAW, {"name": f"tuned {task}", **measure(tuned[task][0])})
    if "merged dense" not in done:
        merged = merge_deltas(copy.deepcopy(base), [_full_delta(base, tuned["news"][0]),
                                                    _full_delta(base, tuned["shakespeare"][0])])
        append_row(RAW, {"name": "merged dense", **measure(merged)})

    calibration = {"news": news.batch(news.train[:16])[0],
                   "shakespeare": calibration_tokens(tokenizer, "shakespeare", samples=16, seq_len=SHAKESPEARE_LEN,
                                                     seed=1).ids}
    validate = {"news": lambda m: news.loss(m, news.validation),
                "shakespeare": lambda m: plays.loss(m, plays.validation)}
    runs = [(method, drop, False) for drop in DROPS for method in METHODS]
    runs += [("darex-q", drop, True) for drop in VALIDATED]
    for method, drop, validated in runs:
        name = f"{method}{' validated' if validated else ''} {drop}"
        if name in done:
            continue
        start = time.perf_counter()
        pruned, row = {}, {"name": name, "method": method, "drop": drop, "validated": validated}
        for task, (model, _) in tuned.items():
            options = {}
            if method == "darex-q" and validated:
                options["validate"] = validate[task]
            elif method == "darex-q":
                options["calibration"] = calibration[task]
            pruned[task] = prune_delta(base, model, method=method, drop=drop, seed=0, progress=False, **options)
            alone = merge_deltas(copy.deepcopy(base), [pruned[task]])
            row[task] = metrics[task](alone)
            row[f"{task} kept"] = pruned[task].info["kept_fraction_overall"]
            row[f"{task} bytes"] = storage_bytes(pruned[task])
            q = pruned[task].info.get("q_search", {}).get("q")
            if q is None and pruned[task].info["q"]:
                qs = [v for v in pruned[task].info["q"].values() if v]
                q = sorted(qs)[len(qs) // 2]  # the median of the per-layer q
            row[f"{task} q"] = q
        merged = merge_deltas(copy.deepcopy(base), [pruned["news"], pruned["shakespeare"]])
        row["merged"] = measure(merged)
        row["seconds"] = time.perf_counter() - start
        append_row(RAW, row)
        print(json.dumps({k: v for k, v in row.items() if "bytes" not in k}), file=sys.stderr)


def _full_delta(base, tuned) -> dict:
    """Every parameter's delta, dense (the unpruned fine-tune as a delta)."""
    from prunekit.deltas import model_delta

    return model_delta(base, tuned)


def _qs(row: dict) -> str:
    """DAREx-q's q for both tasks; DARE's is 1 − p; magnitude does not rescale."""
    if row["method"] == "dare":
        return "1 − p"
    if row["news q"] is None:
        return "–"
    return f"{row['news q']:.3f} / {row['shakespeare q']:.3f}"


def table(rows: list[dict], args: argparse.Namespace) -> str:
    by_name = {r["name"]: r for r in rows}
    base, env = by_name["base"], by_name["base"]["environment"]
    train = base["training"]
    lines = [
        f"SmolLM2-135M (`{MODEL}`) and two full fine-tunes made by the script (float32, AdamW with linear decay, one "
        f"epoch, seed 0): news, {train['news']['examples']} BBC News training articles, {train['news']['steps']} steps "
        f"of {train['news']['batch']}, lr {train['news']['lr']}, loss on the topic token; shakespeare, "
        f"{train['shakespeare']['examples']} × {SHAKESPEARE_LEN} tokens, {train['shakespeare']['steps']} steps of "
        f"{train['shakespeare']['batch']}, lr {train['shakespeare']['lr']}. News: topic accuracy on the 222 test "
        f"articles (first {PROMPT_TOKENS} tokens, 5 classes); Shakespeare: perplexity on 32 × {SHAKESPEARE_LEN} "
        f"held-out tokens. The pruned delta is the block projections'; it is added to the base alone, and to the base "
        f"together with the other task's delta pruned the same way (task arithmetic, scale 1). Stored: the pruned "
        f"projections' delta as int32 flat indices and float32 values (dense float32: "
        f"{rows[-1]['news bytes']['pruned_tensors_dense_bytes'] / 1e6:.1f} MB). q: DARE's rescale is 1/(1 − p); "
        f"DAREx-q's q is shown (label-free: the median over layers of each layer's output-change optimum; validated: "
        f"one q from 11 on 64 held-out examples). "
        f"{args.threads} threads on {platform.processor() or platform.machine()} ({env['cpu_count']} cores), torch "
        f"{env['torch']}, transformers {env['transformers']}. Regenerate: `.venv/bin/python bench/delta.py`.", "",
        "| delta | drop | news acc. alone | Shakespeare ppl alone | merged: news acc. | merged: Shakespeare ppl | "
        "q (news / Shakespeare) | news projections' delta stored |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name in ("base", "tuned news", "tuned shakespeare", "merged dense"):
        r = by_name[name]
        cells = ([f"{r['news']:.3f}", f"{r['shakespeare']:.2f}", "", ""] if name != "merged dense"
                 else ["", "", f"{r['news']:.3f}", f"{r['shakespeare']:.2f}"])
        lines.append(f"| {name} | – | " + " | ".join(cells) + " | | |")
    for r in rows:
        if "method" not in r:
            continue
        label = r["method"] + (" (validated q)" if r["validated"] else "")
        lines.append(f"| {label} | {r['drop']} | {r['news']:.3f} | {r['shakespeare']:.2f} | "
                     f"{r['merged']['news']:.3f} | {r['merged']['shakespeare']:.2f} | "
                     f"{_qs(r)} | "
                     f"{r['news bytes']['pruned_tensors_sparse_bytes'] / 1e6:.1f} MB |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["name"]: r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, task, ylabel in ((axes[0], "news", "news topic accuracy"),
                             (axes[1], "shakespeare", "Shakespeare perplexity")):
        for method, style in (("dare", "o-"), ("darex-q", "s-"), ("magnitude", "^-")):
            points = sorted((r["drop"], r[task]) for r in rows if r.get("method") == method and not r["validated"])
            if points:
                ax.plot(*zip(*points, strict=True), style, label=method)
        points = sorted((r["drop"], r[task]) for r in rows if r.get("validated"))
        if points:
            ax.plot(*zip(*points, strict=True), "D", label="darex-q (validated q)")
        ax.axhline(by_name["tuned " + task][task], color="black", linestyle="--", label="fine-tuned")
        ax.axhline(by_name["base"][task], color="grey", linestyle=":", label="base")
        ax.set_xlabel("fraction of the delta dropped")
        ax.set_ylabel(ylabel)
        if task == "shakespeare":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M fine-tune deltas pruned and added back to the base")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(args: argparse.Namespace) -> None:
    rows = table_rows(RAW)
    plot(rows, RESULTS / "delta_smollm2.png")
    publish("delta_smollm2", table(rows, args), HEADING, "delta pruning")


def main() -> None:
    parser = bench_parser(__doc__)
    run_bench(parser, run, write)


if __name__ == "__main__":
    main()
