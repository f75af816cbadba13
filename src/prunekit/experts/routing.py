"""Routing and per-expert statistics of mixture-of-experts decoders, counted over routed tokens only.

Every supported family routes the same way (see `prunekit.adapters.moe`): softmax over all experts, keep the top k,
renormalise the k weights when the family does. `route` reproduces it, so that the effect of masking or dropping an
expert can be computed without the model's own router. Statistics are gathered by forward hooks on the routers
and the experts modules during ordinary forward passes of the calibration batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import adapter_for
from prunekit.adapters.moe import MoeAdapter, MoeLayer, expert_weights
from prunekit.errors import PrunekitError


def moe_adapter(model: nn.Module) -> MoeAdapter:
    """The model's adapter, if its family routes tokens to experts; else a one-line error."""
    adapter = adapter_for(model)
    if not isinstance(adapter, MoeAdapter):
        raise PrunekitError(f"{type(model).__name__} (family {adapter.family}) has no experts; expert pruning needs a "
                            "mixture-of-experts model (mixtral, qwen2_moe, qwen3_moe, olmoe)")
    if not adapter.moe_layers(model):
        raise PrunekitError(f"{type(model).__name__} has no sparse MoE block (every layer is dense)")
    return adapter


def route(logits: torch.Tensor, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate weights [tokens, k], expert indices [tokens, k]) from router logits [tokens, experts]: softmax over
    all experts in float32, the k largest, rescaled to sum to one when `renormalise` (as the families' routers)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


def dropped_expert_outputs(layer: MoeLayer, hidden: torch.Tensor, logits: torch.Tensor, top_k: int,
                           renormalise: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The experts' output on `hidden` [tokens, hidden] with every expert available, and, for each expert e, the
    output when e is dropped: its logit masked to -inf, so its tokens go to the next-best experts (exactly what the
    model computes after `remove_experts` removes e)."""
    weights, indices = route(logits, top_k, renormalise)
    full = layer.experts(hidden, indices, weights)
    dropped = []
    for expert in range(logits.shape[-1]):
        masked = logits.clone()
        masked[:, expert] = float("-inf")
        weights, indices = route(masked, top_k, renormalise)
        dropped.append(layer.experts(hidden, indices, weights))
    return full, dropped


@dataclass
class RouterStats:
    """What one MoE layer's router did on the calibration tokens.

    counts[e]: tokens routed to expert e (each token counts once for each of its k experts).
    gate_sums[e]: the sum of e's gate weights over the tokens routed to it (after renormalisation, as the experts
        receive them).
    tokens: calibration tokens seen by the layer.
    drop_errors[e]: with `reconstruction`, the summed squared change of the layer's experts output, ‖Y − Y₋ₑ‖²,
        when expert e is dropped; else None.
    """

    index: int
    counts: torch.Tensor
    gate_sums: torch.Tensor
    tokens: int
    drop_errors: torch.Tensor | None = None

    @property
    def frequency(self) -> torch.Tensor:
        """The fraction of tokens routed to each expert (sums to k over the experts)."""
        return self.counts.double() / max(self.tokens, 1)

    @property
    def mean_gate(self) -> torch.Tensor:
        """Each expert's mean gate weight over the tokens routed to it (0 for an expert no token reached)."""
        return self.gate_sums / self.counts.clamp(min=1).double()


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward_batches(model: nn.Module, token_ids: torch.Tensor, batch_size: int, progress: bool, desc: str) -> None:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(token_ids.split(batch_size), desc=desc, unit="batch", disable=not progress):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        model.train(was_training)


def router_statistics(model: nn.Module, token_ids: torch.Tensor, *, batch_size: int = 8,
                      reconstruction: bool = False, progress: bool = False) -> list[RouterStats]:
    """Per-expert routing statistics of every MoE layer on the calibration `token_ids` [samples, length].

    Counted from what each router returns (its chosen experts and their gate weights), so only routed tokens count.
    `reconstruction` also measures, per layer on that layer's own inputs, how much the experts' output changes when
    each expert is dropped (one extra experts pass per expert).
    """
    adapter = moe_adapter(model)
    config = model.config
    top_k, renormalise = getattr(config, adapter.top_k), adapter.renormalises(config)
    stats: list[RouterStats] = []
    handles = []
    for layer in adapter.moe_layers(model):
        experts = layer.router.weight.shape[0]
        entry = RouterStats(layer.index, torch.zeros(experts, dtype=torch.long),
                            torch.zeros(experts, dtype=torch.float64), 0,
                            torch.zeros(experts, dtype=torch.float64) if reconstruction else None)
        stats.append(entry)

        def hook(module, args, output, entry=entry, layer=layer):
            logits, weights, indices = output
            entry.tokens += logits.shape[0]
            entry.counts += torch.bincount(indices.reshape(-1).cpu(), minlength=len(entry.counts))
            entry.gate_sums.index_add_(0, indices.reshape(-1).cpu(), weights.reshape(-1).double().cpu())
            if entry.drop_errors is not None:
                hidden = args[0].reshape(-1, args[0].shape[-1])
                full, dropped = dropped_expert_outputs(layer, hidden, logits, top_k, renormalise)
                for expert, out in enumerate(dropped):
                    entry.drop_errors[expert] += (full - out).double().pow(2).sum().cpu()

        handles.append(layer.router.register_forward_hook(hook))
    with _hooks(handles):
        _forward_batches(model, token_ids, batch_size, progress, "router statistics")
    return stats


@dataclass
class ExpertInputs:
    """Squared input norms of every expert's projections over the tokens routed to it, per input feature.

    hidden_sq[e], hidden_gated_sq[e]: Σ x² and Σ (g·x)² over e's routed tokens of the hidden states entering
        e's gate and up projections ([experts, hidden]); g is the token's gate weight for e.
    inner_sq[e], inner_gated_sq[e]: the same for the input of e's down projection, act(gate x) ⊙ up x
        ([experts, intermediate]).
    counts[e]: tokens routed to e.
    hidden_gram[e], inner_gram[e]: only when asked for (SparseGPT), XᵀX over e's routed tokens of the same two
        inputs ([experts, hidden, hidden] and [experts, intermediate, intermediate], float32).
    """

    index: int
    hidden_sq: torch.Tensor
    hidden_gated_sq: torch.Tensor
    inner_sq: torch.Tensor
    inner_gated_sq: torch.Tensor
    counts: torch.Tensor
    hidden_gram: torch.Tensor | None = None
    inner_gram: torch.Tensor | None = None


def new_expert_inputs(layer: MoeLayer, *, gram: bool = False) -> ExpertInputs:
    """Empty `ExpertInputs` for one MoE layer; with `gram`, also every expert's two input Gram matrices."""
    experts, hidden, inner = layer.experts.down_proj.shape
    grams = [torch.zeros(experts, width, width) for width in (hidden, inner)] if gram else [None, None]
    return ExpertInputs(layer.index, *(torch.zeros(experts, width, dtype=torch.float64)
                                       for width in (hidden, hidden, inner, inner)),
                        torch.zeros(experts, dtype=torch.long), *grams)


def record_expert_inputs(layer: MoeLayer, entry: ExpertInputs):
    """Install a forward pre-hook on the layer's experts module (which receives every token's routed expert indices
    and gate weights) that adds each batch to `entry`; returns the hook's handle."""

    def hook(module, args):
        hidden_states, indices, weights = args[:3]
        for expert in range(module.down_proj.shape[0]):
            tokens, slot = torch.where(indices == expert)
            if not len(tokens):
                continue
            x = hidden_states[tokens].double()
            gate = weights[tokens, slot].double().unsqueeze(-1)
            w = expert_weights(module, expert)
            h = module.act_fn(x @ w["gate"].double().T) * (x @ w["up"].double().T)
            entry.hidden_sq[expert] += x.pow(2).sum(0).cpu()
            entry.hidden_gated_sq[expert] += (gate * x).pow(2).sum(0).cpu()
            entry.inner_sq[expert] += h.pow(2).sum(0).cpu()
            entry.inner_gated_sq[expert] += (gate * h).pow(2).sum(0).cpu()
            entry.counts[expert] += len(tokens)
            if entry.hidden_gram is not None:
                entry.hidden_gram[expert] += (x.T @ x).float().cpu()
                entry.inner_gram[expert] += (h.T @ h).float().cpu()

    return layer.experts.register_forward_pre_hook(hook)


def expert_input_statistics(model: nn.Module, token_ids: torch.Tensor, *, batch_size: int = 8,
                            progress: bool = False, gram: bool = False) -> list[ExpertInputs]:
    """`ExpertInputs` of every MoE layer of the model as it is, on the calibration `token_ids` (with `gram`, the
    Gram matrices too)."""
    layers = moe_adapter(model).moe_layers(model)
    stats = [new_expert_inputs(layer, gram=gram) for layer in layers]
    with _hooks([record_expert_inputs(layer, entry) for layer, entry in zip(layers, stats, strict=True)]):
        _forward_batches(model, token_ids, batch_size, progress, "expert input statistics")
    return stats
