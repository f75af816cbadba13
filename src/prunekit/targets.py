"""Which weights pruning targets: one definition for one-shot and training-time pruning.

For a model that an architecture adapter recognises (every Hugging Face decoder family in `prunekit.adapters`),
the targets are the projections inside the transformer blocks, as in the Wanda and SparseGPT papers: never the
embeddings or the LM head, tied or not. For any other network they are the weights of its Linear and Conv
layers, without the input and output embeddings a Hugging Face model declares.

Weights are named by their parameter names (`model.layers.0.self_attn.q_proj.weight`, `fc1.weight`), the names
of `named_parameters()` and `state_dict()`, and are the parameters themselves in their stored layout: GPT-2's
Conv1D keeps [in_features, out_features]. `projection_weights` gives the [out, in] views that row-wise and N:M
selection work on.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from prunekit.adapters import find_adapter, projection_weight
from prunekit.errors import PrunekitError

TARGET_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def mask_target(targets: dict[str, nn.Parameter], name: str) -> nn.Parameter:
    """The target weight a caller's keep-mask names (`targets` from `target_weights`), or a one-line error."""
    if name not in targets:
        raise PrunekitError(f"mask for {name!r} names no prunable weight of this model; weights look like "
                            f"{next(iter(targets), 'none')!r}")
    return targets[name]


def target_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights pruning targets by default, by parameter name (see the module docstring).

    A weight shared by several modules is listed once, under its first name.
    """
    adapter = find_adapter(model)
    if adapter is not None:
        prefix = adapter.block_prefix(model)
        return {
            f"{prefix}.{index}.{name}.weight": module.weight
            for index, block in enumerate(adapter.block_list(model))
            for name, module in adapter.projections(block).items()
        }
    seen = {id(weight) for weight in _embedding_weights(model)}
    found = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, TARGET_TYPES) and isinstance(weight, nn.Parameter) and id(weight) not in seen:
            seen.add(id(weight))
            found[f"{module_name}.weight" if module_name else "weight"] = weight
    return found


def projection_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """`target_weights` as [out_features, in_features] views of the same data (GPT-2's Conv1D transposed), for
    checks along rows and along the input dimension (N:M)."""
    return {
        name: projection_weight(model.get_submodule(name.rpartition(".")[0]))
        for name in target_weights(model)
    }


def _embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        # Hugging Face models without text embeddings (vision, speech backbones) raise NotImplementedError.
        with contextlib.suppress(NotImplementedError, AttributeError):
            module = getattr(model, getter)()
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                found.append(module.weight)
    return found
