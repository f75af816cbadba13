"""Remove whole transformer blocks so that the model stays a standard, loadable Hugging Face model.

After removal the block list, the config (`num_hidden_layers`, which GPT-2-style configs map to `n_layer` through
their `attribute_map`, and every per-layer list) and the layer index each block uses to address the KV cache all
describe the remaining blocks, renumbered 0..L'-1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

from prunekit.adapters import adapter_for
from prunekit.errors import PrunekitError

PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
"""Config fields holding one entry per block (Gemma 2/3, Qwen 2/3, SmolLM3 `layer_types`; SmolLM3 `no_rope_layers`).
The tests check that no supported family has any other list of one entry per block."""


def check_removal(model: nn.Module, removed: list[int]) -> None:
    """Refuse a removal that would not leave a usable model, before anything changes."""
    blocks = adapter_for(model).block_list(model)
    config = model.config
    if config.num_hidden_layers != len(blocks):
        raise PrunekitError(f"config.num_hidden_layers is {config.num_hidden_layers} but the model has {len(blocks)} "
                            "blocks; prunekit removes blocks only from a model whose config agrees with its blocks")
    bad = [b for b in removed if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(blocks)]
    if bad or len(set(removed)) != len(removed):
        raise PrunekitError(f"blocks to remove {removed} must be distinct integers in [0, {len(blocks) - 1}]")
    if len(removed) >= len(blocks):
        raise PrunekitError(f"removing {len(removed)} of {len(blocks)} blocks leaves none; remove at most "
                            f"{len(blocks) - 1}")
    shifted = removed and min(removed) < len(blocks) - len(removed)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and shifted:
        # GPT-2 scales attention by 1/(layer_idx+1), fixed from the config when the model is built: a renumbered
        # block would be rebuilt with another scale, so only the deepest blocks can go.
        raise PrunekitError(f"this model scales attention by its layer index (scale_attn_by_inverse_layer_idx), "
                            f"so removing blocks {sorted(removed)} would change the blocks after them when reloaded; "
                            f"only the last blocks can be removed")


def remove_blocks(model: nn.Module, removed: list[int]) -> None:
    """Delete the blocks `removed` (indices into the current block list) in place and renumber the rest."""
    check_removal(model, removed)
    blocks = adapter_for(model).block_list(model)
    config = model.config
    kept = [i for i in range(len(blocks)) if i not in set(removed)]
    for index in sorted(removed, reverse=True):
        del blocks[index]  # ModuleList renumbers its children, so state-dict names stay 0..L'-1
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            # the attention's (and Gemma 3's block's own) index of its slot in the KV cache
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    for field in PER_LAYER_LISTS:
        values = getattr(config, field, None)
        if values is not None:
            setattr(config, field, [values[i] for i in kept])
    if getattr(config, "mlp_only_layers", None) is not None:
        # Qwen MoE: block i has a dense MLP if i is in mlp_only_layers or (i + 1) is not a multiple of
        # decoder_sparse_step; the kept blocks' kinds are listed explicitly, since the step rule would not survive
        # renumbering
        step = getattr(config, "decoder_sparse_step", 1) or 1
        dense = {i for i in range(len(blocks) + len(removed))
                 if i in set(config.mlp_only_layers) or (i + 1) % step != 0}
        config.mlp_only_layers = [new for new, old in enumerate(kept) if old in dense]
        config.decoder_sparse_step = 1
    if getattr(config, "max_window_layers", None) is not None:
        # Qwen: the first max_window_layers blocks use full attention; as many of them remain as were kept
        config.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)
    config.num_hidden_layers = len(kept)


def _identity(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def replaced_forwards(replacements: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """While entered, each module computes with the forward paired with it; the modules' own forwards (an instance
    attribute, if one was set, or the class's) are put back on exit."""
    saved = [(module, vars(module).get("forward")) for module, _ in replacements]
    try:
        for module, forward in replacements:
            module.forward = forward
        yield
    finally:
        for module, forward in saved:
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def skipped_blocks(model: nn.Module, skipped: list[int]) -> contextlib.AbstractContextManager[None]:
    """While entered, the blocks `skipped` pass their input hidden states on unchanged (the model with those blocks
    removed, as far as its outputs go; nothing is cached for them). The blocks' own forwards are put back on exit."""
    blocks = adapter_for(model).block_list(model)
    return replaced_forwards([(blocks[i], _identity) for i in skipped])
