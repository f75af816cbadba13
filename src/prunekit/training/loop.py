"""A small, plain training loop for classifiers on tensors, with a pruner stepped after every optimizer step.

This is the loop that `prunekit train` recipes and `bench/training.py` both run, so a number in the benchmark and a
recipe's result come from the same code:

```
history = train(model, data, epochs=3, lr=0.05, pruner=GradualMagnitude(model, 0.9, 0, 200, 20))
history.final["test_accuracy"], history.final["sparsity"]
```

Each step: zero the gradients, forward, cross-entropy, backward, `optimizer.step()`, then `pruner.step()` (the
pruner sees this step's gradients, which RigL and movement pruning need), then `on_step(step, loss)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.assets import ImageSet
from prunekit.errors import PrunekitError
from prunekit.measure import accuracy

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class ClassificationData:
    """Training tensors and, optionally, test tensors: inputs (N, ...) float, labels (N,) int64 class indices."""

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    test_inputs: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split, inputs, labels in (("train", self.train_inputs, self.train_labels),
                                      ("test", self.test_inputs, self.test_labels)):
            if (inputs is None) != (labels is None):
                raise PrunekitError(f"{split} inputs and labels must be given together; got only one of them")
            if inputs is None:
                continue
            if len(inputs) != len(labels):
                raise PrunekitError(f"{split} inputs ({len(inputs)}) and labels ({len(labels)}) differ in length")
            if labels.dtype != torch.long or labels.dim() != 1:
                raise PrunekitError(f"{split} labels must be a 1-D int64 tensor of class indices, got "
                                    f"{labels.dtype} of shape {tuple(labels.shape)}")
        if len(self.train_labels) == 0:
            raise PrunekitError("no training examples; pass at least one")

    @classmethod
    def from_images(cls, train: ImageSet, test: ImageSet | None = None) -> ClassificationData:
        """Wrap `prunekit.assets` image sets; `info` keeps where each split came from."""
        return cls(train.images, train.labels, None if test is None else test.images,
                   None if test is None else test.labels,
                   {"train": dict(train.info), "test": None if test is None else dict(test.info)})


@dataclass
class TrainHistory:
    """What `train` did: one row per evaluation, and the budget actually spent.

    Each row: `step` (steps done, counted from 0 of the schedule, so a run resumed at `start_step` continues the
    count), `epoch` (fractional), `lr`, `loss` (mean training loss since the previous row), `test_accuracy` and
    `test_loss` (None without test data), `sparsity` (the pruner's achieved sparsity, None without a pruner) and
    `target_sparsity` (the pruner's target at that step, None without a pruner).
    """

    rows: list[dict] = field(default_factory=list)
    steps: int = 0
    example_passes: int = 0
    wall_s: float = 0.0

    @property
    def final(self) -> dict:
        if not self.rows:
            raise PrunekitError("the training history is empty; train for at least one step")
        return self.rows[-1]

    def as_dict(self) -> dict:
        return {"rows": self.rows, "steps": self.steps, "example_passes": self.example_passes,
                "wall_s": self.wall_s}


def learning_rate(schedule: str, base_lr: float, step: float, total_steps: float) -> float:
    """The learning rate after `step` of `total_steps` (fractional steps allowed: an epoch-based loop passes the
    epochs done and the epoch count).

    `constant`; `cosine` annealing from `base_lr` to 0 (Loshchilov & Hutter 2017, without restarts); `step`: ×0.1
    at 50% and again at 75% of the steps (the multi-step decay of the lottery-ticket experiments).
    """
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / total_steps))
    if schedule == "step":
        return base_lr * 0.1 ** ((2 * step >= total_steps) + (4 * step >= 3 * total_steps))
    raise PrunekitError(f"unknown lr_schedule '{schedule}'; use one of {', '.join(LR_SCHEDULES)}")


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """SGD (with heavy-ball momentum) or Adam, both with L2 weight decay added to the gradient."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise PrunekitError(f"unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}")


def _check_options(epochs: int | None, steps: int | None, batch_size: int, optimizer: Any, lr: float,
                   momentum: float, weight_decay: float, lr_schedule: str, start_step: int,
                   eval_every: int | None, sampler: Any) -> None:
    if (epochs is None) == (steps is None):
        raise PrunekitError(f"give exactly one of epochs or steps (got epochs={epochs}, steps={steps})")
    if sampler is not None and (steps is not None or start_step or eval_every):
        raise PrunekitError("a sampler decides how long each epoch is: give the budget in epochs, without steps, "
                            "start_step or eval_every")
    for name, value in (("epochs", epochs), ("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PrunekitError(f"{name}={value!r} must be a positive integer")
    if not isinstance(optimizer, torch.optim.Optimizer) and optimizer not in OPTIMIZERS:
        raise PrunekitError(f"unknown optimizer '{optimizer}'; use one of {', '.join(OPTIMIZERS)}")
    if lr_schedule not in LR_SCHEDULES:
        raise PrunekitError(f"unknown lr_schedule '{lr_schedule}'; use one of {', '.join(LR_SCHEDULES)}")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise PrunekitError(f"lr={lr!r} must be a positive number")
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
            raise PrunekitError(f"{name}={value!r} must be a non-negative number")
    if not isinstance(start_step, int) or start_step < 0:
        raise PrunekitError(f"start_step={start_step!r} must be a non-negative integer")


def train(
    model: nn.Module,
    data: ClassificationData,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 128,
    optimizer: str | torch.optim.Optimizer = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_schedule: str = "cosine",
    seed: int = 0,
    start_step: int = 0,
    pruner: Any = None,
    sampler: Any = None,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    eval_every: int | None = None,
    progress: bool = True,
) -> TrainHistory:
    """Train `model` in place with cross-entropy on `data.train_*`; evaluate on `data.test_*`.

    The budget is `epochs` passes over the training set or `steps` optimizer steps (exactly one of them), in
    batches of `batch_size` drawn from a fresh permutation each epoch (a generator seeded with `seed`, so two
    runs with the same seed see the same batches). `start_step` resumes the schedule part-way, as when a lottery
    ticket is rewound to step k: steps `start_step .. total-1` run, with the learning rate and the batches those
    steps would have had.

    `sampler` replaces the permutation: an iterable of example indices, iterated once per epoch (a dynamic data
    sampler such as `prunekit.data.samplers.InfoBatch` or `RS2`). Its epochs may be shorter than the data set, so
    the budget is then given in `epochs` and the learning rate follows the fraction of epochs done. A sampler with
    `update(indices, losses)` and `weights(indices)` (InfoBatch) is fed every batch's per-example losses, and its
    weights rescale them before averaging.

    `optimizer` is "sgd" (heavy-ball `momentum`) or "adam", with L2 `weight_decay`, built anew for every call; or
    an optimizer already built on the model (`make_optimizer`), for a pruner that resets its state (RigL), whose
    lr is then set by the schedule.

    `pruner` (any prunekit.training pruner) is stepped after every `optimizer.step()`; its achieved and target
    sparsity go into the history. `on_epoch_end(epoch, model)` runs after each epoch (the model is back in train
    mode afterwards). Evaluation runs every `eval_every` steps (default: at the end of every epoch) and after the
    last step. Returns the `TrainHistory`; the model's train/eval mode is restored.
    """
    _check_options(epochs, steps, batch_size, optimizer, lr, momentum, weight_decay, lr_schedule, start_step,
                   eval_every, sampler)
    n = len(data.train_labels)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps if steps is not None else epochs * steps_per_epoch
    if start_step >= total:
        raise PrunekitError(f"start_step={start_step} leaves nothing to train in a schedule of {total} steps")
    device = next(model.parameters()).device
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    else:
        opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    reweights = hasattr(sampler, "update") and hasattr(sampler, "weights")
    history = TrainHistory()
    was_training = model.training
    model.train()
    loss_sum, loss_count = 0.0, 0
    bar = tqdm(total=None if sampler is not None else total - start_step, desc="train", unit="step",
               disable=not progress, leave=False)
    began = time.perf_counter()
    try:
        for step, batch in enumerate(_batches(n, batch_size, total, start_step, seed, sampler, epochs), start_step):
            x, y = data.train_inputs[batch.index].to(device), data.train_labels[batch.index].to(device)
            rate = learning_rate(lr_schedule, lr, *batch.progress)
            for group in opt.param_groups:
                group["lr"] = rate
            opt.zero_grad(set_to_none=True)
            if reweights:
                losses = nn.functional.cross_entropy(model(x), y, reduction="none")
                sampler.update(batch.index, losses.detach())
                loss = (losses * sampler.weights(batch.index).to(device)).mean()
            else:
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if pruner is not None:
                pruner.step()
            value = loss.item()
            if not math.isfinite(value):
                raise PrunekitError(f"training loss became {value} at step {step}; lower lr (now {lr})")
            loss_sum, loss_count = loss_sum + value, loss_count + 1
            history.steps += 1
            history.example_passes += len(batch.index)
            if on_step is not None:
                on_step(step, value)
            done = step + 1
            if batch.last or (eval_every and done % eval_every == 0) or (not eval_every and batch.epoch_end):
                history.rows.append(_row(model, data, pruner, done, batch.epochs_done, rate, loss_sum / loss_count))
                loss_sum, loss_count = 0.0, 0
                bar.set_postfix(loss=f"{history.rows[-1]['loss']:.3f}", acc=history.rows[-1]["test_accuracy"])
            if batch.epoch_end and on_epoch_end is not None:
                on_epoch_end(math.ceil(batch.epochs_done) - 1, model)
                model.train()
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    history.wall_s = time.perf_counter() - began
    return history


@dataclass(frozen=True)
class _Batch:
    index: torch.Tensor  # example indices
    progress: tuple[float, float]  # (done, total) for the learning-rate schedule, in steps or in epochs
    epochs_done: float  # epochs completed after this step
    epoch_end: bool
    last: bool


def _batches(n: int, batch_size: int, total: int, start_step: int, seed: int, sampler: Any,
             epochs: int | None) -> Iterator[_Batch]:
    """The batches of a run: from a seeded permutation per epoch, or from `sampler`, iterated once per epoch."""
    if sampler is not None:
        for epoch in range(epochs):
            batches = torch.as_tensor(list(sampler), dtype=torch.long).split(batch_size)
            for position, index in enumerate(batches):
                end = position == len(batches) - 1
                yield _Batch(index, (epoch + position / len(batches), epochs), epoch + (position + 1) / len(batches),
                             end, end and epoch == epochs - 1)
        return
    steps_per_epoch = math.ceil(n / batch_size)
    generator = torch.Generator().manual_seed(seed)
    # every epoch draws its permutation in turn, so a run resumed at start_step sees the batches it would have
    for _ in range(start_step // steps_per_epoch):
        torch.randperm(n, generator=generator)
    order = torch.randperm(n, generator=generator)
    for step in range(start_step, total):
        position = step % steps_per_epoch
        if position == 0 and step != start_step:
            order = torch.randperm(n, generator=generator)
        yield _Batch(order[position * batch_size:(position + 1) * batch_size], (step, total),
                     (step + 1) / steps_per_epoch, position == steps_per_epoch - 1, step == total - 1)


def _row(model: nn.Module, data: ClassificationData, pruner: Any, step: int, epoch: float, lr: float,
         loss: float) -> dict:
    row = {"step": step, "epoch": round(epoch, 4), "lr": lr, "loss": loss, "test_accuracy": None, "test_loss": None,
           "sparsity": None, "target_sparsity": None}
    if data.test_inputs is not None:
        result = accuracy(model, data.test_inputs, data.test_labels)
        row["test_accuracy"], row["test_loss"] = result["accuracy"], result["loss"]
    if pruner is not None:
        row["sparsity"] = float(pruner.sparsity())
        row["target_sparsity"] = float(pruner.target_sparsity(step))
    return row
