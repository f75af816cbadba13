"""Dynamic data pruning during training: samplers the user passes to their DataLoader (or Trainer) explicitly.

- `InfoBatch` (Qin et al. 2024): each epoch, drop a random part of the well-learned examples (last recorded loss
  below the mean) and up-weight the rest of them so the expected gradient equals the full-data gradient; the
  full data in the last epochs.
- `RS2` (Okanovic et al. 2023): each epoch a fresh random subset, without replacement across epochs until the
  data is exhausted.

Both are `torch.utils.data.Sampler`s of example indices. With a plain DataLoader, wrap the data set in
`IndexedDataset` so every batch carries its indices:

```
sampler = InfoBatch(len(train_set), epochs=epochs, prune_ratio=0.5)
loader = DataLoader(IndexedDataset(train_set), batch_size=128, sampler=sampler)
for epoch in range(epochs):
    for index, x, y in loader:
        losses = F.cross_entropy(model(x), y, reduction="none")
        sampler.update(index, losses.detach())
        (losses * sampler.weights(index)).mean().backward()
        ...
```

For a Hugging Face `Trainer`, use `infobatch_trainer_class()` / `rs2_trainer_class()` (a small subclass; nothing
is patched globally).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from prunekit.data.selectors import keep_count
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count


def _check_size(num_examples: int) -> int:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) or num_examples < 1:
        raise PrunekitError(f"a sampler needs at least one example, got {num_examples!r}")
    return int(num_examples)


class IndexedDataset(Dataset):
    """A data set whose items are `(index, *item)`, so a DataLoader batch carries the indices of its examples."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        return (index, *item) if isinstance(item, tuple | list) else (index, item)


