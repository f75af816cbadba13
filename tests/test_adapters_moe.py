"""MoE adapters: roles found in every family, experts addressed as units, routing reproduced, and the dense code
paths either working on MoE models or refusing them with one line."""

import pytest
import torch

from prunekit.adapters import adapter_for, find_adapter
from prunekit.adapters.moe import MoeAdapter, expert_weights
from prunekit.depth.api import prune_depth
from prunekit.errors import PrunekitError
from prunekit.experts import route
from prunekit.structure.api import prune_structure
from prunekit.targets import target_weights
from tiny_models import MOE_FAMILIES, tiny_moe_lm

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_roles_are_found(family):
    model = tiny_moe_lm(family, experts=5, top_k=2)
    adapter = adapter_for(model)
    assert isinstance(adapter, MoeAdapter) and adapter.family == family
    layers = adapter.moe_layers(model)
    assert [layer.index for layer in layers] == [0, 1]
    assert getattr(model.config, adapter.num_experts) == 5 and getattr(model.config, adapter.top_k) == 2
    # the canonical field is what config.json stores
    assert model.config.to_dict()[adapter.num_experts] == 5
    for layer in layers:
        assert len(layer.shared) == (2 if family == "qwen2_moe" else 0)
        assert layer.router.weight.shape == (5, 32)
        assert layer.experts.gate_up_proj.shape[0] == layer.experts.down_proj.shape[0] == 5
    projections = adapter.projections(model.model.layers[0])
    assert list(projections)[:4] == list(adapter.attention)
    assert all(isinstance(m, torch.nn.Linear) for m in projections.values())
    assert ("mlp.shared_expert.down_proj" in projections) == (family == "qwen2_moe")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_weights_are_views_of_one_expert(family):
    model = tiny_moe_lm(family)
    experts = adapter_for(model).moe_layers(model)[0].experts
    w = expert_weights(experts, 3)
    intermediate = experts.down_proj.shape[2]
    assert w["gate"].shape == w["up"].shape == (intermediate, 32) and w["down"].shape == (32, intermediate)
    w["up"][0, 0] = 7.0
    w["down"][1, 2] = 5.0
    assert experts.gate_up_proj[3, intermediate, 0] == 7.0 and experts.down_proj[3, 1, 2] == 5.0
    # expert 3 alone computes act(gate x) * up x then down, as the module does for a token routed only to it
    x = torch.randn(4, 32)
    own = experts(x, torch.full((4, 1), 3), torch.ones(4, 1))
    manual = (experts.act_fn(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T
    torch.testing.assert_close(own, manual)


@pytest.mark.parametrize(("family", "normalise"), [("mixtral", True), ("qwen2_moe", False), ("qwen2_moe", True),
                                                   ("qwen3_moe", False), ("qwen3_moe", True), ("olmoe", False),
                                                   ("olmoe", True)])
def test_route_reproduces_every_router(family, normalise):
    model = tiny_moe_lm(family, top_k=3, norm_topk_prob=normalise)
    adapter = adapter_for(model)
    assert adapter.renormalises(model.config) == normalise
    router = adapter.moe_layers(model)[0].router
    x = torch.randn(20, 32)
    logits, weights, indices = router(x)
    mine_weights, mine_indices = route(logits, 3, adapter.renormalises(model.config))
    assert torch.equal(mine_indices, indices)
    torch.testing.assert_close(mine_weights, weights, rtol=0, atol=1e-7)
    assert torch.allclose(weights.sum(-1), torch.ones(20)) == normalise


def test_qwen_dense_layers_are_skipped():
    model = tiny_moe_lm("qwen2_moe", layers=3, mlp_only_layers=[1])
    adapter = find_adapter(model)
    assert [layer.index for layer in adapter.moe_layers(model)] == [0, 2]
    assert "mlp.down_proj" in adapter.projections(model.model.layers[1])
    assert "mlp.shared_expert.down_proj" in adapter.projections(model.model.layers[0])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_structured_pruning_refuses_moe(family):
    model = tiny_moe_lm(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=f"structured pruning of the {family} family"):
        prune_structure(model, IDS, method="l2", remove=0.2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_one_shot_targets_are_plain_projections(family):
    model = tiny_moe_lm(family)
    names = target_weights(model)
    assert names and not any("experts" in name or name.endswith("mlp.gate.weight") for name in names)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_depth_pruning_removes_moe_blocks(family):
    model = tiny_moe_lm(family, layers=3)
    record = prune_depth(model, method="angular", blocks=1, calibration=IDS, calibration_seq_len=12, progress=False)
    assert model.config.num_hidden_layers == 2 == len(adapter_for(model).moe_layers(model))
    assert record["metrics"]["blocks"]["after"] == 2
    assert torch.isfinite(model(IDS).logits).all()
