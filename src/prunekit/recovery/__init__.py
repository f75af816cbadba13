"""Recovery: heal a pruned causal LM or encoder (sparse, width- or depth-pruned) by LoRA, masked full fine-tuning or
PERP, optionally distilling the dense model (an encoder always distils its embeddings), on one training loop with a
token budget and resumable checkpoints.
"""

from prunekit._lazy import lazy_exports

# The submodules import torch, transformers and peft (seconds); `prunekit heal --help` must answer at once.
_MODULES = {
    "prunekit.recovery.api": "DEFAULT_LR check_heal_options heal",
    "prunekit.recovery.distill": "DISTILL_MODES distillation_loss embedding_distillation_loss layer_pairs",
    "prunekit.recovery.loop": "Checkpointing LMHistory causal_lm_loss train_on_windows warmup_cosine",
    "prunekit.recovery.methods": "HEAL_METHODS LORA_ROLES perp_parameters zero_masks",
}
__getattr__, __dir__, __all__ = lazy_exports("prunekit.recovery", _MODULES)
