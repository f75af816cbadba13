"""Pruners: when and what to prune during training. Every pruner has the same shape:

    pruner = GradualMagnitude(model, final_sparsity=0.9, start_step=100, end_step=1000, frequency=50)
    for batch in data:
        loss(model, batch).backward(); optimizer.step(); pruner.step(); optimizer.zero_grad()
    pruner.finalize()   # bake the zeros in, remove hooks and mask buffers

`pruner.masks` is the `Masks` holding the zeros, `pruner.sparsity()` the achieved sparsity now and
`pruner.target_sparsity(step)` the schedule's target in force after `step` optimizer steps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prunekit.allocation import allocate, check_allocation
from prunekit.budget import check_sparsity
from prunekit.errors import PrunekitError
from prunekit.select import lowest_mask
from prunekit.training.masks import Masks
from prunekit.training.scorers import Batches, check_layer_collapse, grasp_scores, snip_scores, synflow_scores
from prunekit.weights.scores import magnitude_scores, random_scores

INIT_SCORERS = ("snip", "grasp", "synflow", "random", "magnitude")
ONESHOT_SCORERS = ("magnitude", "random")
REWINDS = ("weights", "lr")


def _check_steps(start_step: int, end_step: int, frequency: int) -> None:
    if not 0 <= start_step <= end_step:
        raise PrunekitError(f"need 0 <= start_step <= end_step, got start_step={start_step}, end_step={end_step}")
    if frequency < 1:
        raise PrunekitError(f"frequency {frequency!r} must be a positive number of steps")


def cubic_sparsity(step: int, initial: float, final: float, start_step: int, end_step: int) -> float:
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))³ (Zhu & Gupta 2017, Eq. 1), clamped to [t0, t_end]."""
    if end_step == start_step:
        return final
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class Pruner:
    """The common shape: `step()` after each optimizer step, `finalize()` at the end."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None):
        self.model = model
        self.masks = Masks(model, names)
        self.step_count = 0

    def step(self) -> None:
        """Count one optimizer step, prune or regrow if the schedule says so, and re-zero pruned weights."""
        self.step_count += 1
        self._on_step()
        self.masks.apply()

    def _on_step(self) -> None:
        """What the schedule does after optimizer step `self.step_count` (nothing by default)."""

    def sparsity(self) -> float:
        """Achieved sparsity now: the fraction of masked weights over all targets."""
        return self.masks.sparsity()["achieved"]

    def target_sparsity(self, step: int | None = None) -> float:
        """The schedule's target in force after `step` optimizer steps (default: now)."""
        raise NotImplementedError

    def finalize(self) -> nn.Module:
        """Bake the zeros into the weights and leave a plain model (no hooks, no mask buffers)."""
        return self.masks.finalize()

    def _prune_to(self, scores: dict[str, torch.Tensor], sparsity: float, allocation: str, **options) -> None:
        keep = allocate(scores, sparsity, allocation, **options)
        check_layer_collapse(keep)
        self.masks.update(keep)

    def _live_magnitudes(self) -> dict[str, torch.Tensor]:
        # Pruned weights are exactly zero after apply(), the lowest possible |w|: pruning to a higher sparsity by
        # magnitude therefore keeps every earlier mask (monotone), with any allocation.
        self.masks.apply()
        return {n: magnitude_scores(w.detach()) for n, w in self.masks.weights.items()}

    def _random_scores(self, seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {n: random_scores(w, generator) for n, w in self.masks.weights.items()}


class OneShot(Pruner):
    """Prune once at construction (usually a trained model), then fine-tune with the mask held."""

    def __init__(self, model: nn.Module, sparsity: float, scorer: str = "magnitude", allocation: str = "global", *,
                 min_density: float = 0.0, seed: int = 0, names: Iterable[str] | None = None):
        super().__init__(model, names)
        self.final_sparsity = check_sparsity(sparsity)
        if scorer not in ONESHOT_SCORERS:
            raise PrunekitError(f"one-shot scorer {scorer!r} is unknown; choose one of {', '.join(ONESHOT_SCORERS)} "
                                "(data-dependent scorers: PruneAtInit)")
        scores = self._live_magnitudes() if scorer == "magnitude" else self._random_scores(seed)
        self._prune_to(scores, self.final_sparsity, check_allocation(allocation), min_density=min_density)

    def target_sparsity(self, step: int | None = None) -> float:
        return self.final_sparsity


class PruneAtInit(Pruner):
    """Prune an untrained network once, by SNIP, GraSP, SynFlow, random or magnitude scores, then train sparse.

    SynFlow is iterated over `rounds` (default 100): round r prunes to 1 - (1 - s)^(r/rounds), re-scoring the
    masked network each time (the exponential schedule of Tanaka et al. 2020, Sec. 6), which avoids layer
    collapse. The other scorers prune in one shot; `rounds` is refused for them.
    """

    def __init__(self, model: nn.Module, sparsity: float, scorer: str = "snip", batches: Batches | None = None,
                 input_shape: tuple[int, ...] | None = None, allocation: str = "global", rounds: int | None = None,
                 *, min_density: float = 0.0, seed: int = 0, names: Iterable[str] | None = None):
        super().__init__(model, names)
        self.final_sparsity = check_sparsity(sparsity)
        if scorer not in INIT_SCORERS:
            raise PrunekitError(f"scorer {scorer!r} is unknown; choose one of {', '.join(INIT_SCORERS)}")
        check_allocation(allocation)
        if scorer != "synflow" and rounds is not None:
            raise PrunekitError(f"rounds applies to the iterative SynFlow scorer only, not {scorer!r}")
        if scorer == "synflow":
            rounds = 100 if rounds is None else rounds
            if rounds < 1:
                raise PrunekitError(f"rounds {rounds!r} must be a positive integer")
            if input_shape is None:
                raise PrunekitError("SynFlow needs input_shape, one example's shape such as (1, 28, 28)")
            for r in range(1, rounds + 1):
                scores = synflow_scores(model, input_shape, self.masks.masks)
                keep = allocate(self._restrict(scores), 1.0 - (1.0 - self.final_sparsity) ** (r / rounds),
                                allocation, min_density=min_density)
                self.masks.update(keep)
            check_layer_collapse(self.masks.masks)
            return
        if scorer == "snip":
            scores = snip_scores(model, batches)
        elif scorer == "grasp":
            scores = grasp_scores(model, batches)
        elif scorer == "random":
            scores = self._random_scores(seed)
        else:
            scores = self._live_magnitudes()
        self._prune_to(self._restrict(scores), self.final_sparsity, allocation, min_density=min_density)

    def _restrict(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: scores[n] for n in self.masks.masks}

    def target_sparsity(self, step: int | None = None) -> float:
        return self.final_sparsity


class _CubicSchedule:
    """Pruning steps start_step, start_step + frequency, ... and end_step, with the cubic target in force between."""

    start_step: int
    end_step: int
    frequency: int
    initial_sparsity: float
    final_sparsity: float
    step_count: int

    def is_pruning_step(self, step: int) -> bool:
        """Whether the schedule prunes after optimizer step `step`."""
        inside = self.start_step <= step <= self.end_step
        return inside and ((step - self.start_step) % self.frequency == 0 or step == self.end_step)

    def target_sparsity(self, step: int | None = None) -> float:
        step = self.step_count if step is None else step
        if step < self.start_step:
            return 0.0
        last = min(step, self.end_step)
        if last != self.end_step:
            last -= (last - self.start_step) % self.frequency
        return cubic_sparsity(last, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step)


class GradualMagnitude(_CubicSchedule, Pruner):
    """Gradual magnitude pruning with the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to prune").

    At steps start_step, start_step + frequency, ... up to end_step (and at end_step itself) the smallest
    weights are removed to reach the cubic target; the target in force between pruning steps is the last one
    reached. Before start_step the network is dense.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, frequency: int,
                 initial_sparsity: float = 0.0, allocation: str = "global", *, min_density: float = 0.0,
                 names: Iterable[str] | None = None):
        super().__init__(model, names)
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise PrunekitError(f"initial_sparsity {initial_sparsity} exceeds final_sparsity {final_sparsity}")
        _check_steps(start_step, end_step, frequency)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.allocation, self.min_density = check_allocation(allocation), min_density
        self._on_step()

    def _on_step(self) -> None:
        if self.is_pruning_step(self.step_count):
            target = self.target_sparsity(self.step_count)
            self._prune_to(self._live_magnitudes(), target, self.allocation, min_density=self.min_density)


class IterativeMagnitude(Pruner):
    """Iterative magnitude pruning with rewinding (lottery tickets: Frankle & Carbin 2019; Frankle et al. 2020
    for rewinding to step k; Renda et al. 2020 for learning-rate rewinding).

    `step()` counts optimizer steps and snapshots the whole model state (weights, biases, buffers) after
    `rewind_step` steps (at construction when it is 0). `next_round()` ends a round: it prunes to
    1 - (1 - s)^(round/rounds) overall, i.e. 1 - (1 - s)^(1/rounds) of the weights still remaining, by magnitude,
    then with `rewind="weights"` restores the snapshot on the kept entries (and everything else in the model) and
    resets the step count to `rewind_step`; with `rewind="lr"` the trained weights are kept. In both cases the
    caller re-creates its optimizer and restarts its learning-rate schedule (from step `rewind_step` for weight
    rewinding), since optimizer state belongs to the caller.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, rounds: int, rewind_step: int = 0,
                 rewind: str = "weights", allocation: str = "global", *, min_density: float = 0.0,
                 names: Iterable[str] | None = None):
        super().__init__(model, names)
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        if rounds < 1:
            raise PrunekitError(f"rounds {rounds!r} must be a positive integer")
        if rewind not in REWINDS:
            raise PrunekitError(f"rewind {rewind!r} is unknown; choose one of {', '.join(REWINDS)}")
        if rewind_step < 0:
            raise PrunekitError(f"rewind_step {rewind_step!r} must be >= 0")
        self.rounds, self.rewind_step, self.rewind = rounds, rewind_step, rewind
        self.allocation, self.min_density = check_allocation(allocation), min_density
        self.round = 0
        self.snapshot: dict[str, torch.Tensor] | None = None
        if rewind_step == 0:
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        masks = {f"{n}_mask" for n in self.masks.masks}
        self.snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k not in masks}

    def _on_step(self) -> None:
        if self.step_count == self.rewind_step and self.round == 0:
            self._take_snapshot()

    def target_sparsity(self, step: int | None = None) -> float:
        """Target after the current round; IMP's target changes only at `next_round()`, not with steps."""
        return 1.0 - (1.0 - self.final_sparsity) ** (self.round / self.rounds)

    def next_round(self) -> None:
        """Prune one round by magnitude, then rewind (see the class docstring)."""
        if self.round >= self.rounds:
            raise PrunekitError(f"all {self.rounds} rounds are done; the network is at the final sparsity")
        if self.rewind == "weights" and self.snapshot is None:
            raise PrunekitError(f"cannot rewind to step {self.rewind_step}: only {self.step_count} steps were taken; "
                                "train at least rewind_step steps before next_round()")
        self.round += 1
        self._prune_to(self._live_magnitudes(), self.target_sparsity(), self.allocation, min_density=self.min_density)
        if self.rewind == "weights":
            self.model.load_state_dict(self.snapshot, strict=False)
            self.masks.apply()
            self.step_count = self.rewind_step


