"""`heal`: recover the quality a pruned causal LM or encoder lost, by LoRA, masked full fine-tuning or PERP,
optionally (for an encoder, always) distilling the dense model, and measure it with the one-shot protocol: held-out
perplexity before and after, or for an encoder the fidelity of its sentence embeddings to the dense model's."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from prunekit.adapters import find_adapter
from prunekit.assets import text_asset_names
from prunekit.corpus import load_texts
from prunekit.errors import PrunekitError
from prunekit.inputs import (
    calibration_set,
    check_lengths,
    compute_device,
    encoder_evaluation_set,
    evaluation_set,
    model_card,
)
from prunekit.measure import ResourceMonitor, parameter_counts, perplexity, result_record, weights_sha256
from prunekit.recovery.distill import (
    CAUSAL_DISTILL_MODES,
    DISTILL_MODES,
    check_distill_mode,
    check_teacher,
    distillation_loss,
    embedding_distillation_loss,
    layer_pairs,
)
from prunekit.recovery.loop import Checkpointing, causal_lm_loss, train_on_windows
from prunekit.recovery.methods import (
    HEAL_METHODS,
    LORA_ROLES,
    add_lora,
    check_masks,
    lora_module_names,
    merge_lora,
    perp_parameters,
    sparsity_of,
    zero_masks,
)
from prunekit.training.masks import Masks
from prunekit.weights.engine import refuse_offloaded

# Learning rates that heal within a short budget (thousands to millions of tokens): adapters and the few PERP
# parameters tolerate a large rate, full fine-tuning of every weight a small one. Measured on SmolLM2-135M after 50%
# Wanda, LoRA on 8k tokens: perplexity 44.5 -> 35.3 at 1e-3, -> 38.8 at 5e-4.
DEFAULT_LR = {"lora": 1e-3, "full": 5e-5, "perp": 1e-3}
# Documents held out for evaluation when the training text has no fixed split (a user's file or list of texts).
HELD_OUT_FRACTION = 0.1


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PrunekitError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


def _number(name: str, value: object, low: float, high: float, *, open_low: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise PrunekitError(f"{name}={value!r} must be a number in {bracket}{low}, {high}]")
    return float(value)


def check_heal_options(method: str, tokens: int, *, seq_len: int, batch_size: int, accumulation: int,
                       lr: float | None, warmup: float, weight_decay: float, lora_rank: int, lora_alpha: float,
                       lora_roles: Sequence[str], distill: str | None, has_teacher: bool,
                       temperature: float, distill_alpha: float, checkpoint_every: int | None) -> int:
    """Validate the model-independent options of `heal` (so the CLI can fail before loading a model); returns
    the number of optimizer steps the token budget buys."""
    if method not in HEAL_METHODS:
        raise PrunekitError(f"unknown healing method {method!r}; use one of {', '.join(HEAL_METHODS)}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("accumulation", accumulation)):
        _positive_int(name, value, 2 if name == "seq_len" else 1)
    per_step = seq_len * batch_size * accumulation
    _positive_int("tokens", tokens)
    if tokens < per_step:
        raise PrunekitError(f"tokens={tokens} is less than one optimizer step of {per_step} tokens (batch_size "
                            f"{batch_size} × accumulation {accumulation} × seq_len {seq_len}); raise tokens or "
                            f"shrink the batch")
    if lr is not None:
        _number("lr", lr, 0.0, 1.0, open_low=True)
    _number("warmup", warmup, 0.0, 0.5)
    _number("weight_decay", weight_decay, 0.0, 1.0)
    if method == "lora":
        _positive_int("lora_rank", lora_rank)
        _number("lora_alpha", lora_alpha, 0.0, 1e6, open_low=True)
        if not lora_roles or any(r not in LORA_ROLES for r in lora_roles):
            raise PrunekitError(f"lora_roles={list(lora_roles)!r} must be a non-empty subset of {LORA_ROLES}")
    if distill is not None and distill not in DISTILL_MODES:
        raise PrunekitError(f"distill={distill!r} is not a distillation mode; use None or one of "
                            f"{', '.join(DISTILL_MODES)}")
    if (distill is None) == has_teacher:
        raise PrunekitError("distillation needs both distill= and teacher= (the dense model); got only "
                            + ("teacher" if has_teacher else "distill"))
    if distill is not None:
        _number("temperature", temperature, 0.0, 100.0, open_low=True)
        _number("distill_alpha", distill_alpha, 0.0, 1.0)
    if checkpoint_every is not None:
        _positive_int("checkpoint_every", checkpoint_every)
    return tokens // per_step


def _is_asset(source: object) -> bool:
    return isinstance(source, str) and source in text_asset_names()


def _text_splits(data, eval_data) -> tuple[object, object, dict]:
    """Training and evaluation sources with disjoint text: a text asset's train and test splits; for other text
    (a file, a list of strings) the last `HELD_OUT_FRACTION` of its documents is held out for evaluation."""
    if eval_data is not None:
        paths = isinstance(data, str | os.PathLike) and isinstance(eval_data, str | os.PathLike)
        same = eval_data is data or (paths and os.fspath(data) == os.fspath(eval_data))
        if same and not _is_asset(data):
            shown = repr(os.fspath(eval_data)) if paths else "(the object given as data)"
            raise PrunekitError(f"eval_data {shown} is the training text; leave eval_data=None to hold out "
                                f"part of it, or give other text")
        return data, eval_data, {"held_out": "eval_data given"}
    if isinstance(data, torch.Tensor):
        raise PrunekitError("training from a tensor of token ids needs eval_data= (held-out text or windows)")
    if _is_asset(data):
        return data, data, {"held_out": "the text asset's fixed test split"}
    documents = load_texts(data)
    if len(documents) < 2:
        raise PrunekitError(f"training text {data!r} has {len(documents)} document; holding out evaluation text "
                            f"needs at least 2, or pass eval_data=")
    held = max(1, round(len(documents) * HELD_OUT_FRACTION))
    return documents[:-held], documents[-held:], {
        "held_out": f"last {held} of {len(documents)} documents of {data}", "documents": len(documents)}


def heal(
    model: nn.Module,
    tokenizer=None,
    *,
    method: str = "lora",
    tokens: int = 2_000_000,
    data="wiki-summaries",
    eval_data=None,
    seq_len: int = 512,
    batch_size: int = 8,
    accumulation: int = 1,
    lr: float | None = None,
    warmup: float = 0.05,
    weight_decay: float = 0.0,
    seed: int = 0,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_roles: Sequence[str] = LORA_ROLES,
    perp_head: bool = False,
    distill: str | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 2.0,
    distill_alpha: float = 0.5,
    layer_map: Sequence[int] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    eval_seq_len: int = 512,
    eval_windows: int | None = 64,
    eval_batch_size: int = 4,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_source: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Heal a pruned causal LM or encoder in place on `tokens` training tokens; returns the result record.

    method: 'lora' (adapters on the projections of `lora_roles`, rank `lora_rank`, scale lora_alpha/lora_rank,
        merged at the end), 'full' (every parameter) or 'perp' (biases and norms; `perp_head` adds the LM head).
        Pruned zeros hold in all three (see `prunekit.recovery.methods`).
    tokens: the training budget; `tokens // (batch_size × accumulation × seq_len)` optimizer steps are taken.
    data: training text (asset: its train split; a file or list of strings: all but the held-out last 10% of its
        documents; a tensor of token ids [rows, seq_len] used as given, cycled if short). `eval_data` (default:
        the held-out part of `data`) gives `eval_windows` windows of `eval_seq_len` tokens for perplexity before
        and after, disjoint from the training text.
    lr: AdamW's peak rate (default by method, `DEFAULT_LR`), reached after a linear warm-up over the first
        `warmup` fraction of the steps, then cosine decay to 0.
    distill: None, 'logits' or 'logits+hidden', from `teacher` (the dense model) at `temperature`, weighted
        `distill_alpha` against the plain loss; `layer_map` pairs a depth-pruned student's blocks with the
        teacher's (see `prunekit.recovery.distill`).
    Training runs without dropout (the model in eval mode, gradients flowing): a short recovery fits the dense
        function the model is measured against, and dropout noise on a budget this small costs more than it
        regularises (on a 70%-sparse tiny BERT, LoRA's gain in embedding fidelity was five times larger without
        it).
    An encoder (an adapter that is not causal, such as BERT) has no next-token loss: it heals by distilling the
        dense `teacher`'s sentence embeddings, distill 'embedding' or 'embedding+hidden' (temperature and
        distill_alpha do not apply), and is measured before and after by the mean cosine of its embeddings of
        `eval_windows` held-out texts (at most `eval_seq_len` tokens each) to the teacher's
        (`metrics["before"]`, `["after"]`); its evaluation runs on the CPU, where model and teacher must be.
    masks: keep-masks by weight name (`prunekit.prune(..., return_masks=True)`); default: read from the exact
        zeros of the target weights.
    checkpoint_dir, checkpoint_every, resume: save the trainable tensors and the optimizer state (safetensors,
        JSON) every `checkpoint_every` steps (default: only at the end); with `resume`, continue from the latest
        checkpoint there. Call again with the same starting model and options to resume.
    device: where training runs (default: where the model is); the model is moved there and back.
    on_step(step, loss): called after every optimizer step.

    Every option is checked before the model changes. If training fails, LoRA adapters are removed (the model is
    as it was); 'full' and 'perp' leave the weights of the last finished step.
    """
    refuse_offloaded(model, "healing")
    lora_roles = tuple(lora_roles)
    steps = check_heal_options(method, tokens, seq_len=seq_len, batch_size=batch_size, accumulation=accumulation,
                               lr=lr, warmup=warmup, weight_decay=weight_decay, lora_rank=lora_rank,
                               lora_alpha=lora_alpha, lora_roles=lora_roles, distill=distill,
                               has_teacher=teacher is not None,
                               temperature=temperature, distill_alpha=distill_alpha,
                               checkpoint_every=checkpoint_every)
    if isinstance(data, torch.Tensor) and data.dim() == 2 and data.shape[1] != seq_len:
        raise PrunekitError(f"the training rows given hold {data.shape[1]} tokens each; pass seq_len={data.shape[1]}")
    if resume and checkpoint_dir is None:
        raise PrunekitError("resume=True needs checkpoint_dir= (where the checkpoints were written)")
    lr = DEFAULT_LR[method] if lr is None else lr
    check_lengths(model, calibration_seq_len=seq_len, batch_size=batch_size,
                  eval_seq_len=None if isinstance(eval_data, torch.Tensor) else eval_seq_len)
    _positive_int("eval_batch_size", eval_batch_size)
    adapter = find_adapter(model)
    causal = adapter is None or adapter.causal
    if not causal and teacher is None:
        raise PrunekitError("an encoder heals by distilling the dense model's sentence embeddings: pass teacher= (the "
                            "dense encoder) and distill='embedding' or 'embedding+hidden'")
    if not causal and perp_head:
        raise PrunekitError("perp_head=True trains an LM head, which an encoder does not have")
    lora_modules = lora_module_names(model, lora_roles) if method == "lora" else []
    held = check_masks(model, masks) if masks is not None else zero_masks(model)
    pairs = None
    if teacher is not None:
        check_distill_mode(distill, causal)
        check_teacher(model, teacher, distill)
        if distill.endswith("+hidden"):
            pairs = layer_pairs(model.config.num_hidden_layers, teacher.config.num_hidden_layers, layer_map)
    if layer_map is not None and pairs is None:
        raise PrunekitError("layer_map applies to hidden-state distillation; pass distill='logits+hidden' (encoders: "
                            "'embedding+hidden') and teacher=")
    compute = compute_device(model, device)

    train_source, eval_source, split_info = _text_splits(data, eval_data)
    rows = steps * batch_size * accumulation
    try:
        train_tokens = calibration_set(model, tokenizer, train_source, samples=rows, seq_len=seq_len, seed=seed)
    except PrunekitError as error:
        raise PrunekitError(f"tokens={tokens} needs more training text than given: {error}") from None
    if causal:
        eval_tokens = evaluation_set(tokenizer, eval_source, seq_len=eval_seq_len, windows=eval_windows)
    else:  # the teacher's embeddings of the held-out texts are the reference
        eval_tokens = encoder_evaluation_set(teacher, tokenizer, eval_source, texts=eval_windows,
                                             max_length=eval_seq_len)

    def measure() -> dict:
        if causal:
            return perplexity(model, eval_tokens.ids, batch_size=eval_batch_size, progress=progress)
        return eval_tokens.fidelity(model, tokenizer)

    train_info = {**train_tokens.info, **split_info}
    if isinstance(data, str | os.PathLike):
        train_info["source"] = os.fspath(data)
    card = model_card(model, model_source)

    home = next(model.parameters()).device
    teacher_home = None if teacher is None else next(teacher.parameters()).device
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    before = None if causal else measure()  # an encoder is measured on the CPU, before it moves to `compute`
    model.to(compute)
    metrics: dict = {"before": measure() if causal else before, "sparsity": {"before": sparsity_of(model)}}
    method_card = {
        "name": method, "summary": HEAL_METHODS[method], "tokens": tokens, "seq_len": seq_len,
        "batch_size": batch_size, "accumulation": accumulation, "optimizer": "adamw", "lr": lr,
        "schedule": "linear warm-up, cosine to 0", "warmup": warmup, "warmup_steps": math.floor(warmup * steps),
        "weight_decay": weight_decay, "seed": seed, "dropout": False,
        "masks": "given" if masks is not None else "from exact zeros",
        "masked_weights": len(held), "distill": distill,
    }
    if method == "lora":
        method_card.update(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_roles=list(lora_roles),
                           lora_modules=len(lora_modules))
    if method == "perp":
        method_card["perp_head"] = perp_head
    if distill is not None:
        method_card["layer_pairs"] = None if pairs is None else [list(p) for p in pairs]
    if distill in CAUSAL_DISTILL_MODES:
        method_card.update(temperature=temperature, distill_alpha=distill_alpha)
    checkpointing = None
    if checkpoint_dir is not None:
        fingerprint = {**method_card, "data_sha256": train_tokens.info["tokens_sha256"],
                       "weights_sha256": card["weights_sha256"], "steps": steps}
        checkpointing = Checkpointing(Path(checkpoint_dir), checkpoint_every or steps, resume, fingerprint)

    loss_fn = causal_lm_loss
    if teacher is not None:
        teacher.to(compute).eval()
        loss_fn = (distillation_loss(teacher, temperature=temperature, alpha=distill_alpha, pairs=pairs) if causal
                   else embedding_distillation_loss(teacher, pairs=pairs))
    torch.manual_seed(seed)  # LoRA's initialisation of A
    peft_model = held_masks = None
    merged = finished = False
    try:
        with ResourceMonitor() as monitor:
            if method == "lora":
                peft_model = add_lora(model, lora_modules, rank=lora_rank, alpha=lora_alpha)
                trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            else:
                for p in model.parameters():
                    p.requires_grad_(method == "full")
                trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                if method == "perp":
                    trainable = perp_parameters(model, head=perp_head)
                    for _, p in trainable:
                        p.requires_grad_(True)
                if method == "full" and held:
                    held_masks = Masks(model, held)
                    held_masks.update(held)
            history = train_on_windows(
                model, train_tokens.ids, trainable, steps=steps, batch_size=batch_size, accumulation=accumulation,
                lr=lr, warmup=math.floor(warmup * steps), weight_decay=weight_decay, seed=seed, loss_fn=loss_fn,
                masks=held_masks, checkpointing=checkpointing, device=compute, progress=progress, on_step=on_step,
                dropout=False)
            if peft_model is not None:
                merge_lora(peft_model, held)
                merged = True
        finished = True
    finally:
        if peft_model is not None and not merged:
            peft_model.unload()  # drop the adapters: the base weights were never trained
        if held_masks is not None:
            held_masks.finalize()
        for name, p in model.named_parameters():
            with contextlib.suppress(KeyError):
                p.requires_grad_(requires_grad[name])
        if teacher is not None:
            teacher.to(teacher_home)
        if not finished:
            model.to(home)
    if causal:
        metrics["after"] = measure()
    model.to(home)
    if not causal:
        metrics["after"] = measure()
    metrics["sparsity"]["after"] = sparsity_of(model)
    metrics.update(
        tokens={"target": tokens, "achieved": history.tokens}, steps=history.steps,
        resumed_from=history.resumed_from,
        loss={"first": history.losses[0], "last": history.losses[-1], "per_step": history.losses},
        trainable_parameters=sum(p.numel() for _, p in trainable), parameters=parameter_counts(model),
        healed_weights_sha256=weights_sha256(model),
    )
    return result_record(
        model=card, method=method_card, calibration=None, evaluation=eval_tokens.info, metrics=metrics,
        resources={"heal": monitor.as_dict(), "train_wall_s": history.wall_s, "device": str(compute),
                   "threads": torch.get_num_threads()},
        extra={"training": train_info},
    )