class InfoBatch(Sampler[int]):
    """InfoBatch (Qin et al. 2024, Sec. 3): unbiased dynamic pruning of well-learned examples.

    Each epoch before `anneal * epochs`, the examples whose last recorded loss is below the mean of the recorded
    losses are "well-learned"; round(prune_ratio × their number) of them, drawn uniformly under (`seed`, epoch),
    are skipped this epoch. The kept well-learned examples get loss weight n_well / n_kept_well (= 1/(1 −
    prune_ratio) up to rounding), so each well-learned example's expected weight is exactly 1 and the expected
    epoch gradient equals the full-data gradient (the paper's rescaling, Eq. 3). Examples not yet seen are always
    kept. From epoch `ceil(anneal * epochs)` on, every example is visited exactly once per epoch with weight 1.

    Call `update(indices, losses)` after every batch with the per-example losses, and scale the losses by
    `weights(indices)`. An epoch's selection is fixed when its iteration starts (or when `len()` is first asked);
    `set_epoch(e)` sets the epoch number, otherwise each new iteration is the next epoch.
    """

    def __init__(self, num_examples: int, *, epochs: int, prune_ratio: float = 0.5, anneal: float = 0.875,
                 seed: int = 0):
        self.num_examples = _check_size(num_examples)
        if not (isinstance(epochs, int | np.integer) and epochs >= 1):
            raise PrunekitError(f"epochs {epochs!r} must be a whole number >= 1")
        if not (math.isfinite(prune_ratio) and 0 <= prune_ratio < 1):
            raise PrunekitError(f"prune_ratio {prune_ratio} is outside [0, 1)")
        if not (math.isfinite(anneal) and 0 <= anneal <= 1):
            raise PrunekitError(f"anneal {anneal} is outside [0, 1]")
        self.epochs, self.prune_ratio, self.anneal, self.seed = int(epochs), float(prune_ratio), float(anneal), seed
        self.scores = np.zeros(self.num_examples)
        self.seen = np.zeros(self.num_examples, dtype=bool)
        self._weights = torch.ones(self.num_examples)
        self.epoch = 0
        self._plan: np.ndarray | None = None
        self.passes = 0  # example-passes handed out so far, for measuring the saving

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._plan = int(epoch), None

    def pruning(self, epoch: int | None = None) -> bool:
        """Whether `epoch` (default: the current one) prunes; the last 1 − anneal fraction of epochs do not."""
        return (self.epoch if epoch is None else epoch) < math.ceil(self.anneal * self.epochs)

    def _make_plan(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        self._weights = torch.ones(self.num_examples)
        keep = np.ones(self.num_examples, dtype=bool)
        if self.pruning() and self.seen.any():
            well = np.flatnonzero(self.seen & (self.scores < self.scores[self.seen].mean()))
            dropped = fraction_count(len(well), self.prune_ratio)
            if dropped:
                keep[rng.choice(well, dropped, replace=False)] = False
                self._weights[torch.from_numpy(well[keep[well]])] = len(well) / (len(well) - dropped)
        return rng.permutation(np.flatnonzero(keep))

    def _current_plan(self) -> np.ndarray:
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def __len__(self) -> int:
        return len(self._current_plan())

    def __iter__(self) -> Iterator[int]:
        plan = self._current_plan()
        self.passes += len(plan)
        yield from plan.tolist()
        self.set_epoch(self.epoch + 1)

    def update(self, indices: torch.Tensor | np.ndarray, losses: torch.Tensor | np.ndarray) -> None:
        """Record the per-example losses of a batch (detached; one loss per index)."""
        index = torch.as_tensor(indices).long().cpu().numpy()
        values = torch.as_tensor(losses).detach().double().cpu().numpy()
        if values.shape != index.shape:
            raise PrunekitError(f"{values.shape} losses for {index.shape} indices; give one loss per example")
        if not np.isfinite(values).all():
            raise PrunekitError("InfoBatch got a non-finite loss; check the model and learning rate")
        self.scores[index] = values
        self.seen[index] = True

    def weights(self, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The loss weights of these examples this epoch (1, or n_well / n_kept_well for kept well-learned ones)."""
        return self._weights[torch.as_tensor(indices).long().cpu()]


class RS2(Sampler[int]):
    """Repeated sampling of random subsets (RS2 without replacement, Okanovic et al. 2023, Alg. 1).

    Each epoch yields `keep` (a fraction in (0, 1] or a count) examples, read off a random permutation; when the
    permutation runs out, a new one starts, with the examples just used moved to its end so that no example
    repeats within an epoch and every example is visited once before any is visited again.
    `set_epoch(e)` jumps to epoch `e` (replayed from the seed); otherwise each iteration is the next epoch.
    """

    def __init__(self, num_examples: int, keep: float | int, *, seed: int = 0):
        self.num_examples = _check_size(num_examples)
        self.per_epoch = keep_count(self.num_examples, keep)
        self.seed = seed
        self.epoch = 0
        self._epochs: list[np.ndarray] = []
        self._cycle = 0
        self._queue = np.empty(0, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _next(self) -> np.ndarray:
        taken = self._queue[:self.per_epoch]
        if len(taken) < self.per_epoch:
            order = np.random.default_rng([self.seed, self._cycle]).permutation(self.num_examples)
            self._cycle += 1
            just_used = np.isin(order, taken)
            order = np.concatenate([order[~just_used], order[just_used]])
            missing = self.per_epoch - len(taken)
            taken = np.concatenate([taken, order[:missing]])
            self._queue = order[missing:]
        else:
            self._queue = self._queue[self.per_epoch:]
        return taken

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The indices epoch `epoch` visits, in order."""
        while len(self._epochs) <= epoch:
            self._epochs.append(self._next())
        return self._epochs[epoch]

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        yield from indices.tolist()
        self.epoch += 1


def _trainer_base(base: type | None) -> type:
    if base is not None:
        return base
    from transformers import Trainer

    return Trainer


def rs2_trainer_class(base: type | None = None) -> type:
    """A subclass of `base` (default `transformers.Trainer`) that draws its training batches from an `RS2`
    sampler given as `Trainer(..., data_sampler=RS2(...))`. Only instances of the returned class change."""

    class RS2Trainer(_trainer_base(base)):
        def __init__(self, *args, data_sampler: Sampler, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_sampler = data_sampler

        def _get_train_sampler(self, *args, **kwargs):
            return self.data_sampler

    return RS2Trainer


def infobatch_trainer_class(base: type | None = None, index_column: str = "example_index") -> type:
    """A subclass of `base` (default `transformers.Trainer`) that trains with an `InfoBatch` sampler.

    Construct it as `cls(..., data_sampler=InfoBatch(...))`; the training set must have an integer column
    `index_column` holding each row's position (e.g. `dataset.map(lambda _, i: {"example_index": i},
    with_indices=True)`) and a `labels` column. The model must return `logits`; the loss is per-example
    cross-entropy, fed to the sampler and rescaled by its weights. Only instances of the returned class change.
    """

    class InfoBatchTrainer(_trainer_base(base)):
        def __init__(self, *args, data_sampler: InfoBatch, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_sampler = data_sampler

        def _get_train_sampler(self, *args, **kwargs):
            return self.data_sampler

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if index_column not in self._signature_columns:  # keep the index column when unused ones are removed
                self._signature_columns.append(index_column)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            index, labels = inputs.pop(index_column, None), inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs["logits"]
            losses = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1),
                                                       reduction="none")
            if model.training:  # evaluation batches neither update the sampler nor need the index column
                if index is None:
                    raise PrunekitError(f"InfoBatch training batches need the '{index_column}' column")
                self.data_sampler.update(index, losses.detach())
                losses = losses * self.data_sampler.weights(index).to(losses.device)
            loss = losses.mean()
            return (loss, outputs) if return_outputs else loss

    return InfoBatchTrainer
