"""Expert pruning: statistics over routed tokens, removal that equals masking the router, config and reload,
merging, criteria, weights inside experts, and one-line errors that leave the model untouched."""

import copy
import json

import pytest
import torch
import transformers

from prunekit.adapters import adapter_for
from prunekit.adapters.moe import expert_weights
from prunekit.errors import PrunekitError
from prunekit.experts import (
    expert_input_statistics,
    expert_tensors,
    moe_pruner_scores,
    nearest_experts,
    prune_expert_weights,
    prune_experts,
    prune_inside_experts,
    remove_experts,
    route,
    router_norm_scores,
    router_statistics,
    select_experts,
)
from prunekit.experts.inside import expert_masks
from prunekit.measure.protocol import weights_sha256
from tiny_models import MOE_FAMILIES, tiny_causal_lm, tiny_moe_lm

IDS = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(1))
# families with and without renormalised top-k weights (Mixtral always renormalises)
VARIANTS = [("mixtral", False), ("qwen2_moe", False), ("qwen2_moe", True), ("qwen3_moe", False),
            ("qwen3_moe", True), ("olmoe", False), ("olmoe", True)]


def never_routed(model, expert: int):
    """Make `expert` unreachable in every layer: hidden feature 0 is held at 1 through the residual stream (set in
    the embeddings, written by no sublayer), so router weight -1e4 on it gives the expert a logit far below every
    other and a softmax probability of exactly 0. The other experts' router weights on it are zeroed, so that
    their routing still varies from token to token."""
    adapter = adapter_for(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        for block in adapter.block_list(model):
            block.self_attn.o_proj.weight[0] = 0.0
            shared = getattr(block.mlp, "shared_expert", None)
            if shared is not None:
                shared.down_proj.weight[0] = 0.0
        for layer in adapter.moe_layers(model):
            layer.experts.down_proj[:, 0] = 0.0
            layer.router.weight[:, 0] = 0.0
            layer.router.weight[expert, 0] = -1e4


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("family", "normalise"), VARIANTS)
def test_statistics_count_exactly_the_routed_tokens(family, normalise):
    model = tiny_moe_lm(family, norm_topk_prob=normalise)
    adapter = adapter_for(model)
    stats = router_statistics(model, IDS, batch_size=2)
    with torch.no_grad():
        router_logits = model(IDS, output_router_logits=True).router_logits
    assert len(stats) == len(router_logits) == 2
    for entry, layer_logits in zip(stats, router_logits, strict=True):
        probs = torch.softmax(layer_logits.float(), dim=-1)
        top, chosen = torch.topk(probs, 2, dim=-1)
        if adapter.renormalises(model.config):
            top = top / top.sum(-1, keepdim=True)
        assert entry.tokens == IDS.numel()
        assert entry.counts.tolist() == torch.bincount(chosen.flatten(), minlength=6).tolist()
        assert entry.counts.sum() == 2 * IDS.numel()
        gate_sums = torch.zeros(6, dtype=torch.float64).index_add_(0, chosen.flatten(), top.flatten().double())
        torch.testing.assert_close(entry.gate_sums, gate_sums)
        torch.testing.assert_close(entry.mean_gate, gate_sums / entry.counts.clamp(min=1))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_removing_an_expert_the_router_never_picks_leaves_outputs_identical(family):
    model = tiny_moe_lm(family)
    never_routed(model, 2)
    counts = [s.counts for s in router_statistics(model, IDS)]
    assert all(c[2] == 0 and (c[[0, 1, 3, 4, 5]] > 0).all() for c in counts)
    before = logits(model)
    remove_experts(model, adapter_for(model), [[2], [2]])
    assert torch.equal(logits(model), before)


def masked_router(router, expert: int, top_k: int, renormalise: bool):
    """A forward hook making `router` act as if expert's logit were -inf."""
    def hook(module, args, output):
        logits = output[0].clone()
        logits[:, expert] = float("-inf")
        weights, indices = route(logits, top_k, renormalise)
        return logits, weights, indices

    return router.register_forward_hook(hook)


