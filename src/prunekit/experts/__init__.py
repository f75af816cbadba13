"""Mixture-of-experts pruning: whole experts by router statistics, reconstruction error or router-norm change
(removed or merged into a neighbour), and weights inside experts on their routed tokens (MoE-Pruner, Wanda)."""

from prunekit.experts.api import expert_tensors, prune_experts, prune_inside_experts
from prunekit.experts.criteria import CRITERIA, router_norm_scores, statistic_scores
from prunekit.experts.inside import INSIDE_METHODS, moe_pruner_scores, prune_expert_weights
from prunekit.experts.remove import nearest_experts, removal_count, remove_experts, select_experts
from prunekit.experts.routing import (
    ExpertInputs,
    RouterStats,
    expert_input_statistics,
    moe_adapter,
    route,
    router_statistics,
)

__all__ = ["CRITERIA", "INSIDE_METHODS", "ExpertInputs", "RouterStats", "expert_input_statistics", "expert_tensors",
           "moe_adapter", "moe_pruner_scores", "nearest_experts", "prune_expert_weights", "prune_experts",
           "prune_inside_experts", "removal_count", "remove_experts", "route", "router_norm_scores",
           "router_statistics", "select_experts", "statistic_scores"]
