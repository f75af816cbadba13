"""Expert importance scores, one tensor [experts] per MoE layer; higher means more important (kept first).

Scorers never know how their scores are selected (`prunekit.experts.remove.select_experts` does that).
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.experts.routing import RouterStats, moe_adapter

CRITERIA = {
    "frequency": "fraction of calibration tokens routed to the expert",
    "gate": "mean gate weight over the tokens routed to the expert",
    "reconstruction": "squared change of the layer's experts output when the expert is dropped (re-routed)",
    "router_norm": "change of the expert's router-row L2 norm from a pretrained checkpoint (Chowdhury et al. 2024)",
    "random": "uniform random scores, seeded (the baseline)",
}
CALIBRATED = ("frequency", "gate", "reconstruction")


def check_criterion(criterion: str, pretrained: nn.Module | None) -> None:
    if criterion not in CRITERIA:
        raise PrunekitError(f"unknown expert criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion == "router_norm" and pretrained is None:
        raise PrunekitError("criterion 'router_norm' needs the pretrained model the fine-tuned one started from "
                            "(pretrained=...)")


def statistic_scores(stats: list[RouterStats], criterion: str) -> list[torch.Tensor]:
    """Scores from router statistics: routing frequency, mean gate weight, or drop reconstruction error."""
    if criterion == "frequency":
        return [s.frequency for s in stats]
    if criterion == "gate":
        return [s.mean_gate for s in stats]
    if criterion == "reconstruction":
        if any(s.drop_errors is None for s in stats):
            raise PrunekitError("criterion 'reconstruction' needs statistics gathered with reconstruction=True")
        return [s.drop_errors.clone() for s in stats]
    raise PrunekitError(f"criterion {criterion!r} is not computed from router statistics; those are "
                        f"{', '.join(CALIBRATED)}")


def router_norm_scores(tuned: nn.Module, pretrained: nn.Module) -> list[torch.Tensor]:
    """‖w_e^tuned‖₂ − ‖w_e^pretrained‖₂ for each expert's router row (Chowdhury et al. 2024, "A Provably Effective
    Method for Pruning Experts in Fine-tuned Sparse Mixture-of-Experts"): experts whose router norm grew least
    during fine-tuning are pruned first."""
    tuned_layers = moe_adapter(tuned).moe_layers(tuned)
    base_layers = moe_adapter(pretrained).moe_layers(pretrained)
    if [(layer.index, layer.router.weight.shape) for layer in tuned_layers] != \
            [(layer.index, layer.router.weight.shape) for layer in base_layers]:
        raise PrunekitError("the pretrained model's routers differ in number or shape from the fine-tuned model's; "
                            "give the checkpoint the fine-tuned model started from")
    return [t.router.weight.detach().float().norm(dim=1).cpu() - b.router.weight.detach().float().norm(dim=1).cpu()
            for t, b in zip(tuned_layers, base_layers, strict=True)]


def random_scores(model: nn.Module, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(layer.router.weight.shape[0], generator=generator)
            for layer in moe_adapter(model).moe_layers(model)]
