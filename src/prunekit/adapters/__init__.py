"""Architecture adapters: one per family, chosen by the model's `config.model_type`."""

from __future__ import annotations

from torch import nn

from prunekit.adapters import gpt2, gpt_neox, llama, opt, phi
from prunekit.adapters.base import Adapter, is_conv1d, projection_weight, set_projection_weight
from prunekit.errors import PrunekitError

ADAPTERS: tuple[Adapter, ...] = (llama.ADAPTER, opt.ADAPTER, gpt2.ADAPTER, gpt_neox.ADAPTER, phi.ADAPTER)

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "is_conv1d", "projection_weight", "set_projection_weight"]


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a model's family, checked against the model's actual modules."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            try:
                blocks = adapter.block_list(model)
                adapter.projections(blocks[0])
            except (LookupError, AttributeError, IndexError) as exc:
                raise PrunekitError(
                    f"{type(model).__name__} (model_type '{model_type}') does not have the {adapter.family} "
                    f"layout prunekit expects: {exc}"
                ) from None
            return adapter
    raise PrunekitError(
        f"{type(model).__name__} (model_type {model_type!r}) has no supported decoder blocks; supported model "
        f"types: {', '.join(supported_model_types())}"
    )
