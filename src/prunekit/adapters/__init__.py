"""Architecture adapters: one per family, chosen by the model's `config.model_type`."""

from __future__ import annotations

from torch import nn

from prunekit.adapters import bert, gpt2, gpt_neox, llama, moe, opt, phi
from prunekit.adapters.base import Adapter, is_conv1d, projection_weight, set_projection_weight
from prunekit.errors import PrunekitError

ADAPTERS: tuple[Adapter, ...] = (*llama.ADAPTERS, opt.ADAPTER, gpt2.ADAPTER, gpt_neox.ADAPTER, phi.ADAPTER,
                                 bert.ADAPTER, *moe.ADAPTERS)

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "find_adapter", "is_conv1d", "projection_weight",
           "set_projection_weight", "supported_model_types"]


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a model's family, checked against the model's actual modules."""
    adapter = find_adapter(model)
    if adapter is None:
        raise PrunekitError(
            f"{type(model).__name__} (model_type {_model_type(model)!r}) has no supported decoder blocks; supported "
            f"model types: {', '.join(supported_model_types())}"
        )
    return adapter


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def find_adapter(model: nn.Module) -> Adapter | None:
    """The adapter of a model's family, or None for a model type no adapter lists (any other network).

    A listed model type whose modules do not have the family's layout is an error, never a silent None.
    """
    model_type = _model_type(model)
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
    return None
