"""Benchmark: structured pruning that makes models faster (issue 9), prunekit side by side with Torch-Pruning 1.6.

SmolLM2-135M (`--models smollm2`, the default) at 20% and 35% of its parameters removed: prunekit's
`prune_structure` with every scorer (KV groups with their query heads, and MLP neurons; uniform allocation) against
Torch-Pruning's `MetaPruner` with its activation, Taylor and magnitude importances on MLP neurons at the same
parameter reduction (its head pruning did not finish within 10 minutes on SmolLM2's grouped-query attention, so
its attention stays whole). Metrics, one-shot (no healing): perplexity on the first `--eval-windows`
non-overlapping 512-token windows of the held-out `wiki-summaries` split; calibration `--calibration-samples` x
512 tokens of its train split (seed 0), the same tokens for both libraries; parameters; MACs of one 64-token
prefill; greedy generation tokens/s at batch 1 with the KV cache (16 new tokens after a 64-token prompt); prefill
tokens/s at batch 16 x 64 tokens.

MobileNetV2 (`--models mobilenetv2`) with its ImageNet weights at 30% and 50% removed: prunekit's `prune_graph`
against Torch-Pruning (Taylor, BN scale, magnitude; channel ratio bisected to the same parameter reduction);
top-1 agreement with the dense model on random crops of local photographs, before and after BatchNorm
recalibration; latency at batch 1 and 16.

ResNet (`--models resnet`): prunekit.nets' resnet-small trained here on Fashion-MNIST, 50% removed; test accuracy
right after pruning, after BatchNorm recalibration and after one epoch of fine-tuning; latency.

MiniLM (`--models minilm`): all-MiniLM-L6-v2, 30% of its parameters removed (heads and FFN neurons, both libraries);
cosine of its BBC News sentence embeddings to the dense model's, a logistic regression's topic accuracy on its own
embeddings; latency at batch 1 and 16 of a 256-token article.

Each run is a fresh process and the two libraries' runs alternate. Each process keeps a copy of the dense model
and times it in turns with the pruned one, so that the load of a shared machine changes both alike; speedups are
against that copy, with `prunekit.measure.speed_record`'s flag for "not measurably faster".

    .venv/bin/python bench/structure.py                        # SmolLM2, 19 processes (~25 min on an idle machine)
    .venv/bin/python bench/structure.py --only prunekit:flap:0.2 tp:activation:0.2
    .venv/bin/python bench/structure.py --table                # rebuild the tables from the JSON lines of a run

A full run writes bench/results/structure_<model>.{jsonl,md} and its table in BENCHMARKS.md; a run with --only
prints its table and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import place  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2-135m"
BUDGETS = ("0.2", "0.35")
# calibrated scorers first, so that a run cut short has the strongest of each library
PRUNEKIT_METHODS = ("obs", "flap", "wanda-sp", "activation", "l2", "l1", "random")
TP_METHODS = ("activation", "taylor", "magnitude")
SEQ_LEN = 512
PROMPT = 64  # tokens of the generation prompt and of each prefill sequence
NEW_TOKENS = 16
PREFILL_BATCH = 16


def _run_order(budgets, ours_methods, theirs_methods) -> list[str]:
    """Dense, then per budget the two libraries' runs interleaved."""
    runs = ["dense"]
    for budget in budgets:
        ours = [f"prunekit:{m}:{budget}" for m in ours_methods]
        theirs = [f"tp:{m}:{budget}" for m in theirs_methods]
        runs += [r for pair in zip_longest(ours, theirs) for r in pair if r]
    return runs


def _configs() -> list[str]:
    return _run_order(BUDGETS, PRUNEKIT_METHODS, TP_METHODS)


