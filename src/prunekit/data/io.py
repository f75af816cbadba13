"""Data in and out: one in-memory table for every input kind, atomic writers in the input's own format.

Inputs (`read_data`):
- local files: `.jsonl` (one JSON object or string per line), `.json` (a list of objects or strings), `.csv`,
  `.parquet`, `.txt` (documents separated by blank lines), `.npy` (one array, first axis = examples) and `.npz`
  (named arrays of equal length);
- a directory written by Hugging Face `Dataset.save_to_disk`;
- in memory: a numpy array, a dict of numpy arrays, a Hugging Face `datasets.Dataset`, a PyTorch map-style
  dataset (items are tensors, tuples such as `(x, y)`, or dicts), or a list of strings.

Every example has an id: the `id` field or column when every example has one (or the field named by `id_field`),
else its row index. Ids must be unique.

Outputs are atomic: a file is written to a hidden temporary file in the target's directory and renamed into place
with `os.replace`; a directory (Hugging Face) goes through `prunekit.artifacts.atomic_directory`. An existing output
is refused unless `overwrite`. `Staging` (`prunekit.artifacts.files`) writes several outputs so that either all of
them appear or none.

`ArrayStore` keeps large arrays (embeddings, scores) as memory-mapped `.npy` files in a work directory, so that a
million 384-dimensional float32 embeddings (1.5 GB) need not be held in anonymous memory.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet

from prunekit.artifacts.files import Staging
from prunekit.errors import PrunekitError

FILE_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "txt",
    ".npy": "npy",
    ".npz": "npz",
}
# In-memory inputs are written in the file format that the output path's suffix names.
_MEMORY_FORMATS = {"numpy": (".npy", ".npz"), "torch": (".npz",), "texts": (".txt", ".jsonl", ".json"), "hf": ("",)}
_HF_DISK_FILES = ("state.json", "dataset_info.json")

Ids = np.ndarray


@dataclass
class DataTable:
    """The examples of one input, in order, with their ids and the format they came in.

    Exactly one of `items` (JSON objects or strings: jsonl, json), `table` (a pyarrow Table: csv, parquet,
    Hugging Face), `arrays` (named numpy arrays with examples on the first axis: npy, npz, numpy, torch) or
    `texts_list` (txt, a list of strings) holds the rows. `where` names row i in error messages ("line 3"),
    `source` describes the input for the protocol card, `dataset` keeps a Hugging Face `Dataset` for writing.
    """

    format: str
    source: str
    ids: Ids
    items: list[Any] | None = None
    lines: list[str] | None = None
    table: pa.Table | None = None
    arrays: dict[str, np.ndarray] | None = None
    texts_list: list[str] | None = None
    dataset: Any = None
    item_where: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    # Access by field.

    @property
    def fields(self) -> list[str]:
        """Names of the fields (keys, columns or arrays) that every example has."""
        if self.items is not None:
            dicts = [item for item in self.items if isinstance(item, dict)]
            if len(dicts) < len(self.items):
                return []
            return [key for key in (dicts[0] if dicts else {}) if all(key in d for d in dicts)]
        if self.table is not None:
            return list(self.table.column_names)
        if self.arrays is not None:
            return list(self.arrays)
        return []

    def where(self, i: int) -> str:
        """How an error message names example `i`, e.g. "line 3 of 'data.jsonl'"."""
        if self.item_where is not None:
            return f"{self.item_where[i]} of '{self.source}'"
        return f"example {i} of '{self.source}'"

    def column(self, name: str) -> list[Any] | np.ndarray:
        """The values of field `name`, one per example (a numpy array for array inputs, else a list)."""
        if self.items is not None:
            values = []
            for i, item in enumerate(self.items):
                if not isinstance(item, dict):
                    raise PrunekitError(
                        f"{self.where(i)} is a {type(item).__name__}, not an object with field {name!r}"
                    )
                if name not in item:
                    raise PrunekitError(f"{self.where(i)} has no field {name!r}; its fields: {', '.join(item)}")
                values.append(item[name])
            return values
        if self.table is not None:
            if name not in self.table.column_names:
                raise PrunekitError(
                    f"'{self.source}' has no column {name!r}; its columns: {', '.join(self.table.column_names)}"
                )
            return self.table.column(name).to_pylist()
        if self.arrays is not None:
            if name not in self.arrays:
                raise PrunekitError(f"'{self.source}' has no array {name!r}; its arrays: {', '.join(self.arrays)}")
            return self.arrays[name]
        raise PrunekitError(f"'{self.source}' is a list of texts and has no field {name!r}")

    def texts(self, text_field: str = "text") -> list[str]:
        """The text of every example: field `text_field`, or the example itself where it is a string.

        A missing value (null) is an empty text. Anything else that is not a string is an error.
        """
        if self.texts_list is not None:
            return list(self.texts_list)
        if self.items is not None:
            texts = []
            for i, item in enumerate(self.items):
                if isinstance(item, dict):
                    if text_field not in item:
                        raise PrunekitError(
                            f"{self.where(i)} has no text field {text_field!r}; its fields: {', '.join(item)}"
                        )
                    item = item[text_field]
                if not isinstance(item, str):
                    raise PrunekitError(
                        f"{self.where(i)} is a {type(item).__name__}, not a string or an object with "
                        f"a string field {text_field!r}"
                    )
                texts.append(item)
            return texts
        if self.table is not None:
            self.column(text_field)  # the missing-column error
            column = self.table.column(text_field)
            if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
                raise PrunekitError(f"column {text_field!r} of '{self.source}' holds {column.type}, not text")
            return [text or "" for text in column.to_pylist()]
        raise PrunekitError(
            f"'{self.source}' holds numeric arrays ({', '.join(self.arrays or {})}), not texts; "
            "give a text file or table with --text-field, or use numeric features"
        )

    def labels(self, label_field: str) -> np.ndarray:
        """Class labels of field `label_field` as int64 codes 0..C-1 (sorted unique values), for training scorers."""
        values = self.column(label_field)
        array = np.asarray(values)
        if array.ndim != 1 or any(v is None for v in values):
            raise PrunekitError(
                f"label field {label_field!r} of '{self.source}' must hold one non-null value per example"
            )
        _, codes = np.unique(array, return_inverse=True)
        return codes.astype(np.int64)

    def features(self, feature_field: str | None = None) -> np.ndarray:
        """Numeric features, float32 of shape (N, D) (trailing axes flattened), for inputs without text.

        `feature_field` names the array or column (a list-of-numbers column in a table); None picks the only
        array of more than one dimension, or "x".
        """
        if self.arrays is not None:
            if feature_field is None:
                candidates = [name for name, a in self.arrays.items() if a.ndim > 1]
                feature_field = "x" if "x" in self.arrays else candidates[0] if len(candidates) == 1 else None
                if feature_field is None:
                    raise PrunekitError(
                        f"'{self.source}' has arrays {', '.join(self.arrays)}; name the feature array"
                    )
            values = np.asarray(self.column(feature_field))
        elif feature_field is None:
            raise PrunekitError(
                f"'{self.source}' is a {self.format} input; name the feature field or give a text field"
            )
        else:
            try:
                values = np.asarray(self.column(feature_field), dtype=np.float32)
            except (TypeError, ValueError):
                raise PrunekitError(
                    f"field {feature_field!r} of '{self.source}' is not a numeric array of equal length per example"
                ) from None
        if not np.issubdtype(values.dtype, np.number) and values.dtype != np.bool_:
            raise PrunekitError(f"features {feature_field!r} of '{self.source}' have dtype {values.dtype}, not numbers")
        return np.ascontiguousarray(values.reshape(len(values), -1), dtype=np.float32)

    def take(self, indices: np.ndarray) -> DataTable:
        """A new table of the examples at `indices` (in that order), same format and source."""
        idx = np.asarray(indices, dtype=np.int64)
        pick: Callable[[list], list] = lambda values: [values[i] for i in idx]  # noqa: E731
        return DataTable(
            format=self.format,
            source=self.source,
            ids=self.ids[idx],
            items=None if self.items is None else pick(self.items),
            lines=None if self.lines is None else pick(self.lines),
            table=None if self.table is None else self.table.take(pa.array(idx)),
            arrays=None if self.arrays is None else {k: np.asarray(a[idx]) for k, a in self.arrays.items()},
            texts_list=None if self.texts_list is None else pick(self.texts_list),
            dataset=None if self.dataset is None else self.dataset.select(idx),
            item_where=None if self.item_where is None else pick(self.item_where),
        )


# Reading.


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PrunekitError(f"text file '{path}' is not UTF-8 ({error.reason} at byte {error.start})") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PrunekitError(f"{where} is not valid JSON: {error}") from None
    except RecursionError:
        raise PrunekitError(f"{where} nests JSON too deeply to be data") from None


def read_txt_documents(path: Path) -> list[str]:
    """Documents of a plain text file: a blank line (only whitespace) ends a document."""
    return [doc.strip() for doc in re.split(r"\n[ \t]*\n", _read_utf8(path)) if doc.strip()]


def _check_ids(ids: Ids, source: str, id_field: str) -> Ids:
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) < len(ids):
        raise PrunekitError(
            f"id field {id_field!r} of '{source}' repeats id {unique[counts > 1][0].tolist()!r}; ids must be unique"
        )
    return ids


def _ids_from(values: list[Any] | np.ndarray, source: str, id_field: str) -> Ids:
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise PrunekitError(
            f"id array {id_field!r} of '{source}' has shape {values.shape}; expected one id per example"
        )
    kinds = {type(v) for v in (values.tolist() if isinstance(values, np.ndarray) else values)}
    if kinds <= {int}:
        ids = np.asarray(values, dtype=np.int64)
    elif kinds <= {str}:
        ids = np.asarray(values, dtype=object)
    else:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise PrunekitError(
            f"id field {id_field!r} of '{source}' holds {names}; ids must be all integers or all strings"
        )
    return _check_ids(ids, source, id_field)


def _assign_ids(table: DataTable, id_field: str | None) -> DataTable:
    """Ids from `id_field` (an error if named and missing), else from "id" when every example has it, else row index."""
    name = id_field or "id"
    has = name in table.fields
    partial = table.items is not None and any(isinstance(item, dict) and name in item for item in table.items)
    if partial and not has and id_field is None:
        raise PrunekitError(f"some but not all examples of '{table.source}' have an 'id' field; give each an id")
    if has:
        table.ids = _ids_from(table.column(name), table.source, name)
    elif id_field is not None:
        fields = ", ".join(table.fields) or "none"
        raise PrunekitError(f"'{table.source}' has no id field {id_field!r}; its fields: {fields}")
    else:
        table.ids = np.arange(len(table.ids), dtype=np.int64)
    return table


def _rows(n: int) -> Ids:
    return np.arange(n, dtype=np.int64)


def _read_jsonl(path: Path) -> DataTable:
    lines, items, where = [], [], []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if line.strip():
            items.append(_parse_json(line, f"line {number} of '{path}'"))
            lines.append(line)
            where.append(f"line {number}")
    return DataTable("jsonl", str(path), _rows(len(items)), items=items, lines=lines, item_where=where)


def _read_json(path: Path) -> DataTable:
    items = _parse_json(_read_utf8(path), f"text file '{path}'")
    if not isinstance(items, list):
        raise PrunekitError(
            f"text file '{path}' holds a JSON {type(items).__name__}; expected a list of strings or of objects"
        )
    where = [f"item {i}" for i in range(len(items))]
    return DataTable("json", str(path), _rows(len(items)), items=items, item_where=where)


def _read_arrow(path: Path, string_columns: Sequence[str]) -> DataTable:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pyarrow.parquet.read_table(path)
        else:
            table = pyarrow.csv.read_csv(
                path,
                parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True),
                # Without this, a text column of numbers would be inferred as numbers rather than text.
                convert_options=pyarrow.csv.ConvertOptions(column_types={c: pa.string() for c in string_columns}),
            )
    except pa.ArrowException as error:
        raise PrunekitError(f"text file '{path}' cannot be read as a table: {error}") from None
    return DataTable(FILE_FORMATS[suffix], str(path), _rows(table.num_rows), table=table)


def _check_npy_size(path: Path) -> None:
    """Refuse a .npy file whose header declares more data than the file holds, before anything is allocated."""
    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        needed = f.tell() + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if not dtype.hasobject and needed > path.stat().st_size:
        raise PrunekitError(f"numpy file '{path}' declares shape {shape} of {dtype} ({needed:,} bytes) but holds "
                            f"{path.stat().st_size:,} bytes; it is truncated or corrupt")


def _read_numpy_file(path: Path, mmap: bool) -> DataTable:
    try:
        if path.suffix.lower() == ".npy":
            _check_npy_size(path)
            arrays = {"x": np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)}
        else:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, MemoryError) as error:
        # np.load refuses object arrays rather than unpickling them (allow_pickle=False): also "cannot be read".
        raise PrunekitError(f"numpy file '{path}' cannot be read (truncated, corrupt, or holding pickled "
                            f"objects, which prunekit never loads): {error}") from None
    return _array_table(arrays, str(path), FILE_FORMATS[path.suffix.lower()])


def _array_table(arrays: dict[str, np.ndarray], source: str, fmt: str) -> DataTable:
    if not arrays:
        raise PrunekitError(f"'{source}' holds no arrays")
    lengths = {name: (a.shape[0] if a.ndim else None) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        shown = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise PrunekitError(f"arrays of '{source}' must share their first dimension (examples); got {shown}")
    n = next(iter(lengths.values()))
    return DataTable(fmt, source, _rows(n), arrays=arrays)


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _HF_DISK_FILES)


def _hf_table(dataset: Any, source: str, fmt: str) -> DataTable:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        raise PrunekitError(f"'{source}' is a DatasetDict with splits {', '.join(dataset)}; pass one split")
    table = dataset.with_format("arrow")[:]  # the rows the dataset shows, also for a selected view
    return DataTable(fmt, source, _rows(len(dataset)), table=table, dataset=dataset)


def _torch_table(dataset: Any) -> DataTable:
    """Materialise a map-style torch dataset's items into named arrays (tuple positions x, y or 0, 1, ...)."""
    import torch

    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        return DataTable("torch", f"{type(dataset).__name__} dataset", _rows(0), arrays={"x": np.zeros((0,))})
    first = items[0]
    if isinstance(first, dict):
        names = list(first)
        columns = [[item[k] for item in items] for k in names]
    elif isinstance(first, tuple | list):
        names = ["x", "y"] if len(first) == 2 else [str(i) for i in range(len(first))]
        columns = [[item[j] for item in items] for j in range(len(first))]
    else:
        names, columns = ["x"], [items]

    def stack(values: list) -> np.ndarray:
        if isinstance(values[0], torch.Tensor):
            return torch.stack([torch.as_tensor(v) for v in values]).numpy()
        return np.asarray(values)

    arrays = {name: stack(values) for name, values in zip(names, columns, strict=True)}
    return _array_table(arrays, f"{type(dataset).__name__} dataset", "torch")


