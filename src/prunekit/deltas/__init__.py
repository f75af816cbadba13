"""Delta-parameter pruning: prune the difference between a fine-tuned model and its base (DARE, DAREx-q, magnitude,
activation-aware), store it sparse, and merge pruned deltas into a base (task arithmetic, TIES)."""

from prunekit._lazy import lazy_exports

# The submodules import torch and transformers (seconds); `prunekit delta --help` must answer at once.
_MODULES = {
    "prunekit.deltas.api": ("PrunedDelta check_delta_options delta_input_stats delta_record delta_targets load_delta "
                            "merge_deltas prune_delta save_delta storage_bytes"),
    "prunekit.deltas.methods": ("DELTA_METHODS MERGE_METHODS activation_mask activation_scores dare dare_mask "
                                "magnitude_mask optimal_rescale output_error task_arithmetic ties_merge"),
    "prunekit.deltas.sources": "lora_delta model_delta",
}
__getattr__, __dir__, __all__ = lazy_exports("prunekit.deltas", _MODULES)