@pytest.mark.parametrize(("family", "normalise"), VARIANTS)
def test_removing_expert_k_equals_masking_its_logit(family, normalise):
    model = tiny_moe_lm(family, norm_topk_prob=normalise)
    adapter = adapter_for(model)
    handles = [masked_router(layer.router, 4, 2, adapter.renormalises(model.config))
               for layer in adapter.moe_layers(model)]
    masked = logits(model)
    for handle in handles:
        handle.remove()
    dense = logits(model)
    assert not torch.allclose(masked, dense, atol=1e-4)  # expert 4 mattered
    remove_experts(model, adapter, [[4], [4]])
    torch.testing.assert_close(logits(model), masked, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_config_matches_tensors_and_reloads(family, tmp_path):
    model = tiny_moe_lm(family)
    adapter = adapter_for(model)
    remove_experts(model, adapter, [[0, 5], [1, 3]])
    assert getattr(model.config, adapter.num_experts) == 4
    for layer in adapter.moe_layers(model):
        assert layer.router.weight.shape[0] == layer.experts.gate_up_proj.shape[0] == 4
        assert layer.experts.down_proj.shape[0] == layer.router.num_experts == layer.experts.num_experts == 4
    before = logits(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[adapter.num_experts] == 4
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded), before)


def test_removal_keeps_the_other_experts_in_order():
    model = tiny_moe_lm("olmoe")
    layer = adapter_for(model).moe_layers(model)[1]
    gate_up, router = layer.experts.gate_up_proj.detach().clone(), layer.router.weight.detach().clone()
    remove_experts(model, adapter_for(model), [[0], [1]])
    layer = adapter_for(model).moe_layers(model)[1]
    assert torch.equal(layer.experts.gate_up_proj, gate_up[[0, 2, 3, 4, 5]])
    assert torch.equal(layer.router.weight, router[[0, 2, 3, 4, 5]])


@pytest.mark.parametrize("criterion", ["frequency", "gate", "reconstruction"])
def test_calibrated_criteria_remove_an_unused_expert_first(criterion):
    model = tiny_moe_lm("mixtral")
    never_routed(model, 3)
    record = prune_experts(model, criterion=criterion, remove=1, calibration=IDS, calibration_seq_len=16,
                           progress=False)
    assert record["metrics"]["removed"] == {"0": [3], "1": [3]}
    assert record["metrics"]["scores"]["0"][3] == 0.0
    assert record["metrics"]["experts"] == {"target": 1, "achieved": 1, "before": 6, "after": 5, "top_k": 2}
    json.dumps(record)


def test_reconstruction_error_is_the_change_when_the_expert_is_dropped():
    model = tiny_moe_lm("qwen3_moe")
    adapter = adapter_for(model)
    errors = router_statistics(model, IDS, reconstruction=True)[0].drop_errors
    captured = {}
    layer = adapter.moe_layers(model)[0]
    handle = layer.experts.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out))
    logits(model)
    full = captured["out"].clone()
    masked_router(layer.router, 1, 2, False)
    logits(model)  # layer 0's experts see the same inputs, now routed around expert 1
    handle.remove()
    torch.testing.assert_close(errors[1], (full - captured["out"]).double().pow(2).sum())


def test_frequency_selects_the_least_routed_experts():
    scores = [torch.tensor([3.0, 1.0, 2.0, 1.0]), torch.tensor([0.0, 5.0, 4.0, 3.0])]
    assert select_experts(scores, 2) == [[1, 3], [0, 3]]


def test_router_norm_change():
    pretrained = tiny_moe_lm("mixtral")
    tuned = copy.deepcopy(pretrained)
    scale = torch.tensor([1.2, 1.5, 0.5, 2.0, 1.1, 1.0])
    with torch.no_grad():
        for layer in adapter_for(tuned).moe_layers(tuned):
            layer.router.weight.mul_(scale.unsqueeze(1))
    scores = router_norm_scores(tuned, pretrained)
    norms = adapter_for(pretrained).moe_layers(pretrained)[0].router.weight.norm(dim=1)
    torch.testing.assert_close(scores[0], (scale - 1) * norms.detach())
    record = prune_experts(tuned, criterion="router_norm", remove=2, pretrained=pretrained, progress=False)
    assert record["metrics"]["removed"] == {"0": [2, 5], "1": [2, 5]}
    assert record["calibration"] is None
    with pytest.raises(PrunekitError, match="routers differ"):
        router_norm_scores(tiny_moe_lm("mixtral", experts=4), pretrained)


def test_random_criterion_is_seeded():
    removed = [prune_experts(tiny_moe_lm("olmoe"), criterion="random", remove=3, seed=s, progress=False)
               ["metrics"]["removed"] for s in (0, 0, 1)]
    assert removed[0] == removed[1] != removed[2]