def _tp_prune(model, method: str, remove: float, calib, batch_size: int) -> dict:
    """Torch-Pruning on MLP neurons only: every Linear but gate/up is ignored as a pruning root, so the coupled
    groups are (gate row, up row, down column) of each block, pruned uniformly; the neuron ratio is chosen to
    remove `remove` of all parameters."""
    import torch
    import torch_pruning as tp

    from prunekit.adapters import adapter_for
    from prunekit.structure.groups import roles

    adapter = adapter_for(model)
    r = roles(adapter)
    blocks = adapter.block_list(model)
    ignored = [model.get_output_embeddings()]
    for block in blocks:
        ignored += [block.get_submodule(name) for name in (r.q, r.k, r.v, r.o, r.mlp_out)]
    down = blocks[0].get_submodule(r.mlp_out)
    neurons, neuron_cost = down.in_features, down.out_features * (len(r.mlp_in) + 1)
    total = sum(p.numel() for p in model.parameters())
    per_block = round(total * remove / (len(blocks) * neuron_cost))
    # Torch-Pruning keeps int(width * (1 - ratio)) channels; half a channel of slack makes that exactly the count
    ratio = (per_block - 0.5) / neurons
    importance = {"magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
                  "activation": lambda: tp.importance.ActivationImportance(p=2, target_types=[torch.nn.Linear]),
                  "taylor": lambda: tp.importance.TaylorImportance()}[method]()
    example = calib[:1, :16]
    pruner = tp.pruner.MetaPruner(model, example_inputs=example, importance=importance, pruning_ratio=ratio,
                                  ignored_layers=ignored, output_transform=lambda out: out.logits)
    if method == "activation":
        # its hooks keep the statistics of the last forward only, so all calibration tokens go in one pass
        with torch.no_grad(), importance.compute_importance(model):
            model(input_ids=calib, use_cache=False, logits_to_keep=1)
    elif method == "taylor":
        model.zero_grad()
        for batch in calib.split(batch_size):
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    for group in pruner.step(interactive=True):
        group.prune()
    model.zero_grad(set_to_none=True)
    widths = {block.get_submodule(r.mlp_out).in_features for block in blocks}
    if len(widths) == 1:
        model.config.intermediate_size = widths.pop()
    after = sum(p.numel() for p in model.parameters())
    return {"method": {"name": method, "library": "torch-pruning", "units": ["neurons"], "allocation": "uniform",
                       "neuron_ratio": ratio, "remove": remove},
            "metrics": {"removed_fraction": {"target": remove, "achieved": 1 - after / total},
                        "parameters": {"before": total, "after": after}}}


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process: load, prune, then perplexity, MACs and speed."""
    import torch

    from prunekit.assets import load_causal_lm
    from prunekit.corpus import calibration_tokens, evaluation_windows
    from prunekit.measure import (
        ResourceMonitor,
        count_macs,
        environment,
        generation_speed,
        parameter_counts,
        perplexity,
        prefill_speed,
    )
    from prunekit.structure import prune_structure

    torch.set_num_threads(args.threads)
    loaded = load_causal_lm(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    library, _, rest = args.one.partition(":")
    record: dict = {"run": args.one, "library": library}
    dense = None
    if library != "dense":
        dense = copy.deepcopy(model)  # timed in turns with the pruned model, in this process
        method, budget = rest.split(":")
        remove = float(budget)
        calib_info = dict(calibration="wiki-summaries", calibration_samples=args.calibration_samples,
                          calibration_seq_len=SEQ_LEN, seed=0)
        with ResourceMonitor() as monitor:
            if library == "prunekit":
                pruned = prune_structure(model, tokenizer, method=method, remove=remove, batch_size=4,
                                         progress=False, model_source=MODEL, **calib_info)
            else:
                calib = calibration_tokens(tokenizer, "wiki-summaries", samples=args.calibration_samples,
                                           seq_len=SEQ_LEN, seed=0).ids
                pruned = _tp_prune(model, method, remove, calib, batch_size=4)
        record.update(method=pruned["method"], removed_fraction=pruned["metrics"]["removed_fraction"],
                      calibration=calib_info, prune_s=monitor.wall_s, peak_rss_mb=monitor.peak_rss_mb)
    windows = evaluation_windows(tokenizer, "wiki-summaries", seq_len=SEQ_LEN, max_windows=args.eval_windows)
    record["perplexity"] = perplexity(model, windows.ids, batch_size=4, progress=False)
    record["evaluation"] = windows.info
    prompt = windows.ids[:PREFILL_BATCH, :PROMPT]
    record["parameters"] = parameter_counts(model)["total"]
    record["macs"] = count_macs(model, {"input_ids": prompt[:1], "use_cache": False, "logits_to_keep": 1})
    measures = {"generation": lambda m: generation_speed(m, prompt[:1], new_tokens=NEW_TOKENS, warmup=0, repeats=1),
                "prefill": lambda m: prefill_speed(m, prompt, warmup=0, repeats=1)}
    models = {"pruned": model} if dense is None else {"dense": dense, "pruned": model}
    for kind, measure in measures.items():
        runs = _interleaved(measure, models, args.repeats)
        record[kind] = {**measure(model), **runs["pruned"]}  # the extra call only supplies the settings' fields
        if dense is not None:
            record[f"dense_{kind}"] = {**record[kind], **runs["dense"]}
    record["environment"] = environment()
    return record


def _interleaved(measure, models: dict, repeats: int) -> dict[str, dict]:
    """Tokens/s of each model, measured in turns (one untimed warm-up each, then `repeats` rounds), so that a
    change in the machine's load during the run hits the dense and the pruned model alike."""
    import statistics

    from prunekit.measure import in_turns

    calls = {name: (lambda _, model=model: measure(model)["tokens_per_s"]) for name, model in models.items()}
    rates = in_turns(calls, list(range(repeats)))["outputs"]
    result = {}
    for name, values in rates.items():
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        result[name] = {"tokens_per_s": median, "q1_tokens_per_s": q1, "q3_tokens_per_s": q3, "runs": values}
    return result


def _speed(row: dict, dense: dict) -> dict:
    """The speed record of a pruned row against the dense model timed in turns with it in the same process."""
    from prunekit.measure import speed_record

    return speed_record({"macs": dense["macs"], "generation": row["dense_generation"],
                         "prefill": row["dense_prefill"]},
                        {k: row[k] for k in ("macs", "generation", "prefill")})


def _table(rows: list[dict]) -> str:
    dense = rows[0]
    lines = ["| library | method | params removed (target) | perplexity | MACs removed | ideal speedup | "
             "generation tok/s (b=1) | speedup | prefill tok/s (b=16) | speedup | % of ideal | faster? | prune s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['run']} | failed: {row['error'][:100]} |" + " |" * 11)
            continue
        gen, pre = row["generation"]["tokens_per_s"], row["prefill"]["tokens_per_s"]
        if row["library"] == "dense":
            lines.append(f"| dense | — | — | {row['perplexity']['perplexity']:.2f} | — | — | {gen:.1f} | — | "
                         f"{pre:.0f} | — | — | — | — |")
            continue
        s = _speed(row, dense)
        removed = row["removed_fraction"]
        library = "prunekit" if row["library"] == "prunekit" else "Torch-Pruning"
        units = "heads+neurons" if row["library"] == "prunekit" else "neurons"
        lines.append(
            f"| {library} | {row['method']['name']} ({units}) | {removed['achieved']:.1%} ({removed['target']:.0%}) "
            f"| {row['perplexity']['perplexity']:.2f} | {s['macs']['removed_fraction']:.1%} | "
            f"{s['ideal_speedup']:.2f} | {gen:.1f} | {s['generation']['speedup']:.2f} | {pre:.0f} | "
            f"{s['prefill']['speedup']:.2f} | {s['prefill']['speedup'] / s['ideal_speedup']:.0%} | "
            f"{'no' if s['not_faster'] else 'yes'} | {row['prune_s']:.0f} |")
    return "\n".join(lines)


