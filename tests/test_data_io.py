import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
import torch

from prunekit.data.io import ArrayStore, Staging, read_data, read_scores, write_scores, write_subset
from prunekit.errors import PrunekitError

TEXTS = ["alpha beta", 'gamma, "delta"', "epsilon\nzeta", "42", "eta theta iota"]
LABELS = ["a", "b", "a", "c", "b"]
KEPT = np.array([0, 2, 3])


def rows(with_ids=True):
    return [
        {**({"id": f"doc-{i}"} if with_ids else {}), "text": t, "label": lab, "n": i * 10}
        for i, (t, lab) in enumerate(zip(TEXTS, LABELS, strict=True))
    ]


def make_file(kind, tmp_path):
    """An input of each kind, with the path or object that read_data takes."""
    if kind == "jsonl":
        path = tmp_path / "in.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows()) + "\n")
        return path
    if kind == "json":
        path = tmp_path / "in.json"
        path.write_text(json.dumps(rows()))
        return path
    if kind in ("csv", "parquet"):
        path = tmp_path / f"in.{kind}"
        table = pa.Table.from_pylist(rows())
        if kind == "csv":
            pyarrow.csv.write_csv(table, path)
        else:
            pyarrow.parquet.write_table(table, path)
        return path
    if kind == "txt":
        path = tmp_path / "in.txt"
        path.write_text("\n\n".join(t.replace("\n", " ") for t in TEXTS))
        return path
    if kind == "npy":
        path = tmp_path / "in.npy"
        np.save(path, np.arange(30, dtype=np.float32).reshape(5, 2, 3))
        return path
    if kind == "npz":
        path = tmp_path / "in.npz"
        np.savez(path, x=np.arange(10.0).reshape(5, 2), y=np.array([0, 1, 0, 1, 1]), id=np.array([7, 3, 9, 1, 5]))
        return path
    if kind == "hf-disk":
        path = tmp_path / "in_hf"
        datasets.Dataset.from_list(rows()).save_to_disk(str(path))
        return path
    raise AssertionError(kind)


def assert_same_rows(a, b, ids_preserved=True):
    assert a.format == b.format
    # Formats without an id field (txt, npy) number the rows they hold.
    np.testing.assert_array_equal(a.ids, b.ids if ids_preserved else np.arange(len(b.ids)))
    if a.items is not None:
        assert a.items == b.items
    if a.table is not None:
        assert a.table.equals(b.table)
    if a.arrays is not None:
        assert a.arrays.keys() == b.arrays.keys()
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    if a.texts_list is not None:
        assert a.texts_list == b.texts_list


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "txt", "npy", "npz", "hf-disk"])
def test_every_file_format_round_trips_its_kept_subset(kind, tmp_path):
    source = make_file(kind, tmp_path)
    table = read_data(source, text_field="text")
    out = tmp_path / f"kept{source.suffix}"
    write_subset(table, KEPT, out)
    back = read_data(out, text_field="text")
    assert_same_rows(back, table.take(KEPT), ids_preserved=kind not in ("txt", "npy"))
    assert back.format == table.format
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_ids_come_from_the_id_field_or_the_row_index(tmp_path):
    assert read_data(make_file("jsonl", tmp_path)).ids.tolist() == [f"doc-{i}" for i in range(5)]
    assert read_data(make_file("npz", tmp_path)).ids.tolist() == [7, 3, 9, 1, 5]
    assert read_data(make_file("npy", tmp_path)).ids.tolist() == [0, 1, 2, 3, 4]
    assert read_data(make_file("parquet", tmp_path), id_field="n").ids.tolist() == [0, 10, 20, 30, 40]
    kept = read_data(make_file("csv", tmp_path), text_field="text").take(KEPT)
    assert kept.ids.tolist() == ["doc-0", "doc-2", "doc-3"]


def test_csv_keeps_a_numeric_looking_text_column_as_text(tmp_path):
    table = read_data(make_file("csv", tmp_path), text_field="text")
    assert table.texts("text") == TEXTS
    assert table.column("n") == [0, 10, 20, 30, 40]