def test_merge_folds_into_the_nearest_expert():
    model = tiny_moe_lm("mixtral")
    adapter = adapter_for(model)
    layer = adapter.moe_layers(model)[0]
    with torch.no_grad():
        layer.experts.gate_up_proj[4] = 1.5 * layer.experts.gate_up_proj[1]
        layer.experts.down_proj[4] = 1.5 * layer.experts.down_proj[1]
    assert nearest_experts(layer, [4]) == {4: 1}
    expected = (3 * layer.experts.down_proj[1] + 1 * layer.experts.down_proj[4]) / 4
    counts = [torch.tensor([0, 3, 0, 0, 1, 0]), torch.ones(6)]
    merged = remove_experts(model, adapter, [[4], [0]], merge=True, merge_weights=counts)
    assert merged[0] == {4: 1}
    torch.testing.assert_close(adapter.moe_layers(model)[0].experts.down_proj[1], expected)
    assert getattr(model.config, adapter.num_experts) == 5


def test_prune_experts_with_merge_records_the_neighbours():
    record = prune_experts(tiny_moe_lm("qwen2_moe"), criterion="gate", remove=0.5, merge=True, calibration=IDS,
                           calibration_seq_len=16, progress=False)
    assert record["metrics"]["experts"]["after"] == 3
    assert all(len(v) == 3 for v in record["metrics"]["merged_into"].values())
    assert record["metrics"]["parameters"]["after"]["total"] < record["metrics"]["parameters"]["before"]["total"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"remove": 6}, "leaves none"),
    ({"remove": 5}, "fewer than the 2 each token is routed to"),
    ({"remove": 1.0}, r"in \[0, 1\)"),
    ({"remove": -1}, "must not be negative"),
    ({"remove": "2"}, "must be a number"),
    ({"criterion": "loudness"}, "unknown expert criterion 'loudness'"),
    ({"criterion": "router_norm"}, "needs the pretrained model"),
])
def test_bad_inputs_leave_the_model_untouched(kwargs, message):
    model = tiny_moe_lm("mixtral")
    before = weights_sha256(model)
    with pytest.raises(PrunekitError, match=message) as error:
        prune_experts(model, calibration=IDS, calibration_seq_len=16, progress=False, **kwargs)
    assert "\n" not in str(error.value)
    assert weights_sha256(model) == before and model.config.num_local_experts == 6


@pytest.mark.parametrize("removed", [[[1], [1, 2]], [[7], [1]], [[1, 1], [2, 3]], [[1]]])
def test_bad_removals_leave_the_model_untouched(removed):
    model = tiny_moe_lm("olmoe")
    before = weights_sha256(model)
    with pytest.raises(PrunekitError):
        remove_experts(model, adapter_for(model), removed)
    assert weights_sha256(model) == before


def test_dense_model_is_refused():
    with pytest.raises(PrunekitError, match="has no experts"):
        prune_experts(tiny_causal_lm("llama"), criterion="random", remove=1, progress=False)


def test_moe_pruner_score_formula():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norms = torch.tensor([2.0, 1.0])
    assert torch.equal(moe_pruner_scores(weight, norms), torch.tensor([[2.0, 2.0], [6.0, 0.5]]))


def test_expert_input_statistics_count_routed_tokens():
    model = tiny_moe_lm("olmoe")
    stats = expert_input_statistics(model, IDS)
    counts = router_statistics(model, IDS)
    for inputs, routed in zip(stats, counts, strict=True):
        assert torch.equal(inputs.counts, routed.counts)
        # gate weights below one shrink the gated norms (OLMoE here does not renormalise: g < 1)
        used = inputs.counts > 0
        assert (inputs.hidden_gated_sq[used] < inputs.hidden_sq[used]).all()


@pytest.mark.parametrize("method", ["moe_pruner", "wanda"])
def test_inside_experts_prunes_each_row(method):
    model = tiny_moe_lm("qwen2_moe")
    masks = prune_expert_weights(model, IDS, method=method, sparsity=0.5)
    layer = adapter_for(model).moe_layers(model)[0]
    keep = masks["model.layers.0.mlp.experts.gate_up_proj"]
    assert keep.shape == layer.experts.gate_up_proj.shape
    assert (keep.sum(-1) == 16).all() and (masks["model.layers.0.mlp.experts.down_proj"].sum(-1) == 8).all()
    assert torch.equal(layer.experts.gate_up_proj == 0, ~keep)
    assert torch.isfinite(logits(model)).all()


def _routed_error(layer, inputs, expert, weights):
    """Σ over the expert's routed tokens of ||X(W - Ŵ)ᵀ||² for gate+up and for down, from its Gram matrices."""
    total = 0.0
    for gram, names in ((inputs.hidden_gram[expert], ("gate", "up")), (inputs.inner_gram[expert], ("down",))):
        for name in names:
            diff = (weights["dense"][name] - weights["pruned"][name]).double()
            total += torch.einsum("oi,ij,oj->", diff, gram.double(), diff).item()
    return total


