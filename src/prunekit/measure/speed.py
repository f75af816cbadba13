"""Measured speed: MACs, CPU latency, generation and prefill throughput, and the before/after speed record.

Structured pruning is only worth its quality loss if the smaller model is faster, so every number here is measured
(medians of repeats after warm-up, interquartile ranges beside them, thread count stated) rather than estimated,
and `speed_record` says plainly when a pruned model is not measurably faster than its dense source.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError

# A pruned model counts as faster only if its median is at least this much better than the dense one's: below
# about 5%, run-to-run drift on a shared CPU (frequency scaling, other processes) makes a difference meaningless.
MIN_SPEEDUP = 1.05

Inputs = torch.Tensor | Sequence | Mapping


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch counts the fused attention kernels of CUDA but not the CPU one that `scaled_dot_product_attention`
    uses; without this, a decoder's q·kᵀ and attention·v products (about 13% of SmolLM2's MACs at 512 tokens)
    would be missing. Like torch's formula, the full square is counted (no causal discount)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def _call(model: nn.Module, inputs: Inputs):
    """Run `model` on a tensor, a tuple/list of positional arguments, or a mapping of keyword arguments."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return model(*inputs)
    raise PrunekitError(f"example inputs of type {type(inputs).__name__} are not supported; pass a tensor, a tuple "
                        "of positional arguments or a dict of keyword arguments")


@contextlib.contextmanager
def _measuring(model: nn.Module, threads: int | None = None) -> Iterator[None]:
    """Eval mode, inference mode and (optionally) a thread count for the enclosed block; all restored after."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PrunekitError(f"threads={threads!r} must be a positive integer (or None for torch's current count)")
    was_training, old_threads = model.training, torch.get_num_threads()
    model.eval()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)


def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """Multiply-accumulates of one forward pass of `model` on `example_inputs` (a tensor, a tuple of positional
    arguments, or a dict such as `{"input_ids": ids}`): torch's FLOP counter (matrix products, convolutions and
    attention), halved, since it counts a multiply-accumulate as two FLOPs. Element-wise work is not counted."""
    with _measuring(model), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        _call(model, example_inputs)
    return counter.get_total_flops() // 2


def _repeat_batch(value, batch_size: int):
    """`value` with its first example repeated to `batch_size` along dim 0 (non-tensors pass through)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[:1].expand(batch_size, *value.shape[1:]).contiguous()
    return value


def _batch_maker(inputs: Callable[[int], Inputs] | Inputs) -> Callable[[int], Inputs]:
    if callable(inputs):
        return inputs
    if isinstance(inputs, Mapping):
        return lambda b: {k: _repeat_batch(v, b) for k, v in inputs.items()}
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return lambda b: tuple(_repeat_batch(v, b) for v in inputs)
    return lambda b: _repeat_batch(inputs, b)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); with a single value all three are it."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        least = 0 if name == "warmup" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise PrunekitError(f"{name}={value!r} must be an integer >= {least}")


