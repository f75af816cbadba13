"""What the dense-model paths do with mixture-of-experts models: one-shot `prune` and LaCo merging refuse them
with one line (model untouched); removing blocks of a Qwen MoE with dense layers keeps each block's kind."""

import copy
import json

import pytest
import torch
import transformers

import prunekit
from prunekit.depth.merge import merge_blocks
from prunekit.depth.remove import remove_blocks
from prunekit.errors import PrunekitError
from prunekit.measure.protocol import weights_sha256
from tiny_models import tiny_moe_lm

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_oneshot_prune_refuses_moe_models_untouched(family):
    model = tiny_moe_lm(family)
    before = weights_sha256(model)
    with pytest.raises(PrunekitError, match="experts") as info:
        prunekit.prune(model, calibration=IDS, method="magnitude", sparsity=0.5, evaluation=None)
    assert "\n" not in str(info.value)
    assert weights_sha256(model) == before


def test_laco_merge_refuses_moe_blocks_untouched():
    model = tiny_moe_lm("mixtral", layers=3)
    before = weights_sha256(model)
    with pytest.raises(PrunekitError, match="LaCo merging of mixtral"):
        merge_blocks(model, [1])
    assert weights_sha256(model) == before and len(model.model.layers) == 3


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_removing_blocks_keeps_which_blocks_are_dense(family, tmp_path):
    # blocks 0..5: step 2 makes blocks 1, 3, 5 sparse; mlp_only_layers makes 3 dense too -> sparse: 1, 5
    model = tiny_moe_lm(family, layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    sparse_before = [hasattr(block.mlp, "experts") for block in model.model.layers]
    assert sparse_before == [False, True, False, False, False, True]
    reference = copy.deepcopy(model)
    remove_blocks(model, [0, 2])
    kinds = [hasattr(block.mlp, "experts") for block in model.model.layers]
    assert kinds == [True, False, False, True]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["decoder_sparse_step"] == 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [hasattr(block.mlp, "experts") for block in reloaded.model.layers] == kinds
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    # and the removal equals skipping those blocks in the original
    from prunekit.depth.remove import skipped_blocks

    with skipped_blocks(reference, [0, 2]):
        torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
