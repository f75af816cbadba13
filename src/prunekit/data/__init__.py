"""Data pruning: score training examples, select a subset under a keep budget, or sample dynamically.

score → select → apply: scorers (`dynamics`, `semantic`, `lm_scores`) return one float64 score per example, higher =
harder; selectors (`selectors`) turn scores into sorted kept indices under an exact budget; `samplers` prune
dynamically during training; `io` reads and writes every supported format; `api.prune_data` runs the whole pipeline
(the `prunekit data` command); `distributed` runs the per-example steps on Ray Data.
"""

from prunekit.data.api import METHODS, ScoreResult, prune_data, score_examples, select_kept
from prunekit.data.distributed import ray_available, ray_embed_texts, ray_perplexity_scores
from prunekit.data.dynamics import (
    TRAINING_SCORERS,
    TrainingDynamics,
    aum_scores,
    el2n_scores,
    entropy_scores,
    forgetting_scores,
    grand_scores,
    loss_scores,
    margin_scores,
    per_example_grad_norms,
    predict_logits,
    random_scores,
    record_dynamics,
)
from prunekit.data.embed import Encoder, embed_texts, embed_with, load_encoder
from prunekit.data.io import ArrayStore, DataTable, Staging, read_data, read_scores, write_scores, write_subset
from prunekit.data.lm_scores import perplexity_scores
from prunekit.data.samplers import RS2, IndexedDataset, InfoBatch, infobatch_trainer_class, rs2_trainer_class
from prunekit.data.selectors import SELECTORS, ccs_select, dedup_select, keep_count, select_examples
from prunekit.data.semantic import SemDeDupResult, kmeans, prototype_scores, semdedup, semdedup_groups

__all__ = [
    "METHODS",
    "RS2",
    "SELECTORS",
    "TRAINING_SCORERS",
    "ArrayStore",
    "DataTable",
    "Encoder",
    "IndexedDataset",
    "InfoBatch",
    "ScoreResult",
    "SemDeDupResult",
    "Staging",
    "TrainingDynamics",
    "aum_scores",
    "ccs_select",
    "dedup_select",
    "el2n_scores",
    "embed_texts",
    "embed_with",
    "entropy_scores",
    "forgetting_scores",
    "grand_scores",
    "infobatch_trainer_class",
    "keep_count",
    "kmeans",
    "load_encoder",
    "loss_scores",
    "margin_scores",
    "per_example_grad_norms",
    "perplexity_scores",
    "predict_logits",
    "prototype_scores",
    "prune_data",
    "random_scores",
    "ray_available",
    "ray_embed_texts",
    "ray_perplexity_scores",
    "read_data",
    "read_scores",
    "record_dynamics",
    "rs2_trainer_class",
    "score_examples",
    "select_examples",
    "select_kept",
    "semdedup",
    "semdedup_groups",
    "write_scores",
    "write_subset",
]
