"""Save and load pruned models: the Hugging Face layout plus `prunekit.json`, written atomically.

Weights are stored as safetensors and never unpickled on load. An output directory is assembled in a
temporary directory beside it (same filesystem, so the final rename is atomic) and only renamed into place
once complete: a failed save leaves no partial output, and an existing output survives until its
replacement is ready.
"""

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prunekit.errors import PrunekitError

MANIFEST = "prunekit.json"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _sibling(out_dir: Path, tag: str) -> Path:
    """A fresh hidden path beside `out_dir`, e.g. `.model.tmp-1a2b3c4d`."""
    return out_dir.with_name(f".{out_dir.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PrunekitError(f"output path '{out_dir}' is a file; pass a directory path")
    if out_dir.exists() and not overwrite:
        raise PrunekitError(f"output directory '{out_dir}' exists; pass --overwrite to replace it")


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `out_dir` when the block succeeds.

    Refuses at once, before any work, if `out_dir` is a file, or exists and `overwrite` is False. If the
    block raises, the temporary directory is removed and `out_dir` is untouched. With `overwrite`, the old
    directory is moved aside, the new one renamed in, and only then the old one deleted.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    tmp.mkdir()  # unlike tempfile.mkdtemp, keeps the umask's permissions, which the output should have
    try:
        yield tmp
        _check_target(out_dir, overwrite)  # something may have appeared at out_dir meanwhile
        if not out_dir.exists():
            tmp.rename(out_dir)
            return
        old = _sibling(out_dir, "old")
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
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError as error:
        raise PrunekitError(
            f"'{manifest}' is not valid JSON ({error.msg} at line {error.lineno}); re-save the model"
        ) from error


def load_pruned(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, dict]:
    """Load a directory written by `save_pruned`: `(model, tokenizer or None, record)`.

    Reads only local files, only safetensors weights (nothing is unpickled) and no remote code.
    """
    path = Path(path)
    if not path.is_dir():
        raise PrunekitError(
            f"pruned model directory '{path}' does not exist; pass a directory written by save_pruned"
        )
    record = _read_manifest(path)
    if not any(path.glob("*.safetensors")):
        raise PrunekitError(
            f"'{path}' holds no .safetensors weights; only safetensors checkpoints are loaded"
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, use_safetensors=True, dtype=dtype
    )
    model.to(device)
    tokenizer = None
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, record
