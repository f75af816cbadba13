"""What an architecture adapter says: where the blocks, projections, norms and head layout of a family live.

Nothing outside the adapters names model internals such as `model.layers`. Adding a family is one short file
that defines an `Adapter` and is listed in `prunekit.adapters.ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    """The layout of one architecture family.

    blocks: dotted path of the ModuleList of transformer blocks, from the task model (e.g. `model.layers` for
        LlamaForCausalLM); a bare base model (LlamaModel) is found by dropping leading parts of the path.
    attention, mlp: projections inside one block, in forward order.
    norms: every normalisation layer inside one block (pre- and post-norms, query and key norms), for the
        structural edits that must follow a pruned hidden or head dimension into them.
    heads, kv_heads: config attributes of the head counts (kv_heads None: as many key/value heads as heads);
        `head_layout` reads them with the head width.
    shared_inputs: groups of projections that read the same input tensor (q, k, v), so calibration statistics
        are gathered once per group.
    intermediate: config attribute of the MLP width, rewritten after MLP neurons are removed; None where the family
        does not declare the roles that structured pruning (`prunekit.structure`) needs.
    bias_flags: (role, config attribute) pairs: setting the attribute True gives every projection of the role
        ('attention' or 'mlp') a bias, so biases added by structured pruning (FLAP compensation) reload; a config
        without the attribute cannot hold them.
    head_dim_in_config: the attention modules read `config.head_dim`, so a config can state fewer heads of the same
        width; False where the width is always hidden_size // heads (BERT).
    causal: the blocks attend only to earlier tokens, so the model predicts the next token and has a perplexity;
        False for bidirectional encoders (BERT), measured by `prunekit.measure.embedding` instead.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    norms: tuple[str, ...]
    heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    intermediate: str | None = None
    bias_flags: tuple[tuple[str, str], ...] = ()
    head_dim_in_config: bool = True
    causal: bool = True

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        parts = self.blocks.split(".")
        for skip in range(len(parts)):
            try:
                found = model.get_submodule(".".join(parts[skip:]))
            except AttributeError:
                continue
            if isinstance(found, nn.ModuleList):
                return found
        raise LookupError(f"no '{self.blocks}' block list in {type(model).__name__}")

    def block_prefix(self, model: nn.Module) -> str:
        """The dotted name of the block list inside `model`, for naming layers in reports."""
        blocks = self.block_list(model)
        return next(name for name, module in model.named_modules() if module is blocks)

    def projections(self, block: nn.Module) -> dict[str, nn.Module]:
        """The prunable projections of one block, by their name inside the block, in forward order. A sublayer
        that depth pruning removed (a stand-in marked `removed_sublayer`) has none."""
        gone = {name for name, module in block.named_children() if getattr(module, "removed_sublayer", False)}
        return {name: block.get_submodule(name) for name in (*self.attention, *self.mlp)
                if name.partition(".")[0] not in gone}

    def head_layout(self, config) -> dict[str, int]:
        """Heads, key/value heads and head width of a model's config (what coupled head pruning must respect)."""
        heads = getattr(config, self.heads)
        kv = getattr(config, self.kv_heads, None) if self.kv_heads else None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return {"heads": heads, "kv_heads": kv or heads, "head_dim": head_dim}


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear."""
    return type(module).__name__ == "Conv1D"


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], a view of the parameter's data."""
    return module.weight.data.t() if is_conv1d(module) else module.weight.data


def set_projection_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a [out, in] weight back in place, in the module's own layout and dtype."""
    projection_weight(module).copy_(weight)