def _llm_meta(args: argparse.Namespace, rows: list[dict]) -> str:
    env_card, evaluation = rows[0]["environment"], rows[0]["evaluation"]
    return (
        f"SmolLM2-135M (`{MODEL}`), one-shot (no healing). Calibration {args.calibration_samples} × {SEQ_LEN} tokens "
        f"of the `wiki-summaries` train split (seed 0), the same for both libraries; perplexity on the first "
        f"{evaluation['windows']} non-overlapping {SEQ_LEN}-token windows of its held-out split. MACs of one "
        f"{PROMPT}-token prefill; generation: greedy, batch 1, KV cache, {NEW_TOKENS} new tokens after a "
        f"{PROMPT}-token prompt; prefill: batch {PREFILL_BATCH} × {PROMPT} tokens; medians of {args.repeats} runs "
        f"after 1 warm-up, each pruned model timed in turns with a dense copy in the same process (the dense row's "
        f"speeds are its own process's); 'faster?' is `speed_record`'s test (≥ 5% and interquartile ranges "
        f"apart, for both generation and prefill). % of ideal is the prefill speedup over 1 / (1 − MACs removed). "
        f"{args.threads} threads on {platform.processor() or platform.machine()} ({env_card['cpu_count']} cores), "
        f"torch {env_card['torch']}, transformers {env_card['transformers']}, Torch-Pruning {_tp_version()}; each "
        f"row a fresh process, prunekit and Torch-Pruning runs alternating (the machine's load during the run is "
        f"stated beside the table). "
        f"Regenerate: `.venv/bin/python bench/structure.py` (or `make bench-structure`)."
    )


# MobileNetV2 with its ImageNet weights: prunekit's graph pruning against Torch-Pruning at 30% and 50% removed.
VISION_BUDGETS = ("0.3", "0.5")
VISION_PRUNEKIT = ("taylor", "activation", "l2", "bn-scale", "random")
VISION_TP = ("taylor", "bn-scale", "magnitude")
IMAGE_SIZE = 224


def _vision_configs() -> list[str]:
    return _run_order(VISION_BUDGETS, VISION_PRUNEKIT, VISION_TP)


def _crops(count: int, seed: int):
    """`count` augmented crops of scikit-learn's sample photographs (`prunekit.assets.sample_image_crops`)."""
    from prunekit.assets import sample_image_crops

    return sample_image_crops(count, seed, IMAGE_SIZE)


def _cross_entropy(logits, labels=None):
    """Cross-entropy against `labels`, or against the model's own top-1 where there are none (the photographs)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits, logits.detach().argmax(1) if labels is None else labels)


def _tp_channels(model, method: str, remove: float, calib: list[tuple], ignored: list[str]) -> dict:
    """Torch-Pruning's MetaPruner on a CNN (uniform per layer, the modules named in `ignored` kept whole), its
    channel ratio bisected on copies of the model until the parameters removed match `remove`. `calib` holds
    (inputs, labels or None) batches for Taylor's gradients."""
    import torch_pruning as tp

    make = {"magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
            "bn-scale": lambda: tp.importance.BNScaleImportance(),
            "taylor": lambda: tp.importance.TaylorImportance()}[method]
    if method == "taylor":  # gradients once, copied to every trial copy below
        model.zero_grad()
        for inputs, labels in calib:
            _cross_entropy(model(inputs), labels).backward()
    total = sum(p.numel() for p in model.parameters())
    example = calib[0][0][:1]

    def trial_copy():
        trial = copy.deepcopy(model)  # deepcopy leaves .grad behind
        for source, target in zip(model.parameters(), trial.parameters(), strict=True):
            target.grad = None if source.grad is None else source.grad.clone()
        return trial

    def pruned(ratio: float, target):
        pruner = tp.pruner.MetaPruner(target, example_inputs=example, importance=make(), pruning_ratio=ratio,
                                      ignored_layers=[target.get_submodule(name) for name in ignored])
        pruner.step()
        return 1 - sum(p.numel() for p in target.parameters()) / total

    ratio = _bisect_ratio(lambda r: pruned(r, trial_copy()), remove)
    achieved = pruned(ratio, model)
    model.zero_grad(set_to_none=True)
    return {"method": {"name": method, "library": "torch-pruning", "channel_ratio": ratio},
            "metrics": {"removed_fraction": {"target": remove, "achieved": achieved}}}


def _bisect_ratio(removed: Callable[[float], float], target: float, steps: int = 12) -> float:
    """The Torch-Pruning ratio in [0, 0.95] whose removed fraction of parameters (`removed(ratio)`, on a trial
    copy) comes closest to `target`: its ratio is of channels, not of parameters."""
    low, high = 0.0, 0.95
    for _ in range(steps):
        middle = (low + high) / 2
        if removed(middle) < target:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda r: abs(removed(r) - target))


