"""Data pruning: score training examples, select a subset under a keep budget, or sample dynamically.

score → select → apply: scorers (`dynamics`, `semantic`, `lm_scores`) return one float64 score per example, higher =
harder; selectors (`selectors`) turn scores into sorted kept indices under an exact budget; `samplers` prune
dynamically during training; `io` reads and writes every supported format; `api.prune_data` runs the whole pipeline
(the `prunekit data` command); `distributed` runs the per-example steps on Ray Data.
"""

from prunekit._lazy import lazy_exports

# Submodules import torch, transformers, FAISS or Ray (seconds); each loads on first use of a name from it, so
# that `prunekit data --help` answers at once.
_MODULES = {
    "prunekit.data.api": "DATA_METHODS ScoreResult prune_data score_examples select_kept",
    "prunekit.data.distributed": "ray_available ray_embed_texts ray_perplexity_scores",
    "prunekit.data.dynamics": (
        "TRAINING_SCORERS TrainingDynamics aum_scores el2n_scores entropy_scores forgetting_scores "
        "grand_scores loss_scores margin_scores per_example_grad_norms predict_logits random_scores "
        "record_dynamics"
    ),
    "prunekit.data.embed": "Encoder embed_texts embed_with load_encoder",
    "prunekit.data.io": "ArrayStore DataTable Staging read_data read_scores write_scores write_subset",
    "prunekit.data.lm_scores": "perplexity_scores",
    "prunekit.data.samplers": "IndexedDataset InfoBatch RS2 infobatch_trainer_class rs2_trainer_class",
    "prunekit.data.selectors": "SELECTORS ccs_select dedup_select keep_count select_examples",
    "prunekit.data.semantic": "SemDeDupResult kmeans prototype_scores semdedup semdedup_groups",
}
__getattr__, __dir__, __all__ = lazy_exports("prunekit.data", _MODULES)
