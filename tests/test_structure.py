"""Structured pruning on tiny models of every Llama-style family: invariants of removal, masks, configs, budgets."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.adapters import adapter_for
from prunekit.errors import PrunekitError
from prunekit.measure.protocol import weights_sha256
from prunekit.structure.groups import block_layouts, head_channels, roles
from prunekit.structure.remove import BlockPlan, apply_plan, config_mismatch
from prunekit.structure.scores import ChannelStats, flap_scores, group_norm_scores
from prunekit.training import Masks
from tiny_models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_STYLE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo", "olmo2"]
IDS = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))


def units_of(family):
    # OLMo 2 normalises queries and keys across all heads, so only its neurons can go.
    return ("neurons",) if family == "olmo2" else ("heads", "neurons")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def run(model, mode="remove", **options):
    options = {"method": "flap", "remove": 0.25, "calibration": IDS, "progress": False, **options}
    return prunekit.prune_structure(model, mode=mode, **options)


@pytest.mark.parametrize("family", LLAMA_STYLE)
def test_removing_all_zero_groups_leaves_outputs_identical(family):
    model = tiny_causal_lm(family, layers=2)
    adapter = adapter_for(model)
    layouts = block_layouts(model, adapter)
    r = roles(adapter)
    plans = []
    for block, lay in zip(adapter.block_list(model), layouts, strict=True):
        gone_heads = torch.tensor([0]) if lay.kv_heads > 1 and family != "olmo2" else torch.tensor([], dtype=int)
        gone_neurons = torch.tensor([1, 5, 77])
        q_rows, kv_rows = head_channels(gone_heads, lay)
        with torch.no_grad():
            for name, dim, index in ((r.q, 0, q_rows), (r.k, 0, kv_rows), (r.v, 0, kv_rows), (r.o, 1, q_rows),
                                     (r.mlp_in[0], 0, gone_neurons), (r.mlp_in[1], 0, gone_neurons),
                                     (r.mlp_out, 1, gone_neurons)):
                module = block.get_submodule(name)
                module.weight.index_fill_(dim, index, 0)
                if dim == 0 and module.bias is not None:
                    module.bias.index_fill_(0, index, 0)
        keep_heads = torch.tensor([h for h in range(lay.kv_heads) if h not in gone_heads.tolist()])
        keep_neurons = torch.tensor([n for n in range(lay.neurons) if n not in gone_neurons.tolist()])
        plans.append(BlockPlan(keep_heads, keep_neurons))
    before = logits(model)
    apply_plan(model, adapter, layouts, plans, remove=True)
    assert block_layouts(model, adapter)[0].neurons == layouts[0].neurons - 3
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    assert config_mismatch(model, adapter) is None


@pytest.mark.parametrize("family", LLAMA_STYLE)
@pytest.mark.parametrize("method, allocation", [("flap", "global"), ("l2", "uniform")])
def test_mask_and_remove_give_identical_outputs(family, method, allocation):
    removed, masked = tiny_causal_lm(family), tiny_causal_lm(family)
    record = run(removed, method=method, allocation=allocation, units=units_of(family))
    masked_record, masks = run(masked, "mask", method=method, allocation=allocation, units=units_of(family))
    assert record["metrics"]["widths"] == masked_record["metrics"]["widths"]
    torch.testing.assert_close(logits(removed), logits(masked), rtol=1e-4, atol=1e-5)
    assert record["metrics"]["parameters"]["after"] < record["metrics"]["parameters"]["before"]
    # the masks are the zeros: every weight entry a mask drops is zero, and Masks holds them
    held = Masks(masked, masks)
    held.update(masks)
    for name, mask in masks.items():
        weight = masked.get_parameter(name)
        assert not weight[~mask].any()
    assert sum(int((~m).sum()) for m in masks.values()) > 0


@pytest.mark.parametrize("family", LLAMA_STYLE)
def test_uniform_removal_saves_and_reloads_with_identical_logits_and_generates_with_cache(family, tmp_path):
    model = tiny_causal_lm(family)
    record = run(model, units=units_of(family))
    adapter = adapter_for(model)
    assert record["metrics"]["config_matches_tensors"] and config_mismatch(model, adapter) is None
    widths = record["metrics"]["widths"]
    assert all(w == widths[0] for w in widths)
    prunekit.save(model, None, tmp_path / "out", record)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    assert reloaded.config.intermediate_size == widths[0]["neurons"]
    prompt = IDS[:1, :6]
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = reloaded.generate(prompt, use_cache=True, **settings)
    without = reloaded.generate(prompt, use_cache=False, **settings)
    assert torch.equal(with_cache, without)


def test_flap_bias_compensation_adds_biases_that_the_config_reloads(tmp_path):
    model = tiny_causal_lm("llama")
    record = run(model)
    assert record["method"]["bias_compensation"] == ["attention", "mlp"]
    assert model.config.mlp_bias and model.config.attention_bias
    down = adapter_for(model).block_list(model)[0].mlp.down_proj
    assert down.bias is not None and down.bias.abs().sum() > 0
    prunekit.save(model, None, tmp_path / "out", record)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(reloaded.model.layers[0].mlp.down_proj.bias, down.bias)
    uncompensated = tiny_causal_lm("llama")
    plain = run(uncompensated, bias_compensation=False)
    assert plain["method"]["bias_compensation"] == [] and uncompensated.model.layers[0].mlp.down_proj.bias is None
    assert not torch.equal(logits(model), logits(uncompensated))


def test_compensation_refused_where_the_config_cannot_hold_the_bias():
    model = tiny_causal_lm("qwen2")
    before = weights_sha256(model)
    with pytest.raises(PrunekitError, match="no config flag"):
        run(model, bias_compensation=True)
    assert weights_sha256(model) == before


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("method", ["l1", "l2", "random", "activation", "wanda-sp", "flap"])
@pytest.mark.parametrize("remove", [0.1, 0.3, 0.5])
def test_achieved_reduction_is_within_two_points_of_the_target(allocation, method, remove):
    model = tiny_causal_lm("llama", layers=4)
    record = run(model, method=method, remove=remove, allocation=allocation, units=("neurons", "heads"))
    params = record["metrics"]["parameters"]
    assert params["before"] - params["after"] == params["removed"]  # compensation biases counted against it
    assert abs(record["metrics"]["removed_fraction"]["achieved"] - remove) <= 0.02, params
    assert record["metrics"]["removed_fraction"]["target"] == remove


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("remove_macs", [0.15, 0.3])
def test_a_mac_budget_is_met_and_its_count_equals_the_measured_macs(family, allocation, remove_macs):
    model = tiny_causal_lm(family, layers=4)
    record = run(model, remove=None, remove_macs=remove_macs, allocation=allocation)
    macs = record["metrics"]["macs_removed_fraction"]
    speed = record["metrics"]["speed"]["macs"]
    # the allocation's count of the units' MACs is what the FLOP counter measures on the pruned model
    assert macs["achieved"] == pytest.approx(1 - speed["after"] / speed["before"], abs=1e-12)
    assert abs(macs["achieved"] - remove_macs) <= 0.02, macs
    assert record["method"]["remove_macs"] == remove_macs and record["method"]["remove"] is None
    assert record["metrics"]["config_matches_tensors"] or allocation == "global"


def test_a_mac_budget_in_mask_mode_states_the_macs_the_removal_would_save():
    masked, removed = tiny_causal_lm("llama", layers=4), tiny_causal_lm("llama", layers=4)
    record_mask, _ = run(masked, mode="mask", remove=None, remove_macs=0.3)
    record = run(removed, remove=None, remove_macs=0.3)
    assert record_mask["metrics"]["macs_removed_fraction"] == record["metrics"]["macs_removed_fraction"]
    torch.testing.assert_close(logits(masked), logits(removed), rtol=1e-4, atol=1e-5)


def test_round_to_keeps_multiples_and_global_keeps_the_floor():
    model = tiny_causal_lm("llama", layers=4)
    record = run(model, allocation="global", remove=0.4, round_to=16, units=("neurons",), min_keep=0.25)
    for width in record["metrics"]["widths"]:
        assert width["neurons"] % 16 == 0 and width["neurons"] >= 32
    assert abs(record["metrics"]["removed_fraction"]["achieved"] - 0.4) <= 0.02


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
def test_non_uniform_widths_save_and_load_through_the_manifest(family, tmp_path):
    model = tiny_causal_lm(family, layers=4, tie=True)
    record = run(model, allocation="global", remove=0.3, units=units_of(family))
    widths = record["metrics"]["widths"]
    assert len({(w["heads"], w["neurons"]) for w in widths}) > 1
    assert not record["metrics"]["config_matches_tensors"]
    prunekit.save(model, None, tmp_path / "out", record)
    reloaded, _, saved = prunekit.load(tmp_path / "out")
    assert saved["block_widths"] == widths
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight  # still tied
    prompt = IDS[:1, :6]
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(prompt, use_cache=True, **settings),
                       reloaded.generate(prompt, use_cache=False, **settings))
    with pytest.raises(Exception):  # noqa: B017 - transformers' own error: the shapes do not fit the config
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("widths", ["not a list", [{"heads": 4, "kv_heads": 2}], [{"heads": 4, "kv_heads": 3,
                                                                                   "neurons": 8}] * 4,
                                    [{"heads": 4, "kv_heads": 2, "neurons": 10**9}] * 4])
def test_hostile_manifest_widths_are_bad_input(tmp_path, widths):
    model = tiny_causal_lm("llama", layers=4)
    run(model, allocation="global", remove=0.3, units=("neurons",))
    prunekit.save(model, None, tmp_path / "out", {})
    manifest = tmp_path / "out" / "prunekit.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "block_widths": widths}))
    with pytest.raises(PrunekitError, match="widths"):
        prunekit.load(tmp_path / "out")


@pytest.mark.parametrize("family, options, message", [
    ("llama", dict(remove=1.0), "in \\(0, 1\\)"),
    ("llama", dict(remove=0.0), "in \\(0, 1\\)"),
    ("llama", dict(remove=0.95), "at most"),
    ("llama", dict(remove=None, remove_macs=0.9), "at most .* MACs|MACs .* at most"),
    ("llama", dict(remove=0.3, remove_macs=0.3), "exactly one budget"),
    ("llama", dict(remove=None), "exactly one budget"),
    ("llama", dict(remove=None, remove_macs=1.5), "remove_macs=1.5 must be a fraction of the model's MACs"),
    ("llama", dict(remove=0.3, units=("heads",)), "at most"),
    ("llama", dict(method="taylor"), "unknown"),
    ("llama", dict(round_to=7), "does not divide"),
    ("llama", dict(allocation="lamp"), "not available"),
    ("llama", dict(mode="zero"), "unknown"),
    ("llama", dict(units=("layers",)), "must name"),
    ("llama", dict(method="l2", bias_compensation=True), "needs calibration"),
    ("olmo2", dict(), "across all heads"),
    ("opt", dict(), "not supported"),
])
def test_bad_input_raises_one_line_and_leaves_the_model_untouched(family, options, message):
    model = tiny_causal_lm(family)
    before = weights_sha256(model)
    with pytest.raises(PrunekitError, match=message) as error:
        run(model, **options)
    assert "\n" not in str(error.value)
    assert weights_sha256(model) == before


def test_group_norm_and_flap_scores_match_their_definitions():
    model = tiny_causal_lm("llama", layers=1)
    adapter = adapter_for(model)
    lay = block_layouts(model, adapter)[0]
    block = adapter.block_list(model)[0]
    w = {n: block.get_submodule(n).weight.data for n in adapter.attention + adapter.mlp}
    q, k, v, o = (w[n] for n in adapter.attention)
    gate, up, down = (w[n] for n in adapter.mlp)
    heads, neurons = group_norm_scores(q, k, v, o, [gate, up], down, lay, p=2)
    hd, g = lay.head_dim, lay.group_size
    group1 = torch.cat([q[g * hd:2 * g * hd].flatten(), k[hd:2 * hd].flatten(), v[hd:2 * hd].flatten(),
                        o[:, g * hd:2 * g * hd].flatten()])
    torch.testing.assert_close(heads[1].float(), group1.norm())
    torch.testing.assert_close(neurons[3].float(), torch.cat([gate[3], up[3], down[:, 3]]).norm())
    x_o, x_down = torch.randn(50, o.shape[1]), torch.randn(50, down.shape[1])
    o_stats, down_stats = ChannelStats(o.shape[1], lay.kv_heads * g), ChannelStats(down.shape[1])
    o_stats.add(x_o[:20])
    o_stats.add(x_o[20:])
    down_stats.add(x_down)
    heads, neurons = flap_scores(o, down, o_stats, down_stats, lay)
    expected = x_down.double().var(0) * down.double().square().sum(0)
    torch.testing.assert_close(neurons, expected)
    per_channel = x_o.double().var(0) * o.double().square().sum(0)
    torch.testing.assert_close(heads, per_channel.view(lay.kv_heads, -1).sum(1))


def test_flap_compensation_is_exact_for_constant_channels():
    """A removed neuron whose output never varies contributes W[:, j]·mean_j to every token: the bias takes it
    over exactly. Neurons 0..63 read only their biases here, so they are constant and non-zero."""
    model = tiny_causal_lm("llama", layers=1)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for module, value in ((mlp.gate_proj, 2.0), (mlp.up_proj, 3.0)):
            module.weight[:64] = 0
            module.bias = torch.nn.Parameter(torch.zeros(128))
            module.bias[:64] = value
    before = logits(model)
    record = run(model, method="flap", units=("neurons",), remove=0.05)
    assert 64 <= record["metrics"]["widths"][0]["neurons"] < 128
    assert record["method"]["bias_compensation"] == ["mlp"]
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
