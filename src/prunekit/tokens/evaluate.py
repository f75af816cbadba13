"""Token pruning measured against the same model without it: what `prunekit eval --tokens SPEC` runs.

`parse_token_spec("tome:r=8")` reads the command line's spec into the keyword arguments of `prunekit.tokens.apply`;
`evaluate_tokens` loads a model asset (or directory), runs the evaluation texts through it and through a copy with
the token reduction installed, and returns a result record with the protocol card:

- encoders (MiniLM): the cosine of each text's sentence embedding to the unpruned one, the tokens kept after each
  block, MACs of the first batch and throughput in texts/s (`batch_size` texts of at most `seq_len` tokens);
- decoder LLMs (FastV): each window's last `continuation` tokens are predicted after a pruned prompt (the cache
  from the prefill, then the continuation through it), giving the perplexity of the true continuation, the
  agreement of the next-token predictions with the unpruned model's, prompt tokens kept, MACs and latency of
  the prefill.

The model and its reduced copy run in turns, batch by batch (`prunekit.measure.in_turns`), after one untimed
warm-up batch each, so that a change in the machine's load hits both alike; latency is the median over batches, on
the threads torch has (stated).
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.tokens.install import METHODS, apply, check_options

SPEC_OPTIONS = ("r", "keep", "layer", "seed", "feather")
_INTEGER = re.compile(r"[+-]?\d+")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_token_spec(spec: str) -> dict:
    """'METHOD[:KEY=VALUE,...]' -> `apply`'s keyword arguments, checked as far as they can be without a model.

    e.g. 'tome:r=8' -> {'method': 'tome', 'r': 8}; 'fastv:keep=0.5,layer=3,feather=true'. Keys: r, layer and seed
    (integers), keep (a fraction), feather (true/false).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PrunekitError(f"token spec {spec!r} is empty; expected METHOD:KEY=VALUE,..., e.g. tome:r=8")
    method, colon, rest = spec.strip().partition(":")
    if method not in METHODS:
        raise PrunekitError(f"token spec {spec!r}: unknown method {method!r}; known: {', '.join(METHODS)}")
    options: dict = {}
    if colon:
        for item in rest.split(","):
            key, equals, value = (part.strip() for part in item.partition("="))
            if not equals or not key or not value:
                raise PrunekitError(f"token spec {spec!r}: {item.strip()!r} is not KEY=VALUE (keys: "
                                    f"{', '.join(SPEC_OPTIONS)})")
            if key not in SPEC_OPTIONS:
                raise PrunekitError(f"token spec {spec!r}: unknown option {key!r}; known: {', '.join(SPEC_OPTIONS)}")
            if key in options:
                raise PrunekitError(f"token spec {spec!r}: option {key!r} given twice")
            options[key] = _option_value(spec, key, value)
    check_options(method, **options)
    return {"method": method, **options}


def _option_value(spec: str, key: str, value: str) -> int | float | bool:
    if key == "feather":
        if value.lower() not in _BOOLEANS:
            raise PrunekitError(f"token spec {spec!r}: feather={value!r} must be true or false")
        return _BOOLEANS[value.lower()]
    if key == "keep":
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise PrunekitError(f"token spec {spec!r}: keep={value!r} must be a number in (0, 1]")
        return number
    if not _INTEGER.fullmatch(value):
        raise PrunekitError(f"token spec {spec!r}: {key}={value!r} must be an integer")
    return int(value)


def evaluate_tokens(model: str, spec: str | Mapping, *, data: str | None = None, seq_len: int | None = None,
                    windows: int | None = None, batch_size: int | None = None, continuation: int = 64,
                    progress: bool = True) -> dict:
    """Load `model` (an asset name such as minilm-l6 or smollm2-135m, or a local directory) and measure the token
    reduction `spec` (a string for `parse_token_spec`, or its dict) on it; see the module docstring.

    Defaults: encoders embed the first `windows` = 200 test texts of bbc-news at `seq_len` = 256 tokens, 32 per
    batch; decoders read `windows` = 8 windows of `seq_len` = 1024 tokens of wiki-summaries, one per batch.
    `windows` = 0 takes all. The spec is checked before anything is loaded.
    """
    from prunekit.assets import is_encoder, load_causal_lm
    from prunekit.data.embed import load_encoder

    options = parse_token_spec(spec) if isinstance(spec, str) else _checked(spec)
    if is_encoder(model):
        encoder = load_encoder(model)
        return evaluate_encoder(encoder.model, encoder.tokenizer, options, data=data or "bbc-news",
                                seq_len=seq_len or 256, texts=200 if windows is None else windows or None,
                                batch_size=batch_size or 32, progress=progress, model_source=model)
    loaded = load_causal_lm(model)
    return evaluate_decoder(loaded.model, loaded.tokenizer, options, data=data or "wiki-summaries",
                            seq_len=seq_len or 1024, windows=8 if windows is None else windows or None,
                            batch_size=batch_size or 1, continuation=continuation, progress=progress,
                            model_source=model)


