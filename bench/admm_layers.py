"""Benchmark: ADMM's reconstruction error on real layers, for its N:M ramp and ramp precision variants.

For a few linear layers of a real model, the Hessian H = XᵀX of the layer's inputs over calibration text (the dense
model's activations, 16 x 512 tokens of `wiki-summaries`, seed 0) and, for each N:M pattern, the relative
reconstruction error ||X(W - Ŵ)ᵀ||² / ||XWᵀ||² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of `admm_prune` under:

- ramp `rank`: prunekit's ramp (`select.nm_ramp_mask`): each group of M loses its lowest-ranked entries first;
- ramp `row`: the ramp before stop 17: each group keeps its N best, and the row's lowest entries outside them go;
- ramp precision `float32` or `bfloat16` (the W-steps of the ramp; after it every step is float32).

    .venv/bin/python bench/admm_layers.py --model gemma3-270m
    .venv/bin/python bench/admm_layers.py --model smollm2-135m --layers 3.mlp.down_proj 28.mlp.down_proj

Results go to bench/results/admm_layers_<model>.md (and .jsonl). The solve time is one process's wall time on this
machine, for comparison within a run only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tables import RESULTS  # noqa: E402

DEFAULT_LAYERS = {
    "smollm2-135m": ["3.mlp.down_proj", "28.mlp.down_proj", "10.mlp.gate_proj", "20.self_attn.q_proj",
                     "15.self_attn.o_proj"],
    "gemma3-270m": ["2.mlp.down_proj", "15.mlp.down_proj", "8.mlp.gate_proj", "12.self_attn.q_proj",
                    "6.self_attn.o_proj"],
}


def row_ramp_mask(scores: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """The N:M ramp before stop 17: every group keeps its N best; the row's lowest other entries are removed."""
    from prunekit.select import fraction_count, nm_mask

    cols = scores.shape[1]
    protected = nm_mask(scores, n, m)
    k = fraction_count(cols, min(sparsity, 1 - n / m))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        free = scores.masked_fill(protected, float("inf"))
        keep.scatter_(-1, torch.topk(free, k, dim=-1, largest=False, sorted=False).indices, False)
    return keep


def hessians(model_name: str, layers: list[str], samples: int, seq_len: int) -> dict[str, tuple]:
    """(weight, H) of each layer from the dense model's inputs over the calibration tokens, gathered by the
    pruning engine's `InputStats` (H = XᵀX / tokens)."""
    from prunekit.assets import load_causal_lm
    from prunekit.corpus import calibration_tokens
    from prunekit.weights.stats import InputStats

    loaded = load_causal_lm(model_name)
    model = loaded.model
    calib = calibration_tokens(loaded.tokenizer, "wiki-summaries", samples=samples, seq_len=seq_len, seed=0)
    modules = dict(model.named_modules())
    found = {}
    for layer in layers:
        names = [name for name in modules if name.endswith(f"layers.{layer}")]
        if len(names) != 1:
            raise SystemExit(f"layer {layer!r} names {len(names)} modules of {model_name}")
        found[layer] = modules[names[0]]
    stats = {layer: InputStats(m.in_features, hessian=True) for layer, m in found.items()}
    handles = [module.register_forward_pre_hook(lambda _module, args, layer=layer: stats[layer].add(args[0]))
               for layer, module in found.items()]
    with torch.inference_mode():
        for batch in calib.ids.split(8):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {layer: (found[layer].weight.detach().float().clone(), stats[layer].hessian) for layer in layers}


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    w, d, h = weight.double(), (weight - pruned).double(), hessian.double()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(DEFAULT_LAYERS), default="gemma3-270m")
    parser.add_argument("--layers", nargs="*", help="block.module suffixes, e.g. 3.mlp.down_proj")
    parser.add_argument("--patterns", nargs="*", default=["2:4", "4:8"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    import prunekit.weights.admm as admm
    from prunekit.budget import parse_pattern
    from prunekit.measure.protocol import environment
    from prunekit.select import nm_ramp_mask

    layers = args.layers or DEFAULT_LAYERS[args.model]
    data = hessians(args.model, layers, args.samples, args.seq_len)
    rows = []
    ramps = {"rank": nm_ramp_mask, "row": row_ramp_mask}
    for layer in layers:
        weight, hessian = data[layer]
        for spec in args.patterns:
            pattern = parse_pattern(spec)
            for ramp_name, ramp in ramps.items():
                for dtype in ("float32", "bfloat16"):
                    admm.nm_ramp_mask = ramp
                    try:
                        start = time.perf_counter()
                        pruned, _ = admm.admm_prune(weight, hessian, sparsity=pattern.sparsity, pattern=pattern,
                                                       ramp_dtype=dtype)
                        seconds = time.perf_counter() - start
                    finally:
                        admm.nm_ramp_mask = nm_ramp_mask
                    row = {"layer": layer, "shape": list(weight.shape), "pattern": spec, "ramp": ramp_name,
                           "ramp_dtype": dtype, "relative_error": relative_error(weight, pruned, hessian),
                           "solve_s": round(seconds, 3)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    stem = RESULTS / f"admm_layers_{args.model}"
    machine = environment()
    stem.with_suffix(".jsonl").write_text("".join(json.dumps(r | {"environment": machine}) + "\n" for r in rows))
    lines = [f"ADMM on {args.model} layers ({args.samples} x {args.seq_len} calibration tokens of wiki-summaries, "
             f"dense inputs; default rho, iterations, ramp); relative reconstruction error, solve seconds. "
             f"{machine['machine']} ({machine['cpu_count']} cores), {machine['torch_threads']} threads, torch "
             f"{machine['torch']}.", "",
             "| layer | shape | pattern | rank, float32 | rank, bfloat16 | row, float32 | row, bfloat16 |",
             "|---|---|---|---:|---:|---:|---:|"]
    for layer in layers:
        for spec in args.patterns:
            cells = {(r["ramp"], r["ramp_dtype"]): r for r in rows if r["layer"] == layer and r["pattern"] == spec}
            shape = "x".join(map(str, cells["rank", "float32"]["shape"]))
            values = [f"{cells[key]['relative_error']:.5f} ({cells[key]['solve_s']:.2f} s)"
                      for key in (("rank", "float32"), ("rank", "bfloat16"), ("row", "float32"), ("row", "bfloat16"))]
            lines.append(f"| {layer} | {shape} | {spec} | " + " | ".join(values) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
