"""Pruning a model larger than memory: its blocks stay in files, and the engine loads one block at a time.

`load_offloaded(path)` builds the model with every block's tensors on the meta device (no memory) and loads only
what lies outside the blocks (embeddings, final norm, head, rotary tables); a large one stored in the model's dtype
(the embedding) is mapped from its file copy-on-write, so that only the pages of the rows used become resident. The
sequential engine asks the model's `BlockWeights` for each block as it reaches it (`prunekit.weights.engine`): here,
`enter` reads the block from its safetensors file onto the compute device, and `leave` drops it again, first writing
it to a work folder if it was pruned; from then on the block is read from there. `prunekit.save` then assembles a
standard sharded Hugging Face directory, one block at a time. So pruning needs memory for one block, the calibration
activations and the parts outside the blocks, never for the whole model; the input directory is only read.

Everything that reads a whole model goes through the same files one block at a time: perplexity (block by block, as
on another device), the weight hash and the parameter counts of the record (`weights.engine.state_items`). What
needs every block at once is refused: the `global`/`lamp`/`ecoflap` allocations and Pruner-Zero's gradients.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import adapter_for
from prunekit.adapters.moe import MoeAdapter
from prunekit.artifacts.files import check_safetensors
from prunekit.artifacts.io import MANIFEST, MANIFEST_LIMIT, atomic_directory, read_json_file, saved_class
from prunekit.errors import PrunekitError
from prunekit.weights.engine import BlockWeights, attach_block_weights, block_weights

# Allocations and methods that read every block at once, which an offloaded model never holds.
WHOLE_MODEL_ALLOCATIONS = ("global", "lamp", "ecoflap")


def _libc_trim():
    """glibc's `malloc_trim`, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


# safetensors' dtype names (the format is little-endian, as every machine torch runs on here)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _tensor_files(path: Path, model: nn.Module) -> dict[str, tuple[Path, str]]:
    """Where each tensor of the model is in a directory's safetensors files: model name -> (file, stored name).

    Names are mapped as transformers maps them when loading (GPT-NeoX stores its head as `embed_out`); a stored
    tensor that loading would reshape or fuse (MoE experts) is refused, since a block is read tensor by tensor."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta_state = model.state_dict()
    files: dict[str, tuple[Path, str]] = {}
    for file in sorted(path.glob("*.safetensors")):
        header, _ = check_safetensors(file)
        for stored in header:
            if stored == "__metadata__":
                continue
            name, converted = rename_source_key(stored, renamings, converters, model.base_model_prefix, meta_state)
            if converted is not None:
                raise PrunekitError(f"'{path}' stores '{stored}' in a form that loading converts; offloaded "
                                    "loading reads tensors stored as the model holds them")
            if name in files:
                raise PrunekitError(f"tensor '{name}' is stored twice in '{path}' ({files[name][0].name}, "
                                    f"{file.name}); a model directory holds each tensor once")
            files[name] = (file, stored)
    if not files:
        raise PrunekitError(f"model directory '{path}' has no safetensors weights to read block by block")
    return files


def _read(files: dict[str, tuple[Path, str]], names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, read from their files on the CPU.

    Each tensor's bytes are read on their own. The safetensors library's torch loader maps the whole file as
    private memory instead, which a process whose memory is capped (RLIMIT_DATA) is refused for a file larger
    than its cap, although only one block's pages would ever be touched."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name][0], []).append(name)
    tensors = {}
    for file, wanted in by_file.items():
        header, start = check_safetensors(file)
        with file.open("rb") as handle:
            for name in wanted:
                entry = header[files[name][1]]
                if entry.get("dtype") not in _DTYPES:
                    raise PrunekitError(f"tensor '{name}' in '{file}' has dtype {entry.get('dtype')!r}, which "
                                        f"offloaded loading does not read ({', '.join(_DTYPES)})")
                begin, end = entry["data_offsets"]
                data = bytearray(end - begin)
                handle.seek(start + begin)
                if handle.readinto(data) != len(data):
                    raise PrunekitError(f"'{file}' ended inside tensor '{name}'; the file is truncated")
                dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
                tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                tensors[name] = tensor.reshape(shape)
    return tensors


# Tensors outside the blocks at least this large (a 262k-word embedding is 671 MB in float32) are mapped from their
# file rather than read, when stored in the model's dtype.
MAP_MIN_BYTES = 16 * 2**20


def _map(files: dict[str, tuple[Path, str]], wanted: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The large tensors of `wanted` (name -> the model's dtype) stored in that dtype, mapped copy-on-write from their
    files: a page is read when first touched and, unmodified, stays file cache that the kernel can reclaim; a write
    goes to a private copy, never to the file. Pruning touches only the embedding rows of the calibration tokens,
    so a model's embedding costs it almost no memory. A tensor that cannot be mapped (a cap on private mappings,
    RLIMIT_DATA) is left out, to be read instead. The file must stay as it is while the model lives, as for any
    mapped file (prunekit itself only reads its inputs)."""
    mapped, headers = {}, {}
    for name, dtype in wanted.items():
        file, stored = files[name]
        if file not in headers:
            headers[file] = check_safetensors(file)
        header, start = headers[file]
        entry = header[stored]
        begin, end = (start + offset for offset in entry["data_offsets"])
        if _DTYPES.get(entry.get("dtype")) != dtype or end - begin < MAP_MIN_BYTES:
            continue
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            with file.open("rb") as handle:
                mapping = mmap.mmap(handle.fileno(), end - aligned, access=mmap.ACCESS_COPY, offset=aligned)
        except (OSError, ValueError):
            continue
        # the tensor holds the mapping; it is unmapped with the last tensor that uses it
        mapped[name] = torch.frombuffer(mapping, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                        offset=begin - aligned).reshape(entry["shape"])
    return mapped


