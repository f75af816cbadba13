"""One training loop on token windows, for causal LMs (next-token loss, the default) and encoders (any `loss_fn`, such
as embedding distillation): a token budget, AdamW with warm-up and cosine decay, gradient accumulation, masks held
after every optimizer step, and checkpoints that resume to the same weights.

```
history = train_on_windows(model, windows, parameters, steps=100, batch_size=8, accumulation=2, lr=2e-4)
history.losses[-1], history.tokens
```

Each optimizer step reads `batch_size × accumulation` rows of `windows` (token ids [rows, seq_len]) in an order
fixed by `seed`: a fresh permutation of all rows per pass, so a budget larger than the text reuses it in a new order.
The order, the learning rate and the random state of step `s` depend only on `s`, which is what makes a resumed run
reach the same weights as an uninterrupted one (`tests/test_recovery.py` checks it bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from prunekit.artifacts.files import check_safetensors
from prunekit.artifacts.io import MANIFEST_LIMIT, atomic_directory, read_json_file
from prunekit.errors import PrunekitError

LossFunction = Callable[[nn.Module, torch.Tensor], torch.Tensor]
CHECKPOINT_FORMAT = 1
_STATE, _TENSORS, _LATEST = "state.json", "tensors.safetensors", "latest"


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on a batch of token ids [batch, seq_len]."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def warmup_cosine(base_lr: float, step: int, total: int, warmup: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: linear warm-up from base_lr/warmup to
    base_lr over the first `warmup` steps, then cosine annealing to 0 (Loshchilov & Hutter 2017, no restarts)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def row_order(rows: int, count: int, seed: int) -> torch.Tensor:
    """The first `count` row indices of a sequence of permutations of range(rows), seeded by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    passes = math.ceil(count / rows)
    return torch.cat([torch.randperm(rows, generator=generator) for _ in range(passes)])[:count]


@dataclass
class Checkpointing:
    """Where and how often the loop saves, and whether it resumes from what is there.

    `fingerprint` (JSON-able: the options, the data hash, the starting weights' hash) is stored with each
    checkpoint; resuming refuses a checkpoint whose fingerprint differs, so a run never continues another one.
    """

    directory: Path
    every: int
    resume: bool = False
    fingerprint: dict = field(default_factory=dict)


