"""The names a user types for methods, allocations and modes, in one module that imports nothing heavy.

The command line lists them in its help and checks them without importing torch (which takes seconds); the
modules that implement them (`prunekit.api`, `prunekit.structure`, `prunekit.depth`, `prunekit.data.api`) use these
names, and tests/test_names.py checks that each registry and its names agree.
"""

ONESHOT_METHODS = ("magnitude", "random", "wanda", "ria", "sparsegpt", "admm", "magnitude+admm", "wanda+admm",
                   "ria+admm", "magnitude+dsnot", "wanda+dsnot", "ria+dsnot", "sparsegpt+dsnot", "admm+dsnot",
                   "pruner-zero", "given+admm")
# Structured width pruning (`prunekit.prune_structure`) and depth pruning (`prunekit.prune_depth`).
STRUCTURE_METHODS = ("l1", "l2", "random", "activation", "wanda-sp", "flap", "obs")
STRUCTURE_ALLOCATIONS = ("uniform", "global")
DEPTH_METHODS = ("angular", "block-influence", "sleb", "taylor", "perplexity", "reverse", "random")
DEPTH_UNITS = ("block", "attention", "mlp")
# Every allocation (`prunekit.allocation`); one-shot pruning gives each block one sparsity and uses the allocations
# that differ between blocks of a transformer (ERK/ER depend only on shapes, equal in every block).
ALLOCATIONS = ("uniform", "global", "global-min", "lamp", "erk", "er", "owl", "ecoflap")
ONESHOT_ALLOCATIONS = ("uniform", "global", "lamp", "owl", "ecoflap")
DATA_METHODS = ("random", "semdedup", "prototypes", "perplexity", "loss", "el2n", "grand", "forgetting", "aum",
                "entropy", "margin")
DATA_MODES = ("hard", "easy", "band", "ccs")
# Healing a pruned causal LM (`prunekit.heal`) and its distillation losses.
HEAL_METHODS = ("lora", "full", "perp")
EXPERT_CRITERIA = ("frequency", "gate", "reconstruction", "router_norm", "random")
EXPERT_INSIDE_METHODS = ("moe_pruner", "wanda", "sparsegpt")
DISTILL_MODES = ("logits", "logits+hidden", "embedding", "embedding+hidden")
# The precision of the gradual ADMM's iterations while its mask ramps up (`prunekit.weights.admm`).
ADMM_RAMP_DTYPES = ("auto", "float32", "bfloat16")
