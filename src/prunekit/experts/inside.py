"""Weights inside experts: unstructured pruning of each expert's gate, up and down projections on its routed tokens.

MoE-Pruner (Xie et al. 2024) scores a weight by |W_ij|·‖X_j ⊙ g‖₂, the input feature's norm over the tokens routed
to the expert with each token scaled by its gate weight g (Eq. 3), and compares scores within each output row;
Wanda (Sun et al. 2024) is the same with g = 1, here counted over the expert's routed tokens only. SparseGPT (Frantar
& Alistarh 2023) prunes each expert's projections with its OBS weight update, from the Gram matrix XᵀX of the
expert's routed tokens; gate and up share one column sweep. An expert that no calibration token reached has no
Gram matrix: it is pruned with the identity in its place (magnitude pruning, no update).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters.moe import expert_weights
from prunekit.budget import parse_pattern
from prunekit.errors import PrunekitError
from prunekit.experts.routing import ExpertInputs, moe_adapter, new_expert_inputs, record_expert_inputs
from prunekit.inputs import compute_device
from prunekit.select import row_mask
from prunekit.weights.engine import _tensors_on, capture_block_inputs, run_block
from prunekit.weights.scores import wanda_scores
from prunekit.weights.sparsegpt import sparsegpt_prune

INSIDE_METHODS = {
    "moe_pruner": "|W|·‖X ⊙ g‖₂ over the expert's routed tokens, g the gate weight (MoE-Pruner)",
    "wanda": "|W|·‖X‖₂ over the expert's routed tokens (Wanda)",
    "sparsegpt": "SparseGPT's mask and weight update from XᵀX of the expert's routed tokens",
}
SPARSEGPT_BLOCKSIZE, SPARSEGPT_DAMPING = 128, 0.01


def check_inside_options(method: str, sparsity: float) -> None:
    if method not in INSIDE_METHODS:
        raise PrunekitError(f"unknown method {method!r} for weights inside experts; choose one of "
                            f"{', '.join(INSIDE_METHODS)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
        raise PrunekitError(f"sparsity={sparsity!r} must be a fraction in [0, 1)")


def moe_pruner_scores(weight: torch.Tensor, gated_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j ⊙ g‖₂ (MoE-Pruner, Eq. 3) for a [out, in] weight and the gate-scaled input norms [in]."""
    return weight.abs().float() * gated_norms.float().unsqueeze(0)


def expert_masks(weights: dict[str, torch.Tensor], inputs: ExpertInputs, expert: int, method: str,
                 sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks [out, in] of one expert's `gate`, `up` and `down` weights: the same fraction of each output row
    removed, lowest scores first."""
    gated = method == "moe_pruner"
    hidden = (inputs.hidden_gated_sq if gated else inputs.hidden_sq)[expert].sqrt()
    inner = (inputs.inner_gated_sq if gated else inputs.inner_sq)[expert].sqrt()
    score = moe_pruner_scores if gated else wanda_scores
    return {name: row_mask(score(w, hidden if name != "down" else inner), sparsity) for name, w in weights.items()}


def prune_expert_weights(model: nn.Module, token_ids: torch.Tensor, *, method: str = "moe_pruner",
                         sparsity: float = 0.5, batch_size: int = 8, device: str | torch.device | None = None,
                         progress: bool = False) -> dict[str, torch.Tensor]:
    """Zero `sparsity` of every expert's weights in each output row (moe_pruner, wanda; sparsegpt: of each
    projection, chosen per block of columns, with the remaining weights updated), by `method` on the calibration
    `token_ids`, in place. Returns the keep-masks by parameter name, in the parameters' own 3-D layout
    ([experts, 2·intermediate, hidden] and [experts, hidden, intermediate]).

    Runs through the sequential engine (`prunekit.weights.engine`): each block is calibrated on the outputs of the
    already pruned blocks before it, with one block on `device` (default: where the model is) at a time. An expert
    no calibration token reached has all-zero norms, so its scores tie and the lowest indices of each row go.
    """
    check_inside_options(method, sparsity)
    adapter = moe_adapter(model)
    blocks = adapter.block_list(model)
    layers = {layer.index: layer for layer in adapter.moe_layers(model)}
    compute = compute_device(model, device)
    activations = torch.device("cpu") if next(model.parameters()).device.type == "cpu" else compute
    prefix = adapter.block_prefix(model)
    masks: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, blocks, token_ids, batch_size=batch_size, device=compute,
                                      activation_device=activations)
        for index, block in enumerate(tqdm(blocks, desc="experts' weights", unit="block", disable=not progress)):
            tensors = _tensors_on(block, compute)
            if index in layers:
                layer = layers[index]
                entry = new_expert_inputs(layer, gram=method == "sparsegpt")
                handle = record_expert_inputs(layer, entry)
                try:
                    run_block(block, index, inputs, compute, tensors)
                finally:
                    handle.remove()
                base = f"{prefix}.{index}.{adapter.moe}.{adapter.experts}"
                masks.update({f"{base}.{name}": keep for name, keep in _prune_layer(layer, entry, method,
                                                                                      sparsity).items()})
                tensors = _tensors_on(block, compute)  # the pruned weights
            inputs = run_block(block, index, inputs, compute, tensors)
    finally:
        model.train(was_training)
    return masks


def _prune_layer(layer, inputs: ExpertInputs, method: str, sparsity: float) -> dict[str, torch.Tensor]:
    experts = layer.experts
    gate_up = torch.ones_like(experts.gate_up_proj, dtype=torch.bool)
    down = torch.ones_like(experts.down_proj, dtype=torch.bool)
    with torch.no_grad():
        for expert in range(experts.down_proj.shape[0]):
            if method == "sparsegpt":
                keep = _sparsegpt_expert(experts, inputs, expert, sparsity)
            else:
                keep = expert_masks(expert_weights(experts, expert), inputs, expert, method, sparsity)
            gate_up[expert] = torch.cat([keep["gate"], keep["up"]], dim=0).to(gate_up.device)
            down[expert] = keep["down"].to(down.device)
        experts.gate_up_proj.data.mul_(gate_up)
        experts.down_proj.data.mul_(down)
    return {"gate_up_proj": gate_up, "down_proj": down}


def _sparsegpt_expert(experts: nn.Module, inputs: ExpertInputs, expert: int, sparsity: float) -> dict:
    """SparseGPT on one expert, in place: gate and up (stacked, one sweep, each at `sparsity`), then down."""
    pattern = parse_pattern(None)
    routed = int(inputs.counts[expert]) > 0
    keep = {}
    for names, gram, parameter in ((("gate", "up"), inputs.hidden_gram, experts.gate_up_proj),
                                   (("down",), inputs.inner_gram, experts.down_proj)):
        weight = parameter.data[expert]
        hessian = gram[expert] if routed else torch.eye(weight.shape[1])
        updated, mask = sparsegpt_prune(weight, hessian.to(weight.device), sparsity=sparsity, pattern=pattern,
                                        blocksize=SPARSEGPT_BLOCKSIZE, damping=SPARSEGPT_DAMPING,
                                        row_groups=[weight.shape[0] // len(names)] * len(names))
        weight.copy_(updated.to(weight.dtype))
        for name, part in zip(names, mask.chunk(len(names)), strict=True):
            keep[name] = part
    return keep