@dataclass
class LMHistory:
    """What `train_on_windows` did: mean loss of each optimizer step (all of them, also those before a resume),
    steps and tokens trained, the step it resumed from, and the wall time of this call."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    resumed_from: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return {"losses": self.losses, "steps": self.steps, "tokens": self.tokens, "resumed_from": self.resumed_from,
                "wall_s": self.wall_s}


def _digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _random_state() -> dict[str, torch.Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def save_checkpoint(checkpointing: Checkpointing, step: int, losses: list[float],
                    parameters: Sequence[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer) -> Path:
    """Write the trainable tensors, the optimizer state and the random state as safetensors and the rest as JSON,
    into `<directory>/latest`, replaced atomically (a crash while saving keeps the previous checkpoint)."""
    tensors = {f"param.{name}": p.detach().to("cpu").contiguous() for name, p in parameters}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous()
    tensors.update(_random_state())
    state = {"format": CHECKPOINT_FORMAT, "step": step, "losses": losses,
             "fingerprint": checkpointing.fingerprint, "fingerprint_sha256": _digest(checkpointing.fingerprint)}
    target = checkpointing.directory / _LATEST
    with atomic_directory(target, overwrite=True) as tmp:
        save_file(tensors, str(tmp / _TENSORS))
        (tmp / _STATE).write_text(json.dumps(state) + "\n")
    return target


def load_checkpoint(checkpointing: Checkpointing, parameters: Sequence[tuple[str, nn.Parameter]],
                    optimizer: torch.optim.Optimizer) -> tuple[int, list[float]] | None:
    """Restore the latest checkpoint in place: `(step, losses)`, or None when there is none. Reads JSON and
    safetensors only; a checkpoint of other options, data or starting weights is refused before anything changes."""
    where = checkpointing.directory / _LATEST
    if not (where / _STATE).is_file():
        return None
    state = read_json_file(where / _STATE, limit=MANIFEST_LIMIT, what="checkpoint state")
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("step"), int):
        raise PrunekitError(f"'{where}' is not a prunekit healing checkpoint (format {state.get('format')!r}); "
                            f"remove it or choose another checkpoint directory")
    if state.get("fingerprint_sha256") != _digest(checkpointing.fingerprint):
        differing = sorted(k for k in {*checkpointing.fingerprint, *state.get("fingerprint", {})}
                           if checkpointing.fingerprint.get(k) != state.get("fingerprint", {}).get(k))
        raise PrunekitError(f"checkpoint '{where}' belongs to another run (differs in {', '.join(differing)}); "
                            f"resume with the same model and options, or use a fresh checkpoint directory")
    check_safetensors(where / _TENSORS)
    tensors = load_file(str(where / _TENSORS))
    missing = [name for name, _ in parameters if f"param.{name}" not in tensors]
    if missing:
        raise PrunekitError(f"checkpoint '{where}' lacks trainable tensor {missing[0]!r}; it was not written by this "
                            f"run's method")
    with torch.no_grad():
        for name, p in parameters:
            p.copy_(tensors[f"param.{name}"])
    optimizer_state = optimizer.state_dict()
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            entries.setdefault(int(index), {})[slot] = value
    optimizer_state["state"] = entries
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                           key=lambda k: int(k.rsplit(".", 1)[1]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state["step"], [float(x) for x in state.get("losses", [])]


def train_on_windows(
    model: nn.Module,
    windows: torch.Tensor,
    parameters: Sequence[tuple[str, nn.Parameter]],
    *,
    steps: int,
    batch_size: int,
    accumulation: int = 1,
    lr: float = 2e-4,
    warmup: int = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    loss_fn: LossFunction = causal_lm_loss,
    masks=None,
    checkpointing: Checkpointing | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    dropout: bool = True,
) -> LMHistory:
    """Train the named `parameters` of `model` in place with AdamW on rows of `windows` for `steps` optimizer steps.

    Each step averages `accumulation` micro-batches of `batch_size` rows; `loss_fn(model, ids)` gives a micro-batch's
    loss (default: next-token cross-entropy). The learning rate follows `warmup_cosine`. `masks`
    (`prunekit.training.Masks`) zero the gradients of pruned weights and re-zero them after every step.
    `checkpointing` saves every `every` steps and, with `resume`, continues from the latest checkpoint.
    `on_step(step, loss)` runs after each step (and its checkpoint). The model is in train mode while training
    (eval mode with `dropout=False`, so that the dropout layers pass their input through; gradients flow either
    way); its mode is restored after.
    """
    if windows.dtype != torch.int64 or windows.dim() != 2 or windows.shape[1] < 2:
        raise PrunekitError(f"training windows must be int64 [rows, seq_len >= 2], got {windows.dtype} "
                            f"{tuple(windows.shape)}")
    if not parameters:
        raise PrunekitError("no trainable parameters: the method selected none in this model")
    device = device if device is not None else next(model.parameters()).device
    per_step = batch_size * accumulation
    order = row_order(len(windows), steps * per_step, seed)
    optimizer = torch.optim.AdamW([p for _, p in parameters], lr=lr, weight_decay=weight_decay)
    history = LMHistory()
    start = 0
    torch.manual_seed(seed)
    if checkpointing is not None and checkpointing.resume:
        restored = load_checkpoint(checkpointing, parameters, optimizer)
        if restored is not None:
            start, history.losses = restored
            history.losses = history.losses[:start]
            if masks is not None:
                masks.apply()
    history.resumed_from = start
    was_training = model.training
    model.train(dropout)
    began = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc="heal", unit="step", file=sys.stderr, disable=not progress)
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(lr, step, steps, warmup)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(accumulation):
                rows = order[step * per_step + micro * batch_size: step * per_step + (micro + 1) * batch_size]
                loss = loss_fn(model, windows[rows].to(device))
                if not torch.isfinite(loss):
                    raise PrunekitError(f"the training loss became {loss.item()} at step {step}; lower lr={lr}")
                (loss / accumulation).backward()
                total += loss.item() / accumulation
            optimizer.step()
            if masks is not None:
                masks.apply()
            history.losses.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            done = step + 1
            if checkpointing is not None and (done % checkpointing.every == 0 or done == steps):
                save_checkpoint(checkpointing, done, history.losses, parameters, optimizer)
            if on_step is not None:
                on_step(done, total)
    finally:
        bar.close()
        model.train(was_training)
    history.steps = steps
    history.tokens = steps * per_step * windows.shape[1]
    history.wall_s = time.perf_counter() - began
    return history
