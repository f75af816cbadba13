"""Safe handling of the files a user hands prunekit: inputs never overwritten, nothing unpickled, hostile files refused.

Everything here is light (standard library only), so the command line can run these checks before it imports torch.

- `check_distinct` refuses an output that is, contains or lies inside one of the inputs, or that collides with
  another output, whatever `--overwrite` says: the one mistake that would destroy a user's data.
- `temp_sibling` names the hidden temporary files and directories that outputs are assembled in
  (`.NAME.tmp-<pid>-<hex>`); `clean_stale_siblings` removes those left by a process that was killed, and restores a
  previous output that a killed `--overwrite` had moved aside.
- `check_safetensors` validates a safetensors file's header against the file before any library parses it;
  `refuse_pickled_weights` refuses a model directory whose weights exist only in a pickle format.
- `read_bounded_text` reads a small configuration file (recipe, manifest) with a size limit.
- `Staging` writes several outputs (files or directories) so that all of them appear or none does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path

from prunekit.errors import PrunekitError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A safetensors header is JSON describing the tensors; real ones are kilobytes to a few megabytes.
SAFETENSORS_HEADER_LIMIT = 100 * 2**20


PathLike = str | os.PathLike


def _real(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _same_file(a: Path, b: Path) -> bool:
    """Equal after resolving symbolic links, or the same inode (a hard link)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct(inputs: Mapping[str, PathLike | None], outputs: Mapping[str, PathLike | None]) -> None:
    """Refuse outputs that would overwrite or delete an input, or each other, before any work is done.

    `inputs` and `outputs` map a label for messages (`--input`, `--out`) to a path (None entries are skipped).
    Refused: an output that is an input (also through a symbolic or hard link), an output directory that
    contains an input (replacing it would delete the input), an output inside an input directory, and two outputs
    that are the same path or nested in one another. This holds whatever `overwrite` says.
    """
    given_inputs = [(label, _real(p)) for label, p in inputs.items() if p is not None]
    given_outputs = [(label, _real(p)) for label, p in outputs.items() if p is not None]
    for out_label, out in given_outputs:
        for in_label, source in given_inputs:
            if _same_file(out, source):
                raise PrunekitError(f"{out_label} '{out}' is the {in_label} itself; choose another output path")
            if out in source.parents:
                raise PrunekitError(f"{out_label} '{out}' contains the {in_label} '{source}'; replacing it would "
                                    "delete the input: choose another output path")
            if source in out.parents:
                raise PrunekitError(f"{out_label} '{out}' is inside the {in_label} '{source}'; write outside the "
                                    "input")
    for i, (label_a, a) in enumerate(given_outputs):
        for label_b, b in given_outputs[i + 1:]:
            if _same_file(a, b) or a in b.parents or b in a.parents:
                raise PrunekitError(f"{label_a} '{a}' and {label_b} '{b}' collide; give each output its own path")


