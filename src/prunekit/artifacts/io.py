"""Save and load pruned models: the Hugging Face layout plus `prunekit.json`, written atomically.

Weights are stored as safetensors and never unpickled on load. An output directory is assembled in a
temporary directory beside it (same filesystem, so the final rename is atomic) and only renamed into place
once complete: a failed save leaves no partial output, and an existing output survives until its
replacement is ready.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prunekit.artifacts.files import (
    Staging,
    check_output_dir,
    check_output_file,
    check_safetensors,
    clean_stale_siblings,
    read_bounded_text,
    refuse_pickled_weights,
    temp_sibling,
)
from prunekit.errors import PrunekitError

MANIFEST = "prunekit.json"
# A manifest holds the protocol card and per-layer numbers: kilobytes. Anything far larger is not one of ours.
MANIFEST_LIMIT = 64 * 2**20
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `out_dir` when the block succeeds.

    Refuses at once, before any work, if `out_dir` is a file, or exists and `overwrite` is False. If the
    block raises, the temporary directory is removed and `out_dir` is untouched. With `overwrite`, the old
    directory is moved aside, the new one renamed in, and only then the old one deleted. What an earlier,
    killed process left beside `out_dir` is cleaned up first (see `clean_stale_siblings`).
    """
    out_dir = Path(out_dir)
    clean_stale_siblings(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out_dir, "tmp")
    tmp.mkdir()  # unlike tempfile.mkdtemp, keeps the umask's permissions, which the output should have
    try:
        yield tmp
        check_output_dir(out_dir, overwrite)  # something may have appeared at out_dir meanwhile
        if not out_dir.exists():
            tmp.rename(out_dir)
            return
        old = temp_sibling(out_dir, "old")
        out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except BaseException:
            old.rename(out_dir)
            raise
        shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_pruned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    record: dict,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `model` (safetensors and config.json), `tokenizer` if given and `record` as prunekit.json.

    The output appears complete or not at all (see `atomic_directory`). Returns the output directory.
    """
    manifest = json.dumps(record, indent=2) + "\n"  # a record JSON cannot hold fails before any writing
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        # safetensors is the only format transformers 5 writes (and the default of 4.x)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(manifest)
    return out_dir


def _read_manifest(path: Path) -> dict:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise PrunekitError(f"'{path}' has no {MANIFEST}; pass a directory written by prunekit's save_pruned")
    return read_json_file(manifest, limit=MANIFEST_LIMIT, what="manifest")


def read_json_file(path: Path, *, limit: int, what: str) -> dict:
    """A JSON object from a small file, refusing oversized, non-UTF-8, malformed or non-object content."""
    text = read_bounded_text(path, limit=limit, what=what)
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise PrunekitError(f"{what} '{path}' is not valid JSON ({error.msg} at line {error.lineno})") from None
    except RecursionError:
        raise PrunekitError(f"{what} '{path}' nests too deeply to be a real {what}") from None
    if not isinstance(content, dict):
        raise PrunekitError(f"{what} '{path}' holds a JSON {type(content).__name__}, not an object")
    return content


def check_model_dir(path: Path) -> None:
    """Refuse, before transformers reads anything, a model directory with a broken config or unsafe weights."""
    config = path / "config.json"
    if not config.is_file():
        raise PrunekitError(f"model directory '{path}' has no config.json; expected a Hugging Face model directory")
    read_json_file(config, limit=MANIFEST_LIMIT, what="model config")
    refuse_pickled_weights(path)


def saved_class(config) -> type[PreTrainedModel] | None:
    """The transformers class a directory was saved from (its config's `architectures`, e.g. BertModel for an
    encoder, which has a causal-LM class too), or None. Only transformers' own classes are looked up."""
    import transformers

    names = config.architectures or []
    found = None
    if len(names) == 1 and isinstance(names[0], str) and names[0].isidentifier():
        with contextlib.suppress(ImportError, AttributeError):
            found = getattr(transformers, names[0])
    return found if isinstance(found, type) and issubclass(found, PreTrainedModel) else None