def test_in_memory_inputs_are_written_by_the_output_suffix(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    write_subset(read_data(x), KEPT, tmp_path / "x.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x[KEPT])

    dataset = torch.utils.data.TensorDataset(torch.arange(12.0).view(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]))
    table = read_data(dataset)
    assert table.format == "torch" and list(table.arrays) == ["x", "y"]
    write_subset(table, KEPT, tmp_path / "t.npz")
    back = read_data(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.arrays["x"], dataset.tensors[0][KEPT].numpy())
    np.testing.assert_array_equal(back.arrays["y"], dataset.tensors[1][KEPT].numpy())

    hf = datasets.Dataset.from_list(rows())
    write_subset(read_data(hf), KEPT, tmp_path / "hf_kept")
    back = read_data(tmp_path / "hf_kept")
    assert back.format == "hf-disk" and back.ids.tolist() == ["doc-0", "doc-2", "doc-3"]
    assert back.texts("text") == [TEXTS[i] for i in KEPT]
    write_subset(read_data(hf), [4], tmp_path / "hf_kept", overwrite=True)  # a directory replaced whole
    assert read_data(tmp_path / "hf_kept").ids.tolist() == ["doc-4"]

    write_subset(read_data(TEXTS), KEPT, tmp_path / "texts.jsonl")
    assert read_data(tmp_path / "texts.jsonl").texts() == [TEXTS[i] for i in KEPT]
    with pytest.raises(PrunekitError, match="for a numpy input must have suffix '.npy', '.npz'"):
        write_subset(read_data(x), KEPT, tmp_path / "x.csv")


def test_outputs_are_refused_when_they_exist_and_replaced_with_overwrite(tmp_path):
    table = read_data(make_file("jsonl", tmp_path))
    out = tmp_path / "kept.jsonl"
    out.write_text("old\n")
    with pytest.raises(PrunekitError, match="exists; pass --overwrite"):
        write_subset(table, KEPT, out)
    assert out.read_text() == "old\n"
    write_subset(table, KEPT, out, overwrite=True)
    assert len(out.read_text().splitlines()) == 3
    with pytest.raises(PrunekitError, match=r"must be a '\.jsonl' file, the input's format"):
        write_subset(table, KEPT, tmp_path / "kept.csv")


def test_a_failed_staging_writes_nothing(tmp_path):
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    with pytest.raises(RuntimeError), Staging() as stage:
        pyarrow.parquet.write_table(pa.table({"x": [1]}), stage.path(first))
        stage.path(second).write_text("partial")
        raise RuntimeError("fails halfway")
    assert list(tmp_path.iterdir()) == []


def test_staging_never_replaces_a_directory_by_a_file_or_a_file_by_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    (tmp_path / "f").write_text("f")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with Staging(overwrite=True) as stage, pytest.raises(PrunekitError, match=r"'.*d' is a directory; a file goes"):
        stage.path(tmp_path / "d")
    with Staging(overwrite=True) as stage, pytest.raises(PrunekitError, match=r"'.*f' is a file; a directory goes"):
        stage.path(tmp_path / "f", directory=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    # the same kind is replaced
    with Staging(overwrite=True) as stage:
        stage.path(tmp_path / "f").write_text("new")
        stage.path(tmp_path / "d", directory=True).mkdir()
    assert (tmp_path / "f").read_text() == "new" and list((tmp_path / "d").iterdir()) == []
    # a directory that appears where a file was staged, while the work ran, is not replaced either
    with pytest.raises(PrunekitError, match="is a directory"), Staging(overwrite=True) as stage:
        stage.path(tmp_path / "g").write_text("g")
        (tmp_path / "g").mkdir()
    assert (tmp_path / "g").is_dir()


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(PrunekitError, match="neither an existing file nor a saved Hugging Face dataset"):
        read_data(tmp_path / "missing.jsonl")
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(PrunekitError, match=r"unsupported type '\.md'"):
        read_data(tmp_path / "x.md")
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(PrunekitError, match="repeats id 1; ids must be unique"):
        read_data(tmp_path / "dup.jsonl")
    (tmp_path / "part.jsonl").write_text('{"id": 1, "text": "a"}\n{"text": "b"}\n')
    with pytest.raises(PrunekitError, match="some but not all examples .* have an 'id' field"):
        read_data(tmp_path / "part.jsonl")
    with pytest.raises(PrunekitError, match="has no id field 'key'"):
        read_data(make_file("parquet", tmp_path), id_field="key")
    with pytest.raises(PrunekitError, match="has no column 'body'; its columns: id, text, label, n"):
        read_data(make_file("parquet", tmp_path)).texts("body")
    obj = np.array([{"a": 1}] * 3, dtype=object)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(PrunekitError, match="holding pickled objects"):
        read_data(tmp_path / "obj.npy", mmap=False)
    with pytest.raises(PrunekitError, match="must share their first dimension"):
        read_data({"x": np.zeros((3, 2)), "y": np.zeros(4)})


def test_scores_parquet_has_id_index_score_keep_and_group(tmp_path):
    ids = np.array(["a", "b", "c"], dtype=object)
    write_scores(tmp_path / "s.parquet", ids, np.array([0.5, 0.25, 1.0]), np.array([True, False, True]),
                 groups=np.array([0, 0, 2]))
    table = read_scores(tmp_path / "s.parquet")
    assert table.column_names == ["id", "index", "score", "keep", "group"]
    assert table.to_pydict() == {"id": ["a", "b", "c"], "index": [0, 1, 2], "score": [0.5, 0.25, 1.0],
                                 "keep": [True, False, True], "group": [0, 0, 2]}


def test_array_store_maps_npy_files(tmp_path):
    store = ArrayStore(tmp_path / "work")
    array = store.create("embeddings", (1000, 8), np.float32)
    array[:] = np.arange(8000, dtype=np.float32).reshape(1000, 8)
    array.flush()
    assert "embeddings" in store
    again = store.open("embeddings")
    assert isinstance(again, np.memmap) and not again.flags.writeable
    np.testing.assert_array_equal(again[999], np.arange(7992, 8000))
    np.testing.assert_array_equal(np.load(tmp_path / "work" / "embeddings.npy", allow_pickle=False), array)
    with pytest.raises(PrunekitError, match="array name '../x' must be"):
        store.create("../x", (1,))
