"""Apply a structure plan: physically remove the units (and sync the config), or zero them and return masks.

A plan is the inspectable result of scoring and selection: for each block the KV groups and neurons kept, and
optionally FLAP's bias compensation for the output projections. Removal of uniform widths rewrites the config
(heads, KV heads, head width, intermediate size) so that `from_pretrained` reloads the model; widths that differ
between blocks cannot be stated in a Hugging Face config, nor can fewer heads in a BERT config (its head width is
always hidden_size // heads), and `config_mismatch` says so before a save, which then lists the widths in the
manifest for `prunekit.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.adapters import Adapter
from prunekit.errors import PrunekitError
from prunekit.structure.groups import BlockLayout, head_channels, roles


@dataclass
class BlockPlan:
    """Kept KV groups and neurons of one block (sorted indices), and biases to add to o and down (compensation)."""

    kept_heads: torch.Tensor
    kept_neurons: torch.Tensor
    bias_delta: dict[str, torch.Tensor] = field(default_factory=dict)  # role 'attention' | 'mlp' -> [hidden]
    # role -> (weight [hidden, kept channels], bias [hidden] or None): the output projection re-fitted by least
    # squares on the kept channels (`structure.reconstruct`), replacing its kept columns (and bias)
    refit: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


def removed_indices(kept: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.zeros(size, dtype=torch.bool)
    keep[kept] = True
    return (~keep).nonzero().flatten()


def _slice(module: nn.Linear, dim: int, index: torch.Tensor) -> None:
    """Keep only `index` along the weight's dim 0 (output rows, with the bias) or dim 1 (input columns)."""
    index = index.to(module.weight.device)
    module.weight = nn.Parameter(module.weight.data.index_select(dim, index).clone(),
                                 requires_grad=module.weight.requires_grad)
    if dim == 0:
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.data.index_select(0, index).clone(),
                                       requires_grad=module.bias.requires_grad)
        module.out_features = len(index)
    else:
        module.in_features = len(index)


def _zero(module: nn.Linear, dim: int, index: torch.Tensor, mask: torch.Tensor) -> None:
    index = index.to(module.weight.device)
    module.weight.data.index_fill_(dim, index, 0)
    mask.index_fill_(dim, index.to(mask.device), False)
    if dim == 0 and module.bias is not None:
        module.bias.data.index_fill_(0, index, 0)


def _ensure_bias(module: nn.Linear) -> None:
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                               device=module.weight.device))


def _units(adapter: Adapter, block: nn.Module, plan: BlockPlan, layout: BlockLayout):
    """(module, dim, channels) of every tensor slice the removed units of one block own, and the kept ones."""
    r = roles(adapter)
    get = block.get_submodule
    kept_q, kept_kv = head_channels(plan.kept_heads, layout)
    kept_n = plan.kept_neurons
    gone_heads = removed_indices(plan.kept_heads, layout.kv_heads)
    gone_q, gone_kv = head_channels(gone_heads, layout)
    gone_n = removed_indices(kept_n, layout.neurons)
    return [
        (get(r.q), 0, kept_q, gone_q), (get(r.k), 0, kept_kv, gone_kv), (get(r.v), 0, kept_kv, gone_kv),
        (get(r.o), 1, kept_q, gone_q),
        *((get(name), 0, kept_n, gone_n) for name in r.mlp_in),
        (get(r.mlp_out), 1, kept_n, gone_n),
    ]


def missing_bias_parameters(model: nn.Module, adapter: Adapter, kinds: set[str]) -> int:
    """Parameters that `add_bias_flags` would add: the biases the projections of `kinds` do not have yet."""
    names = {"attention": adapter.attention, "mlp": adapter.mlp}
    return sum(block.get_submodule(name).out_features for kind in kinds for block in adapter.block_list(model)
               for name in names[kind] if block.get_submodule(name).bias is None)


def add_bias_flags(model: nn.Module, adapter: Adapter, kinds: set[str]) -> None:
    """Give every projection of each role in `kinds` a bias (zero where it had none) and set the config flag that
    makes `from_pretrained` build them (a family whose projections always have biases, BERT, has no flag)."""
    flags = dict(adapter.bias_flags)
    names = {"attention": adapter.attention, "mlp": adapter.mlp}
    for kind in kinds:
        if kind in flags:
            setattr(model.config, flags[kind], True)
        for block in adapter.block_list(model):
            for name in names[kind]:
                _ensure_bias(block.get_submodule(name))


def apply_plan(model: nn.Module, adapter: Adapter, layouts: list[BlockLayout], plans: list[BlockPlan], *,
               remove: bool) -> dict[str, torch.Tensor]:
    """Remove (or, with `remove=False`, zero) every unit not kept by `plans`, then add the compensation biases.

    Returns, when zeroing, a keep-mask per projection weight by parameter name (bool, the weight's layout), the
    form `prunekit.training.Masks` takes; {} when removing.
    """
    prefix = adapter.block_prefix(model)
    masks: dict[str, torch.Tensor] = {}
    for index, (block, layout, plan) in enumerate(zip(adapter.block_list(model), layouts, plans, strict=True)):
        masks.update(apply_block_plan(adapter, block, f"{prefix}.{index}", layout, plan, remove=remove))
    if remove:
        sync_config(model, adapter)
    return masks