def _interleaved_latency(models: dict, inputs, rounds: int = 3) -> dict[str, dict]:
    """`measure.latency` of each model at batch 1 and 16, in `rounds` turns (dense, pruned, dense, ...), so that a
    change in the machine's load hits both alike; per batch size the median of the rounds' medians (and its
    quartiles over the rounds, for `speed_record`'s overlap test)."""
    import statistics

    from prunekit.measure import latency

    rounds_ms: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            rounds_ms[name].append(latency(model, inputs, batch_sizes=(1, 16), warmup=2, repeats=5))
    out = {}
    for name, runs in rounds_ms.items():
        sizes = {}
        for size in runs[0]["batch_sizes"]:
            medians = [run["batch_sizes"][size]["median_ms"] for run in runs]
            q1, median, q3 = statistics.quantiles(medians, n=4, method="inclusive")
            sizes[size] = {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "rounds_ms": medians}
        out[name] = {**runs[0], "rounds": rounds, "batch_sizes": sizes}
    return out


def run_one_vision(args: argparse.Namespace) -> dict:
    """One MobileNetV2 configuration in this process: prune, then top-1 agreement, MACs and latency."""
    import torch

    from prunekit.measure import ResourceMonitor, count_macs, environment, parameter_counts
    from prunekit.nets import mobilenet_v2_imagenet
    from prunekit.structure import recalibrate_batchnorm
    from prunekit.structure.graph_prune import prune_graph

    torch.set_num_threads(args.threads)
    model = mobilenet_v2_imagenet()
    images, calib = _crops(args.images, seed=0), _crops(32, seed=1)
    with torch.inference_mode():
        dense_top1 = torch.cat([model(batch).argmax(1) for batch in images.split(32)])
    library, _, rest = args.one.partition(":")
    record: dict = {"run": args.one, "library": library}
    models = {"pruned": model}
    if library != "dense":
        models["dense"] = copy.deepcopy(model)
        method, budget = rest.split(":")
        with ResourceMonitor() as monitor:
            if library == "prunekit":
                pruned, _ = prune_graph(model, images[:1], method=method, remove=float(budget),
                                        ignore=[model.classifier], calibration=list(calib.split(8)), progress=False)
            else:
                pruned = _tp_channels(model, method, float(budget), [(b, None) for b in calib.split(8)],
                                      ignored=["classifier"])
        record.update(method=pruned["method"], removed_fraction=pruned["metrics"]["removed_fraction"],
                      prune_s=monitor.wall_s)
    model.eval()

    def agreement() -> float:
        with torch.inference_mode():
            top1 = torch.cat([model(batch).argmax(1) for batch in images.split(32)])
        return float((top1 == dense_top1).float().mean())

    record["agreement"] = agreement()
    record["images"] = args.images
    record["parameters"] = parameter_counts(model)["total"]
    record["macs"] = count_macs(model, images[:1])
    timed = _interleaved_latency(models, images[:1])
    record["latency"] = timed["pruned"]
    if library != "dense":
        record["dense_latency"] = timed["dense"]
        record["dense_macs"] = count_macs(models["dense"], images[:1])
        recalibrate_batchnorm(model, list(calib.split(8)))
        record["recalibrated_agreement"] = agreement()
    record["environment"] = environment()
    return record


def _vision_table(rows: list[dict]) -> str:
    def cells(row: dict) -> list[str]:
        if row["library"] == "dense":
            return ["100%", "—"]
        return [f"{row['agreement']:.1%}", f"{row['recalibrated_agreement']:.1%}"]

    return _latency_table(rows, ("top-1 agreement", "after BN recalibration"), cells, prune_format=".0f")


def _vision_meta(args: argparse.Namespace, rows: list[dict]) -> str:
    env_card = rows[0]["environment"]
    return (
        f"MobileNetV2 with torchvision's ImageNet-1k weights, one-shot (no fine-tuning), classifier kept whole. "
        f"Top-1 agreement with the dense model on {rows[0]['images']} random resized 224 × 224 crops of "
        f"scikit-learn's two sample photographs (seed 0); calibration for Taylor and activation: 32 other crops "
        f"(seed 1), the loss against the model's own top-1 for both libraries. Torch-Pruning's channel ratio is "
        f"bisected to the same parameter reduction. After BN recalibration: the same model once its BatchNorm "
        f"statistics are re-estimated on those 32 calibration crops (`prunekit.structure.recalibrate_batchnorm`, no "
        f"weight changes), for both libraries. {_LATENCY_NOTE} {args.threads} threads, torch {env_card['torch']}, "
        f"Torch-Pruning {_tp_version()}. "
        f"Regenerate: `.venv/bin/python bench/structure.py --models mobilenetv2`."
    )


# A ResNet-style CNN trained here on Fashion-MNIST: 50% removed, accuracy right after pruning and after one epoch.
RESNET_BUDGETS = ("0.5",)
RESNET_PRUNEKIT = ("taylor", "activation", "l2", "bn-scale", "random")
RESNET_TP = ("taylor", "bn-scale", "magnitude")
RESNET_EPOCHS = 3  # pre-training of the dense model, on all 60,000 training images
RESNET_LR = 0.05


def _resnet_configs() -> list[str]:
    return _run_order(RESNET_BUDGETS, RESNET_PRUNEKIT, RESNET_TP)