def check_output_dir(path: PathLike, overwrite: bool) -> None:
    """Refuse an output directory path that is a file, or that exists when `overwrite` is False."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PrunekitError(f"output path '{path}' is a file; pass a directory path")
    if path.exists() and not overwrite:
        raise PrunekitError(f"output directory '{path}' exists; pass --overwrite to replace it")


def temp_sibling(path: Path, tag: str) -> Path:
    """A fresh hidden path beside `path` that names this process: `.NAME.tmp-<pid>-<hex><suffix>`."""
    return path.with_name(f".{path.stem}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_siblings(path: PathLike) -> list[Path]:
    """Remove what a killed prunekit process left beside output `path`; return what was removed or restored.

    Temporaries of a process that is still running (another prunekit writing the same output) are left alone.
    When a killed `--overwrite` had moved the previous output aside (`.NAME.old-*`) and the new one never
    arrived, the previous output is put back; once the new output exists, the old copy is deleted.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.stem)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}{re.escape(path.suffix)}$")
    handled = []
    for entry in sorted(parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or _alive(int(match[2])):
            continue
        if match[1] == "old" and not path.exists() and not path.is_symlink():
            entry.rename(path)
        else:
            _remove(entry)
        handled.append(entry)
    return handled


def check_safetensors(path: PathLike) -> tuple[dict, int]:
    """Refuse a safetensors file whose header is truncated, oversized, not JSON, or points past the file's end;
    return its header (tensor name -> dtype, shape, data_offsets) and the offset where its data starts."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise PrunekitError(f"weights file '{path}' is truncated ({size} bytes); it is not a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(SAFETENSORS_HEADER_LIMIT, size - 8):
                raise PrunekitError(f"weights file '{path}' declares a {header_len:,}-byte header in a {size:,}-byte "
                                    "file; it is truncated or not a safetensors file")
            header_bytes = f.read(header_len)
    except OSError as error:
        raise PrunekitError(f"weights file '{path}' cannot be read: {error.strerror}") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PrunekitError(f"weights file '{path}' has a header that is not JSON; it is corrupt") from None
    if not isinstance(header, dict):
        raise PrunekitError(f"weights file '{path}' has a malformed header; it is corrupt")
    data_size = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise PrunekitError(f"weights file '{path}' is truncated or corrupt: tensor '{name}' lies outside the "
                                f"file's {data_size:,} data bytes")
    return header, 8 + header_len


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 16 MB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_pickled_weights(directory: PathLike, what: str = "model directory") -> list[Path]:
    """The safetensors files of a model directory, each checked; refuse one that holds only pickle-format weights."""
    directory = Path(directory)
    tensors = sorted(directory.glob("*.safetensors"))
    if not tensors:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES) if directory.is_dir() \
            else []
        if pickled:
            raise PrunekitError(
                f"{what} '{directory}' holds weights only in a pickle format ({', '.join(pickled)}), which prunekit "
                "never loads; convert it once where you trust the file, e.g. AutoModelForCausalLM.from_pretrained"
                "(dir).save_pretrained(new_dir), which writes model.safetensors")
        raise PrunekitError(f"{what} '{directory}' holds no .safetensors weights")
    for file in tensors:
        check_safetensors(file)
    return tensors


def read_bounded_text(path: PathLike, *, limit: int, what: str) -> str:
    """The UTF-8 text of a small file, refusing one larger than `limit` bytes before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise PrunekitError(f"{what} '{path}' is {size:,} bytes; at most {limit:,} are accepted")
        data = path.read_bytes()
    except IsADirectoryError:
        raise PrunekitError(f"{what} '{path}' is a directory; give a file") from None
    except OSError as error:
        raise PrunekitError(f"{what} '{path}' cannot be read: {error.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PrunekitError(f"{what} '{path}' is not UTF-8 text (byte {error.start}); give a text file") from None


def check_output(path: PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, an output that exists (unless `overwrite`) or whose parent is a file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PrunekitError(f"output '{path}' exists; pass --overwrite to replace it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PrunekitError(f"output '{path}' is inside '{parent}', which is a file")
            break
    return path


def check_output_file(path: PathLike, overwrite: bool, *, what: str, example: str) -> Path:
    """`check_output` for an output that must be a file: an existing directory there is refused even with
    `overwrite`, which would otherwise replace the directory with the file."""
    if Path(path).is_dir():
        raise PrunekitError(f"{what} '{path}' is a directory; pass a file path such as {example}")
    return check_output(path, overwrite)


class Staging:
    """Write several outputs so that all appear together or none do.

    ```
    with Staging(overwrite=False) as stage:
        write_table(kept, stage.path("kept.jsonl"))     # a hidden temporary path beside the target
        write_scores(stage.path("scores.parquet"), ...)
    ```
    On success every temporary is renamed into place (`os.replace`, atomic per file); on error they are deleted.
    """

    def __init__(self, *, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._pending: list[tuple[Path, Path, bool]] = []

    def _check(self, target: PathLike, directory: bool) -> Path:
        target = check_output(target, self.overwrite)
        # overwriting replaces a target of the same kind only: never a directory by a file, or a file by a directory
        if directory and target.exists() and not target.is_dir():
            raise PrunekitError(f"output '{target}' is a file; a directory goes there, so give a directory path")
        if not directory and target.is_dir():
            raise PrunekitError(f"output '{target}' is a directory; a file goes there, so give a file path")
        return target

    def path(self, target: PathLike, *, directory: bool = False) -> Path:
        """A temporary path for `target`, which the caller fills with a directory if `directory`, else a file;
        refuses an existing target unless overwrite, and one of the other kind even then."""
        clean_stale_siblings(target)
        target = self._check(target, directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(target, "tmp")
        self._pending.append((tmp, target, directory))
        return tmp

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if exc_type is None:
                for tmp, target, directory in self._pending:  # something may have appeared meanwhile
                    self._check(target, directory)
                    if tmp.is_dir() != directory:
                        raise RuntimeError(f"staged '{tmp}' is not the {'directory' if directory else 'file'} "
                                           f"declared for '{target}'")
                for tmp, target, _ in self._pending:
                    if target.is_dir():
                        old = temp_sibling(target, "old")
                        target.rename(old)
                        os.replace(tmp, target)
                        shutil.rmtree(old)
                    else:
                        os.replace(tmp, target)
        finally:
            for tmp, _, _ in self._pending:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                elif tmp.exists():
                    tmp.unlink()
