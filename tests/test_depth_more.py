"""Depth pruning, second slice, on tiny models: Shortened LLaMA's Taylor+ and perplexity criteria, removal of
attention or MLP sublayers alone, and LaCo's merge of block runs."""

import copy
import json

import pytest
import torch
from test_artifacts import letter_tokenizer

import prunekit
from prunekit import names
from prunekit.adapters import adapter_for
from prunekit.cli import main
from prunekit.depth import (
    TAYLOR_SPARED,
    UNITS,
    RemovedAttention,
    RemovedMLP,
    contiguous_runs,
    merge_blocks,
    merge_targets,
    remove_blocks,
    remove_sublayers,
    removed_sublayers,
    skipped_blocks,
    skipped_sublayers,
    taylor_importance,
)
from prunekit.errors import PrunekitError
from prunekit.measure import perplexity, weights_sha256
from tiny_models import WINDOW, tiny_causal_lm

LAYERS = 8  # Taylor+ spares blocks 0-3 and 6-7, so blocks 4 and 5 can go
IDS = torch.randint(3, 128, (3, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
SUBLAYER_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo",
                     "olmo2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _blocks(model):
    return adapter_for(model).block_list(model)


def test_names_agree():
    assert names.DEPTH_UNITS == UNITS
    assert tuple(prunekit.depth.DEPTH_METHODS) == names.DEPTH_METHODS


# --- Taylor+ and the perplexity criterion -----------------------------------------------------------------------


def test_taylor_importance_equals_a_hand_computation():
    model = tiny_causal_lm("llama", layers=2)
    digest = weights_sha256(model)
    flags = [p.requires_grad for p in model.parameters()]
    scores = taylor_importance(model, IDS, list(_blocks(model)), batch_size=2)  # batches of 2 and 1 samples

    reference = copy.deepcopy(model)
    reference(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()  # the mean loss over every token at once
    expected = [sum(float((p.detach() * p.grad).abs().sum()) for p in block.parameters())
                for block in _blocks(reference)]
    assert scores == pytest.approx(expected, rel=1e-4)
    assert all(s > 0 for s in scores)
    # weights, gradients and flags as they were
    assert weights_sha256(model) == digest
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def _with_zero_outputs(family, indices, roles=("attention", "mlp")):
    """A model whose blocks `indices` add nothing through the sublayers `roles` (zero output projections)."""
    model = tiny_causal_lm(family, layers=LAYERS)
    adapter = adapter_for(model)
    for index in indices:
        for role in roles:
            for tensor in _blocks(model)[index].get_submodule(getattr(adapter, role)[-1]).parameters():
                tensor.data.zero_()
    return model


def test_taylor_removes_blocks_of_no_importance_and_spares_the_ends():
    # blocks 1 and 5 do nothing: Taylor scores them zero, but block 1 is among the spared first four
    model = _with_zero_outputs("qwen2", [1, 5])
    record = prunekit.prune_depth(model, method="taylor", blocks=2, calibration=IDS, progress=False)
    scores = record["metrics"]["block_scores"]
    assert scores["taylor_importance"][1] == scores["taylor_importance"][5] == 0
    assert scores["spared"] == [0, 1, 2, 3, 6, 7] and record["method"]["spared_first_last"] == list(TAYLOR_SPARED)
    removed = record["metrics"]["removed_blocks"]
    assert 5 in removed and removed[0] == 4  # 4 is the only other block Taylor+ may remove
    assert len(record["metrics"]["kept_blocks"]) == LAYERS - 2
    model = _with_zero_outputs("qwen2", [1, 5])
    digest = weights_sha256(model)
    with pytest.raises(PrunekitError, match="removes at most 2 blocks; asked for 3"):
        prunekit.prune_depth(model, method="taylor", blocks=3, calibration=IDS, progress=False)
    assert weights_sha256(model) == digest and len(_blocks(model)) == LAYERS


@pytest.mark.parametrize("unit", ["block", "attention", "mlp"])
def test_perplexity_criterion_equals_perplexity_with_each_unit_skipped(unit):
    model = tiny_causal_lm("gemma3_text", layers=LAYERS)
    reference = copy.deepcopy(model)
    record = prunekit.prune_depth(model, method="perplexity", blocks=3, unit=unit, calibration=IDS, batch_size=2,
                                  progress=False)
    alone = record["metrics"]["block_scores"]["calibration_perplexity_without"]
    expected = []
    for b in range(LAYERS):
        context = skipped_blocks(reference, [b]) if unit == "block" else skipped_sublayers(reference, unit, [b])
        with context:
            expected.append(perplexity(reference, IDS, progress=False)["perplexity"])
    assert alone == pytest.approx(expected, rel=1e-5)
    allowed = range(LAYERS) if unit == "block" else range(1, LAYERS)  # block 0 keeps its sublayers
    chosen = sorted(sorted(allowed, key=alone.__getitem__)[:3])  # one shot: the three lowest, not re-scored
    assert record["metrics"]["removal_order"] == chosen
    if unit == "block":
        assert record["metrics"]["removed_blocks"] == chosen
    else:
        assert record["metrics"]["sublayers"]["removed"] == chosen == record["metrics"]["removed_sublayers"][unit]
        assert record["metrics"]["removed_blocks"] == []


# --- sublayer removal ------------------------------------------------------------------------------------------


class _ZeroOutput:
    """The test's own way of silencing a sublayer: a forward hook that zeroes its output."""

    def __init__(self, module):
        self.handle = module.register_forward_hook(self.hook)

    @staticmethod
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)


@pytest.mark.parametrize("family", SUBLAYER_FAMILIES)
@pytest.mark.parametrize("kind, name", [("attention", "self_attn"), ("mlp", "mlp")])
def test_removing_a_sublayer_equals_zeroing_its_output(family, kind, name):
    model = tiny_causal_lm(family, layers=4)
    removed = [1, 3]
    hooks = [_ZeroOutput(_blocks(model)[i].get_submodule(name)) for i in removed]
    expected = _logits(model)
    for hook in hooks:
        hook.handle.remove()
    assert not torch.allclose(_logits(model), expected)
    sublayer_size = sum(p.numel() for p in _blocks(model)[0].get_submodule(name).parameters())
    total = sum(p.numel() for p in model.parameters())
    remove_sublayers(model, {kind: removed})
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == total - 2 * sublayer_size
    assert not any(f".{i}.{name}." in key for key in model.state_dict() for i in removed)
    assert removed_sublayers(model) == {kind: removed}


@pytest.mark.parametrize("family, attention", [("llama", [1, 3]), ("gemma2", [1, 2]), ("gemma3_text", [1, 3]),
                                               ("qwen2", [2]), ("olmo2", [1, 2])])
def test_generation_after_sublayer_removal_uses_the_kv_cache(family, attention):
    """The masks of a padded batch are sized from the cache of the first layer of each attention type (Gemma 2's
    first full layer 1, Qwen2's first sliding layer 2), whose attention is removed here."""
    model = tiny_causal_lm(family, layers=4)
    remove_sublayers(model, {"attention": attention, "mlp": [3]})
    prompt = IDS[:2, : 2 * WINDOW]  # longer than the sliding window
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # left padding
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    cached = model.generate(prompt, use_cache=True, **settings)
    uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (2, 2 * WINDOW + 6)
    assert torch.equal(cached, uncached)


def test_blocks_removed_after_sublayers_renumber_the_stand_ins():
    model = tiny_causal_lm("gemma3_text", layers=LAYERS)
    remove_sublayers(model, {"attention": [3, 6]})
    remove_blocks(model, [1, 2])
    assert removed_sublayers(model) == {"attention": [1, 4]}
    assert _blocks(model)[4].self_attn.layer_idx == 4
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    prompt = IDS[:1, : 2 * WINDOW]
    assert torch.equal(model.generate(prompt, use_cache=True, **settings),
                       model.generate(prompt, use_cache=False, **settings))


@pytest.mark.parametrize("kind, role", [("attention", "attention"), ("mlp", "mlp")])
@pytest.mark.parametrize("method", ["block-influence", "taylor"])
def test_informed_methods_find_sublayers_that_do_nothing(kind, role, method):
    model = _with_zero_outputs("llama", [4, 5], roles=(role,))
    expected = _logits(model)
    record = prunekit.prune_depth(model, method=method, blocks=2, unit=kind, calibration=IDS, progress=False)
    assert record["metrics"]["sublayers"]["removed"] == [4, 5]
    assert record["metrics"]["removed_sublayers"] == {kind: [4, 5]}
    assert record["metrics"]["blocks"] == {"target": 0, "achieved": 0, "before": LAYERS, "after": LAYERS}
    assert all(isinstance(_blocks(model)[i].get_submodule("self_attn" if kind == "attention" else "mlp"),
                          RemovedAttention if kind == "attention" else RemovedMLP) for i in (4, 5))
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, role", [("attention", "attention"), ("mlp", "mlp")])
def test_sleb_on_sublayers_does_at_least_as_well_as_removing_ones_that_do_nothing(kind, role):
    """On a random model some removals lower the perplexity; SLEB's must not be worse than removing the two silent
    sublayers, which leaves the calibration perplexity unchanged. Block 0 is never a candidate."""
    model = _with_zero_outputs("llama", [4, 5], roles=(role,))
    dense = perplexity(model, IDS, progress=False)["perplexity"]
    record = prunekit.prune_depth(model, method="sleb", blocks=2, unit=kind, calibration=IDS, progress=False)
    assert perplexity(model, IDS, progress=False)["perplexity"] <= dense * (1 + 1e-6)
    assert all(step[0] is None for step in record["metrics"]["block_scores"]["calibration_perplexity_by_step"])


def test_parameter_budget_counts_sublayer_parameters():
    model = tiny_causal_lm("llama", layers=LAYERS)
    mlp = sum(p.numel() for p in _blocks(model)[0].mlp.parameters())
    total = sum(p.numel() for p in model.parameters())
    record = prunekit.prune_depth(model, method="reverse", remove=3.4 * mlp / total, unit="mlp", progress=False)
    metrics = record["metrics"]
    assert metrics["sublayers"] == {"kind": "mlp", "target": 3, "achieved": 3, "removed": [4, 5, 6]}
    assert metrics["parameters"]["after"] == total - 3 * mlp
    assert metrics["removed_fraction"]["achieved"] == pytest.approx(3 * mlp / total)


# --- LaCo merge ------------------------------------------------------------------------------------------------


def test_runs_and_merge_targets():
    assert contiguous_runs([5, 1, 2, 7]) == [[1, 2], [5], [7]]
    assert merge_targets([0, 1, 4]) == {2: [0, 1], 3: [4]}  # a run at block 0 folds into the block after it


def test_merging_copies_of_a_block_leaves_it_unchanged():
    model = tiny_causal_lm("llama", layers=LAYERS)
    blocks = _blocks(model)
    for index in (3, 4):
        blocks[index].load_state_dict(blocks[2].state_dict())
    before = {name: p.clone() for name, p in blocks[2].named_parameters()}
    reference = copy.deepcopy(model)
    assert merge_blocks(model, [3, 4]) == {2: [3, 4]}
    for name, p in _blocks(model)[2].named_parameters():
        assert torch.equal(p, before[name])
    remove_blocks(reference, [3, 4])
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


def test_merge_adds_the_parameter_differences():
    model = tiny_causal_lm("gemma3_text", layers=LAYERS)
    blocks = _blocks(model)
    # the projections take the differences (LaCo's code), the norms stay block 4's own
    expected = {name: p + sum(blocks[i].get_parameter(name) - p for i in (5, 6)) if "proj" in name else p.clone()
                for name, p in blocks[4].named_parameters()}
    assert any("norm" in name for name in expected)
    record = prunekit.prune_depth(model, method="reverse", blocks=2, merge=True, progress=False)
    assert record["metrics"]["removed_blocks"] == [5, 6] and record["method"]["merge"] is True
    assert record["metrics"]["merged_into"] == [{"into": 4, "run": [5, 6]}]
    for name, p in _blocks(model)[4].named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-6)
    assert model.config.num_hidden_layers == LAYERS - 2


def test_merge_refuses_blocks_of_other_shapes():
    model = tiny_causal_lm("llama", layers=LAYERS)
    remove_sublayers(model, {"mlp": [3]})
    digest = weights_sha256(model)
    with pytest.raises(PrunekitError, match="block 3 has a removed sublayer"):
        merge_blocks(model, [3])
    _blocks(model)[5].mlp.up_proj = torch.nn.Linear(64, 96, bias=False)  # as if pruned to another width
    digest = weights_sha256(model)
    with pytest.raises(PrunekitError, match="block 5 cannot be merged into block 4: their parameters differ"):
        merge_blocks(model, [5])
    assert weights_sha256(model) == digest and len(_blocks(model)) == LAYERS


# --- save and load ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(method="block-influence", unit="attention", blocks=3),
                                     dict(method="random", unit="mlp", blocks=2, seed=1),
                                     dict(method="block-influence", blocks=3, merge=True)])
