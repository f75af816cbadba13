"""Where a delta comes from: a base and a fine-tuned model (directories, models or state dicts), or a LoRA adapter.

A delta is a dict from parameter names (those of `named_parameters()`, so tied weights appear once) to
Δ = W_tuned − W_base in float64: for float32 weights the difference is then exact in practice, so base + Δ gives the
fine-tuned weights bit for bit. A LoRA adapter's delta holds only the weights it adapts: B·A·scaling per module, in
the weight's own layout. Model directories are read from safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from prunekit.artifacts.files import check_safetensors, refuse_pickled_weights
from prunekit.errors import PrunekitError

Tensors = Mapping[str, torch.Tensor]
ADAPTER_CONFIG_LIMIT = 2**20
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
_PEFT_PREFIX = "base_model.model."


def load_model_dir(source: str | os.PathLike, what: str):
    """(model, tokenizer or None) of a local Hugging Face causal-LM directory or a prunekit model asset, float32.

    Directories are checked first (config readable, safetensors weights sound, no pickle-only weights); a tokenizer
    is loaded when the directory has one.
    """
    from transformers import AutoTokenizer

    from prunekit.artifacts.io import check_model_dir, load_causal_lm_dir
    from prunekit.assets import load_causal_lm
    from prunekit.assets._models import _MODEL_ASSETS

    name = os.fspath(source)
    if name in _MODEL_ASSETS:
        loaded = load_causal_lm(name)
        return loaded.model, loaded.tokenizer
    path = Path(name)
    if not path.is_dir():
        raise PrunekitError(f"{what} '{name}' is not a directory or a model asset ({', '.join(_MODEL_ASSETS)})")
    check_model_dir(path)
    try:
        model = load_causal_lm_dir(path, dtype=torch.float32)
        tokenizer = (AutoTokenizer.from_pretrained(path, local_files_only=True)
                     if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None)
    except (OSError, ValueError, RuntimeError) as error:
        raise PrunekitError(f"{what} '{path}' could not be loaded: {str(error).splitlines()[0]}") from None
    return model.eval(), tokenizer


def parameters_of(source: nn.Module | Tensors) -> dict[str, torch.Tensor]:
    """The named tensors of a model (its parameters, tied ones once) or of a state dict, detached."""
    items = source.named_parameters() if isinstance(source, nn.Module) else source.items()
    return {name: tensor.detach() for name, tensor in items}


def model_delta(base: nn.Module | Tensors, tuned: nn.Module | Tensors) -> dict[str, torch.Tensor]:
    """Δ = tuned − base per tensor, in float64 on the CPU; names and shapes must match one to one."""
    base_tensors, tuned_tensors = parameters_of(base), parameters_of(tuned)
    for name, tensor in base_tensors.items():
        if name not in tuned_tensors:
            raise PrunekitError(f"tensor '{name}' of the base is missing from the fine-tuned model; give a fine-tune "
                                "of this base")
        if tuned_tensors[name].shape != tensor.shape:
            raise PrunekitError(f"tensor '{name}' has shape {tuple(tensor.shape)} in the base but "
                                f"{tuple(tuned_tensors[name].shape)} in the fine-tuned model; give a fine-tune of "
                                "this base")
    extra = [name for name in tuned_tensors if name not in base_tensors]
    if extra:
        raise PrunekitError(f"tensor '{extra[0]}' of the fine-tuned model is missing from the base; give a fine-tune "
                            "of this base")
    return {name: tuned_tensors[name].cpu().double() - tensor.cpu().double() for name, tensor in base_tensors.items()}


def read_lora_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a peft LoRA adapter directory, refused unless plain LoRA in safetensors."""
    from safetensors.torch import load_file

    from prunekit.artifacts.io import read_json_file

    path = Path(adapter_dir)
    if not path.is_dir():
        raise PrunekitError(f"LoRA adapter '{path}' is not a directory; give a peft adapter directory "
                            "(adapter_config.json, adapter_model.safetensors)")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise PrunekitError(f"LoRA adapter '{path}' has no adapter_config.json; give a peft adapter directory")
    config = read_json_file(config_file, limit=ADAPTER_CONFIG_LIMIT, what="adapter config")
    if config.get("peft_type") != "LORA":
        raise PrunekitError(f"adapter '{path}' has peft_type {config.get('peft_type')!r}; only LORA adapters are read")
    # Variants whose delta is not B·A·scaling (DoRA's magnitude vector, per-module ranks, extra full weights) are
    # refused rather than read wrongly.
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias", "trainable_token_indices",
                "target_parameters", "layer_replication"):
        if config.get(key):
            raise PrunekitError(f"LoRA adapter '{path}' sets {key}={config[key]!r}, which prunekit does not read; "
                                "give a plain LoRA adapter")
    if not isinstance(config.get("r"), int) or config["r"] < 1 or not isinstance(config.get("lora_alpha"), int | float):
        raise PrunekitError(f"LoRA adapter '{path}' has r={config.get('r')!r}, lora_alpha={config.get('lora_alpha')!r};"
                            " expected a positive rank and a number")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        refuse_pickled_weights(path, "LoRA adapter")  # names the pickle file when there is one
        raise PrunekitError(f"LoRA adapter '{path}' has no adapter_model.safetensors")
    check_safetensors(weights)
    return config, load_file(weights)


def lora_delta(base: nn.Module | Tensors, adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The merged delta of a peft LoRA adapter: B·A·scaling for each adapted weight (float64), as peft merges it.

    scaling is lora_alpha / r (lora_alpha / √r with use_rslora); with fan_in_fan_out (GPT-2's Conv1D, stored
    [in, out]) the product is transposed into the weight's layout. Each adapted weight must exist in `base` with the
    product's shape.
    """
    config, tensors = read_lora_adapter(adapter_dir)
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    base_tensors = parameters_of(base)
    modules = []
    for key in tensors:
        if key.endswith(_LORA_A):
            modules.append(key[: -len(_LORA_A)])
        elif not key.endswith(_LORA_B):
            raise PrunekitError(f"LoRA adapter '{adapter_dir}' holds '{key}', which is not a lora_A or lora_B weight; "
                                "give a plain LoRA adapter")
    if not modules:
        raise PrunekitError(f"LoRA adapter '{adapter_dir}' holds no lora_A weights")
    delta = {}
    for module in modules:
        a, b = tensors[module + _LORA_A], tensors.get(module + _LORA_B)
        if b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise PrunekitError(f"LoRA adapter '{adapter_dir}': module '{module}' lacks a rank-{rank} lora_A/lora_B "
                                "pair")
        name = (module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module) + ".weight"
        product = (b.double() @ a.double()) * scaling
        if config.get("fan_in_fan_out"):
            product = product.t()
        if name not in base_tensors:
            raise PrunekitError(f"LoRA adapter '{adapter_dir}' adapts '{name}', which the base does not have; give "
                                "the base the adapter was trained on")
        if base_tensors[name].shape != product.shape:
            raise PrunekitError(f"LoRA adapter '{adapter_dir}' gives '{name}' a delta of shape "
                                f"{tuple(product.shape)}, but the base weight is {tuple(base_tensors[name].shape)}; "
                                "give the base the adapter was trained on")
        delta[name] = product.contiguous()
    return delta
