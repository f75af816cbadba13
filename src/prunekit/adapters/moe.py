"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (transformers 5 layout).

Their blocks are Llama-style, with the MLP replaced by a sparse MoE block (`mlp`) holding a router (`mlp.gate`, a
weight of [experts, hidden] giving one logit per expert) and the experts stored together as 3-D parameters
(`mlp.experts.gate_up_proj` [experts, 2·intermediate, hidden], gate rows first, and `mlp.experts.down_proj`
[experts, hidden, intermediate]). Every family's router takes the softmax over all experts, keeps the top k, and
renormalises the k weights to sum to one (Mixtral always, the others when `norm_topk_prob` is set); Qwen2-MoE adds
a shared expert, a plain gated MLP every token passes through, scaled by sigmoid(`shared_expert_gate`).

`projections` lists only plain Linear projections (attention, the shared expert, and the dense MLP of the layers
Qwen's `mlp_only_layers` keeps dense), so weight pruning through the dense roles reaches no expert; the experts are
addressed as units through `moe_layers` and `expert_weights` (see `prunekit.experts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.adapters.base import Adapter

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


@dataclass(frozen=True)
class MoeLayer:
    """One sparse MoE block: its block index, the MoE module, its router, its experts, and the modules every token
    passes through besides them (Qwen2-MoE's shared expert and its gate; none elsewhere)."""

    index: int
    moe: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: tuple[nn.Module, ...] = ()


@dataclass(frozen=True)
class MoeAdapter(Adapter):
    """An `Adapter` whose blocks route tokens to experts.

    moe, router, experts: dotted paths of the sparse MoE block inside a decoder block, and of its router and
        experts inside the MoE block.
    shared: modules of the MoE block that every token passes through (Qwen2-MoE's shared expert and its gate).
    num_experts, top_k, expert_intermediate: config attributes of the number of experts, of the experts each token
        is routed to, and of one expert's width.
    normalise_flag: config attribute that makes the router renormalise its top-k weights; None where it always
        does (Mixtral).
    """

    moe: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared: tuple[str, ...] = ()
    num_experts: str = "num_experts"
    top_k: str = "num_experts_per_tok"
    expert_intermediate: str = "intermediate_size"
    normalise_flag: str | None = "norm_topk_prob"

    def projections(self, block: nn.Module) -> dict[str, nn.Module]:
        """The plain Linear projections of one block (attention, shared expert, dense MLP where the block has one),
        by name inside the block, in forward order; the experts are not among them."""
        found = {}
        for name in (*self.attention, *self.mlp):
            try:
                found[name] = block.get_submodule(name)
            except AttributeError:
                if name.split(".")[0] != self.moe:  # the attention must be there; an MLP role may not be
                    raise
        return found

    def moe_layers(self, model: nn.Module) -> list[MoeLayer]:
        """The sparse MoE blocks of a model, in block order (Qwen's dense `mlp_only_layers` are skipped)."""
        layers = []
        for index, block in enumerate(self.block_list(model)):
            moe = block.get_submodule(self.moe)
            if hasattr(moe, self.experts):
                layers.append(MoeLayer(index, moe, moe.get_submodule(self.router), moe.get_submodule(self.experts),
                                       tuple(moe.get_submodule(name) for name in self.shared)))
        return layers

    def renormalises(self, config) -> bool:
        """Whether the router rescales its top-k weights to sum to one."""
        return True if self.normalise_flag is None else bool(getattr(config, self.normalise_flag))


def expert_weights(experts: nn.Module, expert: int) -> dict[str, torch.Tensor]:
    """Expert `expert`'s projections as [out, in] views of the stored 3-D parameters: `gate` and `up`
    [intermediate, hidden] (the two halves of `gate_up_proj`, gate first) and `down` [hidden, intermediate]."""
    gate, up = experts.gate_up_proj.data[expert].chunk(2, dim=0)
    return {"gate": gate, "up": up, "down": experts.down_proj.data[expert]}


MIXTRAL = MoeAdapter(
    family="mixtral", model_types=("mixtral",), blocks="model.layers", attention=ATTENTION, mlp=(), norms=NORMS,
    num_experts="num_local_experts", normalise_flag=None)
QWEN2_MOE = MoeAdapter(
    family="qwen2_moe", model_types=("qwen2_moe",), blocks="model.layers", attention=ATTENTION,
    mlp=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj", *DENSE_MLP),
    norms=NORMS, shared=("shared_expert", "shared_expert_gate"), expert_intermediate="moe_intermediate_size")
QWEN3_MOE = MoeAdapter(
    family="qwen3_moe", model_types=("qwen3_moe",), blocks="model.layers", attention=ATTENTION, mlp=DENSE_MLP,
    norms=NORMS + QK_NORMS, num_experts="num_local_experts", expert_intermediate="moe_intermediate_size")
OLMOE = MoeAdapter(
    family="olmoe", model_types=("olmoe",), blocks="model.layers", attention=ATTENTION, mlp=(),
    norms=NORMS + QK_NORMS)

ADAPTERS = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)
