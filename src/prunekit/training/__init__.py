"""Training-time pruning: masks that hold through training, allocation, pruning at initialization, schedules.

Every pruner has one shape: build it on the model, call `pruner.step()` after each `optimizer.step()`, and
`pruner.finalize()` at the end to bake the zeros in. Nothing is patched globally: masks live as buffers and
gradient hooks on the weights of the model you pass.
"""

from prunekit.training.allocation import ALLOCATIONS, allocate, erk_densities, lamp_scores
from prunekit.training.dst import SET, RigL
from prunekit.training.loop import ClassificationData, TrainHistory, train
from prunekit.training.masks import Masks, prunable_weights
from prunekit.training.schedules import (
    GradualMagnitude,
    IterativeMagnitude,
    Movement,
    OneShot,
    PruneAtInit,
    Pruner,
    cubic_sparsity,
)
from prunekit.training.scorers import (
    check_layer_collapse,
    grasp_scores,
    magnitude_scores,
    random_scores,
    snip_scores,
    synflow_scores,
)

__all__ = [
    "ALLOCATIONS",
    "ClassificationData",
    "SET",
    "TrainHistory",
    "GradualMagnitude",
    "IterativeMagnitude",
    "Masks",
    "Movement",
    "OneShot",
    "PruneAtInit",
    "Pruner",
    "PruningCallback",
    "RigL",
    "allocate",
    "check_layer_collapse",
    "cubic_sparsity",
    "erk_densities",
    "grasp_scores",
    "lamp_scores",
    "load_checkpoint",
    "load_recipe",
    "magnitude_scores",
    "prunable_weights",
    "random_scores",
    "run_recipe",
    "snip_scores",
    "synflow_scores",
    "train",
]


_LAZY = {"PruningCallback": "prunekit.training.hf", "load_recipe": "prunekit.training.recipes",
         "run_recipe": "prunekit.training.recipes", "load_checkpoint": "prunekit.training.recipes"}


def __getattr__(name: str):
    # The callback and the recipe runner import transformers (seconds); load them only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunekit.training' has no attribute '{name}'")
