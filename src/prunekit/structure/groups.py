"""Coupled groups of a transformer block, declared from the adapter's roles (Hugging Face models do not trace).

Two kinds of unit are removed whole:
- an attention KV group: key/value head g with the query heads that share it (query heads g·G … g·G+G-1, the
  order in which `repeat_kv` expands key/value heads), i.e. those rows of q, k and v (and their biases) and those
  columns of o. Removing a KV head only together with all its query heads keeps every group the same size, so
  grouped-query attention stays valid. Query/key norms (Qwen3, Gemma 3, OLMo 2) act on one head's width and stay.
  Encoders without grouped-query attention (BERT) have groups of one query head.
- an MLP neuron: row j of every MLP input projection (gate and up; BERT's intermediate.dense) and column j of the
  output projection (down; BERT's output.dense).
The output projections' biases belong to the hidden dimension, which is not pruned, and stay whole.

The widths are read from each block's tensors, so a model whose blocks already differ is handled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.adapters import Adapter, adapter_for
from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class BlockLayout:
    """The prunable widths of one block and what one unit of each kind costs in parameters."""

    kv_heads: int
    group_size: int  # query heads per key/value head
    head_dim: int
    neurons: int
    head_cost: int  # parameters of one KV group: q, k, v rows, o columns and the row biases
    neuron_cost: int
    head_weights: int = 0  # the same without biases: multiply-accumulates per token of one KV group's projections
    neuron_weights: int = 0

    @property
    def prunable(self) -> int:
        return self.kv_heads * self.head_cost + self.neurons * self.neuron_cost


@dataclass(frozen=True)
class Roles:
    """Module names inside a block: q, k, v, o and the MLP input projections and output projection."""

    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str


def structure_adapter(model: nn.Module) -> Adapter:
    """The model's adapter, if its family declares what structured pruning needs; else a one-line error."""
    adapter = adapter_for(model)
    if adapter.intermediate is None or len(adapter.attention) != 4 or len(adapter.mlp) < 2:
        raise PrunekitError(
            f"structured pruning of the {adapter.family} family ({type(model).__name__}) is not supported yet; "
            "supported: Llama-style decoders (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, smollm3, "
            "olmo, olmo2) and BERT encoders (bert)")
    return adapter


def roles(adapter: Adapter) -> Roles:
    q, k, v, o = adapter.attention
    return Roles(q, k, v, o, tuple(adapter.mlp[:-1]), adapter.mlp[-1])


def _parameters(module: nn.Module, rows: bool) -> int:
    """Parameters of one output row (weight row and bias entry) or one input column of a Linear."""
    if rows:
        return module.in_features + (module.bias is not None)
    return module.out_features


def block_layout(adapter: Adapter, block: nn.Module, head_dim: int) -> BlockLayout:
    r = roles(adapter)
    get = block.get_submodule
    q, k, v, o = get(r.q), get(r.k), get(r.v), get(r.o)
    for module in (q, k, v, o, *(get(n) for n in (*r.mlp_in, r.mlp_out))):
        if not isinstance(module, nn.Linear):
            raise PrunekitError(f"structured pruning needs nn.Linear projections, got {type(module).__name__}")
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads * head_dim != q.out_features or kv_heads == 0 or heads % kv_heads:
        raise PrunekitError(f"attention of {q.out_features} query and {k.out_features} key features does not split "
                            f"into heads of width {head_dim}")
    group = heads // kv_heads
    head_cost = head_dim * (group * _parameters(q, True) + _parameters(k, True) + _parameters(v, True)
                            + group * _parameters(o, False))
    neuron_cost = sum(_parameters(get(n), True) for n in r.mlp_in) + _parameters(get(r.mlp_out), False)
    head_weights = head_dim * (group * (q.in_features + o.out_features) + k.in_features + v.in_features)
    neuron_weights = sum(get(n).in_features for n in r.mlp_in) + get(r.mlp_out).out_features
    return BlockLayout(kv_heads, group, head_dim, get(r.mlp_out).in_features, head_cost, neuron_cost,
                       head_weights, neuron_weights)


def mac_layouts(layouts: list[BlockLayout], seq_len: int) -> list[BlockLayout]:
    """The layouts with each unit's cost in multiply-accumulates of one `seq_len`-token forward pass instead of
    parameters, counted as `measure.speed.count_macs` counts them: every projection weight once per token (biases
    are additions), and per query head the q·kᵀ and attention·v products over the full square, 2·T²·head_dim."""
    return [dataclasses.replace(lay, head_cost=seq_len * lay.head_weights
                                + 2 * lay.group_size * seq_len ** 2 * lay.head_dim,
                                neuron_cost=seq_len * lay.neuron_weights) for lay in layouts]


def block_layouts(model: nn.Module, adapter: Adapter) -> list[BlockLayout]:
    blocks = adapter.block_list(model)
    hollow = [i for i, block in enumerate(blocks)
              if any(getattr(module, "removed_sublayer", False) for module in block.children())]
    if hollow:
        raise PrunekitError(f"blocks {hollow} have attention or MLP sublayers removed by depth pruning; structured "
                            "pruning needs every block whole, so remove structures first, then sublayers")
    head_dim = adapter.head_layout(model.config)["head_dim"]
    return [block_layout(adapter, block, head_dim) for block in adapter.block_list(model)]


def head_channels(kv_groups: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(query channels, key/value channels) of the given KV groups: rows of q (= columns of o), rows of k and v."""
    width = layout.group_size * layout.head_dim
    offsets = torch.arange(width)
    query = (kv_groups[:, None] * width + offsets).flatten()
    kv = (kv_groups[:, None] * layout.head_dim + torch.arange(layout.head_dim)).flatten()
    return query, kv