class Movement(_CubicSchedule, Pruner):
    """Movement pruning for fine-tuning (Sanh et al. 2020), on the cubic schedule of `GradualMagnitude`.

    Scores accumulate S = -Σ_t w ⊙ ∂L/∂w over every backward pass (Sanh et al., Eq. 3-4: weights moving away from
    zero score high). Hard (`soft=False`): at each pruning step every layer keeps its top (1 - s_t) fraction by S
    (the paper's per-matrix Top-k). Soft (`soft=True`): one threshold τ_t on S shared by all layers, so layers end
    at different sparsities; here τ_t is set at each pruning step to the score quantile that meets the cubic
    target exactly, instead of the paper's learned scores under an L1 penalty with an uncontrolled budget.

    Unlike the paper's straight-through estimator, a pruned weight is zeroed here (the masks hold), so its score
    stops changing; it can come back (at zero) only if live scores fall below it.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, frequency: int,
                 soft: bool = False, *, initial_sparsity: float = 0.0, names: Iterable[str] | None = None):
        super().__init__(model, names)
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        _check_steps(start_step, end_step, frequency)
        if start_step < 1:
            raise PrunekitError("Movement needs start_step >= 1: its scores accumulate over training steps")
        self.start_step, self.end_step, self.frequency, self.soft = start_step, end_step, frequency, soft
        weights = self.masks.weights
        self.scores = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}

        def accumulate(name: str, grad: torch.Tensor) -> None:
            self.scores[name].sub_(weights[name].detach() * grad)

        self.masks.observe_gradients(accumulate)

    def _on_step(self) -> None:
        if not self.is_pruning_step(self.step_count):
            return
        target = self.target_sparsity(self.step_count)
        if self.soft:
            self._prune_to(self.scores, target, "global")
        else:
            keep = {n: lowest_mask(s, target) for n, s in self.scores.items()}
            check_layer_collapse(keep)
            self.masks.update(keep)