def read_data(
    source: Any,
    *,
    id_field: str | None = None,
    text_field: str | None = None,
    mmap: bool = True,
) -> DataTable:
    """Read any supported input (see the module docstring) into a `DataTable`.

    `text_field` is read as text in CSV files (so a column of numbers stays text); `id_field` names the id field
    (default: "id" when every example has one, else the row index). `.npy` files are memory-mapped when `mmap`.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if _is_hf_disk(path):
            import datasets

            try:
                dataset = datasets.load_from_disk(str(path))
            except (OSError, ValueError) as error:
                raise PrunekitError(f"'{path}' cannot be read as a saved Hugging Face dataset: {error}") from None
            table = _hf_table(dataset, str(path), "hf-disk")
        elif not path.is_file():
            raise PrunekitError(
                f"input '{path}' is neither an existing file nor a saved Hugging Face dataset directory"
            )
        else:
            suffix = path.suffix.lower()
            if suffix not in FILE_FORMATS:
                raise PrunekitError(f"input file '{path}' has unsupported type {suffix!r}; accepted: "
                                    f"{', '.join(FILE_FORMATS)}, or a save_to_disk directory")
            if suffix == ".jsonl":
                table = _read_jsonl(path)
            elif suffix == ".json":
                table = _read_json(path)
            elif suffix in (".csv", ".parquet"):
                table = _read_arrow(path, [text_field] if text_field else [])
            elif suffix == ".txt":
                docs = read_txt_documents(path)
                table = DataTable("txt", str(path), _rows(len(docs)), texts_list=docs)
            else:
                table = _read_numpy_file(path, mmap)
    elif isinstance(source, np.ndarray):
        table = _array_table({"x": source}, f"array of shape {source.shape}", "numpy")
    elif isinstance(source, dict) and all(isinstance(v, np.ndarray) for v in source.values()):
        table = _array_table(dict(source), f"arrays {', '.join(source)}", "numpy")
    elif isinstance(source, list | tuple) and all(isinstance(t, str) for t in source):
        table = DataTable("texts", f"{len(source)} texts given in memory", _rows(len(source)), texts_list=list(source))
    elif type(source).__module__.startswith("datasets"):
        table = _hf_table(source, f"Hugging Face dataset of {len(source)} rows", "hf")
    elif hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        table = _torch_table(source)
    else:
        raise PrunekitError(
            f"input of type {type(source).__name__} is not accepted; give a path ({', '.join(FILE_FORMATS)}, "
            "save_to_disk directory), a numpy array, a Hugging Face Dataset, a torch Dataset or a list of strings"
        )
    return _assign_ids(table, id_field)


# Writing.


def output_format(table: DataTable, path: str | os.PathLike) -> str:
    """The format the kept subset of `table` is written in: the input's own; in-memory inputs by `path`'s suffix."""
    suffix = Path(path).suffix.lower()
    if table.format in FILE_FORMATS.values() or table.format == "hf-disk":
        fmt = table.format
        expected = next((s for s, f in FILE_FORMATS.items() if f == fmt), "")
        if suffix != expected:
            what = f"a '{expected}' file" if expected else "a directory path without suffix"
            raise PrunekitError(f"output '{path}' must be {what}, the input's format ({fmt})")
        return fmt
    accepted = _MEMORY_FORMATS[table.format]
    if suffix not in accepted:
        shown = ", ".join(repr(s) for s in accepted).replace("''", "no suffix (a save_to_disk directory)")
        raise PrunekitError(f"output '{path}' for a {table.format} input must have suffix {shown}")
    return "hf-disk" if table.format == "hf" else FILE_FORMATS[suffix]


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def write_table(table: DataTable, path: str | os.PathLike, fmt: str | None = None) -> None:
    """Write `table` to `path` (not atomically: give it a `Staging` path) in `fmt` (default `output_format`)."""
    path = Path(path)
    fmt = fmt or output_format(table, path)
    if fmt == "jsonl":
        if table.lines is not None:
            _write_lines(path, table.lines)  # the original lines, byte for byte
        elif table.items is not None:
            _write_lines(path, [json.dumps(item, ensure_ascii=False) for item in table.items])
        else:
            _write_lines(path, [json.dumps(text, ensure_ascii=False) for text in table.texts()])
    elif fmt == "json":
        items = table.items if table.items is not None else table.texts()
        path.write_text(json.dumps(items, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif fmt == "csv":
        pyarrow.csv.write_csv(table.table, path)
    elif fmt == "parquet":
        pyarrow.parquet.write_table(table.table, path)
    elif fmt == "txt":
        path.write_text("".join(text.strip() + "\n\n" for text in table.texts()), encoding="utf-8")
    elif fmt == "npy":
        if len(table.arrays or {}) != 1:
            raise PrunekitError(f"output '{path}' is .npy but the input has arrays {', '.join(table.arrays or {})}; "
                                "use .npz")
        with open(path, "wb") as f:
            np.save(f, next(iter(table.arrays.values())), allow_pickle=False)
    elif fmt == "npz":
        with open(path, "wb") as f:
            np.savez(f, **table.arrays)
    elif fmt == "hf-disk":
        path.mkdir()
        table.dataset.save_to_disk(str(path))
    else:
        raise PrunekitError(f"cannot write format {fmt!r}")


def write_subset(
    table: DataTable, indices: np.ndarray, out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write the examples of `table` at `indices` to `out` in the input's format, atomically."""
    fmt = output_format(table, out)
    with Staging(overwrite=overwrite) as stage:
        write_table(table.take(indices), stage.path(out, directory=fmt == "hf-disk"), fmt)
    return Path(out)