def test_saved_model_reloads_with_identical_logits(options, tmp_path):
    model = tiny_causal_lm("gemma3_text", layers=LAYERS)
    record = prunekit.prune_depth(model, calibration=IDS, progress=False, **options)
    expected = _logits(model)
    prunekit.save(model, None, tmp_path / "pruned", record)
    reloaded, _, saved = prunekit.load(tmp_path / "pruned")
    assert saved.get("removed_sublayers", {}) == record["metrics"]["removed_sublayers"]
    assert removed_sublayers(reloaded) == removed_sublayers(model)
    assert sum(p.numel() for p in reloaded.parameters()) == record["metrics"]["parameters"]["after"]
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=0)


# --- bad inputs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, options, message", [
    ("llama", dict(method="reverse", blocks=1, unit="heads"), "unit 'heads' is unknown"),
    ("llama", dict(method="angular", blocks=1, unit="attention"), "cannot remove attention sublayers"),
    ("llama", dict(method="reverse", blocks=1, unit="mlp", merge=True), "use merge=False"),
    ("llama", dict(method="reverse", blocks=1, merge="yes"), "merge='yes'"),
    ("llama", dict(method="reverse", blocks=LAYERS, unit="attention"), "remove all 8 attention sublayers"),
    ("llama", dict(method="taylor", blocks=3, calibration=IDS), "removes at most 2 blocks"),
    ("opt", dict(method="reverse", blocks=1, unit="mlp"), "sublayers of opt models cannot be removed alone"),
    ("phi", dict(method="reverse", blocks=1, unit="attention"), "sublayers of phi models"),
])
def test_bad_inputs_raise_one_line_and_leave_the_model_untouched(family, options, message):
    model = tiny_causal_lm(family, layers=LAYERS)
    digest, config, before = weights_sha256(model), model.config.to_dict(), _logits(model)
    with pytest.raises(PrunekitError, match=message) as error:
        prunekit.prune_depth(model, progress=False, **options)
    assert "\n" not in str(error.value)
    assert weights_sha256(model) == digest and model.config.to_dict() == config
    assert torch.equal(_logits(model), before)


