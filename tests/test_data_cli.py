import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
import torch

from prunekit.cli import main
from prunekit.data.api import prune_data
from prunekit.errors import PrunekitError

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [
    "The central bank raised interest rates by half a point.",
    "The striker scored twice in the second half of the final.",
    "A new smartphone with a folding screen goes on sale next week.",
    "Parliament debated the budget until late at night.",
    "The film won the award for best picture at the festival.",
    "Heavy rain caused flooding across the northern valleys.",
    "Researchers trained a small neural network on handwritten digits.",
    "The orchestra performed a symphony by Beethoven.",
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def news(tmp_path):
    """Eight distinct sentences, an exact copy of one and a copy with a trailing space of another."""
    records = [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)]
    records += [{"id": "copy-of-s2", "text": SENTENCES[2]}, {"id": "copy-of-s5", "text": SENTENCES[5] + " "}]
    path = tmp_path / "news.jsonl"
    write_jsonl(path, records)
    return path


def test_semdedup_end_to_end_keeps_one_of_each_duplicate(news, tmp_path, capsys):
    out, scores, report = tmp_path / "kept.jsonl", tmp_path / "scores.parquet", tmp_path / "report.json"
    code = main(["data", "--input", str(news), "--text-field", "text", "--method", "semdedup", "--threshold", "0.95",
                 "--out", str(out), "--scores-out", str(scores), "--report", str(report), "--threads", "1",
                 "--quiet", "--json"])
    assert code == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == [f"s{i}" for i in range(8)]
    # The kept lines are the input's lines, byte for byte.
    assert out.read_text().splitlines() == news.read_text().splitlines()[:8]
    table = pyarrow.parquet.read_table(scores).to_pydict()
    assert table["id"] == [f"s{i}" for i in range(8)] + ["copy-of-s2", "copy-of-s5"]
    assert table["keep"] == [True] * 8 + [False, False]
    assert table["group"] == list(range(8)) + [2, 5]
    assert table["score"][8] > 0.999 and table["score"][9] > 0.95
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads(report.read_text())
    assert record["metrics"]["kept"] == 8 and record["metrics"]["removed"] == 2
    assert record["metrics"]["keep_fraction"] == {"target": None, "achieved": 0.8}
    assert record["method"]["name"] == "semdedup" and record["method"]["threshold"] == 0.95
    assert record["model"]["encoder"] == "minilm-l6"
    assert record["environment"]["torch_threads"] == 1 and record["resources"]["peak_rss_mb"] > 0


def test_random_keeps_the_exact_count_in_the_input_format(tmp_path):
    path = tmp_path / "rows.csv"
    pyarrow.csv.write_csv(pa.table({"text": [f"row {i}" for i in range(20)], "n": list(range(20))}), path)
    out = tmp_path / "kept.csv"
    assert main(["data", "--input", str(path), "--method", "random", "--keep", "0.25", "--seed", "3",
                 "--out", str(out), "--quiet"]) == 0
    kept = pyarrow.csv.read_csv(out).to_pydict()
    assert len(kept["n"]) == 5 and kept["n"] == sorted(kept["n"])
    expected = np.sort(np.argsort(-np.random.default_rng(3).random(20), kind="stable")[:5])
    assert kept["n"] == expected.tolist()


def test_training_dynamics_on_numeric_features_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    features = rng.standard_normal((60, 5)) + labels[:, None]
    path = tmp_path / "x.parquet"
    pyarrow.parquet.write_table(pa.table({"features": features.tolist(), "label": labels}), path)
    out, scores = tmp_path / "kept.parquet", tmp_path / "scores.parquet"
    assert main(["data", "--input", str(path), "--method", "el2n", "--label-field", "label", "--feature-field",
                 "features", "--keep", "0.5", "--class-balanced", "--out", str(out), "--scores-out", str(scores),
                 "--quiet", "--threads", "1"]) == 0
    kept = pyarrow.parquet.read_table(out).to_pydict()
    assert len(kept["label"]) == 30
    assert np.bincount(kept["label"]).tolist() == np.round(np.bincount(labels) / 2).astype(int).tolist()
    table = pyarrow.parquet.read_table(scores).to_pydict()
    assert sum(table["keep"]) == 30 and "group" not in table
    # The hardest examples of each class are the kept ones.
    s, keep = np.array(table["score"]), np.array(table["keep"])
    for c in range(3):
        in_class = labels == c
        assert s[in_class & keep].min() >= s[in_class & ~keep].max()


