"""Text in, token tensors out: calibration samples and evaluation windows with a reproducible protocol.

A text source is one of
- a text asset name (`wiki-summaries`, `bbc-news`, `shakespeare`), the only kind of source that has
  fixed "train" and "test" splits (see `prunekit.assets.text_records`);
- a local file: `.txt` (documents separated by blank lines), `.jsonl` (one JSON object with a text field,
  or one JSON string, per line), `.json` (a list of strings or of objects with a text field), `.parquet`
  or `.csv` (a text column);
- a local directory, read as its `.txt` files in sorted name order (not recursive);
- a sequence of strings, used as given.

Documents become one token stream: each document is tokenized on its own without special tokens and the
tokens of the separator "\\n\\n" go between consecutive documents, so the stream does not depend on how
many documents were tokenized at once. Windows are cut from the stream without overlap. Every `TokenSet`
carries an `info` dict that states how it was made, for the protocol card, and a SHA-256 of its tokens.
"""

import hashlib
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from prunekit.assets import text_asset_names, text_records
from prunekit.assets._texts import check_split
from prunekit.data.io import read_data, read_txt_documents
from prunekit.errors import PrunekitError

SEPARATOR = "\n\n"
FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
# Documents are tokenized in batches of about this many characters (a few ten thousand tokens), which
# keeps the fast tokenizers' batch parallelism while tokenizing little more text than is needed.
_BATCH_CHARS = 1 << 18

TextSource = str | os.PathLike[str] | Sequence[str]


@dataclass
class TokenSet:
    """Token ids, one row per sample or window, with the protocol that produced them.

    `ids` is an int64 tensor of shape [samples, seq_len]. `info` is JSON-able and holds "source",
    "split" (None where no split applied), "samples", "seq_len", "seed" (None where nothing was random),
    "selection" (how the rows were chosen) and "tokens_sha256"; evaluation windows add "windowing",
    "windows" and "tokens".
    """

    ids: torch.Tensor
    info: dict[str, Any]


def _is_asset(source: object) -> bool:
    return isinstance(source, str) and source in text_asset_names()


def load_texts(source: TextSource, *, split: str | None = None, text_field: str = "text") -> list[str]:
    """The documents of a text source (see the module docstring for the kinds of source), in their order.

    `split` ("train", "test" or None for all) selects from a text asset's fixed 90/10 split. Local files,
    directories and sequences of strings are the caller's own choice of documents and are used whole:
    `split` does not apply to them (the `TokenSet.info` of such sources records "split": None).
    `text_field` names the field or column that holds the text in `.jsonl`, `.json`, `.parquet` and
    `.csv` files.
    """
    check_split(split)
    if _is_asset(source):
        documents = [record["text"] for record in text_records(source, split)]
    elif isinstance(source, str | os.PathLike):
        documents = _load_path(Path(source), text_field)
    elif isinstance(source, Sequence) and all(isinstance(text, str) for text in source):
        documents = list(source)
    else:
        raise PrunekitError(
            f"text source of type {type(source).__name__} is not accepted; give a text asset name, "
            "a path, or a list of strings"
        )
    if not any(text.strip() for text in documents):
        raise PrunekitError(f"text source {_describe(source)!r} has no text")
    return documents


