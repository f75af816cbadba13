"""Prune the delta between a fine-tuned model and its base, store it, and merge pruned deltas into a base.

`prune_delta` reads a delta (see `prunekit.deltas.sources`), chooses the tensors it prunes, and applies one method of
`prunekit.deltas.methods` to each, returning a `PrunedDelta` that nothing has been applied to yet. `save_delta` and
`load_delta` store it as safetensors (pruned tensors sparse: kept flat indices and values) with a JSON record;
`merge_deltas` adds one or several pruned deltas to a base model.

Which tensors: by default (`tensors="linear"`) the projections inside the transformer blocks, as
`prunekit.targets.target_weights` defines them (for Hugging Face decoders: attention and MLP projections, found by
the architecture adapter). The deltas of everything else (embeddings, norms, biases, the LM head) are kept dense and
unpruned. `tensors="all"` prunes every tensor of the delta (DARE and magnitude only: the calibrated methods score
projection inputs).

Calibration inputs (activation-aware pruning, label-free DAREx-q) are the inputs X of each pruned projection in the
fine-tuned model, captured with forward pre-hooks in one forward pass over the calibration tokens: the delta should
reproduce what the fine-tuned layer computes on its own inputs.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import find_adapter, is_conv1d
from prunekit.deltas import methods
from prunekit.deltas.sources import Tensors, load_model_dir, lora_delta, model_delta
from prunekit.errors import PrunekitError
from prunekit.measure.protocol import weights_sha256

TENSOR_CHOICES = ("linear", "all")
DELTA_FILE, DELTA_RECORD = "delta.safetensors", "delta.json"
DELTA_FORMAT = "prunekit-delta-1"
# Separates a tensor's name from the part stored ("::indices", "::values"); PyTorch names never contain it.
_PART = "::"
_RECORD_LIMIT = 256 * 2**20


@dataclass
class PrunedDelta:
    """A pruned (and rescaled) delta, dense in memory, float64, in each parameter's own layout.

    tensors: every tensor of the delta; those in `pruned` were pruned, the others are kept whole.
    info: method, drop, seed, rescale per tensor (DAREx-q's 1/q), kept fraction per tensor and overall, sources.
    """

    tensors: dict[str, torch.Tensor]
    pruned: tuple[str, ...]
    info: dict = field(default_factory=dict)


def _load(source, what: str):
    if isinstance(source, str | os.PathLike):
        return load_model_dir(source, what)
    if isinstance(source, nn.Module | Mapping):
        return source, None
    raise PrunekitError(f"{what} of type {type(source).__name__} is not accepted; give a model directory, a model "
                        "or a state dict")


def _source_name(source) -> str:
    return os.fspath(source) if isinstance(source, str | os.PathLike) else f"in-memory {type(source).__name__}"


def _conv1d_names(model: nn.Module, names: Sequence[str]) -> set[str]:
    return {name for name in names if is_conv1d(model.get_submodule(name.rpartition(".")[0]))}


def check_delta_options(method: str, drop: float, tensors: str | Sequence[str] = "linear") -> None:
    """Refuse an unknown method or tensor rule, or a drop outside [0, 1), before anything is loaded."""
    if method not in methods.DELTA_METHODS:
        raise PrunekitError(f"delta method {method!r} is unknown; use one of {', '.join(methods.DELTA_METHODS)}")
    methods.check_drop(drop)
    if isinstance(tensors, str) and tensors not in TENSOR_CHOICES:
        raise PrunekitError(f"tensors {tensors!r} is unknown; use one of {', '.join(TENSOR_CHOICES)} or a list of "
                            "tensor names")
    if tensors == "all" and method in ("activation", "darex-q"):
        raise PrunekitError(f"tensors='all' applies to dare and magnitude; {method} scores the projections of the "
                            "blocks by their calibration inputs (use tensors='linear')")


def delta_targets(delta: Tensors, model: nn.Module | None, tensors: str | Sequence[str]) -> list[str]:
    """The names of the delta's tensors that are pruned, in the delta's order (see the module docstring)."""
    if tensors == "all":
        return list(delta)
    if isinstance(tensors, str):
        if model is None:
            raise PrunekitError("tensors='linear' needs a model to find its projections; with state dicts give "
                                "tensors='all' or a list of names")
        from prunekit.targets import target_weights

        wanted = set(target_weights(model))
        return [name for name in delta if name in wanted]
    unknown = [name for name in tensors if name not in delta]
    if unknown:
        raise PrunekitError(f"tensor '{unknown[0]}' is not in the delta; name tensors of the model")
    return [name for name in delta if name in set(tensors)]


def delta_input_stats(model: nn.Module, names: Sequence[str], calibration: torch.Tensor, *, gram: bool,
                      batch_size: int = 8, progress: bool = True) -> dict:
    """Per pruned weight, the statistics (`InputStats`: column norms, and XᵀX with `gram`) of its module's inputs
    over the calibration token ids ([samples, seq_len]), gathered with forward pre-hooks in one pass."""
    from prunekit.weights.stats import InputStats

    stats, handles = {}, []
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        features = module.weight.shape[0] if name in _conv1d_names(model, [name]) else module.weight.shape[1]
        stats[name] = InputStats(features, hessian=gram)

        def hook(module, args, _stats=stats[name]):
            _stats.add(args[0].detach())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            for batch in tqdm(calibration.split(batch_size), desc="calibration", disable=not progress):
                model(input_ids=batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _as_matrix(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[out, in] view of a projection's weight-layout tensor (GPT-2's Conv1D stores [in, out])."""
    return tensor.t() if transposed else tensor


def _check_q_grid(q_grid: Sequence[float] | None, drop: float) -> list[float]:
    if q_grid is None:
        # geometric from DARE's q = 1 − p to q = 1 (no rescaling), 11 values
        low = 1.0 - drop
        return [low ** (1 - i / 10) for i in range(11)]
    grid = list(q_grid)
    if not grid or any(isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1 for q in grid):
        raise PrunekitError(f"q_grid {q_grid!r} must be a non-empty list of numbers in (0, 1]")
    return [float(q) for q in grid]


def prune_delta(
    base,
    tuned=None,
    *,
    lora: str | os.PathLike | None = None,
    method: str = "dare",
    drop: float = 0.9,
    seed: int = 0,
    tensors: str | Sequence[str] = "linear",
    calibration: torch.Tensor | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    q_grid: Sequence[float] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PrunedDelta:
    """Prune the delta of `tuned` (or of the LoRA adapter `lora`) over `base`.

    base, tuned: a local Hugging Face directory (safetensors only), a model, or a state dict.
    method: dare, darex-q, magnitude or activation (see `prunekit.deltas.methods`); drop: fraction removed, [0, 1).
    seed: seeds the torch.Generator of the random masks (dare, darex-q); masks are drawn tensor by tensor in the
        delta's order, so dare and darex-q with one seed drop the same entries.
    calibration: token ids [samples, seq_len] for activation and label-free darex-q.
    validate: darex-q only: a function of the merged model (base + pruned delta) returning a loss, lower is better;
        one q for all tensors is then chosen from `q_grid` (default: 11 values geometric from 1 − drop to 1) instead
        of each layer's label-free optimum.
    Nothing on disk or in the given models is changed.
    """
    check_delta_options(method, drop, tensors)
    if (tuned is None) == (lora is None):
        raise PrunekitError("give exactly one of tuned (a fine-tuned model) and lora (a LoRA adapter directory)")
    if validate is not None and method != "darex-q":
        raise PrunekitError(f"validate tunes DAREx-q's q; method {method!r} does not use it")
    if q_grid is not None and validate is None:
        raise PrunekitError("q_grid is searched with validate; without it DAREx-q's q is each layer's optimum")
    grid = _check_q_grid(q_grid, drop) if validate is not None else None
    calibrated = method == "activation" or (method == "darex-q" and validate is None)
    if calibrated and calibration is None:
        raise PrunekitError(f"method {method} needs calibration token ids ([samples, seq_len]); none were given")
    if not calibrated and calibration is not None:
        raise PrunekitError(f"calibration is used by activation and label-free darex-q, not by {method}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PrunekitError(f"seed {seed!r} is not a whole number >= 0")
    if calibration is not None:
        calibration = getattr(calibration, "ids", calibration)
        if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
            raise PrunekitError("calibration must be int64 token ids of shape [samples, seq_len]")

    base_model, _ = _load(base, "base model")
    if lora is not None:
        delta, tuned_model = lora_delta(base_model, lora), None
    else:
        tuned_model, _ = _load(tuned, "fine-tuned model")
        delta = model_delta(base_model, tuned_model)
    model = next((m for m in (base_model, tuned_model) if isinstance(m, nn.Module)), None)
    targets = delta_targets(delta, model, tensors)
    if not targets:
        raise PrunekitError(f"no tensor of the delta is selected by tensors={tensors!r}; nothing would be pruned")
    transposed = _conv1d_names(model, [n for n in targets if n.endswith(".weight")]) if model is not None else set()

    if (calibrated or grid is not None) and not isinstance(base_model, nn.Module):
        raise PrunekitError(f"method {method} runs the {'merged' if grid else 'fine-tuned'} model; give models or "
                            "directories, not state dicts")
    if calibrated and find_adapter(base_model) is None:
        raise PrunekitError(f"method {method} calibrates the projections of Hugging Face decoders; "
                            f"{type(base_model).__name__} is not one (dare and magnitude prune any network's delta)")
    stats = None
    if calibrated:
        # a LoRA adapter or a tuned state dict is run as base + delta
        runner = (tuned_model if isinstance(tuned_model, nn.Module)
                  else merge_deltas(copy.deepcopy(base_model), [delta]))
        stats = delta_input_stats(runner, targets, calibration, gram=method == "darex-q", batch_size=batch_size,
                                  progress=progress)

    generator = torch.Generator().manual_seed(seed)
    pruned, kept, rescale = dict(delta), {}, {}
    for name in tqdm(targets, desc=f"{method} delta", disable=not progress):
        d = delta[name]
        if method in ("dare", "darex-q"):
            mask = methods.dare_mask(d.shape, drop, generator)
        elif method == "magnitude":
            mask = methods.magnitude_mask(d, drop)
        else:
            mask = _as_matrix(methods.activation_mask(_as_matrix(d, name in transposed), stats[name].norms, drop),
                              name in transposed)
        kept_delta = torch.where(mask, d, torch.zeros((), dtype=d.dtype))
        if method == "darex-q" and stats is not None:
            t = name in transposed
            scale = methods.optimal_rescale(_as_matrix(d, t), _as_matrix(kept_delta, t), stats[name].hessian)
        elif method == "dare" or method == "darex-q":
            scale = 1.0 / (1.0 - drop)  # DARE's; darex-q with validate replaces it below
        else:
            scale = 1.0
        pruned[name] = kept_delta * scale
        kept[name] = mask.sum().item() / mask.numel()
        rescale[name] = scale

    info = {"method": method, "drop": drop, "seed": seed if method in ("dare", "darex-q") else None,
            "tensors": tensors if isinstance(tensors, str) else list(tensors),
            "sources": {"base": _source_name(base),
                        **({"lora": os.fspath(lora)} if lora is not None else {"tuned": _source_name(tuned)})},
            "base_weights_sha256": weights_sha256(base_model) if isinstance(base_model, nn.Module) else None}
    if grid is not None:
        losses, best = _search_q(base_model, pruned, rescale, targets, grid, validate, drop, progress)
        for name in targets:
            pruned[name] = pruned[name] * ((1 - drop) / best)  # from DARE's 1/(1 − p) to 1/q
            rescale[name] = 1.0 / best
        info["q_search"] = {"grid": grid, "losses": losses, "q": best}
    numel = sum(delta[name].numel() for name in targets)
    info["rescale"] = rescale
    info["q"] = {name: (1.0 / s if s > 0 else None) for name, s in rescale.items()} if method == "darex-q" else None
    info["kept_fraction"] = kept
    info["kept_fraction_overall"] = sum(kept[n] * delta[n].numel() for n in targets) / numel
    info["pruned_numel"] = numel
    return PrunedDelta(tensors=pruned, pruned=tuple(targets), info=info)


def delta_record(delta: PrunedDelta, base: nn.Module | None = None, *, resources: dict | None = None,
                 calibration: dict | None = None) -> dict:
    """The result record (protocol card) of a pruned delta: sources (with the base's card when it is a model), the
    method and its hyperparameters, kept fractions and rescale factors per tensor."""
    from prunekit.inputs import model_card
    from prunekit.measure.protocol import result_record

    info = delta.info
    model = {"sources": info["sources"]}
    if isinstance(base, nn.Module):
        model["base"] = model_card(base, info["sources"].get("base"))
    method = {"name": info["method"], "drop": info["drop"], "seed": info["seed"], "tensors": info["tensors"]}
    if "q_search" in info:
        method["q_search"] = info["q_search"]
    metrics = {key: info[key] for key in ("kept_fraction_overall", "pruned_numel", "kept_fraction", "rescale", "q")}
    return result_record(model=model, method=method, calibration=calibration, evaluation=None, metrics=metrics,
                         resources=resources or {})


def _search_q(base_model, pruned: dict, rescale: dict, targets: list[str], grid: list[float],
              validate: Callable[[nn.Module], float], drop: float, progress: bool) -> tuple[list[float], float]:
    """DAREx-q with validation: the loss of base + delta with the kept entries scaled by 1/q, for each q."""
    work = copy.deepcopy(base_model)
    originals = {name: t.detach().clone() for name, t in work.named_parameters()}
    losses = []
    for q in tqdm(grid, desc="darex-q search", disable=not progress):
        candidate = {name: (t * ((1 - drop) / q) if name in rescale else t) for name, t in pruned.items()}
        with torch.no_grad():
            for name, parameter in work.named_parameters():
                parameter.copy_(originals[name])
        merge_deltas(work, [candidate])
        loss = float(validate(work))
        if not math.isfinite(loss):
            raise PrunekitError(f"validate returned {loss} for q={q}; it must return a finite loss")
        losses.append(loss)
    return losses, grid[min(range(len(grid)), key=losses.__getitem__)]


def _delta_tensors(delta: PrunedDelta | Tensors) -> Tensors:
    return delta.tensors if isinstance(delta, PrunedDelta) else delta


def merge_deltas(model: nn.Module, deltas: Sequence[PrunedDelta | Tensors], *, scale: float = 1.0,
                 method: str = "sum") -> nn.Module:
    """Add pruned deltas to `model` (the base) in place and return it.

    method 'sum' is task arithmetic, W = W_base + scale·Σ_t Δ_t; 'ties' uses TIES' sign election and disjoint mean
    (`methods.ties_merge`), W = W_base + scale·merged. A tensor missing from some deltas counts as zero there.
    Every name and shape is checked before any weight changes.
    """
    if method not in methods.MERGE_METHODS:
        raise PrunekitError(f"merge method {method!r} is unknown; use one of {', '.join(methods.MERGE_METHODS)}")
    methods.check_scale(scale)
    if not deltas:
        raise PrunekitError("merging needs at least one delta; got none")
    parameters = dict(model.named_parameters())
    tensor_sets = [_delta_tensors(d) for d in deltas]
    for tensors in tensor_sets:
        for name, tensor in tensors.items():
            if name not in parameters:
                raise PrunekitError(f"delta tensor '{name}' is not a parameter of the model; merge into the base the "
                                    "delta was taken from")
            if tuple(tensor.shape) != tuple(parameters[name].shape):
                raise PrunekitError(f"delta tensor '{name}' has shape {tuple(tensor.shape)}, the model's is "
                                    f"{tuple(parameters[name].shape)}; merge into the base the delta was taken from")
    names = list(dict.fromkeys(name for tensors in tensor_sets for name in tensors))
    combine = methods.task_arithmetic if method == "sum" else methods.ties_merge
    with torch.no_grad():
        for name in names:
            parameter = parameters[name]
            zero = torch.zeros(parameter.shape, dtype=torch.float64)
            update = combine([t[name].double().cpu() if name in t else zero for t in tensor_sets], scale)
            parameter.copy_((parameter.double() + update.to(parameter.device)).to(parameter.dtype))
    return model


def check_delta_base(delta: PrunedDelta, weights_sha256: str, where: str = "the delta") -> None:
    """Refuse a delta taken from a base with other weights (its info's `base_weights_sha256`); a delta taken from
    a state dict has no such hash and is not checked."""
    recorded = delta.info.get("base_weights_sha256")
    if recorded is not None and recorded != weights_sha256:
        raise PrunekitError(f"{where} was taken from a base with weights {recorded[:12]}..., not this base "
                            f"({weights_sha256[:12]}...); merge into the base the delta was taken from")


def storage_bytes(delta: PrunedDelta, *, value_bytes: int = 4) -> dict:
    """Bytes of the delta stored dense versus sparse (pruned tensors as kept flat indices and values).

    Values are float32 (`value_bytes`); indices int32 for tensors under 2³¹ entries, else int64.
    """
    dense = sum(t.numel() for t in delta.tensors.values()) * value_bytes
    pruned_dense = sum(delta.tensors[n].numel() for n in delta.pruned) * value_bytes
    pruned_sparse = sum(int(torch.count_nonzero(delta.tensors[n])) * (value_bytes + _index_dtype(delta.tensors[n])
                                                                      .itemsize) for n in delta.pruned)
    return {"dense_bytes": dense, "sparse_bytes": dense - pruned_dense + pruned_sparse,
            "pruned_tensors_dense_bytes": pruned_dense, "pruned_tensors_sparse_bytes": pruned_sparse}


def _index_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.int32 if tensor.numel() < 2**31 else torch.int64


def save_delta(delta: PrunedDelta, out_dir: str | os.PathLike, *, record: dict | None = None,
               overwrite: bool = False) -> dict:
    """Write `delta.safetensors` and `delta.json` into `out_dir` atomically; return the storage numbers.

    Pruned tensors are stored sparse: `NAME::indices` (int32 flat indices into the tensor, row-major, ascending, of
    its nonzero entries) and `NAME::values` (float32); the others dense under their own name. delta.json holds
    `record` (a result record, optional), the delta's info under "delta", the storage in bytes (dense, sparse, and the
    file written) and the format.
    """
    import json

    from safetensors.torch import save_file

    from prunekit.artifacts.io import atomic_directory

    stored, shapes = {}, {}
    for name, tensor in delta.tensors.items():
        shapes[name] = list(tensor.shape)
        if name in delta.pruned:
            flat = tensor.reshape(-1)
            indices = torch.nonzero(flat).reshape(-1)
            stored[name + _PART + "indices"] = indices.to(_index_dtype(tensor))
            stored[name + _PART + "values"] = flat[indices].float()
        else:
            stored[name] = tensor.float().contiguous()
    storage = storage_bytes(delta)
    content = dict(record or {})
    content["delta"] = delta.info
    content["format"] = {"name": DELTA_FORMAT, "file": DELTA_FILE, "values": "float32",
                         "sparse": "flat int32 indices (int64 from 2^31 entries) and float32 values",
                         "pruned": list(delta.pruned), "shapes": shapes}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(stored, tmp / DELTA_FILE, metadata={"format": DELTA_FORMAT})
        storage["file_bytes"] = (tmp / DELTA_FILE).stat().st_size
        content["storage"] = storage
        (tmp / DELTA_RECORD).write_text(json.dumps(content, indent=2) + "\n")
    return storage


def load_delta(path: str | os.PathLike) -> PrunedDelta:
    """Read a directory written by `save_delta` (safetensors and JSON only), dense in memory as float64."""
    from safetensors.torch import load_file

    from prunekit.artifacts.files import check_safetensors
    from prunekit.artifacts.io import read_json_file

    path = Path(path)
    if not (path / DELTA_RECORD).is_file() or not (path / DELTA_FILE).is_file():
        raise PrunekitError(f"'{path}' is not a pruned delta: it needs {DELTA_FILE} and {DELTA_RECORD} (written by "
                            "prunekit delta)")
    record = read_json_file(path / DELTA_RECORD, limit=_RECORD_LIMIT, what="delta record")
    form = record.get("format")
    if not isinstance(form, dict) or form.get("name") != DELTA_FORMAT or not isinstance(form.get("shapes"), dict):
        raise PrunekitError(f"'{path / DELTA_RECORD}' does not describe a {DELTA_FORMAT} delta")
    check_safetensors(path / DELTA_FILE)
    stored = load_file(path / DELTA_FILE)
    pruned = list(form.get("pruned", []))
    expected = {n + _PART + part for n in pruned for part in ("indices", "values")}
    expected |= {n for n in form["shapes"] if n not in pruned}
    if set(stored) != expected:
        odd = sorted(set(stored) ^ expected)[0]
        raise PrunekitError(f"'{path / DELTA_FILE}' does not match its record at tensor '{odd}'; the delta is corrupt")
    tensors = {}
    for name, shape in form["shapes"].items():
        if name not in pruned:
            tensors[name] = stored[name].double()
            if list(tensors[name].shape) != shape:
                raise PrunekitError(f"tensor '{name}' in '{path}' has shape {list(tensors[name].shape)}, its record "
                                    f"says {shape}; the delta is corrupt")
            continue
        indices, values = stored[name + _PART + "indices"].long(), stored[name + _PART + "values"].double()
        numel = math.prod(shape)
        if indices.dim() != 1 or indices.shape != values.shape or (len(indices) and not (
                indices.min() >= 0 and indices.max() < numel)):
            raise PrunekitError(f"sparse tensor '{name}' in '{path}' has indices outside its {numel} entries; the "
                                "delta is corrupt")
        dense = torch.zeros(numel, dtype=torch.float64)
        dense[indices] = values
        tensors[name] = dense.reshape(shape)
    info = record.get("delta")
    if not isinstance(info, dict):
        raise PrunekitError(f"'{path / DELTA_RECORD}' has no 'delta' information; the delta is corrupt")
    return PrunedDelta(tensors=tensors, pruned=tuple(pruned), info=info)