def _fashion_mnist():
    from prunekit.assets import load_images
    from prunekit.training.loop import ClassificationData

    return ClassificationData.from_images(load_images("fashion-mnist", "train"), load_images("fashion-mnist", "test"))


def _resnet_weights():
    from prunekit.assets import cache_dir

    return cache_dir() / "bench" / f"resnet-small-fashion-mnist-e{RESNET_EPOCHS}-seed0.safetensors"


def _prepare_resnet(args: argparse.Namespace) -> None:
    """Train the dense ResNet once (SGD, cosine schedule, seed 0) and cache its weights for every run's process."""
    import torch
    from safetensors.torch import save_file

    from prunekit.nets import build_net
    from prunekit.training.loop import train

    path = _resnet_weights()
    if path.exists():
        return
    torch.set_num_threads(args.threads)
    model = build_net("resnet-small", seed=0)
    train(model, _fashion_mnist(), epochs=RESNET_EPOCHS, batch_size=128, lr=RESNET_LR, seed=0, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(model.state_dict(), str(partial))
    partial.rename(path)


def run_one_resnet(args: argparse.Namespace) -> dict:
    """One ResNet configuration in this process: prune the trained network, accuracy on the 10,000 test images
    right after pruning and after one epoch of fine-tuning on the 60,000 training images, MACs and latency."""
    import torch
    from safetensors.torch import load_file

    from prunekit.measure import ResourceMonitor, accuracy, count_macs, environment, parameter_counts
    from prunekit.nets import build_net
    from prunekit.structure import recalibrate_batchnorm
    from prunekit.structure.graph_prune import prune_graph
    from prunekit.training.loop import train

    torch.set_num_threads(args.threads)
    data = _fashion_mnist()
    model = build_net("resnet-small")
    model.load_state_dict(load_file(str(_resnet_weights())))
    model.eval()
    order = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(1))[:256]
    calib = [(data.train_inputs[i], data.train_labels[i]) for i in order.split(32)]
    library, _, rest = args.one.partition(":")
    record: dict = {"run": args.one, "library": library}
    models = {"pruned": model}
    if library != "dense":
        models = {"dense": copy.deepcopy(model), "pruned": model}
        method, budget = rest.split(":")
        with ResourceMonitor() as monitor:
            if library == "prunekit":
                pruned, _ = prune_graph(model, data.train_inputs[:1], method=method, remove=float(budget),
                                        ignore=[model.fc], progress=False,
                                        calibration=[{"inputs": x, "labels": y} for x, y in calib])
            else:
                pruned = _tp_channels(model, method, float(budget), calib, ignored=["fc"])
        record.update(method=pruned["method"], removed_fraction=pruned["metrics"]["removed_fraction"],
                      prune_s=monitor.wall_s, dense_macs=count_macs(models["dense"], data.train_inputs[:1]))
    model.eval()
    record["accuracy"] = accuracy(model, data.test_inputs, data.test_labels)["accuracy"]
    record["parameters"] = parameter_counts(model)["total"]
    record["macs"] = count_macs(model, data.train_inputs[:1])
    timed = _interleaved_latency(models, data.test_inputs[:1])
    record["latency"] = timed["pruned"]
    if library != "dense":
        record["dense_latency"] = timed["dense"]
        recalibrate_batchnorm(model, [x for x, _ in calib])
        record["recalibrated_accuracy"] = accuracy(model, data.test_inputs, data.test_labels)["accuracy"]
        train(model, data, epochs=1, batch_size=128, lr=RESNET_LR / 5, seed=0, progress=False)
        model.eval()
        record["finetuned_accuracy"] = accuracy(model, data.test_inputs, data.test_labels)["accuracy"]
    record["environment"] = environment()
    return record


def _latency_columns(row: dict) -> tuple[dict, dict]:
    """(median ms by batch size, `speed_record` against the dense copy timed in the same process)."""
    from prunekit.measure import speed_record

    ms = {b: row["latency"]["batch_sizes"][b]["median_ms"] for b in ("1", "16")}
    if row["library"] == "dense":
        return ms, {}
    return ms, speed_record({"macs": row["dense_macs"], "latency": row["dense_latency"]},
                            {"macs": row["macs"], "latency": row["latency"]})


def _speed_cells(ms: dict, s: dict) -> str:
    return (f"{s['macs']['removed_fraction']:.1%} | {s['ideal_speedup']:.2f} | {ms['1']:.2f} | "
            f"{s['latency']['1']['speedup']:.2f} | {ms['16']:.2f} | {s['latency']['16']['speedup']:.2f} | "
            f"{s['latency']['16']['ideal_fraction']:.0%} | {'no' if s['not_faster'] else 'yes'}")


def _latency_table(rows: list[dict], fidelity: tuple[str, ...], cells: Callable[[dict], list[str]],
                   prune_format: str) -> str:
    """The table of a CNN or encoder section: the fidelity columns (`cells(row)` of each row, dense or pruned),
    then MACs, latency at batch 1 and 16 against the dense copy, and the pruning time."""
    speed = ("MACs removed", "ideal speedup", "b=1 ms", "speedup", "b=16 ms", "speedup", "% of ideal (b=16)")
    header = ("library", "method", "params removed (target)", *fidelity, *speed, "faster?", "prune s")
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(fidelity) + len(speed)) + "---|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['run']} | failed: {row['error'][:100]} |" + " |" * (len(header) - 2))
            continue
        ms, s = _latency_columns(row)
        fidelity_cells = " | ".join(cells(row))
        if row["library"] == "dense":
            lines.append(f"| dense | — | — | {fidelity_cells} | — | — | {ms['1']:.2f} | — | {ms['16']:.2f} | — | — | "
                         "— | — |")
            continue
        removed = row["removed_fraction"]
        lines.append(f"| {_library(row)} | {row['method']['name']} | {removed['achieved']:.1%} "
                     f"({removed['target']:.0%}) | {fidelity_cells} | {_speed_cells(ms, s)} | "
                     f"{row['prune_s']:{prune_format}} |")
    return "\n".join(lines)