def _checked(options: Mapping) -> dict:
    options = dict(options)
    unknown = sorted(set(options) - {"method", *SPEC_OPTIONS})
    if unknown or "method" not in options:
        raise PrunekitError(f"token options {options!r} need a 'method' and only the keys {', '.join(SPEC_OPTIONS)}")
    check_options(**options)
    return options


def evaluate_encoder(model: nn.Module, tokenizer, options: Mapping, *, data="bbc-news", seq_len: int = 256,
                     texts: int | None = 200, batch_size: int = 32, progress: bool = True,
                     model_source: str | None = None) -> dict:
    """Sentence embeddings (size-weighted mean pooling, `TokenHandle.pool`) of `data`'s first `texts` test texts
    (all if None) with and without the token reduction `options` (keyword arguments of `apply`)."""
    from prunekit.corpus import load_texts
    from prunekit.inputs import model_card
    from prunekit.measure import ResourceMonitor
    from prunekit.measure.embedding import embedding_fidelity
    from prunekit.measure.protocol import result_record
    from prunekit.measure.speed import count_macs, in_turns

    options = _checked(options)
    documents = load_texts(data, split="test") if isinstance(data, str) else list(data)
    documents = documents[:texts] if texts is not None else documents
    if not documents:
        raise PrunekitError(f"no texts to evaluate in {data!r}")
    batches = [tokenizer(documents[i:i + batch_size], padding=True, truncation=True, max_length=seq_len,
                         return_tensors="pt") for i in range(0, len(documents), batch_size)]
    card = model_card(model, model_source)
    reduced_model = copy.deepcopy(model)  # timed in turns with `model`, which is never changed
    handle = apply(reduced_model, **options)
    kept = []

    def pruned(batch):
        hidden = reduced_model(**batch).last_hidden_state
        kept.append(handle.kept.sum(1))
        return handle.pool(hidden)

    with ResourceMonitor() as monitor, torch.inference_mode():
        dense_macs = count_macs(model, dict(batches[0]))
        macs = count_macs(reduced_model, dict(batches[0]))
        timed = in_turns({"dense": lambda batch: mean_pooled(batch, model(**batch).last_hidden_state),
                          "pruned": pruned}, batches, progress=progress, desc=f"embedding (dense, {options['method']})")
    dense, reduced = (torch.cat(timed["outputs"][name]) for name in ("dense", "pruned"))
    dense_seconds, seconds = timed["seconds"]["dense"], timed["seconds"]["pruned"]
    input_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    kept_per_layer = torch.stack(kept[1:]).sum(0)  # the first entry is the warm-up pass over batch 0
    threads = torch.get_num_threads()
    metrics = {
        "embedding_fidelity": embedding_fidelity(dense, reduced),
        "tokens": {"input_per_text": input_tokens / len(documents),
                   "kept_per_text_per_layer": (kept_per_layer / len(documents)).tolist(),
                   "kept_fraction": float(kept_per_layer[-1]) / input_tokens},
        "macs_first_batch": {"dense": dense_macs, "pruned": macs},
        "throughput": {"dense_texts_per_s": len(documents) / sum(dense_seconds),
                       "pruned_texts_per_s": len(documents) / sum(seconds),
                       "speedup": sum(dense_seconds) / sum(seconds), "batch_size": batch_size, "threads": threads},
    }
    evaluation = {"source": data if isinstance(data, str) else "texts", "split": "test", "texts": len(documents),
                  "max_length": seq_len, "batch_size": batch_size}
    return result_record(model=card, method={"name": "tokens", **options}, calibration=None, evaluation=evaluation,
                         metrics=metrics, resources=monitor.as_dict())