def latency(
    model: nn.Module,
    inputs: Callable[[int], Inputs] | Inputs,
    batch_sizes: Sequence[int] = (1, 16),
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict:
    """Wall-clock latency of one forward pass of `model` at each batch size, on its current device.

    inputs: a function `batch_size -> inputs` (a tensor, tuple of positional arguments or dict of keyword
        arguments), or example inputs whose first example is repeated to each batch size.
    threads: torch's intra-op threads for the measurement (restored after); None keeps the current count.

    Each batch size gets `warmup` untimed passes, then `repeats` timed ones under `torch.inference_mode`. Returns
    `{"threads", "warmup", "repeats", "batch_sizes": {"<b>": {"median_ms", "q1_ms", "q3_ms", "iqr_ms"}}}`.
    """
    _check_counts(warmup=warmup, repeats=repeats)
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise PrunekitError(f"batch_sizes={batch_sizes!r} must be positive integers, e.g. (1, 16)")
    make = _batch_maker(inputs)
    cuda = next(model.parameters()).device.type == "cuda"
    result: dict = {"warmup": warmup, "repeats": repeats, "batch_sizes": {}}
    with _measuring(model, threads):
        result["threads"] = torch.get_num_threads()
        for batch_size in batch_sizes:
            batch = make(batch_size)
            times = []
            for step in range(warmup + repeats):
                start = time.perf_counter()
                _call(model, batch)
                if cuda:  # CUDA launches return before the work is done
                    torch.cuda.synchronize()
                if step >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
            q1, median, q3 = _quartiles(times)
            result["batch_sizes"][str(batch_size)] = {"median_ms": median, "q1_ms": q1, "q3_ms": q3,
                                                      "iqr_ms": q3 - q1}
    return result


def in_turns(calls: Mapping[str, Callable[[object], object]], inputs: Sequence, *, rounds: int = 1,
             progress: bool = False, desc: str = "timed in turns") -> dict:
    """Time several calls (the dense and the pruned model, say) on the same inputs in turns: for each input, each
    call once (A B A B ...), after one untimed warm-up call of each on the first input, so that a change in the
    machine's load during the measurement hits every call alike and their ratio stays meaningful.

    Returns {"seconds": {name: seconds of every timed call, in order}, "outputs": {name: the return values of the
    first round, one per input}}. `progress` shows a bar over the rounds' inputs.
    """
    _check_counts(rounds=rounds)
    if not calls or not inputs:
        raise PrunekitError("in_turns needs at least one call and one input")
    for call in calls.values():
        call(inputs[0])
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    outputs: dict[str, list] = {name: [] for name in calls}
    steps = tqdm(total=rounds * len(inputs), desc=desc, disable=not progress, leave=False)
    for round_ in range(rounds):
        for item in inputs:
            steps.update()
            for name, call in calls.items():
                start = time.perf_counter()
                value = call(item)
                seconds[name].append(time.perf_counter() - start)
                if round_ == 0:
                    outputs[name].append(value)
    steps.close()
    return {"seconds": seconds, "outputs": outputs}


def _rate_summary(tokens: int, seconds: list[float], threads: int) -> dict:
    q1, median, q3 = _quartiles(sorted(tokens / s for s in seconds))
    return {"tokens_per_s": median, "q1_tokens_per_s": q1, "q3_tokens_per_s": q3, "threads": threads}


def _check_ids(input_ids: torch.Tensor, what: str) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64 or input_ids.dim() != 2 \
            or input_ids.numel() == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise PrunekitError(f"{what} must be a non-empty int64 tensor [batch, seq_len], got {shape}")


def generation_speed(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32, warmup: int = 1,
                     repeats: int = 3, threads: int | None = None) -> dict:
    """Greedy decoding speed of a causal LM at batch 1 with its KV cache: new tokens per second of decoding.

    The prompt (`input_ids[:1]`) is prefilled first and not timed, so the rate is that of the token-by-token
    loop a chat user waits on. The loop never stops early at an end-of-sequence token, so every run decodes
    exactly `new_tokens`. Returns `{"tokens_per_s", "q1_tokens_per_s", "q3_tokens_per_s", "threads",
    "new_tokens", "prompt_tokens"}` over `repeats` runs after `warmup` ones.
    """
    _check_ids(input_ids, "input_ids")
    _check_counts(new_tokens=new_tokens, warmup=warmup, repeats=repeats)
    device = next(model.parameters()).device
    prompt = input_ids[:1].to(device)
    # transformers 5.24 renamed the cache argument and output `past_key_values` to `cache`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    seconds = []
    with _measuring(model, threads):
        threads_used = torch.get_num_threads()
        for run in range(warmup + repeats):
            out = model(input_ids=prompt, use_cache=True)
            cache, token = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{name: cache})
                cache, token = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if run >= warmup:
                seconds.append(time.perf_counter() - start)
    return {**_rate_summary(new_tokens, seconds, threads_used), "new_tokens": new_tokens,
            "prompt_tokens": prompt.shape[1]}