def _library(row: dict) -> str:
    return "prunekit" if row["library"] == "prunekit" else "Torch-Pruning"


def _resnet_table(rows: list[dict]) -> str:
    def cells(row: dict) -> list[str]:
        if row["library"] == "dense":
            return [f"{row['accuracy']:.2%}", "—", "—"]
        return [f"{row[k]:.2%}" for k in ("accuracy", "recalibrated_accuracy", "finetuned_accuracy")]

    return _latency_table(rows, ("accuracy", "after BN recalibration", "after 1 epoch"), cells, prune_format=".1f")


def _resnet_meta(args: argparse.Namespace, rows: list[dict]) -> str:
    env_card = rows[0]["environment"]
    return (
        f"`resnet-small` (prunekit.nets: stem and three basic residual blocks at 16/32/64 channels, 78k parameters), "
        f"trained here on all 60,000 Fashion-MNIST training images ({RESNET_EPOCHS} epochs, SGD momentum 0.9, "
        f"lr {RESNET_LR} cosine, batch 128, seed 0); the classifier kept whole. Accuracy on the 10,000 test images "
        f"right after pruning and after one epoch of fine-tuning on the training images (lr {RESNET_LR / 5} "
        f"cosine, same batches for every row). Calibration for Taylor and activation: 256 labelled training images "
        f"(seed 1), Taylor's loss the cross-entropy against their labels in both libraries. Torch-Pruning's channel "
        f"ratio is bisected to the same parameter reduction. After BN recalibration: BatchNorm statistics "
        f"re-estimated on those 256 images (`prunekit.structure.recalibrate_batchnorm`); the epoch of fine-tuning "
        f"starts from there. Latency: 28 × 28 inputs. {_LATENCY_NOTE} {args.threads} threads, torch "
        f"{env_card['torch']}, Torch-Pruning "
        f"{_tp_version()}. Regenerate: `.venv/bin/python bench/structure.py --models resnet`."
    )


# all-MiniLM-L6-v2: 30% of its parameters (embeddings included) removed, heads and FFN neurons.
MINILM_BUDGETS = ("0.3",)
MINILM_PRUNEKIT = ("obs", "flap", "activation", "wanda-sp", "l2", "random")
MINILM_TP = ("activation", "magnitude")
MINILM_TOKENS = 256  # all-MiniLM-L6-v2's sentence-transformers length, for the embeddings and the latency
MINILM_CALIB = (32, 128)  # calibration sequences x tokens of wiki-summaries, the CLI's default for encoders


def _minilm_configs() -> list[str]:
    return _run_order(MINILM_BUDGETS, MINILM_PRUNEKIT, MINILM_TP)


def _news(args: argparse.Namespace) -> dict[str, tuple[list[str], list[str]]]:
    """BBC News texts and topic labels: the first `--news-train` of the train split (seeded shuffle) to fit the
    logistic regression, the first `--news-test` of the test split for its accuracy and the embedding cosine."""
    import random

    from prunekit.assets import text_records

    out = {}
    for split, count in (("train", args.news_train), ("test", args.news_test)):
        records = text_records("bbc-news", split)
        random.Random(0).shuffle(records)
        records = records[:count]
        out[split] = ([r["text"] for r in records], [r["label"] for r in records])
    return out


def _dense_news_path(args: argparse.Namespace):
    from prunekit.assets import cache_dir

    return cache_dir() / "bench" / f"minilm-bbc-{args.news_train}-{args.news_test}-{MINILM_TOKENS}.safetensors"


