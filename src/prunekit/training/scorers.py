"""Scores for pruning at (or near) initialization. Higher means keep, as everywhere in prunekit.

Each scorer returns `{weight name: score tensor}` for `target_weights(model)` and leaves the model as it found it
(weights, buffers such as BatchNorm statistics, train/eval mode, and `.grad`). The data-free scores (magnitude,
random) are the tensor functions of `prunekit.weights.scores`, applied to each weight.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.targets import target_weights

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Preserved:
    """Run a scoring pass on the model and put back its buffers, mode and gradients afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        self.grads = {n: p.grad for n, p in self.model.named_parameters()}
        self.training = self.model.training
        for p in self.model.parameters():
            p.grad = None
        return self.model

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                if name in self.buffers:
                    buffer.copy_(self.buffers[name])
        for name, p in self.model.named_parameters():
            p.grad = self.grads.get(name)
        self.model.train(self.training)


def _check_batches(batches: Batches | None, scorer: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = list(batches or [])
    if not batches:
        raise PrunekitError(f"{scorer} needs training data: pass batches=[(inputs, labels), ...] (at least one)")
    return batches


def snip_scores(model: nn.Module, batches: Batches, loss_fn: LossFn = F.cross_entropy) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity |∂L/∂w ⊙ w| (Lee et al. 2019, Eq. 6), gradients summed over `batches`."""
    batches = _check_batches(batches, "SNIP")
    weights = target_weights(model)
    with _Preserved(model):
        for inputs, labels in batches:
            loss_fn(model(inputs), labels).backward()
        return {n: (w.grad * w).detach().abs() for n, w in weights.items()}


def grasp_scores(model: nn.Module, batches: Batches, loss_fn: LossFn = F.cross_entropy,
                 temperature: float = 200.0) -> dict[str, torch.Tensor]:
    """GraSP keep-scores θ ⊙ Hg (Wang et al. 2020, Eq. 8).

    The paper removes the weights with the *largest* S(-θ) = -θ ⊙ Hg (those whose removal least reduces the
    gradient flow), so the keep-score is its negation. g is the gradient summed over `batches` and Hg a
    Hessian-gradient product; logits are divided by `temperature` as in the authors' code (T = 200). Scores
    can be negative: use them with `global` or `uniform` allocation, not `lamp`.
    """
    batches = _check_batches(batches, "GraSP")
    weights = target_weights(model)
    params = list(weights.values())
    with _Preserved(model):
        grads = [torch.zeros_like(p) for p in params]
        for inputs, labels in batches:
            step = torch.autograd.grad(loss_fn(model(inputs) / temperature, labels), params)
            torch._foreach_add_(grads, step)
        for inputs, labels in batches:
            step = torch.autograd.grad(loss_fn(model(inputs) / temperature, labels), params, create_graph=True)
            # d/dθ (g_fixed · ∇L(θ)) = H g, accumulated in .grad.
            sum((g * s).sum() for g, s in zip(grads, step, strict=True)).backward()
        return {n: (w * w.grad).detach() for n, w in weights.items()}


@torch.no_grad()
def _linearize(model: nn.Module) -> None:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.abs_()


def synflow_scores(model: nn.Module, input_shape: tuple[int, ...],
                   masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """SynFlow scores |∂R/∂θ ⊙ θ| with R = 1ᵀ (Π_l |θ_l|) 1 (Tanaka et al. 2020, Eq. 2): data-free.

    The network is linearised on a float64 copy (every parameter and buffer replaced by its absolute value, as in
    the authors' code) and fed a single all-ones input of `input_shape` (without the batch dimension) in eval
    mode, so BatchNorm acts through its running statistics. `masks` (keep-masks by name) zero pruned weights of
    the copy first; the iterative schedule that avoids layer collapse is `PruneAtInit(..., scorer="synflow")`.
    """
    if not input_shape or any(int(d) <= 0 for d in input_shape):
        raise PrunekitError(f"SynFlow needs an input_shape without the batch dimension, e.g. (1, 28, 28); "
                            f"got {input_shape!r}")
    clone = copy.deepcopy(model).double().eval()
    _linearize(clone)
    weights = target_weights(clone)
    if masks:
        with torch.no_grad():
            for name, mask in masks.items():
                weights[name].mul_(mask)
    for p in clone.parameters():
        p.grad = None
    clone(torch.ones((1, *input_shape), dtype=torch.float64)).sum().backward()
    # Scores stay in float64: at high sparsity the products of many |θ| span far more than float32's range.
    return {n: (w.grad * w).detach().abs() for n, w in weights.items()}


def check_layer_collapse(masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of layers whose keep-mask keeps nothing (the network is then disconnected); warns if any."""
    emptied = [name for name, mask in masks.items() if not bool(mask.any())]
    if emptied:
        warnings.warn(
            f"layer collapse: {len(emptied)} layer(s) fully pruned ({', '.join(emptied)}); the network cannot "
            "pass a signal. Use allocation 'lamp', 'global-min' or 'erk', or a lower sparsity",
            stacklevel=2,
        )
    return emptied