def test_removing_every_sublayer_or_one_twice_is_refused():
    model = tiny_causal_lm("llama", layers=3)
    with pytest.raises(PrunekitError, match="sublayer of block 0 cannot be removed"):
        remove_sublayers(model, {"attention": [0, 1, 2]})
    with pytest.raises(PrunekitError, match="sublayer kind 'norm' is unknown"):
        remove_sublayers(model, {"mlp": [1], "norm": [2]})
    with pytest.raises(PrunekitError, match=r"must be distinct integers in \[0, 2\]"):
        remove_sublayers(model, {"mlp": [1, 1]})
    assert removed_sublayers(model) == {}  # the valid part was not applied either
    remove_sublayers(model, {"mlp": [1, 2]})
    with pytest.raises(PrunekitError, match=r"mlp sublayers \[1\] were removed before"):
        remove_sublayers(model, {"mlp": [1]})
    with pytest.raises(PrunekitError, match="would remove all 3 attention sublayers"):
        prunekit.prune_depth(model, method="reverse", blocks=3, unit="attention", progress=False)
    with pytest.raises(PrunekitError, match="removes the mlp sublayers of a model once"):
        prunekit.prune_depth(model, method="reverse", blocks=0, unit="mlp", progress=False)


# --- command line ----------------------------------------------------------------------------------------------