def test_sparsegpt_inside_experts_keeps_sparsity_exact_and_reconstructs_better_than_wanda():
    dense = tiny_moe_lm("mixtral")
    layer_index = adapter_for(dense).moe_layers(dense)[0].index
    errors = {}
    for method in ("wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        masks = prune_expert_weights(model, IDS, method=method, sparsity=0.5)
        keep = masks[f"model.layers.{layer_index}.mlp.experts.gate_up_proj"]
        layer = adapter_for(model).moe_layers(model)[0]
        assert keep.sum().item() == keep.numel() // 2  # exact, gate and up each at 50%
        assert torch.equal(layer.experts.gate_up_proj == 0, ~keep)
        # the first MoE layer sees the dense model's inputs: compare on the same routed tokens
        inputs = expert_input_statistics(dense, IDS, gram=True)[0]
        dense_layer = adapter_for(dense).moe_layers(dense)[0]
        errors[method] = sum(_routed_error(layer, inputs, e, {"dense": expert_weights(dense_layer.experts, e),
                                                              "pruned": expert_weights(layer.experts, e)})
                             for e in range(layer.experts.down_proj.shape[0]) if inputs.counts[e] > 0)
    assert errors["sparsegpt"] < 0.9 * errors["wanda"]


def test_sparsegpt_prunes_an_expert_no_token_reached_by_magnitude():
    model = tiny_moe_lm("mixtral")
    never_routed(model, 0)
    layer = adapter_for(model).moe_layers(model)[0]
    before = {k: v.clone() for k, v in expert_weights(layer.experts, 0).items()}
    prune_expert_weights(model, IDS, method="sparsegpt", sparsity=0.5)
    for name, weight in expert_weights(layer.experts, 0).items():
        expected = before[name].masked_fill(before[name].abs() <= before[name].abs().median(), 0)
        kept = weight != 0
        assert kept.sum().item() == weight.numel() // 2
        assert torch.equal(weight[kept], before[name][kept])  # no update without a Gram matrix
        assert torch.equal(weight.abs() > 0, expected.abs() > 0), name


def test_moe_pruner_equals_wanda_when_every_gate_is_one():
    # top-1 with renormalisation: every routed token has gate weight 1, so ‖X ⊙ g‖ = ‖X‖
    masks = [prune_expert_weights(tiny_moe_lm("mixtral", top_k=1), IDS, method=m, sparsity=0.5)
             for m in ("moe_pruner", "wanda")]
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    gated = [prune_expert_weights(tiny_moe_lm("olmoe"), IDS, method=m, sparsity=0.5)
             for m in ("moe_pruner", "wanda")]
    assert any(not torch.equal(gated[0][k], gated[1][k]) for k in gated[0])


def test_inside_experts_at_zero_sparsity_changes_nothing():
    model = tiny_moe_lm("mixtral")
    before = weights_sha256(model)
    masks = prune_expert_weights(model, IDS, sparsity=0.0)
    assert all(m.all() for m in masks.values()) and weights_sha256(model) == before
    with pytest.raises(PrunekitError, match="unknown method 'obs'"):
        prune_expert_weights(model, IDS, method="obs")


def test_inside_experts_calibrates_each_block_on_the_pruned_blocks_before_it():
    model = tiny_moe_lm("olmoe")
    dense = expert_input_statistics(model, IDS)
    masks = prune_expert_weights(model, IDS, method="moe_pruner", sparsity=0.5)
    pruned = expert_input_statistics(model, IDS)  # block 1 now sees pruned block 0's outputs, as while pruning
    layers = adapter_for(model).moe_layers(model)
    assert torch.equal(pruned[0].hidden_gated_sq, dense[0].hidden_gated_sq)
    assert not torch.equal(pruned[1].hidden_gated_sq, dense[1].hidden_gated_sq)
    for layer, stats in zip(layers, pruned, strict=True):
        for expert in range(6):
            keep = expert_masks(expert_weights(layer.experts, expert), stats, expert, "moe_pruner", 0.5)
            base = f"model.layers.{layer.index}.mlp.experts"
            assert torch.equal(torch.cat([keep["gate"], keep["up"]]), masks[f"{base}.gate_up_proj"][expert])
            assert torch.equal(keep["down"], masks[f"{base}.down_proj"][expert])


def test_prune_inside_experts_record_and_masks():
    model = tiny_moe_lm("qwen3_moe")
    attention = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    record, masks = prune_inside_experts(model, method="moe_pruner", sparsity=0.25, calibration=IDS,
                                         calibration_seq_len=16, progress=False, return_masks=True)
    assert record["metrics"]["sparsity"]["target"] == 0.25 == record["metrics"]["sparsity"]["achieved"]
    assert set(masks) == set(expert_tensors(model))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, attention)
    json.dumps(record)
