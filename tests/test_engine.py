"""The sequential engine and adapters on tiny randomly initialised models of every supported family."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.adapters import adapter_for, supported_model_types
from prunekit.errors import PrunekitError
from prunekit.measure import nm_violations
from prunekit.targets import projection_weights
from prunekit.training import Masks
from prunekit.weights import methods
from prunekit.weights.engine import blockwise_forward, capture_block_inputs, run_block
from prunekit.weights.sparsegpt import sparsegpt_prune
from tiny_models import FAMILIES, MOE_FAMILIES, WINDOW, tiny_causal_lm

VOCAB = 128


def tiny(family: str) -> nn.Module:
    return tiny_causal_lm(family, vocab=VOCAB)


def calibration(samples=6, length=24, seed=1):
    return torch.randint(0, VOCAB, (samples, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


MIXED_LAYER_TYPES = {"qwen2", "qwen3", "gemma2", "gemma3_text", "smollm3"}
CPU = torch.device("cpu")


def test_tiny_models_cover_every_supported_model_type():
    # bert, the one encoder, is covered by tests/test_structure_encoder.py; the MoE families by tests/test_experts.py
    assert sorted([*FAMILIES, *MOE_FAMILIES, "bert"]) == supported_model_types()


def block_calls(model, ids):
    """The hidden states every block receives in a normal forward, as transformers reports them."""
    with torch.no_grad():
        hidden = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    return hidden[: len(adapter_for(model).block_list(model))]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_replays_the_input_every_block_sees(family):
    """12 blocks, mixed layer types where the family has them, sequences three times the sliding window: the
    captured inputs, run block by block with each block's own arguments, equal a normal forward's hidden states."""
    model = tiny_causal_lm(family, vocab=VOCAB, layers=12)
    blocks = adapter_for(model).block_list(model)
    ids = calibration(length=3 * WINDOW)
    expected = block_calls(model, ids)
    inputs = capture_block_inputs(model, blocks, ids, batch_size=4, device=CPU, activation_device=CPU)
    assert [len(item.arguments) for item in inputs] == [12, 12]
    first = inputs
    for index, block in enumerate(blocks):
        torch.testing.assert_close(torch.cat([item.hidden for item in inputs]), expected[index], rtol=0, atol=0)
        inputs = run_block(block, index, inputs, CPU)
    assert all("forward" not in vars(block) for block in blocks)  # the stand-ins are gone
    if family in MIXED_LAYER_TYPES:  # the test can fail: with block 0's arguments for all, the output differs
        replayed = first
        for block in blocks:
            replayed = run_block(block, 0, replayed, CPU)
        difference = torch.cat([a.hidden - b.hidden for a, b in zip(replayed, inputs, strict=True)]).abs().max()
        assert difference > 1e-2


@pytest.mark.parametrize(("family", "tie"), [(family, False) for family in FAMILIES] + [("llama", True)])
def test_blockwise_forward_equals_the_model_forward(family, tie):
    """Block by block, then the model's own code after the blocks (final norm, head, Gemma's logit soft-capping)."""
    model = tiny_causal_lm(family, vocab=VOCAB, layers=12, tie=tie)
    ids = calibration(length=3 * WINDOW)
    outputs = blockwise_forward(model, adapter_for(model).block_list(model), ids, batch_size=4, device=CPU,
                                activation_device=CPU)
    for batch, output in zip(ids.split(4), outputs, strict=True):
        torch.testing.assert_close(output.logits, logits(model, batch), rtol=0, atol=0)
    assert all("forward" not in vars(block) for block in adapter_for(model).block_list(model))


def test_a_model_that_changes_the_hidden_states_between_blocks_is_refused():
    model = tiny("llama")
    blocks = adapter_for(model).block_list(model)
    blocks[0].register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(PrunekitError, match="block 1 is not called with the output of block 0"):
        capture_block_inputs(model, blocks, calibration(), batch_size=6, device=CPU, activation_device=CPU)
    assert all("forward" not in vars(block) and not block._forward_pre_hooks for block in blocks)


def test_arguments_shared_by_blocks_are_held_once():
    """Moved to another activation device, a mask or rotary embedding that several blocks receive is one copy."""
    model = tiny_causal_lm("gemma2", vocab=VOCAB, layers=12)
    blocks = adapter_for(model).block_list(model)
    (item,) = capture_block_inputs(model, blocks, calibration(length=3 * WINDOW), batch_size=6, device=CPU,
                                   activation_device=torch.device("meta"))
    masks = {id(kwargs["attention_mask"]) for _, kwargs in item.arguments}
    rotary = {id(kwargs["position_embeddings"][0]) for _, kwargs in item.arguments}
    assert item.arguments[0][1]["attention_mask"].device.type == "meta"
    assert len(masks) == 2 and len(rotary) == 1  # sliding and full masks, one rotary embedding, for 12 blocks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_returned_masks_are_the_zeros_of_every_targeted_weight(family, method, pattern):
    model = tiny(family)
    record, masks = prunekit.prune(model, method=method, sparsity=0.5 if pattern == "unstructured" else None,
                                   pattern=pattern, calibration=calibration(), progress=False, blocksize=16,
                                   return_masks=True)
    weights = prunekit.target_weights(model)
    assert list(masks) == list(weights) == list(record["metrics"]["sparsity"]["per_layer"])
    for name, weight in weights.items():
        assert masks[name].dtype == torch.bool and masks[name].shape == weight.shape, name
        assert torch.equal(masks[name], weight != 0), name


def test_masks_are_returned_only_when_asked_and_are_all_true_for_dense_blocks():
    record = prunekit.prune(tiny("llama"), method="magnitude", sparsity=0.5, progress=False)
    assert isinstance(record, dict) and "metrics" in record
    _, masks = prunekit.prune(tiny("llama"), method="wanda", sparsity=0.0, calibration=calibration(),
                              progress=False, return_masks=True)
    assert len(masks) == 3 * 7 and all(mask.all() for mask in masks.values())


def test_sparsegpt_returns_the_masks_its_kernel_selected(monkeypatch):
    selected = []

    def recording(*args, **kwargs):
        updated, keep = sparsegpt_prune(*args, **kwargs)
        selected.append(keep.clone())
        return updated, keep

    monkeypatch.setattr(methods, "sparsegpt_prune", recording)
    model = tiny("llama")
    _, masks = prunekit.prune(model, method="sparsegpt", sparsity=0.5, calibration=calibration(), progress=False,
                              blocksize=16, return_masks=True)
    adapter = adapter_for(model)
    groups = [g for g in adapter.shared_inputs] + [("self_attn.o_proj",), ("mlp.down_proj",)]
    order = list(adapter.projections(adapter.block_list(model)[0]))
    groups.sort(key=lambda g: order.index(g[0]))
    expected = [(index, group) for index in range(3) for group in groups]
    assert len(selected) == len(expected)
    for keep, (index, group) in zip(selected, expected, strict=True):
        returned = torch.cat([masks[f"model.layers.{index}.{name}.weight"] for name in group])
        assert torch.equal(returned, keep), (index, group)


def test_masks_from_prune_hold_the_zeros_through_fine_tuning():
    model = tiny("llama")
    _, masks = prunekit.prune(model, method="wanda", sparsity=0.5, calibration=calibration(), progress=False,
                              return_masks=True)
    held = Masks(model, masks)
    held.update(masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {name: weight.detach().clone() for name, weight in prunekit.target_weights(model).items()}
    model.train()
    for seed in range(3):
        ids = calibration(seed=seed)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, weight in prunekit.target_weights(model).items():
        assert torch.equal(weight[~masks[name]], torch.zeros_like(weight[~masks[name]])), name
        assert not torch.equal(weight[masks[name]], before[name][masks[name]]), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "random", "wanda", "sparsegpt"])
def test_exact_unstructured_sparsity_per_layer(family, method):
    model = tiny(family)
    record = prunekit.prune(model, method=method, sparsity=0.5, calibration=calibration(), batch_size=4,
                            progress=False, blocksize=16)
    per_layer = record["metrics"]["sparsity"]["per_layer"]
    assert len(per_layer) == 3 * len(adapter_for(model).projections(adapter_for(model).block_list(model)[0]))
    for name, weight in projection_weights(model).items():
        zeros = (weight == 0).sum().item()
        assert abs(zeros - 0.5 * weight.numel()) <= weight.shape[0], name
        assert per_layer[name]["zeros"] == zeros
    assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_every_nm_group_is_valid(family, method, pattern):
    model = tiny(family)
    n, m = map(int, pattern.split(":"))
    prunekit.prune(model, method=method, pattern=pattern, calibration=calibration(), progress=False, blocksize=16)
    for name, weight in projection_weights(model).items():
        assert nm_violations(weight, n, m) == 0, name
        assert (weight == 0).sum().item() >= weight.numel() * (m - n) // m


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_zero_sparsity_leaves_logits_identical(family, method):
    model = tiny(family)
    ids = calibration(seed=5)
    before = logits(model, ids)
    record = prunekit.prune(model, method=method, sparsity=0.0, calibration=calibration(), progress=False)
    assert torch.equal(logits(model, ids), before)
    assert record["metrics"]["sparsity"]["achieved"] == 0.0


def test_runs_are_deterministic_and_random_depends_on_the_seed():
    hashes = {}
    for method, seed in [("wanda", 0), ("wanda", 0), ("random", 0), ("random", 0), ("random", 1)]:
        model = tiny("llama")
        record = prunekit.prune(model, method=method, sparsity=0.5, calibration=calibration(), seed=seed,
                                progress=False)
        hashes.setdefault((method, seed), set()).add(record["metrics"]["pruned_weights_sha256"])
    assert len(hashes[("wanda", 0)]) == 1 and len(hashes[("random", 0)]) == 1
    assert hashes[("random", 0)] != hashes[("random", 1)]


def test_wanda_and_sparsegpt_use_the_calibration_data():
    pruned = []
    for seed in (1, 2):
        model = tiny("llama")
        prunekit.prune(model, method="wanda", sparsity=0.5, calibration=calibration(seed=seed), progress=False)
        pruned.append(prunekit.target_weights(model))
    assert any(not torch.equal(pruned[0][k] == 0, pruned[1][k] == 0) for k in pruned[0])


def test_owl_allocates_per_block_and_meets_the_overall_target():
    model = tiny("llama")
    with torch.no_grad():  # give block 1 strong outlier features so OWL has something to find
        model.model.layers[1].mlp.down_proj.weight[:, :3] *= 50
    record = prunekit.prune(model, method="wanda", sparsity=0.6, allocation="owl", owl_limit=0.1,
                            calibration=calibration(), progress=False)
    block_sparsities = record["method"]["owl_block_sparsities"]
    assert len(set(block_sparsities)) > 1
    assert sum(block_sparsities) / 3 == pytest.approx(0.6, abs=1e-9)
    assert max(block_sparsities) - min(block_sparsities) == pytest.approx(0.2)
    assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(0.6, abs=0.01)
    for name, layer in record["metrics"]["sparsity"]["per_layer"].items():
        assert layer["sparsity"] == pytest.approx(layer["target"], abs=0.02), name


def test_other_allocations_with_nm_are_refused():
    # OWL has its own N:M family per block (tests/test_weights_api.py); the others give one sparsity per block
    with pytest.raises(PrunekitError, match="LAMP allocates"):
        prunekit.prune(tiny("llama"), method="wanda", pattern="2:4", allocation="lamp", calibration=calibration())


def test_non_finite_activations_are_reported_and_nothing_is_pruned():
    model = tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    before = {k: v.clone() for k, v in prunekit.target_weights(model).items()}
    with pytest.raises(PrunekitError, match="non-finite"):
        prunekit.prune(model, method="wanda", sparsity=0.5, calibration=calibration(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in prunekit.target_weights(model).items())


def test_non_finite_weights_are_refused():
    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(PrunekitError, match="up_proj.*NaN or inf"):
        prunekit.prune(model, method="magnitude", sparsity=0.5, progress=False)


def test_pattern_not_dividing_the_width_is_refused_before_any_change():
    model = tiny("llama")
    before = {k: v.clone() for k, v in prunekit.target_weights(model).items()}
    with pytest.raises(PrunekitError, match="2:5 needs input widths divisible by 5"):
        prunekit.prune(model, method="wanda", pattern="2:5", calibration=calibration())
    assert all(torch.equal(before[k], v) for k, v in prunekit.target_weights(model).items())


def test_unknown_method_and_allocation():
    with pytest.raises(PrunekitError, match="unknown method 'obs'.*wanda"):
        prunekit.prune(tiny("llama"), method="obs", sparsity=0.5)
    with pytest.raises(PrunekitError, match="allocation 'snip' is unknown"):
        prunekit.prune(tiny("llama"), method="wanda", sparsity=0.5, allocation="snip")


def test_model_without_supported_blocks():
    with pytest.raises(PrunekitError, match="no supported decoder blocks"):
        prunekit.prune(nn.Sequential(nn.Linear(4, 4)), method="magnitude", sparsity=0.5)


def test_base_model_without_head_is_supported():
    base = tiny("llama").model
    prunekit.prune(base, method="wanda", sparsity=0.5, calibration=calibration(), progress=False)
    assert prunekit.target_weights(base)["layers.0.self_attn.q_proj.weight"].eq(0).float().mean() == 0.5


def test_calibration_ids_outside_the_vocabulary():
    with pytest.raises(PrunekitError, match="vocabulary"):
        prunekit.prune(tiny("llama"), method="wanda", sparsity=0.5, calibration=calibration() + VOCAB)


def test_text_calibration_without_a_tokenizer():
    with pytest.raises(PrunekitError, match="calibration from text needs a tokenizer"):
        prunekit.prune(tiny("llama"), method="wanda", sparsity=0.5, calibration="wiki-summaries")
    with pytest.raises(PrunekitError, match="evaluation from text needs a tokenizer"):
        prunekit.evaluate(tiny("llama"), data="wiki-summaries")


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "phi"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_statistics_do_not_depend_on_batching(family, method):
    """Batches after the first stop at the last projection input; one big batch never does: same weights."""
    pruned = []
    for batch_size in (1, 6):
        model = tiny(family)
        prunekit.prune(model, method=method, sparsity=0.5, calibration=calibration(), batch_size=batch_size,
                       progress=False)
        pruned.append(prunekit.target_weights(model))
    for name, weight in pruned[0].items():
        assert torch.equal(weight == 0, pruned[1][name] == 0), name
        torch.testing.assert_close(weight, pruned[1][name], rtol=1e-4, atol=1e-5)
