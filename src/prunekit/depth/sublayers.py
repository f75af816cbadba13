"""Remove attention or MLP sublayers of pre-norm decoder blocks alone, leaving the rest of each block in place.

A removed sublayer is replaced by a parameter-free stand-in that adds nothing to the residual stream: the block
then computes x + 0 where it computed x + f(norm(x)) (Gemma 2/3 and OLMo 2 normalise the sublayer's output first,
and the norm of zeros is zero). The stand-ins are not Hugging Face modules, so a model with removed sublayers is
rebuilt by `prunekit.load` from the `removed_sublayers` of its manifest (`remove_sublayers`), not by
`from_pretrained`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from prunekit.adapters import adapter_for
from prunekit.depth.remove import replaced_forwards
from prunekit.errors import PrunekitError

SUBLAYERS = {"attention": "self_attn", "mlp": "mlp"}
"""Sublayer kind -> the module's name inside a block."""
SUBLAYER_FAMILIES = ("llama", "qwen3", "gemma2", "gemma3", "olmo2")
"""Adapter families whose blocks apply attention then MLP, each once on the residual stream, as `self_attn` and
`mlp` modules. OPT (projections directly in the block), GPT-2 and the parallel-residual GPT-NeoX and Phi are not
among them."""


class RemovedAttention(nn.Module):
    """Stands where a removed attention sublayer was: no parameters, output zero.

    With a KV cache it still appends a one-wide placeholder of zeros for every token: the model sizes the masks of
    a padded batch by the tokens held in the cache of the first layer of each attention type, which may be this
    one (Qwen 2's first sliding layer, say)."""

    removed_sublayer = True  # adapters list no projections here (`Adapter.projections`)

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # renumbered by remove_blocks like any attention's

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache")
        if cache is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None  # the decoder layer unpacks (output, attention weights)


class RemovedMLP(nn.Module):
    """Stands where a removed MLP sublayer was: no parameters, output zero."""

    removed_sublayer = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


_STAND_INS = {"attention": RemovedAttention, "mlp": RemovedMLP}


def _stand_in(kind: str, block: nn.Module) -> nn.Module:
    if kind == "attention":
        return RemovedAttention(block.get_submodule(SUBLAYERS[kind]).layer_idx)
    return RemovedMLP()


def check_sublayer_family(model: nn.Module) -> None:
    """Refuse a model whose blocks do not hold attention and MLP as separate sequential sublayers."""
    family = adapter_for(model).family
    if family not in SUBLAYER_FAMILIES:
        raise PrunekitError(f"sublayers of {family} models cannot be removed alone; remove whole blocks "
                            f"(unit='block'), or use a model of the families {', '.join(SUBLAYER_FAMILIES)}")


def removed_sublayers(model: nn.Module) -> dict[str, list[int]]:
    """The blocks whose attention or MLP sublayer has been removed, by kind ({} when none): what a manifest states
    so that `remove_sublayers` can rebuild the model."""
    if not any(isinstance(module, RemovedAttention | RemovedMLP) for module in model.modules()):
        return {}  # also for models that prunekit's adapters do not know
    blocks = adapter_for(model).block_list(model)
    found = {kind: [i for i, block in enumerate(blocks)
                    if isinstance(getattr(block, name, None), _STAND_INS[kind])]
             for kind, name in SUBLAYERS.items()}
    return {kind: indices for kind, indices in found.items() if indices}


def check_sublayer_removal(model: nn.Module, kind: str, removed: list[int]) -> None:
    """Refuse a removal that would not leave a usable model, before anything changes: a family without separate
    sublayers, an unknown kind, bad or repeated indices, a sublayer removed before, or block 0: prunekit's adapters
    recognise a model's layout by its first block's projections, so that block stays whole (and so one sublayer of
    each kind always remains).
    """
    if kind not in SUBLAYERS:
        raise PrunekitError(f"sublayer kind '{kind}' is unknown; use one of {', '.join(SUBLAYERS)}")
    check_sublayer_family(model)
    num_blocks = len(adapter_for(model).block_list(model))
    bad = [b for b in removed if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < num_blocks]
    if bad or len(set(removed)) != len(removed):
        raise PrunekitError(f"{kind} sublayers to remove {removed} must be distinct integers in [0, {num_blocks - 1}]")
    if 0 in removed:
        raise PrunekitError(f"the {kind} sublayer of block 0 cannot be removed (prunekit recognises a model by its "
                            f"first block); choose among blocks 1 to {num_blocks - 1}")
    already = removed_sublayers(model).get(kind, [])
    if set(already) & set(removed):
        raise PrunekitError(f"{kind} sublayers {sorted(set(already) & set(removed))} were removed before; remove "
                            f"others than {already}")


def remove_sublayers(model: nn.Module, removed: dict[str, list[int]] | None) -> None:
    """Replace the sublayers `removed` ({'attention': [block indices], 'mlp': [...]}) by parameter-free stand-ins,
    in place. Every part is checked before the model changes."""
    removed = removed or {}
    if not isinstance(removed, dict):
        raise PrunekitError(f"removed sublayers {removed!r} must map a kind ({', '.join(SUBLAYERS)}) to block indices")
    for kind, indices in removed.items():
        check_sublayer_removal(model, kind, list(indices))
    blocks = adapter_for(model).block_list(model)
    for kind, indices in removed.items():
        for index in indices:
            setattr(blocks[index], SUBLAYERS[kind], _stand_in(kind, blocks[index]))


def sublayer_parameters(model: nn.Module, kind: str) -> list[int]:
    """The parameter count of every block's `kind` sublayer (0 where removed)."""
    blocks = adapter_for(model).block_list(model)
    return [sum(p.numel() for p in block.get_submodule(SUBLAYERS[kind]).parameters()) for block in blocks]


def skipped_sublayers(model: nn.Module, kind: str, skipped: list[int]) -> contextlib.AbstractContextManager[None]:
    """While entered, the `kind` sublayers of the blocks `skipped` compute as their stand-ins do and add nothing
    (the model with them removed, as far as its outputs go). The modules stay in place, so the model keeps its
    layout; their own forwards are put back on exit."""
    blocks = adapter_for(model).block_list(model)
    return replaced_forwards([(blocks[i].get_submodule(SUBLAYERS[kind]), _stand_in(kind, blocks[i]).forward)
                              for i in skipped])
