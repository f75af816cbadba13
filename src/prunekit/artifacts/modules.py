"""Save and load structurally pruned models that are not Hugging Face ones: safetensors plus module geometry.

Graph pruning (`prunekit.structure.graph_prune`) rewrites the shapes of convolutions, linear and norm layers and of
bare `nn.Parameter`s in place, so a freshly built instance of the model's class no longer fits its weights. The
manifest therefore records, besides the result record:

- `modules`: every module whose geometry the pruner can change, by name, with its class and constructor geometry;
- `tensors`: the shapes of the parameters and buffers held by any other module (a bare `nn.Parameter`);
- `tied`: state-dict names that share one tensor with an earlier name (stored once in the weights file);
- `net`: the name of the built-in network (`prunekit.nets`) the model is an instance of, found from its exact
  class at save time, or None. Constructor arguments such as the class count need not be recorded, because every
  layer they size is rebuilt from its recorded geometry.

Loading rebuilds the network (by `net`, or from a dense instance the caller builds), checks the whole manifest
against the model and the weights file, and only then replaces each listed module by a fresh one of the recorded
geometry and loads the weights strictly. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.errors import PrunekitError

WEIGHTS = "model.safetensors"

_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
         "padding_mode")
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")
# The layers whose tensors the pruner resizes, with the constructor arguments that fix their shapes.
GEOMETRY: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Conv3d: _CONV,
    nn.ConvTranspose1d: (*_CONV, "output_padding"), nn.ConvTranspose2d: (*_CONV, "output_padding"),
    nn.ConvTranspose3d: (*_CONV, "output_padding"),
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.BatchNorm1d: _NORM, nn.BatchNorm2d: _NORM, nn.BatchNorm3d: _NORM,
    nn.InstanceNorm1d: _NORM, nn.InstanceNorm2d: _NORM, nn.InstanceNorm3d: _NORM,
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine", "bias"),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.PReLU: ("num_parameters",),
}
_BY_NAME = {cls.__name__: cls for cls in GEOMETRY}
_BOOLS = ("bias", "affine", "track_running_stats", "elementwise_affine")


def builtin_nets() -> dict[str, type[nn.Module]]:
    """The networks `load` can rebuild by name: `prunekit.nets.NETS` and `mobilenet-v2`."""
    from prunekit import nets

    return {**nets.NETS, "mobilenet-v2": nets.MobileNetV2}


def net_name(model: nn.Module) -> str | None:
    """The built-in network name of `model`'s exact class (a subclass may change its layout), or None."""
    return next((name for name, cls in builtin_nets().items() if type(model) is cls), None)


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


def module_geometry(module: nn.Module) -> dict:
    """The class and constructor geometry of one layer of `GEOMETRY`, as JSON values."""
    geometry: dict = {"type": type(module).__name__}
    for field in GEOMETRY[type(module)]:
        geometry[field] = module.bias is not None if field == "bias" else _json_value(getattr(module, field))
    return geometry


