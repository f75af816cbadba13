"""Structured pruning of BERT encoders: attention heads and FFN neurons of tiny random BertModels (fast), and of
the real all-MiniLM-L6-v2 judged by the fidelity of its sentence embeddings on BBC News (slow)."""

import copy
import json

import pytest
import torch
import transformers
from torch import nn

import prunekit
from prunekit.adapters import adapter_for
from prunekit.errors import PrunekitError
from prunekit.measure import parameter_counts
from prunekit.measure.embedding import embedding_fidelity, sentence_embeddings
from prunekit.measure.protocol import weights_sha256
from prunekit.structure.groups import block_layouts, head_channels, roles
from prunekit.structure.remove import BlockPlan, apply_plan, config_mismatch
from tiny_models import tiny_bert

VOCAB = 128
IDS = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS).index_fill_(1, torch.arange(18, 24), 0)  # padded tails must stay padded


def hidden(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run(model, mode="remove", **options):
    options = {"method": "flap", "remove": 0.25, "calibration": IDS, "progress": False, **options}
    return prunekit.prune_structure(model, mode=mode, **options)


@pytest.mark.parametrize("cls", [transformers.BertModel, transformers.BertForMaskedLM,
                                 transformers.BertForSequenceClassification])
def test_adapter_names_every_role_of_the_block(cls):
    model = tiny_bert(cls)
    adapter = adapter_for(model)
    assert adapter.family == "bert" and not adapter.causal
    assert len(adapter.block_list(model)) == 3
    layout = adapter.head_layout(model.config)
    assert layout == {"heads": 4, "kv_heads": 4, "head_dim": 16}
    for block in adapter.block_list(model):
        norms = {name for name, module in block.named_modules() if isinstance(module, nn.LayerNorm)}
        assert set(adapter.norms) == norms
        linears = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        assert set(adapter.attention + adapter.mlp) == linears
    assert [lay.group_size for lay in block_layouts(model, adapter)] == [1, 1, 1]


def zero_units(model, gone_heads, gone_neurons):
    """Zero heads `gone_heads` (rows of q, k, v with their biases, columns of o) and neurons `gone_neurons` (rows of
    intermediate.dense with biases, columns of output.dense) in every block; the plans that keep the rest."""
    adapter = adapter_for(model)
    layouts = block_layouts(model, adapter)
    r = roles(adapter)
    plans = []
    for block, lay in zip(adapter.block_list(model), layouts, strict=True):
        rows, _ = head_channels(gone_heads, lay)
        with torch.no_grad():
            for name, dim, index in ((r.q, 0, rows), (r.k, 0, rows), (r.v, 0, rows), (r.o, 1, rows),
                                     (r.mlp_in[0], 0, gone_neurons), (r.mlp_out, 1, gone_neurons)):
                module = block.get_submodule(name)
                module.weight.index_fill_(dim, index, 0)
                if dim == 0:
                    module.bias.index_fill_(0, index, 0)
        plans.append(BlockPlan(torch.tensor([h for h in range(lay.kv_heads) if h not in gone_heads.tolist()]),
                               torch.tensor([n for n in range(lay.neurons) if n not in gone_neurons.tolist()])))
    return adapter, layouts, plans


def test_removing_all_zero_heads_and_neurons_leaves_outputs_identical():
    model = tiny_bert()
    adapter, layouts, plans = zero_units(model, torch.tensor([1]), torch.tensor([0, 5, 77, 127]))
    before = hidden(model)
    apply_plan(model, adapter, layouts, plans, remove=True)
    after = block_layouts(model, adapter)
    assert [(lay.kv_heads, lay.neurons) for lay in after] == [(3, 124)] * 3
    torch.testing.assert_close(hidden(model), before, rtol=1e-5, atol=1e-5)
    # the output projections keep their whole biases (they belong to the unpruned hidden dimension)
    block = adapter.block_list(model)[0]
    assert block.attention.output.dense.bias.shape == (64,) and block.intermediate.dense.bias.shape == (124,)
    # the FFN width is stated by the config; three heads of 16 cannot be (BERT derives the width from the count)
    assert model.config.intermediate_size == 124 and model.config.num_attention_heads == 4
    assert "heads" in config_mismatch(model, adapter)


def test_removing_all_zero_neurons_only_keeps_the_config_in_agreement(tmp_path):
    model = tiny_bert()
    adapter, layouts, plans = zero_units(model, torch.tensor([], dtype=torch.long), torch.tensor([3, 9]))
    before = hidden(model)
    apply_plan(model, adapter, layouts, plans, remove=True)
    torch.testing.assert_close(hidden(model), before, rtol=1e-5, atol=1e-5)
    assert config_mismatch(model, adapter) is None and model.config.intermediate_size == 126


@pytest.mark.parametrize("method, allocation", [("flap", "global"), ("l2", "uniform"), ("activation", "uniform"),
                                                ("wanda-sp", "global")])
def test_mask_and_remove_give_identical_outputs(method, allocation):
    removed, masked = tiny_bert(), tiny_bert()
    record = run(removed, method=method, allocation=allocation)
    masked_record, masks = run(masked, "mask", method=method, allocation=allocation)
    assert record["metrics"]["widths"] == masked_record["metrics"]["widths"]
    assert any(w["heads"] < 4 for w in record["metrics"]["widths"])
    torch.testing.assert_close(hidden(removed), hidden(masked), rtol=1e-4, atol=1e-5)
    for name, mask in masks.items():
        assert not masked.get_parameter(name)[~mask].any()
    assert sum(int((~m).sum()) for m in masks.values()) > 0


def test_flap_compensation_uses_the_existing_biases():
    model = tiny_bert()
    config_before = model.config.to_dict()
    bias = model.encoder.layer[0].output.dense.bias.detach().clone()
    record = run(model, bias_compensation=True)
    assert record["method"]["bias_compensation"] == ["attention", "mlp"]
    assert record["metrics"]["parameters"]["compensation_biases_added"] == 0
    assert not torch.equal(model.encoder.layer[0].output.dense.bias, bias)
    changed = {k for k, v in model.config.to_dict().items() if config_before.get(k) != v}
    assert changed <= {"intermediate_size"}  # no bias flag is needed (or set): BERT's projections all have biases


@pytest.mark.parametrize("allocation, units, loads_with_from_pretrained", [
    ("uniform", ("heads", "neurons"), False),  # fewer heads: only the manifest can state them
    ("global", ("heads", "neurons"), False),
    ("uniform", ("neurons",), True),
])
def test_save_and_reload_give_identical_outputs(tmp_path, allocation, units, loads_with_from_pretrained):
    model = tiny_bert(layers=4)
    record = run(model, allocation=allocation, units=units, remove=0.3)
    assert record["metrics"]["config_matches_tensors"] is loads_with_from_pretrained
    prunekit.save(model, None, tmp_path / "out", record)
    reloaded, _, saved = prunekit.load(tmp_path / "out")
    assert type(reloaded) is transformers.BertModel
    assert (saved.get("block_widths") is None) is loads_with_from_pretrained
    torch.testing.assert_close(hidden(reloaded), hidden(model), rtol=0, atol=0)
    if loads_with_from_pretrained:
        plain = transformers.BertModel.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(hidden(plain), hidden(model), rtol=0, atol=0)
    else:
        assert saved["block_widths"] == [{"heads": w["heads"], "kv_heads": w["kv_heads"], "neurons": w["neurons"]}
                                         for w in record["metrics"]["widths"]]
        with pytest.raises(Exception):  # noqa: B017 - transformers' own error: the shapes do not fit the config
            transformers.BertModel.from_pretrained(tmp_path / "out")


def test_masked_lm_with_tied_decoder_saves_and_reloads(tmp_path):
    model = tiny_bert(transformers.BertForMaskedLM, layers=4)
    record = run(model, allocation="global", method="activation", remove=0.2)
    prunekit.save(model, None, tmp_path / "out", record)
    reloaded, _, _ = prunekit.load(tmp_path / "out")
    assert type(reloaded) is transformers.BertForMaskedLM
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    torch.testing.assert_close(hidden(reloaded), hidden(model), rtol=0, atol=0)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("method", ["l2", "random", "activation", "flap"])
@pytest.mark.parametrize("remove", [0.1, 0.3, 0.5])
def test_achieved_reduction_is_within_two_points_of_the_target(allocation, method, remove):
    model = tiny_bert(layers=6, vocab=32)  # embeddings are 4% of it: 0.5 of all parameters is removable
    record = run(model, method=method, remove=remove, allocation=allocation, calibration=IDS % 32)
    params = record["metrics"]["parameters"]
    assert params["before"] - params["after"] == params["removed"] == params["before"] - parameter_counts(model)[
        "total"]
    assert abs(record["metrics"]["removed_fraction"]["achieved"] - remove) <= 0.02, params


@pytest.mark.parametrize("options, message", [
    (dict(remove=0.75), "at most"),  # 70%: the embeddings, pooler, norms and every block's floor stay
    (dict(remove=0.5, units=("heads",)), "at most"),
    (dict(round_to=48), "does not divide"),
    (dict(method="taylor"), "unknown"),
])
def test_bad_input_raises_one_line_and_leaves_the_model_untouched(options, message):
    model = tiny_bert()
    before = weights_sha256(model), model.config.to_dict()
    with pytest.raises(PrunekitError, match=message) as error:
        run(model, **options)
    assert "\n" not in str(error.value)
    assert (weights_sha256(model), model.config.to_dict()) == before


def test_one_shot_weight_pruning_targets_the_encoder_blocks_and_perplexity_is_refused():
    model = tiny_bert(transformers.BertForMaskedLM)
    targets = prunekit.target_weights(model)
    assert len(targets) == 3 * 6 and all(".encoder.layer." in name for name in targets)
    record = prunekit.prune(model, method="wanda", sparsity=0.5, calibration=IDS, progress=False)
    assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(0.5)
    fresh = tiny_bert()
    before = weights_sha256(fresh)
    with pytest.raises(PrunekitError, match="perplexity needs a causal language model.*bert encoder") as error:
        prunekit.prune(fresh, method="wanda", sparsity=0.5, calibration=IDS, evaluation=IDS, progress=False)
    assert "\n" not in str(error.value) and weights_sha256(fresh) == before


def test_embedding_fidelity_is_the_mean_paired_cosine():
    dense = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    pruned = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])
    assert embedding_fidelity(dense, dense)["mean_cosine"] == pytest.approx(1.0)
    result = embedding_fidelity(dense, pruned)
    assert result == pytest.approx({"mean_cosine": 0.0, "min_cosine": -1.0, "texts": 3})
    with pytest.raises(PrunekitError, match="same shape"):
        embedding_fidelity(dense, pruned[:2])


