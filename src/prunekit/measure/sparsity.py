"""Achieved sparsity and parameter counts.

`sparsity` is always the fraction of zeros (0.5 = half the weights removed), as in the rest of prunekit,
so a target and the value measured here can be reported side by side.
"""

from collections.abc import Iterable, Mapping

import torch

from prunekit.errors import PrunekitError


def _zeros(t: torch.Tensor) -> int:
    return t.numel() - int(torch.count_nonzero(t))


Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
"""Named tensors: a mapping, or (name, tensor) pairs read once (an offloaded model's, one block at a time)."""


def layer_sparsity(weights: Weights) -> dict[str, dict]:
    """Zeros, size and sparsity of each named tensor: `name -> {"zeros", "numel", "sparsity"}`.

    An empty tensor (possible after physical removal) has sparsity 0.0.
    """
    report = {}
    for name, t in weights.items() if isinstance(weights, Mapping) else weights:
        zeros, numel = _zeros(t), t.numel()
        report[name] = {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}
    return report


def sparsity_summary(weights: Weights) -> dict:
    """Overall sparsity of the given tensors (zeros over elements: large layers weigh more), and per layer."""
    per_layer = layer_sparsity(weights)
    if not per_layer:
        raise PrunekitError("sparsity_summary got no weights; pass a mapping of name -> tensor")
    return summarise(per_layer)


def summarise(per_layer: dict[str, dict]) -> dict:
    """`sparsity_summary` of the per-layer report of `layer_sparsity`."""
    zeros = sum(r["zeros"] for r in per_layer.values())
    numel = sum(r["numel"] for r in per_layer.values())
    return {
        "overall": zeros / numel if numel else 0.0,
        "zeros": zeros,
        "numel": numel,
        "per_layer": per_layer,
    }


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total and nonzero parameters; a parameter shared by several modules (tied embeddings) counts once. An
    offloaded model's blocks are read from their files one at a time (`weights.engine.state_items`)."""
    from prunekit.weights.engine import state_items

    params = dict(model.named_parameters())  # each shared Parameter once, under its first name
    return {
        "total": sum(p.numel() for p in params.values()),
        "nonzero": sum(int(torch.count_nonzero(t)) for name, t in state_items(model) if name in params),
    }


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of `m` consecutive weights along the last (input) dim holding more than `n` nonzeros.

    Zero means `weight` satisfies the N:M pattern (e.g. 2:4 keeps at most 2 of every 4).
    """
    if m < 1 or not 0 <= n <= m:
        raise PrunekitError(f"invalid N:M pattern {n}:{m}; need 0 <= N <= M and M >= 1, e.g. 2:4")
    if weight.dim() == 0 or weight.shape[-1] % m:
        raise PrunekitError(
            f"weight of shape {tuple(weight.shape)} cannot be split into groups of {m} along its last "
            f"dimension; its last dimension must be a multiple of {m}"
        )
    nonzeros_per_group = (weight.reshape(-1, m) != 0).sum(dim=1)
    return int((nonzeros_per_group > n).sum())