def load_causal_lm_dir(path: Path, *, dtype: torch.dtype, block_widths: list | None = None,
                       removed_sublayers: dict | None = None) -> PreTrainedModel:
    """The model of a checked directory: the class it was saved from, else the causal LM of its type. With
    `block_widths` (from the manifest of a model whose blocks were pruned to different widths) or
    `removed_sublayers` (of a model whose attention or MLP sublayers were removed by `prunekit.depth`) it is built
    from its config, shaped block by block, and its safetensors are loaded strictly: every tensor must fit, and only
    tied weights may be absent from the files."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    saved = saved_class(config)
    if block_widths is None and not removed_sublayers:
        return (saved or AutoModelForCausalLM).from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                               dtype=dtype)
    from prunekit.structure import load_widths

    model = saved._from_config(config, dtype=dtype) if saved else AutoModelForCausalLM.from_config(config,
                                                                                                  dtype=dtype)
    if block_widths is not None:
        load_widths(model, block_widths)
    from prunekit.depth import remove_sublayers

    remove_sublayers(model, removed_sublayers)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise PrunekitError(f"the weights in '{path}' do not fit the widths its manifest states: "
                            f"{str(error).splitlines()[0]}") from None
    model.tie_weights()
    loaded = {model.get_parameter(name).data_ptr() for name in state if name not in unexpected}
    untied = [name for name in missing if model.get_parameter(name).data_ptr() not in loaded]
    if unexpected or untied:
        raise PrunekitError(f"the weights in '{path}' do not match its model: unexpected {sorted(unexpected)[:3]}, "
                            f"missing {untied[:3]}")
    return model.eval()


def load_pruned(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    model: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None, dict]:
    """Load a directory written by `save_pruned` or `save_module`: `(model, tokenizer or None, record)`.

    A directory of `save_module` (its manifest lists `modules`) holds a network that is not a Hugging Face model:
    a built-in one is rebuilt by name; any other is reshaped from `model`, a freshly built dense instance of its
    class (see `prunekit.artifacts.modules`). Reads only local files, only safetensors weights (nothing is
    unpickled) and no remote code.
    """
    path = Path(path)
    if not path.is_dir():
        raise PrunekitError(
            f"pruned model directory '{path}' does not exist; pass a directory written by save_pruned"
        )
    record = _read_manifest(path)
    if "modules" in record:
        from prunekit.artifacts.modules import load_module

        return load_module(path, record, model, dtype=dtype, device=device), None, record
    if model is not None:
        raise PrunekitError(f"'{path}' holds a Hugging Face model, which is rebuilt from its config; model= applies "
                            "to directories of networks saved by prunekit.save")
    check_model_dir(path)
    model = load_causal_lm_dir(path, dtype=dtype, block_widths=record.get("block_widths"),
                               removed_sublayers=record.get("removed_sublayers"))
    model.to(device)
    tokenizer = None
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, record


# ---- keep-masks ----------------------------------------------------------------------------------------------

MASKS_KIND = "prunekit keep-masks"


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write keep-masks {parameter name: bool tensor, True = kept} as one safetensors file, atomically.

    The file is what `prune(..., return_masks=True)` returns and what `given+admm` (`masks=`) and `heal` (`masks=`)
    take; `load_masks` reads it back. An existing file is refused unless `overwrite`."""
    tensors = {}
    for name, keep in masks.items():
        if not isinstance(name, str) or not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            got = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise PrunekitError(f"keep-mask '{name}' must be a bool tensor under a parameter name, got {got}")
        tensors[name] = keep.detach().cpu().contiguous()
    if not tensors:
        raise PrunekitError("no keep-masks to save")
    check_output_file(path, overwrite, what="masks output", example="masks.safetensors")
    with Staging(overwrite=overwrite) as stage:
        save_file(tensors, stage.path(path), metadata={"format": "pt", "kind": MASKS_KIND})
    return Path(path)


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Keep-masks {parameter name: bool tensor} from a safetensors file of bool tensors (`save_masks` writes one).

    The header is checked before anything is read; a tensor of any other dtype is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"masks file '{path}' does not exist" if not path.exists() else
                            f"masks path '{path}' is not a file; pass the .safetensors file save_masks wrote")
    header, _ = check_safetensors(path)
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if not tensors:
        raise PrunekitError(f"masks file '{path}' holds no tensors")
    for name, entry in tensors.items():
        if entry.get("dtype") != "BOOL":
            raise PrunekitError(f"masks file '{path}': '{name}' is {entry.get('dtype')}, not a bool keep-mask")
    return load_file(path)