def apply_block_plan(adapter: Adapter, block: nn.Module, name: str, layout: BlockLayout, plan: BlockPlan, *,
                     remove: bool) -> dict[str, torch.Tensor]:
    """`apply_plan` for one block (named `name` in the model), without the config rewrite."""
    r = roles(adapter)
    masks: dict[str, torch.Tensor] = {}
    outputs = {"attention": (block.get_submodule(r.o), head_channels(plan.kept_heads, layout)[0]),
               "mlp": (block.get_submodule(r.mlp_out), plan.kept_neurons)}
    for module, dim, kept, gone in _units(adapter, block, plan, layout):
        if remove:
            _slice(module, dim, kept)
        else:
            module_name = next(n for n, m in block.named_modules() if m is module)
            mask = torch.ones_like(module.weight, dtype=torch.bool)
            _zero(module, dim, gone, mask)
            masks[f"{name}.{module_name}.weight"] = mask
    for kind, (weight, bias) in plan.refit.items():
        out, kept = outputs[kind]
        columns = slice(None) if remove else kept.to(out.weight.device)
        out.weight.data[:, columns] = weight.to(out.weight.device, out.weight.dtype)
        if bias is not None:
            out.bias.data.copy_(bias)
    for kind, delta in plan.bias_delta.items():
        out = outputs[kind][0]
        out.bias.data += delta.to(out.bias.device, out.bias.dtype)
    return masks


def block_widths(model: nn.Module, adapter: Adapter) -> list[dict[str, int]]:
    """Query heads, KV heads and MLP neurons of every block, read from its tensors."""
    r = roles(adapter)
    head_dim = adapter.head_layout(model.config)["head_dim"]
    return [{"heads": block.get_submodule(r.q).out_features // head_dim,
             "kv_heads": block.get_submodule(r.k).out_features // head_dim,
             "neurons": block.get_submodule(r.mlp_out).in_features} for block in adapter.block_list(model)]


def sync_config(model: nn.Module, adapter: Adapter) -> None:
    """Rewrite heads, KV heads, head width and intermediate size when every block has the same widths.

    The head width is written explicitly: configs that derive it as hidden_size // heads would otherwise change
    it when the head count changes. A family whose attention always derives it (BERT) keeps its head count, and
    `config_mismatch` then reports the blocks' fewer heads, which the manifest states instead.
    """
    widths = block_widths(model, adapter)
    if any(w != widths[0] for w in widths):
        return
    config = model.config
    if adapter.head_dim_in_config:
        config.head_dim = adapter.head_layout(config)["head_dim"]
        setattr(config, adapter.heads, widths[0]["heads"])
        if adapter.kv_heads:
            setattr(config, adapter.kv_heads, widths[0]["kv_heads"])
    setattr(config, adapter.intermediate, widths[0]["neurons"])


def config_mismatch(model: nn.Module, adapter: Adapter) -> str | None:
    """Why the config does not describe the tensors (non-uniform widths after structured pruning), or None."""
    if adapter.intermediate is None:
        return None
    layout = adapter.head_layout(model.config)
    expected = {"heads": layout["heads"], "kv_heads": layout["kv_heads"],
                "neurons": getattr(model.config, adapter.intermediate)}
    for index, widths in enumerate(block_widths(model, adapter)):
        if widths != expected:
            return f"block {index} has {widths}, the config states {expected}"
    return None


def resize_to_widths(model: nn.Module, adapter: Adapter, widths: list[dict[str, int]]) -> None:
    """Give every block the projection shapes of `widths` (fresh, unloaded parameters), so that a model built from
    its config accepts the state dict saved from a model whose blocks were pruned to different widths."""
    blocks = adapter.block_list(model)
    # Pruning only shrinks, and keeps the number of query heads per KV head that the attention modules are built
    # with: anything else in a manifest is not prunekit's (and could ask for any amount of memory).
    layout = adapter.head_layout(model.config)
    largest = {"heads": layout["heads"], "kv_heads": layout["kv_heads"],
               "neurons": getattr(model.config, adapter.intermediate)}
    group = layout["heads"] // layout["kv_heads"]
    valid = isinstance(widths, list) and all(
        isinstance(w, dict) and set(w) == set(largest)
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= largest[k] for k, v in w.items())
        and w["heads"] == group * w["kv_heads"] for w in widths)
    if not valid or len(widths) != len(blocks):
        raise PrunekitError(f"the manifest's block widths do not describe this model's {len(blocks)} blocks of at "
                            f"most {largest} with {group} query heads per KV head")
    r = roles(adapter)
    head_dim = adapter.head_layout(model.config)["head_dim"]
    for block, width in zip(blocks, widths, strict=True):
        rows = {r.q: width["heads"] * head_dim, r.k: width["kv_heads"] * head_dim, r.v: width["kv_heads"] * head_dim,
                **dict.fromkeys(r.mlp_in, width["neurons"])}
        columns = {r.o: width["heads"] * head_dim, r.mlp_out: width["neurons"]}
        for name in (*rows, *columns):
            old = block.get_submodule(name)
            out_features = rows.get(name, old.out_features)
            in_features = columns.get(name, old.in_features)
            parent, _, attribute = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attribute,
                    nn.Linear(in_features, out_features, bias=old.bias is not None, dtype=old.weight.dtype,
                              device=old.weight.device))