def _prepare_minilm(args: argparse.Namespace) -> None:
    """The dense model's embeddings of the news texts, once, for every run's cosine."""
    import torch
    from safetensors.torch import save_file

    from prunekit.data.embed import load_encoder
    from prunekit.measure.embedding import sentence_embeddings

    path = _dense_news_path(args)
    if path.exists():
        return
    torch.set_num_threads(args.threads)
    encoder = load_encoder("minilm-l6")
    news = _news(args)
    out = {split: sentence_embeddings(encoder.model, encoder.tokenizer, texts, max_length=MINILM_TOKENS)
           for split, (texts, _) in news.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(out, str(partial))
    partial.rename(path)


def _tp_encoder(model, method: str, remove: float, calib) -> dict:
    """Torch-Pruning on a BERT encoder's whole attention heads (q/k/v rows with the output projection's columns)
    and FFN neurons, the hidden size kept: one ratio for both, bisected on copies to the parameter budget."""
    import torch
    import torch_pruning as tp

    total = sum(p.numel() for p in model.parameters())
    example = {"input_ids": calib[:1], "attention_mask": torch.ones_like(calib[:1])}

    def prune(ratio: float, target, importance):
        layers = target.encoder.layer
        num_heads = {}
        for layer in layers:
            attention = layer.attention.self
            for projection in (attention.query, attention.key, attention.value):
                num_heads[projection] = attention.num_attention_heads
        # the residual stream stays whole: the Linear layers that write to it, and the pooler, are not roots
        ignored = [m for layer in layers for m in (layer.attention.output.dense, layer.output.dense)]
        if getattr(target, "pooler", None) is not None:
            ignored.append(target.pooler.dense)
        pruner = tp.pruner.MetaPruner(target, example_inputs=example, importance=importance, pruning_ratio=ratio,
                                      num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
                                      head_pruning_ratio=ratio, ignored_layers=ignored,
                                      output_transform=lambda out: out.last_hidden_state)
        if method == "activation":
            with torch.no_grad(), importance.compute_importance(target):
                target(input_ids=calib, attention_mask=torch.ones_like(calib))
        for group in pruner.step(interactive=True):
            group.prune()
        for layer in layers:  # BertSelfAttention reads these sizes in forward
            attention = layer.attention.self
            attention.all_head_size = attention.query.out_features
            attention.num_attention_heads = attention.all_head_size // attention.attention_head_size
        heads = {layer.attention.self.num_attention_heads for layer in layers}
        widths = {layer.intermediate.dense.out_features for layer in layers}
        if len(heads) == 1 and len(widths) == 1:
            target.config.num_attention_heads, target.config.intermediate_size = heads.pop(), widths.pop()
        return 1 - sum(p.numel() for p in target.parameters()) / total

    def importance():
        return (tp.importance.ActivationImportance(p=2, target_types=[torch.nn.Linear]) if method == "activation"
                else tp.importance.MagnitudeImportance(p=2))

    ratio = _bisect_ratio(lambda r: prune(r, copy.deepcopy(model), importance()), remove, steps=8)
    achieved = prune(ratio, model, importance())
    return {"method": {"name": method, "library": "torch-pruning", "units": ["heads", "neurons"], "ratio": ratio},
            "metrics": {"removed_fraction": {"target": remove, "achieved": achieved}}}


def run_one_minilm(args: argparse.Namespace) -> dict:
    """One MiniLM configuration in this process: prune, then the cosine of its BBC News embeddings to the dense
    model's, a logistic regression's topic accuracy on its own embeddings, MACs and latency."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegression

    from prunekit.corpus import calibration_tokens
    from prunekit.data.embed import load_encoder
    from prunekit.measure import ResourceMonitor, count_macs, environment, parameter_counts
    from prunekit.measure.embedding import embedding_fidelity, sentence_embeddings
    from prunekit.structure import prune_structure

    torch.set_num_threads(args.threads)
    encoder = load_encoder("minilm-l6")
    model, tokenizer = encoder.model, encoder.tokenizer
    news = _news(args)
    dense_news = load_file(str(_dense_news_path(args)))
    sample = tokenizer(news["test"][0][0], truncation=True, max_length=MINILM_TOKENS, return_tensors="pt")
    inputs = {"input_ids": sample["input_ids"], "attention_mask": sample["attention_mask"]}
    library, _, rest = args.one.partition(":")
    record: dict = {"run": args.one, "library": library}
    models = {"pruned": model}
    if library != "dense":
        models = {"dense": copy.deepcopy(model), "pruned": model}
        method, budget = rest.split(":")
        samples, seq_len = MINILM_CALIB
        with ResourceMonitor() as monitor:
            if library == "prunekit":
                pruned = prune_structure(model, tokenizer, method=method, remove=float(budget), batch_size=8,
                                         calibration="wiki-summaries", calibration_samples=samples,
                                         calibration_seq_len=seq_len, seed=0, progress=False, model_source="minilm-l6")
            else:
                calib = calibration_tokens(tokenizer, "wiki-summaries", samples=samples, seq_len=seq_len, seed=0).ids
                pruned = _tp_encoder(model, method, float(budget), calib)
        record.update(method=pruned["method"], removed_fraction=pruned["metrics"]["removed_fraction"],
                      prune_s=monitor.wall_s, dense_macs=count_macs(models["dense"], inputs))
    model.eval()
    embedded = {split: sentence_embeddings(model, tokenizer, texts, max_length=MINILM_TOKENS)
                for split, (texts, _) in news.items()}
    record["cosine"] = embedding_fidelity(dense_news["test"], embedded["test"])
    classifier = LogisticRegression(C=10.0, max_iter=2000).fit(embedded["train"].numpy(), news["train"][1])
    record["news_accuracy"] = float(np.mean(classifier.predict(embedded["test"].numpy()) == np.array(news["test"][1])))
    record["texts"] = {"train": len(news["train"][0]), "test": len(news["test"][0])}
    record["parameters"] = parameter_counts(model)["total"]
    record["macs"] = count_macs(model, inputs)
    timed = _interleaved_latency(models, inputs)
    record["latency"] = timed["pruned"]
    if library != "dense":
        record["dense_latency"] = timed["dense"]
    record["environment"] = environment()
    return record


def _minilm_table(rows: list[dict]) -> str:
    def cells(row: dict) -> list[str]:
        return [f"{row['cosine']['mean_cosine']:.4f} ({row['cosine']['min_cosine']:.3f})",
                f"{row['news_accuracy']:.1%}"]

    return _latency_table(rows, ("embedding cosine (min)", "topic accuracy"), cells, prune_format=".0f")


def _minilm_meta(args: argparse.Namespace, rows: list[dict]) -> str:
    env_card, texts = rows[0]["environment"], rows[0]["texts"]
    return (
        f"all-MiniLM-L6-v2 (`minilm-l6`, 22.7M parameters of which 11.7M are the token embeddings that neither "
        f"library shrinks), one-shot, heads and FFN neurons removed uniformly, the hidden size kept; the budget is "
        f"30% of all parameters, so about 60% of the heads and neurons go. Calibration {MINILM_CALIB[0]} × "
        f"{MINILM_CALIB[1]} tokens of `wiki-summaries` (seed 0), the same for both libraries. Embedding cosine: "
        f"mean (min) cosine of the mean-pooled, normalised embeddings of {texts['test']} BBC News test articles "
        f"({MINILM_TOKENS} tokens) to the dense model's; topic accuracy: a logistic regression (C=10) fitted on "
        f"the same model's embeddings of {texts['train']} training articles, on those test articles. Latency: one "
        f"{MINILM_TOKENS}-token article, batch 1 and 16. {_LATENCY_NOTE} "
        f"{args.threads} threads, torch {env_card['torch']}, transformers {env_card['transformers']}, "
        f"Torch-Pruning {_tp_version()}. Regenerate: `.venv/bin/python bench/structure.py --models minilm`."
    )


_LATENCY_NOTE = ("Each pruned model is timed in 3 rounds alternating with a dense copy in the same process (5 "
                 "repeats after 2 warm-ups per round; the median of the rounds' medians); 'faster?' is "
                 "`speed_record`'s test (≥ 5% and interquartile ranges of the rounds apart, at both batch sizes).")


def _tp_version() -> str:
    from importlib.metadata import version

    return version("torch-pruning")


@dataclass(frozen=True)
class Section:
    """A model's runs, its worker and its table; results go to bench/results/structure_<name>.{jsonl,md} and the
    `<!-- structure_<name>:begin/end -->` block of BENCHMARKS.md."""

    configs: Callable[[], list[str]]
    run_one: Callable[[argparse.Namespace], dict]
    table: Callable[[list[dict]], str]
    meta: Callable[[argparse.Namespace, list[dict]], str]
    prepare: Callable[[argparse.Namespace], None] | None = None  # once, before the runs (train, cache)


SECTIONS = {"smollm2": Section(_configs, run_one, _table, _llm_meta),
            "mobilenetv2": Section(_vision_configs, run_one_vision, _vision_table, _vision_meta),
            "resnet": Section(_resnet_configs, run_one_resnet, _resnet_table, _resnet_meta, _prepare_resnet),
            "minilm": Section(_minilm_configs, run_one_minilm, _minilm_table, _minilm_meta, _prepare_minilm)}


def _run_section(name: str, args: argparse.Namespace) -> None:
    section = SECTIONS[name]
    configs = section.configs()
    if args.only:
        configs = ["dense", *[c for c in configs if c in args.only and c != "dense"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"structure_{name}" + (f"_{args.name}" if args.name else "")
    keep = not args.only or args.name  # a named selection is a table of its own; an unnamed one is only printed
    raw = RESULTS / f"{stem}.jsonl"
    rows: list[dict] = []
    if args.table:
        rows = [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines()]
        configs = []
    elif keep:
        raw.write_text("")
    if configs and section.prepare is not None:
        section.prepare(args)
    for one in configs:
        cmd = [sys.executable, __file__, "--one", one, "--section", name, "--threads", str(args.threads),
               "--calibration-samples", str(args.calibration_samples), "--eval-windows", str(args.eval_windows),
               "--repeats", str(args.repeats), "--images", str(args.images), "--news-train", str(args.news_train),
               "--news-test", str(args.news_test)]
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:  # one failed configuration is reported, and the others still run
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"run": one, "library": one.partition(":")[0], "error": error})
            print(f"{name} {one}: failed: {error}", file=sys.stderr)
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name} {one}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if keep:  # one JSON line per run as it finishes, so an interrupted run keeps what it measured
            with raw.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    table = section.table(rows)
    print(table)
    if not keep:
        return
    meta = section.meta(args, rows)
    (RESULTS / f"{stem}.md").write_text(f"{meta}\n\n{table}\n", encoding="utf-8")
    place(stem, f"{meta}\n\n{table}", "## Structured pruning that makes models faster (issue 9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--section", choices=list(SECTIONS), default="smollm2", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", choices=list(SECTIONS), default=["smollm2"],
                        help="sections to run, in order")
    parser.add_argument("--only", nargs="*", help="runs such as prunekit:flap:0.2, tp:taylor:0.35 (dense always runs)")
    parser.add_argument("--name", default=None,
                        help="with --only: keep the selection as its own table, bench/results/structure_<model>_<name>")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-samples", type=int, default=8, help="SmolLM2: calibration sequences")
    parser.add_argument("--eval-windows", type=int, default=16, help="SmolLM2: held-out 512-token windows")
    parser.add_argument("--repeats", type=int, default=3, help="SmolLM2: timed rounds of generation and prefill")
    parser.add_argument("--images", type=int, default=256, help="MobileNetV2: crops for top-1 agreement")
    parser.add_argument("--news-train", type=int, default=400, help="MiniLM: BBC News articles to fit the classifier")
    parser.add_argument("--news-test", type=int, default=200, help="MiniLM: BBC News articles for cosine and accuracy")
    parser.add_argument("--table", action="store_true",
                        help="only rebuild the tables from bench/results/structure_<model>.jsonl (e.g. of a cut run)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(SECTIONS[args.section].run_one(args)))
        return
    known = {c for name in args.models for c in SECTIONS[name].configs()}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    for name in args.models:
        _run_section(name, args)


if __name__ == "__main__":
    main()
