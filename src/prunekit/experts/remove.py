"""Select experts under a budget and remove them physically (router rows, expert tensors, config), optionally
merging each into its nearest kept neighbour first.

The config holds one expert count for every MoE layer (transformers builds each layer with `num_experts`), so every
layer loses the same number of experts; a per-layer count would not reload.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.adapters.moe import MoeAdapter, MoeLayer
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count


def removal_count(experts: int, top_k: int, remove: int | float) -> int:
    """The number of experts to remove from each layer: `remove` itself (an int) or that fraction of `experts`
    (a float in [0, 1)), refused when it leaves no expert or fewer experts than each token is routed to."""
    if isinstance(remove, bool) or not isinstance(remove, int | float):
        raise PrunekitError(f"remove={remove!r} must be a number of experts (int) or a fraction in [0, 1) (float)")
    if isinstance(remove, float):
        if not 0.0 <= remove < 1.0:
            raise PrunekitError(f"remove={remove} as a fraction of experts must lie in [0, 1); give an int for a "
                                "number of experts")
        count = fraction_count(experts, remove)
    else:
        count = remove
    if count < 0:
        raise PrunekitError(f"remove={remove} must not be negative")
    if count >= experts:
        raise PrunekitError(f"removing {count} of {experts} experts per layer leaves none; remove at most "
                            f"{experts - top_k} (top-k is {top_k})")
    if experts - count < top_k:
        raise PrunekitError(f"removing {count} of {experts} experts leaves {experts - count}, fewer than the "
                            f"{top_k} each token is routed to (top-k); remove at most {experts - top_k}")
    return count


def select_experts(scores: list[torch.Tensor], count: int) -> list[list[int]]:
    """The `count` lowest-scoring experts of every layer (ties go to the lower index), sorted."""
    return [sorted(torch.argsort(s, stable=True)[:count].tolist()) for s in scores]


def check_removal(adapter: MoeAdapter, model: nn.Module, removed: list[list[int]]) -> list[MoeLayer]:
    """Refuse a removal that the config could not state or that would not leave a usable model, before any change."""
    layers = adapter.moe_layers(model)
    config = model.config
    experts, top_k = getattr(config, adapter.num_experts), getattr(config, adapter.top_k)
    if len(removed) != len(layers):
        raise PrunekitError(f"expected one list of experts to remove per MoE layer ({len(layers)}), got "
                            f"{len(removed)}")
    counts = {len(r) for r in removed}
    if len(counts) != 1:
        raise PrunekitError(f"experts to remove per layer {[len(r) for r in removed]} differ; the config states one "
                            "expert count for all layers, so remove the same number from each")
    for layer, chosen in zip(layers, removed, strict=True):
        if layer.router.weight.shape[0] != experts or layer.experts.down_proj.shape[0] != experts:
            raise PrunekitError(f"layer {layer.index} holds {layer.router.weight.shape[0]} experts but the config "
                                f"states {experts}; prunekit removes experts only where they agree")
        bad = [e for e in chosen if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < experts]
        if bad or len(set(chosen)) != len(chosen):
            raise PrunekitError(f"experts to remove {chosen} in layer {layer.index} must be distinct integers in "
                                f"[0, {experts - 1}]")
    removal_count(experts, top_k, counts.pop())
    return layers


def _flat(layer: MoeLayer) -> torch.Tensor:
    """Each expert's weights as one vector [experts, ·] (gate, up and down)."""
    experts = layer.experts
    return torch.cat([experts.gate_up_proj.detach().flatten(1), experts.down_proj.detach().flatten(1)], dim=1)


def nearest_experts(layer: MoeLayer, removed: list[int]) -> dict[int, int]:
    """For each removed expert, the kept expert of the same layer whose weights have the highest cosine
    similarity to its own."""
    kept = [e for e in range(layer.router.weight.shape[0]) if e not in set(removed)]
    flat = F.normalize(_flat(layer).float(), dim=1)
    similarity = flat[removed] @ flat[kept].T
    return {e: kept[int(similarity[i].argmax())] for i, e in enumerate(removed)}


def _merge(layer: MoeLayer, removed: list[int], weights: torch.Tensor | None) -> dict[int, int]:
    """Fold every removed expert into its nearest kept neighbour: the neighbour becomes the average of itself and
    the experts folded into it, weighted by `weights` (routed-token counts, say; equal where None or all zero)."""
    targets = nearest_experts(layer, removed)
    experts = layer.experts
    for target in sorted(set(targets.values())):
        group = [target, *[e for e, t in targets.items() if t == target]]
        w = torch.ones(len(group), dtype=torch.float64) if weights is None else weights[group].double()
        if w.sum() <= 0:
            w = torch.ones(len(group), dtype=torch.float64)
        w = (w / w.sum()).to(experts.down_proj.dtype).to(experts.down_proj.device)
        for parameter in (experts.gate_up_proj, experts.down_proj):
            parameter.data[target] = torch.einsum("g,g...->...", w, parameter.data[group])
    return targets


def _keep_rows(module: nn.Module, name: str, kept: torch.Tensor) -> None:
    parameter = getattr(module, name)
    setattr(module, name, nn.Parameter(parameter.data[kept.to(parameter.device)].clone(),
                                       requires_grad=parameter.requires_grad))


def remove_experts(model: nn.Module, adapter: MoeAdapter, removed: list[list[int]], *, merge: bool = False,
                   merge_weights: list[torch.Tensor] | None = None) -> dict[int, dict[int, int]]:
    """Delete the experts `removed` (one list per MoE layer, indices before removal) in place: their router rows and
    their slices of the 3-D expert tensors, then rewrite the expert count in the config and the modules.

    With `merge`, each removed expert is first folded into its nearest kept neighbour (cosine of the weights),
    weighted by `merge_weights` (one tensor [experts] per layer) if given. Returns {block index: {removed expert:
    neighbour}} for a merge, else {}. Everything is checked before the model changes.
    """
    layers = check_removal(adapter, model, removed)
    if merge_weights is not None and len(merge_weights) != len(layers):
        raise PrunekitError(f"merge_weights holds {len(merge_weights)} tensors, not one per MoE layer "
                            f"({len(layers)})")
    merged: dict[int, dict[int, int]] = {}
    experts = layers[0].router.weight.shape[0]
    with torch.no_grad():
        for i, (layer, chosen) in enumerate(zip(layers, removed, strict=True)):
            if merge and chosen:
                merged[layer.index] = _merge(layer, chosen, None if merge_weights is None else merge_weights[i])
            kept = torch.tensor([e for e in range(experts) if e not in set(chosen)])
            _keep_rows(layer.router, "weight", kept)
            if getattr(layer.router, "bias", None) is not None:
                _keep_rows(layer.router, "bias", kept)
            _keep_rows(layer.experts, "gate_up_proj", kept)
            _keep_rows(layer.experts, "down_proj", kept)
            for module in (layer.router, layer.experts):
                module.num_experts = len(kept)
    remaining = experts - len(removed[0])
    setattr(model.config, adapter.num_experts, remaining)
    if isinstance(getattr(model, "num_experts", None), int):  # the CausalLM's own copy, for its auxiliary loss
        model.num_experts = remaining
    return merged
