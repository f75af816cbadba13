"""Dynamic sparse training: prune-and-regrow at a constant sparsity, from a random sparse start.

RigL (Evci et al. 2020, Alg. 1): every `update_frequency` steps until `end_step`, each layer drops the
fraction f_t of its active weights with the smallest magnitude and regrows as many inactive connections with
the largest dense-gradient magnitude, initialised to zero; f_t = drop_fraction/2 · (1 + cos(π t / end_step))
(Eq. 1). SET (Mocanu et al. 2018) regrows at random instead. Each layer's count of active weights never changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from prunekit.allocation import check_allocation
from prunekit.budget import check_sparsity
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count
from prunekit.training.schedules import Pruner
from prunekit.weights.scores import magnitude_scores, random_scores


class RigL(Pruner):
    """Rigging the Lottery: drop by magnitude, regrow by gradient magnitude (see the module docstring).

    The dense gradient is read inside the backward pass of each update step, before the mask zeroes it, so the
    pruner still only needs `step()` after `optimizer.step()` (gradient accumulation sums the micro-batches).
    Pass `optimizer` to zero its state (momentum, Adam moments) on regrown connections, as the authors do.
    """

    _needs_gradient = True  # SET regrows at random and never reads gradients

    def __init__(self, model: nn.Module, sparsity: float, allocation: str = "erk", update_frequency: int = 100,
                 end_step: int | None = None, drop_fraction: float = 0.3, seed: int = 0, *,
                 optimizer: torch.optim.Optimizer | None = None, names: Iterable[str] | None = None):
        super().__init__(model, names)
        self.final_sparsity = check_sparsity(sparsity)
        if end_step is None or end_step < 1:
            raise PrunekitError(f"end_step {end_step!r} must be a positive step count (RigL stops updating there; "
                                "the paper uses 75% of training)")
        if update_frequency < 1:
            raise PrunekitError(f"update_frequency {update_frequency!r} must be a positive number of steps")
        if not 0.0 < drop_fraction < 1.0:
            raise PrunekitError(f"drop_fraction {drop_fraction!r} must be in (0, 1)")
        self.update_frequency, self.end_step, self.drop_fraction = update_frequency, end_step, drop_fraction
        self.optimizer = optimizer
        self.generator = torch.Generator().manual_seed(seed)
        self.dense_grads: dict[str, torch.Tensor] = {}
        self.updates = 0
        # One random stream for the initial mask and SET's regrowth: a second generator with the same seed would
        # replay the initial scores and regrow exactly the connections just dropped.
        scores = {n: random_scores(w, self.generator) for n, w in self.masks.weights.items()}
        self._prune_to(scores, self.final_sparsity, check_allocation(allocation))
        self._arm()

    def target_sparsity(self, step: int | None = None) -> float:
        return self.final_sparsity

    def is_update_step(self, step: int) -> bool:
        """Whether the connections are rewired after optimizer step `step`."""
        return step % self.update_frequency == 0 and step < self.end_step

    def drop_fraction_at(self, step: int) -> float:
        """Cosine-decayed drop fraction (Evci et al. 2020, Eq. 1)."""
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * min(step, self.end_step) / self.end_step))

    def _arm(self) -> None:
        """Capture the dense gradient during the backward pass(es) that precede the next update step."""
        if self._needs_gradient and self.is_update_step(self.step_count + 1):
            self.dense_grads = {}
            self.masks.observe_gradients(self._capture)
        else:
            self.masks.observe_gradients(None)

    def _capture(self, name: str, grad: torch.Tensor) -> None:
        if name in self.dense_grads:
            self.dense_grads[name] += grad.detach()
        else:
            self.dense_grads[name] = grad.detach().clone()

    def _grow_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.dense_grads:
            raise PrunekitError(f"RigL saw no gradient for {name!r} before update step {self.step_count}; call "
                                "pruner.step() after each optimizer.step() that follows a backward pass")
        return self.dense_grads[name].abs().float()

    def _on_step(self) -> None:
        if self.is_update_step(self.step_count):
            self._rewire(self.drop_fraction_at(self.step_count))
            self.dense_grads = {}
            self.updates += 1
        self._arm()

    @torch.no_grad()
    def _rewire(self, fraction: float) -> None:
        masks, weights = self.masks.masks, self.masks.weights
        new, regrown = {}, {}
        for name, mask in masks.items():
            flat = mask.flatten()
            active = int(flat.count_nonzero())
            count = min(fraction_count(active, fraction), flat.numel() - active)
            if count == 0:
                continue
            # Drop: the `count` active weights of smallest magnitude.
            magnitude = magnitude_scores(weights[name].detach()).flatten().masked_fill(~flat, math.inf)
            kept = flat.clone()
            kept[torch.topk(magnitude, count, largest=False).indices] = False
            # Grow: the `count` best connections inactive after the drop (a just-dropped one may come back).
            grow_scores = self._grow_scores(name, weights[name]).flatten().masked_fill(kept, -math.inf)
            grow = torch.topk(grow_scores, count).indices
            # Regrown connections start at zero (Evci et al. 2020, Sec. 3), also when just dropped.
            weights[name].view(-1)[grow] = 0
            after = kept.clone()
            after[grow] = True
            new[name] = after.view_as(mask)
            regrown[name] = (after & ~kept).view_as(mask)
        self.masks.update(new)
        self._reset_optimizer_state(regrown)

    def _reset_optimizer_state(self, grown: dict[str, torch.Tensor]) -> None:
        if self.optimizer is None:
            return
        weights = self.masks.weights
        for name, mask in grown.items():
            for state in self.optimizer.state.get(weights[name], {}).values():
                if torch.is_tensor(state) and state.shape == mask.shape:
                    state.masked_fill_(mask, 0)


class SET(RigL):
    """Sparse Evolutionary Training (Mocanu et al. 2018): RigL's schedule with regrowth at random (no gradient)."""

    _needs_gradient = False

    def _grow_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return random_scores(weight, self.generator)
