"""Training-time pruning: masks that hold through training, allocation, pruning at initialization, schedules.

Every pruner has one shape: build it on the model, call `pruner.step()` after each `optimizer.step()`, and
`pruner.finalize()` at the end to bake the zeros in. Nothing is patched globally: masks live as buffers and
gradient hooks on the weights of the model you pass. The weights targeted by default are those of
`prunekit.targets.target_weights` (for Hugging Face decoders, the projections one-shot pruning targets); layer
allocation is `prunekit.allocation`, shared with one-shot pruning.
"""

from prunekit._lazy import lazy_exports

# Every submodule imports torch (and some transformers): seconds. Each loads on first use of a name from it, so that
# `prunekit train --help` answers at once.
_MODULES = {
    "prunekit.allocation": "ALLOCATIONS allocate erk_densities lamp_scores",
    "prunekit.targets": "target_weights",
    "prunekit.training.dst": "SET RigL",
    "prunekit.training.hf": "PruningCallback",
    "prunekit.training.loop": "ClassificationData TrainHistory train",
    "prunekit.training.masks": "Masks",
    "prunekit.training.recipes": "load_checkpoint load_recipe run_recipe",
    "prunekit.training.schedules": (
        "GradualMagnitude IterativeMagnitude Movement OneShot PruneAtInit Pruner cubic_sparsity"
    ),
    "prunekit.training.scorers": "check_layer_collapse grasp_scores snip_scores synflow_scores",
}
__getattr__, __dir__, __all__ = lazy_exports("prunekit.training", _MODULES)
