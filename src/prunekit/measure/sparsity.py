"""Achieved sparsity and parameter counts.

`sparsity` is always the fraction of zeros (0.5 = half the weights removed), as in the rest of prunekit,
so a target and the value measured here can be reported side by side.
"""

from collections.abc import Mapping

import torch

from prunekit.errors import PrunekitError


def _zeros(t: torch.Tensor) -> int:
    return t.numel() - int(torch.count_nonzero(t))


def layer_sparsity(weights: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Zeros, size and sparsity of each named tensor: `name -> {"zeros", "numel", "sparsity"}`.

    An empty tensor (possible after physical removal) has sparsity 0.0.
    """
    report = {}
    for name, t in weights.items():
        zeros, numel = _zeros(t), t.numel()
        report[name] = {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}
    return report


def sparsity_summary(weights: Mapping[str, torch.Tensor]) -> dict:
    """Overall sparsity of the given tensors (zeros over elements: large layers weigh more), and per layer."""
    if not weights:
        raise PrunekitError("sparsity_summary got no weights; pass a mapping of name -> tensor")
    per_layer = layer_sparsity(weights)
    zeros = sum(r["zeros"] for r in per_layer.values())
    numel = sum(r["numel"] for r in per_layer.values())
    return {
        "overall": zeros / numel if numel else 0.0,
        "zeros": zeros,
        "numel": numel,
        "per_layer": per_layer,
    }


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total and nonzero parameters; a parameter shared by several modules (tied embeddings) counts once."""
    params = list(model.parameters())  # `parameters()` yields each shared Parameter once
    return {
        "total": sum(p.numel() for p in params),
        "nonzero": sum(int(torch.count_nonzero(p)) for p in params),
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
