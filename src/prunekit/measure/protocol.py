"""The protocol card: everything needed to reproduce a number, recorded beside it.

A result record holds the software and hardware it ran on, the model's source and a hash of its weights,
the method with all its hyperparameters, the calibration and evaluation data, the metrics and the
resources used. Two runs with equal cards must give equal numbers.
"""

import hashlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Iterable

import torch

from prunekit.errors import PrunekitError

RECORD_VERSION = 1


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _prunekit_version() -> str | None:
    version = _package_version("prunekit")
    if version is None:  # running from a source tree that was never installed
        import prunekit

        version = getattr(prunekit, "__version__", None)
    return version


def environment() -> dict:
    """Software versions, platform, CPU and thread count, and accelerators of this process."""
    cuda = torch.cuda.is_available()
    return {
        "prunekit": _prunekit_version(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def _update(hasher, t: torch.Tensor) -> None:
    """Feed dtype, shape and the raw bytes of `t` (as a contiguous CPU tensor) to `hasher`."""
    hasher.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
    data = t.detach().to("cpu").contiguous().reshape(-1)
    # a uint8 view exposes the bytes of any dtype (bfloat16 has no NumPy equivalent) without a copy
    hasher.update(data.view(torch.uint8).numpy())


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values: equal tensors hash equal, whatever their layout."""
    if t.device.type == "meta":
        raise PrunekitError("cannot hash a tensor on the meta device; load its values first")
    hasher = hashlib.sha256()
    _update(hasher, t)
    return hasher.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict: each tensor's name, dtype, shape and bytes, in sorted name order.

    Entries that share storage (tied embeddings) are hashed once, under the first of their names in sorted
    order, so tying is part of the hash but does not double the work. An offloaded model's blocks are read from
    their files one at a time (`weights.engine.state_items`).
    """
    return weight_facts(model, counts=False)["weights_sha256"]


def weight_facts(model: torch.nn.Module, targets: Iterable[str] = (), *, counts: bool = True) -> dict:
    """In one pass over the weights (one read of each block of an offloaded model): `weights_sha256`, with
    `counts` the parameter counts of `measure.parameter_counts` ("parameters": total and nonzero), and when
    `targets` names tensors, their `measure.sparsity_summary` ("sparsity", per layer in the state dict's order)."""
    from prunekit.measure.sparsity import layer_sparsity, summarise
    from prunekit.weights.engine import state_items

    # Shared entries are found on the state dict as it is, before any offloaded block is read: the storage of a
    # block read and freed may be reused by the next one, which must not make it a "duplicate".
    state = model.state_dict(keep_vars=True)
    first: set = set()
    hashed = set()
    for name in sorted(state):
        t = state[name]
        key = (("meta", id(t)) if t.device.type == "meta" else
               (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype))
        if key not in first:
            first.add(key)
            hashed.add(name)
    params = dict(model.named_parameters()) if counts else {}  # each shared Parameter once, under its first name
    targets = set(targets)
    hasher, nonzero, per_layer = hashlib.sha256(), 0, {}
    for name, t in state_items(model, sorted(hashed | set(params) | targets)):
        if name in hashed:
            if t.device.type == "meta":
                raise PrunekitError(f"cannot hash weight '{name}': it is on the meta device; load the weights first")
            hasher.update(f"{name}\0".encode())
            _update(hasher, t.detach())
        if name in params:
            nonzero += int(torch.count_nonzero(t))
        if name in targets:
            per_layer |= layer_sparsity([(name, t)])
    facts = {"weights_sha256": hasher.hexdigest()}
    if counts:
        facts["parameters"] = {"total": sum(p.numel() for p in params.values()), "nonzero": nonzero}
    if targets:
        facts["sparsity"] = summarise({name: per_layer[name] for name in state if name in per_layer})
    return facts


def _unserialisable_path(value: object, path: str) -> str | None:
    """Dotted path of the first value inside `value` that `json.dumps` rejects, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool | type(None)):
                return f"{path}.{key!r} (key of type {type(key).__name__})"
            found = _unserialisable_path(item, f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _unserialisable_path(item, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, str | int | float | bool | type(None)):
        return None
    return f"{path} (of type {type(value).__name__})"


def result_record(
    *,
    model: dict,
    method: dict,
    calibration: dict | None,
    evaluation: dict | None,
    metrics: dict,
    resources: dict,
    extra: dict | None = None,
) -> dict:
    """A JSON-serialisable result record: the protocol card of this environment plus the given fields.

    `extra` adds top-level fields; it may not replace the card's own. Raises TypeError naming the first
    field that JSON cannot represent (e.g. a tensor left in `metrics`).
    """
    record = {
        "prunekit_record": RECORD_VERSION,
        "environment": environment(),
        "model": model,
        "method": method,
        "calibration": calibration,
        "evaluation": evaluation,
        "metrics": metrics,
        "resources": resources,
    }
    clashes = sorted(set(extra or {}) & set(record))
    if clashes:
        raise PrunekitError(f"extra fields {clashes} would replace the record's own; rename them")
    record.update(extra or {})
    try:
        json.dumps(record)
    except TypeError as error:
        for key, value in record.items():
            path = _unserialisable_path(value, key)
            if path:
                raise TypeError(f"result record field {path} is not JSON-serialisable") from error
        raise
    return record