def _owned_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers a module holds directly (not through its children)."""
    tensors = {k: v for k, v in module._parameters.items() if v is not None}
    tensors.update((k, v) for k, v in module._buffers.items()
                   if v is not None and k not in module._non_persistent_buffers_set)
    return tensors


def describe_modules(model: nn.Module) -> dict:
    """The manifest entries `load_module` needs: `modules`, `tensors`, `tied`, `net` and `model_class`."""
    if type(model) in GEOMETRY:
        raise PrunekitError(f"the model itself is a {type(model).__name__}, which load could not replace in place; "
                            "save it inside a container, e.g. nn.Sequential(model)")
    modules, tensors = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in GEOMETRY:
            modules[name] = module_geometry(module)
            continue
        base = next((cls for cls in GEOMETRY if isinstance(module, cls)), None)
        if base is not None:
            raise PrunekitError(f"module '{name}' is a {type(module).__name__}, a subclass of {base.__name__} whose "
                                f"constructor prunekit cannot know; only {base.__name__} itself can be rebuilt")
        prefix = f"{name}." if name else ""
        tensors.update((prefix + k, list(v.shape)) for k, v in _owned_tensors(module).items())
    return {"net": net_name(model), "model_class": type(model).__name__, "modules": modules, "tensors": tensors}


def _split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the tensors to store, each copied so that no two share memory; {later name: first name} of the names that
    are one tensor). safetensors refuses tensors that share memory, and a tie must survive the round trip."""
    first: dict[tuple, str] = {}
    stored, tied = {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in first:
            tied[name] = first[key]
            continue
        first[key] = name
        stored[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return stored, tied


def save_module(model: nn.Module, out_dir: str | os.PathLike, record: dict, *, overwrite: bool = False) -> Path:
    """Write `model.safetensors` and `prunekit.json` (the record plus the module geometry) atomically.

    Refuses, before writing anything, a model holding a subclass of a resizable layer (its constructor is
    unknown) and a record that JSON cannot hold. Returns the output directory.
    """
    from prunekit.artifacts.io import MANIFEST, atomic_directory

    description = describe_modules(model)
    stored, tied = _split_tied(model.state_dict())
    manifest = json.dumps({**record, **description, "tied": tied}, indent=2) + "\n"
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(stored, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(manifest)
    return out_dir


# ---- loading -----------------------------------------------------------------------------------------------

def _is_int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _fresh_module(name: str, geometry) -> nn.Module:
    """A module of the recorded class and geometry, on the meta device (no memory, whatever the sizes say)."""
    if not isinstance(geometry, dict) or geometry.get("type") not in _BY_NAME:
        kind = geometry.get("type") if isinstance(geometry, dict) else geometry
        raise PrunekitError(f"manifest module '{name}' has type {kind!r}; prunekit rebuilds only "
                            f"{', '.join(_BY_NAME)}")
    cls = _BY_NAME[geometry["type"]]
    fields = GEOMETRY[cls]
    if set(geometry) != {"type", *fields}:
        raise PrunekitError(f"manifest module '{name}' ({cls.__name__}) states {sorted(set(geometry) - {'type'})}; "
                            f"expected exactly {sorted(fields)}")
    for field in fields:
        value = geometry[field]
        if field in _BOOLS:
            valid = isinstance(value, bool)
        elif field in ("eps", "momentum"):
            valid = isinstance(value, int | float) and not isinstance(value, bool) or (field == "momentum"
                                                                                        and value is None)
        elif field == "padding_mode":
            valid = isinstance(value, str)
        else:  # sizes: one whole number, a list of them, or a padding mode such as 'same'
            valid = (isinstance(value, int) and not isinstance(value, bool) or _is_int_list(value)
                     or field == "padding" and isinstance(value, str))
        if not valid:
            raise PrunekitError(f"manifest module '{name}' ({cls.__name__}) has {field}={value!r}, which is not a "
                                "valid value for it; the manifest is damaged")
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in geometry.items() if k != "type"}
    try:
        return cls(**arguments, device="meta")
    except (TypeError, ValueError, RuntimeError) as error:
        raise PrunekitError(f"manifest module '{name}' has an impossible {cls.__name__} geometry: "
                            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def _check_manifest_form(record: dict) -> tuple[dict, dict, dict]:
    modules, tensors, tied = record.get("modules"), record.get("tensors", {}), record.get("tied", {})
    if not isinstance(modules, dict) or not isinstance(tensors, dict) or not isinstance(tied, dict):
        raise PrunekitError("manifest 'modules', 'tensors' and 'tied' must be JSON objects; the manifest is damaged")
    for name, shape in tensors.items():
        if not _is_int_list(shape) or min(shape, default=0) < 0:
            raise PrunekitError(f"manifest tensor '{name}' has shape {shape!r}; expected a list of sizes")
    for name, source in tied.items():
        if not isinstance(source, str):
            raise PrunekitError(f"manifest tie '{name}' points to {source!r}; expected a tensor name")
    return modules, tensors, tied


def reshape_to_manifest(model: nn.Module, record: dict, state: dict[str, torch.Tensor]) -> None:
    """Replace `model`'s resizable modules and bare tensors by the recorded geometry and load `state` strictly.

    Everything (module names and types, geometry, every tensor's name and shape) is checked before the model
    changes: on a mismatch `model` is left as it was. The loaded tensors become the model's (dtype as stored).
    """
    modules, tensors, tied = _check_manifest_form(record)
    origin = f"the manifest of a {record.get('model_class', 'model')}"
    present = dict(model.named_modules(remove_duplicate=False))
    fresh: dict[str, nn.Module] = {}
    made: dict[int, nn.Module] = {}  # one fresh module per dense module, so that shared modules stay shared
    for name, geometry in modules.items():
        if name not in present:
            raise PrunekitError(f"{origin} lists module '{name}', which {type(model).__name__} does not have; "
                                "build the model with the class it was saved from")
        new = _fresh_module(name, geometry)
        if type(present[name]) is not type(new):
            raise PrunekitError(f"{origin} has a {type(new).__name__} at '{name}', but {type(model).__name__} "
                                f"has a {type(present[name]).__name__} there")
        fresh[name] = made.setdefault(id(present[name]), new)
    unlisted = [n for n, m in present.items() if type(m) in GEOMETRY and n not in fresh]
    if unlisted:
        raise PrunekitError(f"{origin} does not describe module '{unlisted[0]}' of {type(model).__name__}; the "
                            "manifest is damaged or belongs to another model")

    expected = {}
    for name, module in present.items():
        prefix = f"{name}." if name else ""
        source = fresh.get(name, module)
        expected.update((prefix + k, tuple(v.shape)) for k, v in _owned_tensors(source).items())
    for name, shape in tensors.items():
        if name not in expected or any(name.startswith(f"{m}.") and "." not in name[len(m) + 1:] for m in fresh):
            raise PrunekitError(f"{origin} lists tensor '{name}', which is not a bare parameter or buffer of "
                                f"{type(model).__name__}")
        expected[name] = tuple(shape)
    stored = set(state) | set(tied)
    missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or unexpected:
        raise PrunekitError(f"the weights do not match {type(model).__name__}: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}")
    for name, source in tied.items():
        if source not in state:
            raise PrunekitError(f"manifest tie '{name}' points to '{source}', which the weights file lacks")
    for name in expected:
        shape = tuple(state[tied.get(name, name)].shape)
        if shape != expected[name]:
            raise PrunekitError(f"tensor '{name}' has shape {list(shape)} in the weights file but "
                                f"{list(expected[name])} in the manifest's geometry; the files do not belong together")

    for name, new in fresh.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    for name, shape in tensors.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        if attr in owner._parameters:
            old = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=old.requires_grad)
        else:
            owner._buffers[attr] = torch.empty(shape, device="meta")
    model.load_state_dict({name: state[tied.get(name, name)] for name in expected}, strict=True, assign=True)
    for name, source in tied.items():  # one tensor again, as when saved, not two equal copies
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        if attr in owner._parameters:
            owner._parameters[attr] = model.get_parameter(source)
        else:
            owner._buffers[attr] = model.get_buffer(source)


def load_module(path: Path, record: dict, model: nn.Module | None, *, dtype: torch.dtype | None,
                device: str | torch.device) -> nn.Module:
    """The model of a directory written by `save_module`: the built-in network `record['net']`, or `model` (a
    freshly built dense instance of the saved class), reshaped to the manifest and loaded. In eval mode."""
    from prunekit.artifacts.files import refuse_pickled_weights

    net = record.get("net")
    if model is None:
        nets = builtin_nets()
        if net is None:
            raise PrunekitError(f"'{path}' holds a {record.get('model_class', 'model')} that is not a prunekit "
                                "network; pass a freshly built instance: load(dir, model=TheClass(...))")
        if net not in nets:
            raise PrunekitError(f"'{path}' names network {net!r}; prunekit's networks are {', '.join(nets)}")
        model = nets[net]()
    elif not isinstance(model, nn.Module):
        raise PrunekitError(f"model= must be a freshly built torch.nn.Module, got {type(model).__name__}")
    files = refuse_pickled_weights(path)
    if [f.name for f in files] != [WEIGHTS]:
        raise PrunekitError(f"'{path}' must hold exactly one weights file, {WEIGHTS}; found "
                            f"{', '.join(f.name for f in files)}")
    reshape_to_manifest(model, record, load_file(files[0]))
    return model.to(device=device, dtype=dtype).eval()