def scores_table(
    ids: Ids, scores: np.ndarray, keep: np.ndarray, groups: np.ndarray | None = None
) -> pa.Table:
    """The ids-and-scores table: columns id, index, score, keep and, for dedup, group."""
    n = len(ids)
    columns = {
        "id": pa.array(ids.tolist() if ids.dtype == object else ids),
        "index": pa.array(np.arange(n, dtype=np.int64)),
        "score": pa.array(np.asarray(scores, dtype=np.float64)),
        "keep": pa.array(np.asarray(keep, dtype=bool)),
    }
    if groups is not None:
        columns["group"] = pa.array(np.asarray(groups, dtype=np.int64))
    return pa.table(columns)


def write_scores(
    out: str | os.PathLike,
    ids: Ids,
    scores: np.ndarray,
    keep: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ids, scores and the keep mask (and dedup groups) as parquet, atomically."""
    table = scores_table(ids, scores, keep, groups)
    with Staging(overwrite=overwrite) as stage:
        pyarrow.parquet.write_table(table, stage.path(out))
    return Path(out)


def read_scores(path: str | os.PathLike) -> pa.Table:
    """Read a parquet file written by `write_scores`."""
    return pyarrow.parquet.read_table(path)


# Memory-mapped arrays.


class ArrayStore:
    """Named `.npy` arrays in a work directory, memory-mapped (`np.lib.format.open_memmap`).

    `create(name, shape, dtype)` makes a writable array backed by `<directory>/<name>.npy`; `open(name)` maps it
    read-only later, in this or another process. Nothing is pickled.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise PrunekitError(f"array name {name!r} must be letters, digits, '_', '-' or '.'")
        return self.directory / f"{name}.npy"

    def create(self, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> np.memmap:
        """A new zero-filled writable memory-mapped array (replacing any array of that name)."""
        return np.lib.format.open_memmap(self._path(name), mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))

    def open(self, name: str, mode: str = "r") -> np.memmap:
        """Map the stored array `name` ("r" read-only, "r+" writable)."""
        path = self._path(name)
        if not path.is_file():
            raise PrunekitError(f"no stored array {name!r} in '{self.directory}'")
        return np.lib.format.open_memmap(path, mode=mode)

    def __contains__(self, name: str) -> bool:
        return self._path(name).is_file()