def _load_path(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        return [text for file in sorted(path.glob("*.txt")) for text in read_txt_documents(file)]
    if not path.is_file():
        raise PrunekitError(
            f"text source '{path}' is neither a text asset ({', '.join(text_asset_names())}) "
            "nor an existing file or directory"
        )
    if path.suffix.lower() not in FILE_TYPES:
        raise PrunekitError(
            f"text file '{path}' has unsupported type {path.suffix.lower()!r}; accepted: {', '.join(FILE_TYPES)}"
        )
    return read_data(path, text_field=text_field).texts(text_field)


def _describe(source: TextSource) -> str:
    """The source as the protocol card names it."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return f"{len(source)} texts given in memory"


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _token_stream(tokenizer: PreTrainedTokenizerBase, documents: Iterable[str], needed: int | None) -> list[int]:
    """Token ids of `documents` joined by the separator, stopping once at least `needed` ids exist."""
    separator = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    first = True
    for batch in _batches(documents):
        # verbose=False: whole documents may exceed model_max_length, which is no problem here.
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if not first:
                stream.extend(separator)
            stream.extend(ids)
            first = False
        if needed is not None and len(stream) >= needed:
            break
    return stream


def _check_at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PrunekitError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _token_set(ids: torch.Tensor, info: dict[str, Any]) -> TokenSet:
    digest = hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()
    samples, seq_len = ids.shape
    return TokenSet(ids=ids, info={**info, "samples": samples, "seq_len": seq_len, "tokens_sha256": digest})


def _given_tensor(tokenizer: PreTrainedTokenizerBase | None, ids: torch.Tensor) -> TokenSet:
    """A tensor of token ids used exactly as given, after checking that the model could read it."""
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise PrunekitError(f"token tensor has shape {tuple(ids.shape)}; expected [samples >= 1, seq_len >= 2]")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise PrunekitError(f"token tensor has dtype {ids.dtype}; expected an integer dtype such as torch.int64")
    low, high = int(ids.min()), int(ids.max())
    vocab = len(tokenizer) if tokenizer is not None else high + 1  # without a tokenizer the caller checks the model
    if low < 0 or high >= vocab:
        raise PrunekitError(
            f"token tensor holds ids from {low} to {high}; the tokenizer's ids run from 0 to {vocab - 1}"
        )
    info = {"source": "tensor", "split": None, "seed": None, "selection": "given tensor, used as is"}
    return _token_set(ids.detach().to("cpu", torch.int64), info)


def calibration_tokens(
    tokenizer: PreTrainedTokenizerBase,
    source: TextSource | torch.Tensor,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    split: str | None = "train",
) -> TokenSet:
    """`samples` windows of `seq_len` tokens for calibrating a pruning method, reproducible from `seed`.

    Document order is shuffled with `random.Random(seed)`, the documents are tokenized in that order
    (only as many as needed), and the stream is cut into `samples` consecutive non-overlapping windows,
    so every sample is real running text and no token is used twice. A 2-D integer `source` tensor is
    used exactly as given and `samples`, `seq_len`, `seed` and `split` do not apply. `split` applies to
    text assets only (see `load_texts`).
    """
    if isinstance(source, torch.Tensor):
        return _given_tensor(tokenizer, source)
    _check_at_least("samples", samples, 1)
    _check_at_least("seq_len", seq_len, 2)
    _check_at_least("seed", seed, 0)
    documents = load_texts(source, split=split)
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    needed = samples * seq_len
    stream = _token_stream(tokenizer, (documents[i] for i in order), needed)
    if len(stream) < needed:
        raise PrunekitError(
            f"calibration text has {len(stream)} tokens; {samples} samples × {seq_len} tokens need {needed}"
        )
    info = {
        "source": _describe(source),
        "split": split if _is_asset(source) else None,
        "seed": seed,
        "selection": "documents shuffled with random.Random(seed), joined by '\\n\\n', "
        "consecutive non-overlapping windows from the start",
    }
    return _token_set(torch.tensor(stream[:needed], dtype=torch.int64).view(samples, seq_len), info)


def evaluation_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: TextSource | torch.Tensor,
    *,
    seq_len: int,
    max_windows: int | None = None,
    split: str | None = "test",
) -> TokenSet:
    """Non-overlapping windows of `seq_len` tokens over a text, in order, for perplexity and the like.

    Documents keep their fixed order, joined by "\\n\\n"; the incomplete tail is dropped, and only the
    first `max_windows` windows are kept (all if None; only the text they need is tokenized). A 2-D
    integer `source` tensor is used exactly as given and `seq_len`, `max_windows` and `split` do not
    apply. `split` applies to text assets only (see `load_texts`).
    """
    if isinstance(source, torch.Tensor):
        token_set = _given_tensor(tokenizer, source)
        samples, length = token_set.ids.shape
        token_set.info.update(windowing="given", windows=samples, tokens=samples * length)
        return token_set
    _check_at_least("seq_len", seq_len, 2)
    if max_windows is not None:
        _check_at_least("max_windows", max_windows, 1)
    documents = load_texts(source, split=split)
    needed = None if max_windows is None else max_windows * seq_len
    stream = _token_stream(tokenizer, documents, needed)
    windows = len(stream) // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise PrunekitError(f"evaluation text has {len(stream)} tokens; one window of {seq_len} tokens needs {seq_len}")
    info = {
        "source": _describe(source),
        "split": split if _is_asset(source) else None,
        "seed": None,
        "selection": "documents in their fixed order, joined by '\\n\\n', incomplete tail dropped",
        "windowing": "non-overlapping",
        "windows": windows,
        "tokens": windows * seq_len,
    }
    ids = torch.tensor(stream[: windows * seq_len], dtype=torch.int64).view(windows, seq_len)
    return _token_set(ids, info)