def test_sentence_embeddings_pool_over_real_tokens_only():
    from prunekit.assets import model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path("minilm-l6"))
    model = tiny_bert(vocab=tokenizer.vocab_size, layers=1).train()  # dropout on: embedding must switch it off
    texts = ["a short text", "a much longer text that forces the first one to be padded in its batch"]
    together = sentence_embeddings(model, tokenizer, texts, batch_size=2)
    alone = sentence_embeddings(model, tokenizer, texts[:1], batch_size=1)
    assert model.training  # the caller's mode is restored
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(2))
    with torch.no_grad():
        expected = model.eval()(**tokenizer(texts[:1], return_tensors="pt")).last_hidden_state.mean(1)
    torch.testing.assert_close(alone, nn.functional.normalize(expected, dim=1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 (22.7M parameters, of which 11.9M are embeddings that structured pruning keeps)

MINILM_TEXTS = 200
MINILM_TOKENS = 128  # half the sentence-transformers length, to keep the module under ~90 s on 2 shared cores
MINILM_CALIB = dict(calibration="wiki-summaries", calibration_samples=16, calibration_seq_len=128, seed=0)


@pytest.fixture(scope="module")
def minilm():
    """(path, tokenizer, dense model, BBC News texts, dense embeddings), loaded once."""
    from prunekit.assets import model_path, text_records

    path = model_path("minilm-l6")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    texts = [r["text"] for r in text_records("bbc-news", "test")[:MINILM_TEXTS]]
    return path, tokenizer, dense, texts, sentence_embeddings(dense, tokenizer, texts, max_length=MINILM_TOKENS)


@pytest.fixture(scope="module")
def minilm_pruned(minilm):
    """(model, record, fidelity, top-1 retrieval) of MiniLM with 30% of all its parameters removed by a method."""
    _, tokenizer, dense, texts, reference = minilm
    cache = {}

    def prune(method):
        if method not in cache:
            model = copy.deepcopy(dense)
            record = prunekit.prune_structure(model, tokenizer, method=method, remove=0.3, progress=False,
                                              **MINILM_CALIB)
            embeddings = sentence_embeddings(model, tokenizer, texts, max_length=MINILM_TOKENS)
            # does each pruned embedding still find its own text among the dense embeddings of all 200?
            top1 = float(((embeddings @ reference.T).argmax(1) == torch.arange(len(texts))).float().mean())
            cache[method] = model, record, embedding_fidelity(reference, embeddings), top1
        return cache[method]

    return prune


@pytest.mark.slow
def test_minilm_budget_counts_all_parameters_and_an_impossible_one_is_refused(minilm):
    _, tokenizer, dense, _, _ = minilm
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    prunable = sum(lay.prunable for lay in block_layouts(model, adapter))
    total = parameter_counts(model)["total"]
    assert 0.45 < prunable / total < 0.48  # the word embeddings alone are 11.7M of 22.7M
    with pytest.raises(PrunekitError, match=r"remove=0.5 asks for .* at most 9331428 \(41\.1%\) are removable"):
        prunekit.prune_structure(model, tokenizer, method="l2", remove=0.5, progress=False)
    assert weights_sha256(model) == weights_sha256(dense)


@pytest.mark.slow
def test_minilm_activation_keeps_embeddings_closer_than_random_at_30_percent(minilm_pruned):
    # Measured (torch 2.13 CPU, 200 BBC News test texts at 128 tokens, calibration 16 x 128 wiki-summaries tokens,
    # uniform: 4 of 12 heads and 572 of 1536 neurons kept per block): mean cosine to the dense embeddings
    # activation 0.491, random 0.352, l2 0.327; top-1 retrieval of the text's own dense embedding 0.99, 0.99, 0.92.
    # 30% of all parameters is 64% of the encoder blocks; different texts' dense embeddings have cosine 0.07.
    results = {method: minilm_pruned(method) for method in ("activation", "random", "l2")}
    for method, (_, record, fidelity, top1) in results.items():
        assert abs(record["metrics"]["removed_fraction"]["achieved"] - 0.3) <= 0.02, method
        assert record["metrics"]["widths"] == [{"kv_heads": 4, "heads": 4, "neurons": 572}] * 6, method
        assert top1 >= 0.85, (method, top1)
        assert fidelity["mean_cosine"] > 0.25, (method, fidelity)
    activation, random = results["activation"][2]["mean_cosine"], results["random"][2]["mean_cosine"]
    assert activation > random + 0.05, (activation, random)
    assert activation > 0.4, activation


@pytest.mark.slow
def test_minilm_pruned_saves_and_reloads_with_identical_embeddings(minilm, minilm_pruned, tmp_path):
    _, tokenizer, _, texts, _ = minilm
    model, record, _, _ = minilm_pruned("activation")
    prunekit.save(model, tokenizer, tmp_path / "out", record)
    manifest = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert manifest["block_widths"] == [{"heads": 4, "kv_heads": 4, "neurons": 572}] * 6
    reloaded, reloaded_tokenizer, _ = prunekit.load(tmp_path / "out")
    assert parameter_counts(reloaded) == parameter_counts(model)
    sample = texts[:16]
    torch.testing.assert_close(sentence_embeddings(reloaded, reloaded_tokenizer, sample, max_length=MINILM_TOKENS),
                               sentence_embeddings(model, tokenizer, sample, max_length=MINILM_TOKENS),
                               rtol=0, atol=0)
