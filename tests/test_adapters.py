"""Architecture adapters name every role of a block correctly: projections, norms, head layout."""

import pytest
from torch import nn

from prunekit.adapters import ADAPTERS, adapter_for, find_adapter, projection_weight
from prunekit.errors import PrunekitError
from tiny_models import FAMILIES, tiny_causal_lm


@pytest.fixture(scope="module", params=FAMILIES)
def model(request) -> nn.Module:
    return tiny_causal_lm(request.param)


def test_model_types_are_claimed_by_one_adapter_each():
    claimed = [t for adapter in ADAPTERS for t in adapter.model_types]
    assert len(claimed) == len(set(claimed))


def test_norms_are_every_normalisation_layer_of_each_block(model):
    adapter = adapter_for(model)
    for block in adapter.block_list(model):
        found = {name for name, module in block.named_modules() if "norm" in type(module).__name__.lower()}
        assert set(adapter.norms) == found


def test_head_layout_matches_the_attention_projections(model):
    """The projections before the output projection produce queries, keys and values (fused or not), the output
    projection reads all the heads."""
    adapter = adapter_for(model)
    layout = adapter.head_layout(model.config)
    assert layout["heads"] % layout["kv_heads"] == 0
    width = layout["head_dim"]
    for block in adapter.block_list(model):
        shapes = [projection_weight(block.get_submodule(name)).shape for name in adapter.attention]
        assert sum(out for out, _ in shapes[:-1]) == (layout["heads"] + 2 * layout["kv_heads"]) * width
        assert shapes[-1][1] == layout["heads"] * width


def test_networks_without_an_adapter():
    assert find_adapter(nn.Sequential(nn.Linear(2, 2))) is None
    with pytest.raises(PrunekitError, match="no supported decoder blocks; supported model types: bert, gemma"):
        adapter_for(nn.Sequential(nn.Linear(2, 2)))
    broken = tiny_causal_lm("llama")
    broken.model.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(PrunekitError, match="does not have the llama layout"):
        find_adapter(broken)
