"""Masks that hold through training.

A `Masks` object keeps one boolean keep-mask per target weight, registered as a buffer `<param>_mask` on the
module that owns the weight (so it is part of `state_dict` and survives save and load), and holds the zeros in
two ways:

1. a hook run after each backward pass accumulates into `weight.grad` multiplies it by the mask in place
   (`register_post_accumulate_grad_hook`), so pruned weights have zero gradient, also under gradient
   accumulation over micro-batches;
2. `apply()` re-zeroes the pruned weights; every pruner calls it after `optimizer.step()`.

Why both. With a zero gradient and a zero weight, the update of SGD (momentum, coupled weight decay) and of
AdamW (decoupled weight decay) is exactly zero *as long as the optimizer state of that entry is zero too*. That
is the case when the mask exists from the first step (pruning at initialization, sparse training from scratch).
When a weight is pruned in the middle of training, its momentum buffer (SGD) or first moment (Adam) is not zero:
the optimizer keeps moving the weight for many steps although its gradient is zero. Re-zeroing after every step
removes that drift; zeroing the gradient keeps the optimizer state of pruned entries decaying towards zero, so a
connection regrown later (RigL, SET) does not inherit a stale update. `tests/test_training_masks.py` shows both
facts (gradient zeroing alone suffices from initialization and fails after a mid-training prune).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.targets import target_weights

GradientObserver = Callable[[str, torch.Tensor], None]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


class Masks:
    """A boolean keep-mask (True = keep) per target weight of `model`, held through training.

    `names` selects the weights (default: all of `prunekit.targets.target_weights(model)`: for a Hugging Face
    model an adapter recognises, the projections inside its blocks, never the embeddings or the LM head). Masks
    start all-True (identity) and have the shape the weight is stored in (GPT-2's Conv1D: [in, out]).
    To load a checkpoint saved with masks into a fresh model, create `Masks(fresh_model, names)` first, then call
    `fresh_model.load_state_dict(state)`: the buffers are loaded in place and the hooks read them.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None):
        available = target_weights(model)
        names = list(available) if names is None else list(names)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise PrunekitError(
                f"no prunable weight named {unknown[0]!r}; available: {', '.join(available) or 'none'}"
            )
        if not names:
            raise PrunekitError("Masks needs at least one weight; the model has no weights to prune (see "
                                "prunekit.targets.target_weights)")
        self.model = model
        self._targets: dict[str, tuple[nn.Module, str]] = {}
        self._hooks, self._observer_hooks = [], []
        self._observer: GradientObserver | None = None
        for name in names:
            module, attr = _owner(model, name)
            buffer = f"{attr}_mask"
            if hasattr(module, buffer):
                raise PrunekitError(f"weight {name!r} already has a mask ({buffer}); finalize the other Masks first")
            weight = getattr(module, attr)
            module.register_buffer(buffer, torch.ones_like(weight, dtype=torch.bool))
            self._targets[name] = (module, attr)
            self._hooks.append(weight.register_post_accumulate_grad_hook(self._gradient_hook(name)))
        self._finalized = False
        self._multipliers: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def _multiplier(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a tensor of `dtype`, cached: multiplying by a bool tensor is ~50x slower on CPU (type
        promotion), which would cost more than the training step itself on small networks. The price is one
        weight-sized copy per mask in the weight's dtype.

        The cache follows the buffer, read at call time: `update()` and `load_state_dict` change it in place (its
        version counter moves), `model.to(...)` replaces it.
        """
        module, attr = self._targets[name]
        mask = getattr(module, f"{attr}_mask")
        cached = self._multipliers.get(name)
        if cached is None or cached[0] is not mask or cached[1] != mask._version or cached[2].dtype != dtype:
            cached = (mask, mask._version, mask.to(dtype))
            self._multipliers[name] = cached
        return cached[2]

    def _gradient_hook(self, name: str):
        def hook(weight: nn.Parameter) -> None:
            # In place on the accumulated .grad: no new tensor per step (the cheapest of the hook kinds on CPU).
            weight.grad.mul_(self._multiplier(name, weight.grad.dtype))

        return hook

    def _observer_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            self._observer(name, grad)

        return hook

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks by weight name (the registered buffers themselves)."""
        self._check_live()
        return {name: getattr(module, f"{attr}_mask") for name, (module, attr) in self._targets.items()}

    @property
    def weights(self) -> dict[str, nn.Parameter]:
        """The masked weights by name."""
        return {name: getattr(module, attr) for name, (module, attr) in self._targets.items()}

    def observe_gradients(self, observer: GradientObserver | None) -> None:
        """Call `observer(name, dense_gradient)` inside each backward pass, before pruned entries are zeroed.

        Pruners that rank pruned connections by their gradient (RigL) or accumulate movement scores use it;
        `None` removes the observer. Only one observer at a time; the extra hooks exist only while it is set.
        """
        self._check_live()
        self._observer = observer
        if observer is None:
            for hook in self._observer_hooks:
                hook.remove()
            self._observer_hooks = []
        elif not self._observer_hooks:
            self._observer_hooks = [w.register_hook(self._observer_hook(n)) for n, w in self.weights.items()]

    @torch.no_grad()
    def apply(self) -> None:
        """Re-zero the pruned weights (one fused multiply over all targets)."""
        self._check_live()
        weights = self.weights
        torch._foreach_mul_(list(weights.values()), [self._multiplier(n, w.dtype) for n, w in weights.items()])

    def update(self, new: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks of the named weights (in place) and re-zero. Weights regrown by a new mask keep
        their current value, which is zero if they were pruned before."""
        self._check_live()
        masks = self.masks
        for name, mask in new.items():
            if name not in masks:
                raise PrunekitError(f"no mask for weight {name!r}; masked weights: {', '.join(masks)}")
            if mask.shape != masks[name].shape:
                raise PrunekitError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, the weight has {tuple(masks[name].shape)}"
                )
            masks[name].copy_(mask.to(dtype=torch.bool, device=masks[name].device))
        self.apply()

    def sparsity(self) -> dict:
        """Fraction of masked (pruned) entries: overall ("achieved", large layers weigh more), and per layer."""
        layers, pruned, numel = {}, 0, 0
        for name, mask in self.masks.items():
            zeros = mask.numel() - int(mask.count_nonzero())
            layers[name] = zeros / mask.numel()
            pruned += zeros
            numel += mask.numel()
        return {"achieved": pruned / numel, "numel": numel, "layers": layers}

    def finalize(self) -> nn.Module:
        """Bake the zeros into the weights, remove the hooks and the mask buffers; return the plain model."""
        self.apply()
        self.observe_gradients(None)
        for hook in self._hooks:
            hook.remove()
        for module, attr in self._targets.values():
            del module._buffers[f"{attr}_mask"]
        self._hooks, self._observer, self._multipliers, self._finalized = [], None, {}, True
        return self.model

    def _check_live(self) -> None:
        if self._finalized:
            raise PrunekitError("these masks were finalized (baked into the weights); create new Masks to prune again")