def prefill_speed(model: nn.Module, batch: torch.Tensor, warmup: int = 1, repeats: int = 3,
                  threads: int | None = None) -> dict:
    """Prompt-processing speed of a causal LM: tokens of `batch` [batch, seq_len] per second of one forward pass.

    As in generation, only the last position's logits are computed (`logits_to_keep=1` where the model takes
    it): the LM head over every position is work that no prefill does, and pruning never shrinks it. Returns
    `{"tokens_per_s", "q1_tokens_per_s", "q3_tokens_per_s", "threads", "batch_size", "seq_len"}`.
    """
    _check_ids(batch, "batch")
    _check_counts(warmup=warmup, repeats=repeats)
    device = next(model.parameters()).device
    batch = batch.to(device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    seconds = []
    with _measuring(model, threads):
        threads_used = torch.get_num_threads()
        for run in range(warmup + repeats):
            start = time.perf_counter()
            model(input_ids=batch, use_cache=False, **extra)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if run >= warmup:
                seconds.append(time.perf_counter() - start)
    return {**_rate_summary(batch.numel(), seconds, threads_used), "batch_size": batch.shape[0],
            "seq_len": batch.shape[1]}


def _compare(before: tuple[float, float, float], after: tuple[float, float, float], higher_is_better: bool) -> dict:
    """Speedup of medians, and whether it is measurable: at least MIN_SPEEDUP, and the interquartile ranges apart
    (pruned's worse quartile better than dense's better one). With ~10 repeats a formal test has little power;
    disjoint IQRs are the assumption-free version of "most pruned runs beat most dense runs"."""
    (b_q1, b_med, b_q3), (a_q1, a_med, a_q3) = before, after
    if higher_is_better:
        speedup, apart = a_med / b_med, a_q1 > b_q3
    else:
        speedup, apart = b_med / a_med, a_q3 < b_q1
    return {"before": b_med, "after": a_med, "speedup": speedup, "faster": speedup >= MIN_SPEEDUP and apart}


def speed_record(dense: dict, pruned: dict) -> dict:
    """Before/after speed of a pruned model against its dense source, with the ideal speedup and a warning.

    `dense` and `pruned` hold `"macs"` (from `count_macs`, same inputs) and any of `"latency"` (from `latency`,
    same batch sizes), `"generation"` (`generation_speed`) and `"prefill"` (`prefill_speed`). The ideal speedup
    is 1 / (1 − fraction of MACs removed). A timing is `faster` when its median improves by at least 5% with the
    interquartile ranges apart; `not_faster` is True when any measured timing is not (None when nothing was
    timed), and `warning` then says which (None otherwise).
    """
    for name, value in (("dense", dense), ("pruned", pruned)):
        if not isinstance(value, Mapping) or not isinstance(value.get("macs"), int) or value["macs"] <= 0:
            raise PrunekitError(f"{name} must be a dict with a positive integer 'macs' (from count_macs), "
                                f"got {value!r:.80}")
    removed = 1 - pruned["macs"] / dense["macs"]
    record: dict = {"macs": {"before": dense["macs"], "after": pruned["macs"], "removed_fraction": removed},
                    "ideal_speedup": dense["macs"] / pruned["macs"]}
    checks: dict[str, dict] = {}
    if "latency" in dense and "latency" in pruned:
        sizes_d, sizes_p = dense["latency"]["batch_sizes"], pruned["latency"]["batch_sizes"]
        if set(sizes_d) != set(sizes_p):
            raise PrunekitError(f"latency was measured at batch sizes {sorted(sizes_d)} (dense) and "
                                f"{sorted(sizes_p)} (pruned); measure both at the same ones")
        record["latency"] = {}
        for size in sizes_d:
            d, p = sizes_d[size], sizes_p[size]
            entry = _compare((d["q1_ms"], d["median_ms"], d["q3_ms"]), (p["q1_ms"], p["median_ms"], p["q3_ms"]),
                             higher_is_better=False)
            entry["ideal_fraction"] = entry["speedup"] / record["ideal_speedup"]
            record["latency"][size] = checks[f"latency at batch {size}"] = entry
        record["threads"] = pruned["latency"]["threads"]
    for kind in ("generation", "prefill"):
        if kind in dense and kind in pruned:
            d, p = dense[kind], pruned[kind]
            record[kind] = checks[f"{kind} tokens/s"] = _compare(
                (d["q1_tokens_per_s"], d["tokens_per_s"], d["q3_tokens_per_s"]),
                (p["q1_tokens_per_s"], p["tokens_per_s"], p["q3_tokens_per_s"]), higher_is_better=True)
    slow = [f"{name} ({entry['speedup']:.2f}x)" for name, entry in checks.items() if not entry["faster"]]
    record["not_faster"] = bool(slow) if checks else None  # nothing timed: unknown, not "faster"
    record["warning"] = (f"the pruned model is not measurably faster than the dense one: {', '.join(slow)}; "
                         f"ideal {record['ideal_speedup']:.2f}x from MACs") if slow else None
    return record
