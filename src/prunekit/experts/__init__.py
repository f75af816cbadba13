"""Mixture-of-experts pruning: whole experts by router statistics, reconstruction error or router-norm change
(removed or merged into a neighbour), and weights inside experts on their routed tokens (MoE-Pruner, Wanda)."""

from prunekit._lazy import lazy_exports

# The submodules import torch (seconds); `prunekit experts --help` must answer at once.
_MODULES = {
    "prunekit.experts.api": "expert_tensors prune_experts prune_inside_experts",
    "prunekit.experts.criteria": "CRITERIA router_norm_scores statistic_scores",
    "prunekit.experts.inside": "INSIDE_METHODS moe_pruner_scores prune_expert_weights",
    "prunekit.experts.remove": "nearest_experts removal_count remove_experts select_experts",
    "prunekit.experts.routing": ("ExpertInputs RouterStats expert_input_statistics moe_adapter route "
                                 "router_statistics"),
}
__getattr__, __dir__, __all__ = lazy_exports("prunekit.experts", _MODULES)