def mean_pooled(batch: Mapping, hidden: torch.Tensor) -> torch.Tensor:
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def evaluate_decoder(model: nn.Module, tokenizer, options: Mapping, *, data="wiki-summaries", seq_len: int = 1024,
                     windows: int | None = 8, batch_size: int = 1, continuation: int = 64, progress: bool = True,
                     model_source: str | None = None) -> dict:
    """Each `seq_len` window of `data` split into a prompt and its last `continuation` tokens; the continuation is
    predicted through the cache of the (pruned) prompt, with and without the reduction `options`."""
    from prunekit.inputs import evaluation_set, model_card
    from prunekit.measure import ResourceMonitor
    from prunekit.measure.protocol import result_record
    from prunekit.measure.speed import count_macs, in_turns

    options = _checked(options)
    if isinstance(continuation, bool) or not isinstance(continuation, int) or not 1 <= continuation < seq_len - 1:
        raise PrunekitError(f"continuation={continuation!r} must be an integer in [1, seq_len - 2 = {seq_len - 2}]")
    whole = torch.tensor([seq_len - continuation])  # what a handle that installs nothing (K past the last layer) keeps
    token_set = evaluation_set(tokenizer, data, seq_len=seq_len, windows=windows)
    ids = token_set.ids
    prompts, targets = ids[:, :-continuation], ids[:, -continuation:]
    card = model_card(model, model_source)
    reduced_model = copy.deepcopy(model)  # timed in turns with `model`, which is never changed
    handle = apply(reduced_model, **options)
    kept = []
    batches = [(prompts[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    with ResourceMonitor() as monitor, torch.inference_mode():
        dense_macs = count_macs(model, {"input_ids": prompts[:1]})
        macs = count_macs(reduced_model, {"input_ids": prompts[:1]})
        timed = in_turns({
            "dense": lambda pair: continue_prompt(model, *pair),
            "pruned": lambda pair: continue_prompt(reduced_model, *pair, after_prefill=lambda: kept.append(
                handle.kept if handle.installed else whole)),
        }, batches, progress=progress, desc=f"continuations (dense, {options['method']})")
    dense, pruned = (join_continuations(timed["outputs"][name], targets.numel()) for name in ("dense", "pruned"))
    kept_tokens = torch.cat(kept[1:]).double()  # the first entry is the warm-up prefill
    metrics = {
        "continuation_perplexity": {"dense": math.exp(dense["nll"]), "pruned": math.exp(pruned["nll"])},
        "next_token_agreement": float((dense["predictions"] == pruned["predictions"]).double().mean()),
        "prompt_tokens": {"input": prompts.shape[1], "kept_mean": float(kept_tokens.mean()),
                          "kept_fraction": float(kept_tokens.mean()) / prompts.shape[1]},
        "prefill_macs": {"dense": dense_macs, "pruned": macs},
        "prefill_latency": {"dense_median_ms": _median(dense["seconds"]) * 1e3,
                            "pruned_median_ms": _median(pruned["seconds"]) * 1e3,
                            "speedup": _median(dense["seconds"]) / _median(pruned["seconds"]),
                            "batch_size": batch_size, "threads": torch.get_num_threads()},
    }
    evaluation = {**token_set.info, "prompt_tokens": prompts.shape[1], "continuation_tokens": continuation}
    return result_record(model=card, method={"name": "tokens", **options}, calibration=None, evaluation=evaluation,
                         metrics=metrics, resources=monitor.as_dict())


def continue_prompt(model: nn.Module, prompt: torch.Tensor, target: torch.Tensor,
                    after_prefill: Callable[[], None] | None = None) -> dict:
    """Prefill `prompt` ([batch, tokens]) with the cache, then read `target` through it: the summed negative
    log-likelihood of `target`, the greedy predictions at its positions, and the prefill's seconds.
    `after_prefill` is called once the prompt is in the cache (to read a token handle's kept tokens)."""
    began = time.perf_counter()
    out = model(prompt, use_cache=True)
    seconds = time.perf_counter() - began
    if after_prefill is not None:
        after_prefill()
    logits = out.logits[:, -1:]
    if target.shape[1] > 1:
        rest = model(target[:, :-1], cache=out.cache, use_cache=True).logits
        logits = torch.cat([logits, rest], dim=1)
    logits = logits.float()
    nll = float(nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
    return {"nll_sum": nll, "predictions": logits.argmax(-1), "prefill_s": seconds}


def join_continuations(parts: list[dict], tokens: int) -> dict:
    """The mean NLL per target token, all predictions and every prefill's seconds of `continue_prompt` batches."""
    return {"nll": sum(p["nll_sum"] for p in parts) / tokens,
            "predictions": torch.cat([p["predictions"] for p in parts]),
            "seconds": [p["prefill_s"] for p in parts]}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summary(record: dict) -> str:
    """A few lines for the terminal."""
    metrics, method = record["metrics"], record["method"]
    options = ", ".join(f"{k}={v}" for k, v in method.items() if k not in ("name", "method"))
    lines = [f"tokens     {method['method']} ({options}) on {record['model']['source']}"]
    if "embedding_fidelity" in metrics:
        fidelity, tokens, speed = metrics["embedding_fidelity"], metrics["tokens"], metrics["throughput"]
        lines += [f"fidelity   mean cosine {fidelity['mean_cosine']:.4f} (min {fidelity['min_cosine']:.4f}) on "
                  f"{fidelity['texts']} texts",
                  f"kept       {tokens['kept_fraction']:.3f} of {tokens['input_per_text']:.1f} tokens per text after "
                  f"the last block",
                  f"speed      {speed['pruned_texts_per_s']:.1f} texts/s vs {speed['dense_texts_per_s']:.1f} dense "
                  f"({speed['speedup']:.2f}x, batch {speed['batch_size']}, {speed['threads']} threads)"]
    else:
        ppl, tokens, speed = metrics["continuation_perplexity"], metrics["prompt_tokens"], metrics["prefill_latency"]
        lines += [f"perplexity {ppl['pruned']:.3f} vs {ppl['dense']:.3f} dense on the continuations; next-token "
                  f"agreement {metrics['next_token_agreement']:.4f}",
                  f"kept       {tokens['kept_mean']:.1f} of {tokens['input']} prompt tokens",
                  f"prefill    {speed['pruned_median_ms']:.1f} ms vs {speed['dense_median_ms']:.1f} ms dense "
                  f"({speed['speedup']:.2f}x, batch {speed['batch_size']}, {speed['threads']} threads)"]
    return "\n".join(lines)
