"""Data pruning: score training examples, select a subset under a keep budget, or sample dynamically.

score → select → apply: scorers (`dynamics`, `semantic`, `lm_scores`) return one float64 score per example, higher =
harder; selectors (`selectors`) turn scores into sorted kept indices under an exact budget; `samplers` prune
dynamically during training; `io` reads and writes every supported format; `api.prune_data` runs the whole pipeline
(the `prunekit data` command); `distributed` runs the per-example steps on Ray Data.
"""

# Submodules import torch, transformers, FAISS or Ray (seconds); each loads on first use of a name from it, so
# that `prunekit data --help` answers at once.
_MODULES = {
    "api": "DATA_METHODS ScoreResult prune_data score_examples select_kept",
    "distributed": "ray_available ray_embed_texts ray_perplexity_scores",
    "dynamics": (
        "TRAINING_SCORERS TrainingDynamics aum_scores el2n_scores entropy_scores forgetting_scores "
        "grand_scores loss_scores margin_scores per_example_grad_norms predict_logits random_scores "
        "record_dynamics"
    ),
    "embed": "Encoder embed_texts embed_with load_encoder",
    "io": "ArrayStore DataTable Staging read_data read_scores write_scores write_subset",
    "lm_scores": "perplexity_scores",
    "samplers": "IndexedDataset InfoBatch RS2 infobatch_trainer_class rs2_trainer_class",
    "selectors": "SELECTORS ccs_select dedup_select keep_count select_examples",
    "semantic": "SemDeDupResult kmeans prototype_scores semdedup semdedup_groups",
}
_EXPORTS = {name: f"prunekit.data.{module}" for module, names in _MODULES.items() for name in names.split()}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prunekit.data' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
