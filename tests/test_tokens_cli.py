"""`prunekit eval --tokens SPEC`: the spec parser and the evaluation it runs (tiny models; MiniLM marked slow)."""

import math

import pytest
import torch
from test_tokens import tiny_encoder
from test_tokens_fastv import decoder

from prunekit.errors import PrunekitError
from prunekit.tokens.evaluate import evaluate_decoder, evaluate_encoder, evaluate_tokens, parse_token_spec, summary


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize(("spec", "expected"), [
    ("tome:r=8", {"method": "tome", "r": 8}),
    ("zero-tprune:keep=0.5", {"method": "zero-tprune", "keep": 0.5}),
    ("random:r=4,seed=3", {"method": "random", "r": 4, "seed": 3}),
    (" fastv:keep=0.25, layer=3, feather=true ", {"method": "fastv", "keep": 0.25, "layer": 3, "feather": True}),
    ("fastv:r=100,feather=0", {"method": "fastv", "r": 100, "feather": False}),
])
def test_token_specs_parse(spec, expected):
    assert parse_token_spec(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("", "is empty"),
    ("tome", "exactly one of r"),
    ("pagerank:r=2", "unknown method 'pagerank'"),
    ("tome:", "'' is not KEY=VALUE"),
    ("tome:r", "'r' is not KEY=VALUE"),
    ("tome:r=", "'r=' is not KEY=VALUE"),
    ("tome:k=8", "unknown option 'k'"),
    ("tome:r=8,r=4", "option 'r' given twice"),
    ("tome:r=8.0", "r='8.0' must be an integer"),
    ("tome:keep=half", "keep='half' must be a number"),
    ("tome:keep=nan", "keep='nan' must be a number"),
    ("tome:keep=1.5", "keep must be a fraction"),
    ("tome:r=-1", "r must be an integer >= 0"),
    ("tome:r=2,keep=0.5", "exactly one of r"),
    ("tome:r=2,layer=2", "layer and feather are options of fastv, random"),
    ("fastv:keep=0.5,layer=0", "layer must be an integer >= 1"),
    ("fastv:keep=0.5,feather=maybe", "feather='maybe' must be true or false"),
])
def test_bad_token_specs_raise_one_line(spec, message):
    with pytest.raises(PrunekitError, match=message) as error:
        parse_token_spec(spec)
    assert "\n" not in str(error.value)


class WordTokenizer:
    """Whitespace words hashed into a tiny vocabulary, with CLS first and right padding: enough for tiny_encoder."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[1] + [5 + sum(map(ord, word)) % 95 for word in text.split()][:max_length - 1] for text in texts]
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(width) < torch.tensor([[len(r)] for r in rows]))
                .long()}


TEXTS = [" ".join(f"w{(7 * i + j) % 23}" for j in range(5 + 3 * i)) for i in range(7)]


def test_encoder_evaluation_measures_against_the_unpruned_model():
    model = tiny_encoder()
    record = evaluate_encoder(model, WordTokenizer(), {"method": "tome", "r": 0}, data=TEXTS, seq_len=20,
                              batch_size=3, progress=False)
    metrics = record["metrics"]
    assert metrics["embedding_fidelity"]["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["tokens"]["kept_fraction"] == 1.0
    assert metrics["macs_first_batch"]["pruned"] == metrics["macs_first_batch"]["dense"]
    record = evaluate_encoder(model, WordTokenizer(), {"method": "tome", "r": 2}, data=TEXTS, seq_len=20,
                              batch_size=3, progress=False)
    metrics = record["metrics"]
    lengths = [min(20, 6 + 3 * i) for i in range(7)]
    # 2 tokens per block in each of the 3 blocks; the 6-token text goes 6 -> 4 -> 3 -> 2 (ToMe merges at most the
    # unprotected half of the A set per block).
    assert metrics["tokens"]["kept_per_text_per_layer"][-1] == pytest.approx(sum(max(n - 6, 2) for n in lengths) / 7)
    assert metrics["macs_first_batch"]["pruned"] < metrics["macs_first_batch"]["dense"]
    assert 0 < metrics["embedding_fidelity"]["mean_cosine"] < 1
    assert record["method"] == {"name": "tokens", "method": "tome", "r": 2}
    assert "texts/s" in summary(record)
    assert all("forward" not in vars(block) for block in model.encoder.layer)  # removed after measuring


def test_decoder_evaluation_measures_against_the_unpruned_model():
    model = decoder()
    ids = torch.randint(3, 128, (4, 40), generator=torch.Generator().manual_seed(0))
    record = evaluate_decoder(model, None, {"method": "fastv", "keep": 1.0}, data=ids, seq_len=40, continuation=8,
                              batch_size=2, progress=False)
    metrics = record["metrics"]
    assert metrics["next_token_agreement"] == 1.0
    assert metrics["continuation_perplexity"]["pruned"] == metrics["continuation_perplexity"]["dense"]
    assert metrics["prompt_tokens"] == {"input": 32, "kept_mean": 32.0, "kept_fraction": 1.0}
    record = evaluate_decoder(model, None, {"method": "fastv", "keep": 0.25, "layer": 1}, data=ids, seq_len=40,
                              continuation=8, batch_size=2, progress=False)
    metrics = record["metrics"]
    assert metrics["prompt_tokens"]["kept_mean"] == 8.0
    assert metrics["next_token_agreement"] < 1.0
    assert metrics["prefill_macs"]["pruned"] < metrics["prefill_macs"]["dense"]
    assert math.isfinite(metrics["continuation_perplexity"]["pruned"])
    assert "prefill" in summary(record)
    record = evaluate_decoder(model, None, {"method": "fastv", "keep": 0.25, "layer": 9}, data=ids, seq_len=40,
                              continuation=8, batch_size=2, progress=False)
    assert record["metrics"]["next_token_agreement"] == 1.0  # K past the last layer: nothing pruned


def test_evaluation_checks_the_spec_before_loading():
    with pytest.raises(PrunekitError, match="unknown option 'k'"):
        evaluate_tokens("no-such-model", "tome:k=3")
    with pytest.raises(PrunekitError, match="need a 'method'"):
        evaluate_tokens("no-such-model", {"r": 3})


@pytest.mark.slow
def test_tome_on_minilm_from_the_spec():
    record = evaluate_tokens("minilm-l6", "tome:r=8", windows=32, progress=False)
    metrics = record["metrics"]
    assert metrics["embedding_fidelity"]["mean_cosine"] >= 0.95
    assert metrics["tokens"]["kept_fraction"] < 0.9
    # 8 of 256 tokens fewer after each of the 6 blocks: about 0.906 of the MACs on the 256-token texts.
    assert metrics["macs_first_batch"]["pruned"] < 0.93 * metrics["macs_first_batch"]["dense"]
    assert record["evaluation"]["texts"] == 32