def _non_persistent_buffers(module: nn.Module) -> list[str]:
    return [f"{prefix}.{name}".lstrip(".") for prefix, sub in module.named_modules()
            for name in sub._non_persistent_buffers_set if getattr(sub, name, None) is not None]


class OffloadedBlocks(BlockWeights):
    """The blocks of a model loaded by `load_offloaded`: read from the input's files, or from the work folder
    once pruned. The work folder is removed when this object is garbage-collected."""

    def __init__(self, model: nn.Module, files: dict[str, tuple[Path, str]], work: Path) -> None:
        super().__init__()
        adapter = adapter_for(model)
        self.prefix = adapter.block_prefix(model)
        blocks = adapter.block_list(model)
        self.names = [[f"{self.prefix}.{i}.{name}" for name in block.state_dict()] for i, block in enumerate(blocks)]
        self.dtypes = [{name: t.dtype for name, t in block.state_dict().items()} for block in blocks]
        self.files = files
        self.work = work
        self._cleanup = weakref.finalize(self, shutil.rmtree, work, ignore_errors=True)

    @property
    def offloaded(self) -> bool:
        return True

    def read(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors by local name, in the model's dtypes, as they are now (pruned or not)."""
        tensors = _read(self.files, self.names[index])
        local = len(f"{self.prefix}.{index}.")
        out = {}
        for name, tensor in tensors.items():
            key = name[local:]
            if not torch.isfinite(tensor).all():
                raise PrunekitError(f"weight '{name}' in '{self.files[name][0]}' holds NaN or inf; prunekit will not "
                                    "prune a broken model")
            out[key] = tensor.to(self.dtypes[index][key])
        return out

    def enter(self, index: int, block: nn.Module, device: torch.device) -> None:
        tensors = self.read(index)
        block.to_empty(device=device)
        block.load_state_dict(tensors, strict=True)

    def leave(self, index: int, block: nn.Module, *, changed: bool) -> None:
        if changed:
            file = self.work / f"block-{index:05d}.safetensors"
            tmp = file.with_suffix(".tmp")
            save_file({f"{self.prefix}.{index}.{k}": v.detach().to("cpu").contiguous()
                       for k, v in block.state_dict().items()}, tmp, metadata={"format": "pt"})
            os.replace(tmp, file)  # a block file is whole or absent, and replaces an earlier version of the block
            for name in self.names[index]:
                self.files[name] = (file, name)
        block.to("meta")
        if _TRIM is not None:
            # glibc raises its mmap threshold after large frees, and then keeps a freed block's memory in its heap
            # instead of returning it: measured on SmolLM2, 300 MB more resident memory after 30 blocks without this
            _TRIM(0)


def load_offloaded(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   work_dir: str | os.PathLike | None = None):
    """(model, tokenizer) of a causal LM whose blocks stay in its safetensors files until the engine needs them
    (tokenizer None for a directory without one).

    `source` is a model asset or a local Hugging Face directory (safetensors, tensor names as `save_pretrained`
    writes them). `prunekit.prune` then prunes it one block at a time, `prunekit.measure.perplexity` evaluates it
    block by block, and `prunekit.save` writes it. Pruned blocks wait in a folder under `work_dir` (default: the
    system's temporary directory), removed with the model. The input directory is never written.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prunekit.assets import causal_lm_path, check_dtype

    check_dtype(dtype)
    path = causal_lm_path(source)
    manifest = path / MANIFEST
    record = read_json_file(manifest, limit=MANIFEST_LIMIT, what="manifest") if manifest.is_file() else {}
    if record.get("block_widths") or record.get("removed_sublayers"):
        raise PrunekitError(f"'{path}' was structurally pruned (its blocks differ from its config); load it with "
                            "prunekit.load, offloaded loading reads models whose blocks match their config")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    saved = saved_class(config)
    with torch.device("meta"):
        model = (saved._from_config(config, dtype=dtype) if saved
                 else AutoModelForCausalLM.from_config(config, dtype=dtype))
    adapter = adapter_for(model)
    if isinstance(adapter, MoeAdapter):
        raise PrunekitError(f"offloaded pruning reaches plain Linear projections only, not the experts of this "
                            f"{adapter.family} model")
    files = _tensor_files(path, model)
    blocks = adapter.block_list(model)
    prefix = adapter.block_prefix(model) + "."
    computed = _non_persistent_buffers(blocks)
    if computed:
        raise PrunekitError(f"the blocks of this {config.model_type} model hold buffers computed at construction "
                            f"({computed[0]}), which offloaded loading cannot read from the files")
    state = model.state_dict()
    missing = [name for name in state if name.startswith(prefix) and name not in files]
    if missing:
        raise PrunekitError(f"'{path}' has no tensor '{missing[0]}'; offloaded loading needs the tensor names of the "
                            "model's state dict, as save_pretrained writes them")

    outside = [name for name in state if not name.startswith(prefix) and name in files]
    mapped = _map(files, {name: state[name].dtype for name in outside})
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module.to_empty(device="cpu", recurse=False)
    # the parameters to be mapped wait on the meta device, where initialising them below writes no page
    model.load_state_dict({name: state[name] for name in mapped}, strict=False, assign=True)
    for module in model.modules():  # rotary tables, embedding scales: computed, not stored (as transformers does);
        if id(module) not in inside and module._non_persistent_buffers_set:  # before loading, which overwrites the
            model._init_weights(module)  # module's parameters that this initialises too
    model.load_state_dict(_read(files, [name for name in outside if name not in mapped]), strict=False)
    model.load_state_dict(mapped, strict=False, assign=True)  # the mapped tensors become the parameters
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[name].data_ptr() for name in outside if name in params}
    unloaded = [name for name, t in params.items()
                if not name.startswith(prefix) and name not in files and t.data_ptr() not in loaded]
    if unloaded:
        raise PrunekitError(f"'{path}' has no tensor '{unloaded[0]}' (outside the blocks, not tied to another)")
    model.eval()

    try:
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="prunekit-offload-", dir=work_dir))
    except OSError as error:
        raise PrunekitError(f"cannot make a work folder for the pruned blocks in '{work_dir or tempfile.gettempdir()}'"
                            f": {error.strerror}") from None
    attach_block_weights(model, OffloadedBlocks(model, files, work))
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    return model, tokenizer


def check_offload_options(*, allocation: str, statistics: str | None) -> None:
    """Refuse, for an offloaded model, allocations that rank every block's weights at once and methods that need
    a backward pass through the whole model."""
    if allocation in WHOLE_MODEL_ALLOCATIONS:
        raise PrunekitError(f"allocation '{allocation}' needs every block's weights at once, which an offloaded "
                            "model never holds; use uniform or owl")
    if statistics == "gradients":
        raise PrunekitError("gradient-scored methods (pruner-zero) need a backward pass through the whole model, "
                            "which an offloaded model cannot run; use wanda, ria, sparsegpt or admm")


def check_offload_support(model: nn.Module, *, allocation: str, statistics: str | None) -> None:
    """`check_offload_options` when `model` is offloaded."""
    if block_weights(model).offloaded:
        check_offload_options(allocation=allocation, statistics=statistics)


def save_offloaded(model: nn.Module, tokenizer, out_dir: str | os.PathLike, record: dict, *,
                   overwrite: bool = False, progress: bool = False) -> Path:
    """Write an offloaded model as a sharded Hugging Face directory, one block at a time, atomically: one shard
    for the tensors outside the blocks, one per block, `model.safetensors.index.json`, config, tokenizer and
    `prunekit.json`. Every tensor is written in the model's dtype, as `save_pretrained` would."""
    store = block_weights(model)
    if not isinstance(store, OffloadedBlocks):
        raise PrunekitError("save_offloaded writes models loaded with load_offloaded; use prunekit.save")
    manifest = json.dumps(record, indent=2) + "\n"
    blocks = len(store.names)
    shards = blocks + 1
    shard = [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        prefix = store.prefix + "."
        # the tensors outside the blocks under the names the input stored (a tied head is not stored twice)
        outside = {name: t.detach().contiguous() for name, t in model.state_dict().items()
                   if not name.startswith(prefix) and name in store.files}
        for index in tqdm(range(-1, blocks), desc="save block by block", unit="shard", disable=not progress):
            tensors = outside if index < 0 else {f"{prefix}{index}.{k}": v for k, v in store.read(index).items()}
            save_file(tensors, tmp / shard[index + 1], metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard[index + 1]))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(manifest)
    return out_dir