def run_error(argv, tmp_path, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("prunekit: error: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporaries left
    return err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "random", "--keep", "0"], r"keep count 0 is outside \[1, 10\]"),
        (["--method", "random", "--keep", "1.5"], r"keep fraction 1.5 is outside \(0, 1\]"),
        (["--method", "random", "--keep", "-0.2"], r"keep fraction -0.2 is outside \(0, 1\]"),
        (["--method", "prototypes", "--keep", "0.5", "--text-field", "body"], "has no text field 'body'"),
        (["--method", "magic", "--keep", "0.5"], "method 'magic' is unknown; use one of random, semdedup"),
        (["--method", "el2n", "--keep", "0.5"], "el2n trains a classifier on the examples and needs labels"),
        (["--method", "semdedup", "--keep", "0.5"], "semdedup needs a cosine similarity threshold"),
        (["--method", "semdedup", "--threshold", "0"], r"threshold must be a cosine similarity in \(0, 1\)"),
        (["--method", "random", "--keep", "0.5", "--mode", "middle"], "selection mode 'middle' is unknown"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(options, message, news, tmp_path, capsys):
    out = tmp_path / "kept.jsonl"
    err = run_error(["data", "--input", str(news), *options, "--out", str(out), "--scores-out",
                     str(tmp_path / "s.parquet"), "--quiet"], tmp_path, capsys)
    assert re.search(message, err), err


def test_empty_data_nan_embeddings_and_existing_outputs_exit_2(news, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    err = run_error(["data", "--input", str(empty), "--method", "random", "--keep", "0.5", "--out",
                     str(tmp_path / "k.jsonl")], tmp_path, capsys)
    assert "has no examples" in err
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    x[5, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    err = run_error(["data", "--input", str(tmp_path / "x.npy"), "--method", "prototypes", "--keep", "0.5", "--out",
                     str(tmp_path / "k.npy"), "--quiet"], tmp_path, capsys)
    assert "embeddings hold NaN or infinite values" in err and "first row 5" in err
    (tmp_path / "kept.jsonl").write_text("precious\n")
    err = run_error(["data", "--input", str(news), "--method", "random", "--keep", "0.5", "--out",
                     str(tmp_path / "kept.jsonl")], tmp_path, capsys)
    assert "exists; pass --overwrite" in err
    assert (tmp_path / "kept.jsonl").read_text() == "precious\n"
    assert main(["data", "--input", str(news), "--method", "random", "--keep", "3", "--out",
                 str(tmp_path / "kept.jsonl"), "--overwrite", "--quiet"]) == 0
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 3


def test_prototypes_on_arrays_in_python_keep_the_easiest(tmp_path):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal((40, 8)) * 0.1 + 5, rng.standard_normal((5, 8)) * 3]).astype(np.float32)
    record = prune_data(x, method="prototypes", keep=40, mode="easy", clusters=1, out=tmp_path / "kept.npy",
                        scores_out=tmp_path / "s.parquet", progress=False)
    assert record["metrics"]["kept"] == 40 and record["metrics"]["keep_fraction"]["target"] == pytest.approx(40 / 45)
    np.testing.assert_array_equal(np.load(tmp_path / "kept.npy"), x[:40])  # the 5 outliers are the hardest
    with pytest.raises(PrunekitError, match="perplexity scores texts"):
        prune_data(x, method="perplexity", keep=0.5, out=tmp_path / "p.npy", progress=False)
    assert not (tmp_path / "p.npy").exists()


def test_threads_limit_the_call_and_the_callers_setting_comes_back(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    calls = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    prune_data(x, method="random", keep=5, out=tmp_path / "kept.npy", progress=False, threads=2)
    assert calls == [2, before] and torch.get_num_threads() == before