def _cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize("args, needle", [
    (["--method", "angular", "--blocks", "2", "--unit", "heads"], "--unit: invalid choice: 'heads'"),
    (["--method", "angular", "--blocks", "2", "--unit", "mlp"], "cannot remove mlp sublayers"),
    (["--method", "sleb", "--blocks", "2", "--unit", "attention", "--merge"], "use merge=False"),
    (["--method", "wanda", "--sparsity", "0.5", "--merge"], "--merge applies to blocks, not to weights"),
    (["--method", "flap", "--remove", "0.2", "--unit", "mlp"], "--unit applies to blocks, not to structures"),
])
def test_cli_refuses_bad_unit_and_merge_before_loading(tmp_path, capsys, args, needle):
    assert _cli(["prune", "--model", "smollm2-135m", "--out", str(tmp_path / "out"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, sublayers, layers", [(["--unit", "mlp"], {"mlp": [5, 6]}, LAYERS),
                                                        (["--merge"], {}, LAYERS - 2)])
def test_cli_removes_sublayers_or_merges_blocks_of_a_local_model(tmp_path, capsys, options, sublayers, layers):
    source = tmp_path / "tiny"
    dense = tiny_causal_lm("llama", layers=LAYERS)
    dense.save_pretrained(source)
    letter_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    code = _cli(["prune", "--model", str(source), "--method", "reverse", "--blocks", "2", *options, "--no-eval",
                 "--quiet", "--json", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out)
    assert record["metrics"]["removed_sublayers"] == sublayers
    assert record["method"]["unit"] == ("mlp" if sublayers else "block")
    assert record["method"]["merge"] is ("--merge" in options)
    model, _, saved = prunekit.load(out)
    assert removed_sublayers(model) == saved.get("removed_sublayers", {}) == sublayers
    assert model.config.num_hidden_layers == layers
    if "--merge" in options:  # blocks 5 and 6 were folded into block 4, which changed
        assert record["metrics"]["merged_into"] == [{"into": 4, "run": [5, 6]}]
        assert not torch.equal(_blocks(model)[4].mlp.up_proj.weight, _blocks(dense)[4].mlp.up_proj.weight)


def test_a_model_with_removed_sublayers_can_be_sparsified_and_healed_but_not_narrowed():
    model = tiny_causal_lm("llama", layers=4)
    prunekit.prune_depth(model, None, method="reverse", blocks=1, unit="mlp", progress=False)
    gone = removed_sublayers(model)["mlp"]
    adapter = adapter_for(model)
    assert all(not name.startswith("mlp.") for name in adapter.projections(adapter.block_list(model)[gone[0]]))
    record = prunekit.prune(model, None, method="wanda", sparsity=0.5, calibration=IDS, progress=False)
    assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)  # of the weights still there
    before = weights_sha256(model)
    with pytest.raises(PrunekitError, match="sublayers removed by depth pruning") as error:
        prunekit.prune_structure(model, None, method="l2", remove=0.2, progress=False)
    assert "\n" not in str(error.value) and weights_sha256(model) == before
    rows = IDS[:, :WINDOW]
    healed = prunekit.heal(model, None, method="lora", tokens=rows.numel(), seq_len=WINDOW, batch_size=len(rows),
                           data=rows, eval_data=rows[:1], progress=False)
    assert healed["metrics"]["sparsity"]["after"] == healed["metrics"]["sparsity"]["before"]
