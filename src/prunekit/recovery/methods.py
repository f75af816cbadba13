"""What each healing method trains, and how the pruned zeros survive it.

- `lora`: low-rank adapters (Hu et al. 2021, via peft) on the attention and MLP projections an architecture adapter
  names, merged into the weights at the end. The merged update B·A is dense, so on a sparse model the masks are
  applied again after merging (the LLM-Pruner recipe, made mask-preserving): sparsity is exactly what it was.
- `full`: every parameter trains; `prunekit.training.Masks` zeroes the gradients of pruned weights and re-zeroes
  them after every optimizer step.
- `perp`: only biases and normalisation parameters train, optionally the LM head (Zimmer et al. 2023, "PERP:
  Rethinking the Prune-Retrain Paradigm in the Era of LLMs"); every pruned weight is frozen, so its zeros hold.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from prunekit.adapters import find_adapter, is_conv1d
from prunekit.errors import PrunekitError
from prunekit.targets import mask_target, target_weights

HEAL_METHODS = {
    "lora": "low-rank adapters on the attention and MLP projections, merged at the end, masks re-applied",
    "full": "every parameter trains, pruned weights held at zero by prunekit.training.Masks",
    "perp": "only biases and normalisation parameters train (PERP), optionally the LM head",
}
LORA_ROLES = ("attention", "mlp")


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks (True = nonzero) of the target weights that hold exact zeros: what a one-shot pruned model's
    masks were, read back from its weights. Weights without a zero (dense, or physically pruned) get none."""
    masks = {}
    for name, weight in target_weights(model).items():
        keep = weight.detach() != 0
        if not bool(keep.all()):
            masks[name] = keep
    return masks


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks given by the caller (e.g. from `prunekit.prune(..., return_masks=True)`), checked against the model's
    target weights: names, shapes, and that every pruned entry is zero now (else holding it would change the model)."""
    available = target_weights(model)
    checked = {}
    for name, mask in masks.items():
        weight = mask_target(available, name)
        if tuple(mask.shape) != tuple(weight.shape):
            raise PrunekitError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
        keep = mask.to(device=weight.device, dtype=torch.bool)
        if bool((weight.detach()[~keep] != 0).any()):
            raise PrunekitError(f"mask for {name!r} marks nonzero weights as pruned; pass the masks of this "
                                f"model's pruning, or none to read them from its zeros")
        checked[name] = keep
    return checked


def sparsity_of(model: nn.Module) -> dict:
    """Zeros among the target weights: `{"zeros", "numel", "sparsity"}`."""
    weights = target_weights(model).values()
    numel = sum(w.numel() for w in weights)
    zeros = sum(int((w.detach() == 0).sum()) for w in weights)
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}


def lora_module_names(model: nn.Module, roles: tuple[str, ...] = LORA_ROLES) -> list[str]:
    """Full names of the projections that get adapters: the `roles` ('attention', 'mlp') of every block."""
    unknown = [r for r in roles if r not in LORA_ROLES]
    if unknown or not roles:
        raise PrunekitError(f"LoRA roles {list(roles)!r} are not accepted; use a non-empty subset of {LORA_ROLES}")
    adapter = find_adapter(model)
    if adapter is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise PrunekitError(f"LoRA needs the projection roles of an architecture adapter; {type(model).__name__} "
                            f"(model_type {model_type!r}) has none: heal it with method 'full' or 'perp'")
    prefix = adapter.block_prefix(model)
    names = [*(adapter.attention if "attention" in roles else ()), *(adapter.mlp if "mlp" in roles else ())]
    # a sublayer that depth pruning removed has no projections to adapt (`Adapter.projections` leaves it out)
    return [f"{prefix}.{i}.{name}" for i, block in enumerate(adapter.block_list(model))
            for name in names if name in adapter.projections(block)]


def add_lora(model: nn.Module, modules: list[str], *, rank: int, alpha: float):
    """Wrap `modules` of `model` in peft LoRA layers, in place; returns the PeftModel (whose `base_model` modules
    are the model's own). Only the adapters are trainable afterwards."""
    from peft import LoraConfig, get_peft_model

    fan_in_fan_out = any(is_conv1d(model.get_submodule(name)) for name in modules)  # GPT-2 stores [in, out]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules, bias="none",
                        fan_in_fan_out=fan_in_fan_out)
    with warnings.catch_warnings():
        # peft warns about layers it adapts as it was told (Conv1D with fan_in_fan_out) and about configs without a
        # task type, and calls a transformers API that transformers 5 deprecates; none of it concerns a model that
        # is merged back before anyone sees it
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def merge_lora(peft_model, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Merge the adapters into the weights (W + scale·B·A), remove the peft layers, then re-apply `masks` so the
    pruned entries are exactly zero again; returns the base model (the object the caller passed to `add_lora`)."""
    model = peft_model.merge_and_unload()
    weights = target_weights(model)
    with torch.no_grad():
        for name, keep in masks.items():
            weights[name].mul_(keep.to(device=weights[name].device, dtype=weights[name].dtype))
    return model


def is_norm(module: nn.Module) -> bool:
    """Normalisation layers: torch's own and the RMSNorm / LayerNorm classes of Hugging Face families."""
    if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._BatchNorm | nn.RMSNorm):
        return True
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def perp_parameters(model: nn.Module, *, head: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The parameters PERP trains: every bias and every parameter of a normalisation layer, and with `head` the LM
    head's weight (tied to the input embeddings in some models, which then train with it)."""
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if is_norm(module) or name == "bias":
                chosen.setdefault(id(p), (f"{module_name}.{name}" if module_name else name, p))
    if head:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is None:
            raise PrunekitError(f"{type(model).__name__} has no LM head to train; heal with perp_head=False")
        name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is output.weight)
        chosen.setdefault(id(output.weight), (name, output.weight))
    return list(chosen.values())
