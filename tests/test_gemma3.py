"""Quality and engine tests on the real Gemma-3-270M, the second real LLM beside SmolLM2 (issue 8 §1).

Gemma 3 alternates five sliding-window layers (window 512, local rotary base 10^4) with one full-attention layer
(global rotary base 10^6), so a block calibrated with another block's arguments gets wrong activations. Small
calibration and evaluation sets keep the module at about two minutes on 2 cores.
"""

import copy

import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for
from prunekit.assets import LoadedModel, load_causal_lm
from prunekit.corpus import calibration_tokens, evaluation_windows
from prunekit.measure import perplexity
from prunekit.weights.engine import capture_block_inputs, run_block
from real_models import CALIB, pruned_perplexity_runner

pytestmark = pytest.mark.slow

# 16 x 256 tokens: with 8 x 256 SparseGPT's Hessians are too poorly estimated and it falls behind Wanda at 50%.
CPU = torch.device("cpu")

# Perplexity over dense measured with CALIB on the 8 x 256 evaluation windows below (dense 45.41; no BOS token in
# the windows, as in the SmolLM2 protocol): 50% Wanda 3.32x, SparseGPT 2.59x; 2:4 Wanda 11.00x, SparseGPT 3.39x.
# The bounds are those values plus 15%, so that a 15% regression fails.
WITHIN_DENSE = {("wanda", "0.5"): 3.8, ("sparsegpt", "0.5"): 3.0, ("wanda", "2:4"): 12.7, ("sparsegpt", "2:4"): 3.9}
# Magnitude collapses on Gemma 3 (92,003 at 50%, 635,542 at 2:4); Wanda and SparseGPT are 600x to 4,000x lower.
BELOW_MAGNITUDE = 0.01


@pytest.fixture(scope="module")
def gemma3() -> LoadedModel:
    """Gemma-3-270M in float32 on the CPU. The first use on a machine converts the GGUF file (~1 min) into the
    prunekit cache; later loads take about 2 s. Tests that change the model work on a `copy.deepcopy` of it."""
    return load_causal_lm("gemma3-270m")


@pytest.fixture(scope="module")
def eval_ids(gemma3):
    return evaluation_windows(gemma3.tokenizer, "wiki-summaries", seq_len=256, max_windows=8).ids


@pytest.fixture(scope="module")
def dense_perplexity(gemma3, eval_ids) -> float:
    return perplexity(gemma3.model, eval_ids, progress=False)["perplexity"]


@pytest.fixture(scope="module")
def pruned_perplexity(gemma3, eval_ids):
    """Perplexity after pruning a fresh copy of Gemma-3-270M with each (method, budget) pair, computed once."""
    return pruned_perplexity_runner(gemma3, eval_ids)


@pytest.mark.parametrize("budget", ["0.5", "2:4"])
def test_wanda_and_sparsegpt_clearly_beat_magnitude(pruned_perplexity, dense_perplexity, budget):
    magnitude = pruned_perplexity("magnitude", budget)
    wanda = pruned_perplexity("wanda", budget)
    sparsegpt = pruned_perplexity("sparsegpt", budget)
    assert dense_perplexity < sparsegpt < wanda, (dense_perplexity, sparsegpt, wanda)
    assert wanda < BELOW_MAGNITUDE * magnitude, (wanda, magnitude)
    assert sparsegpt < BELOW_MAGNITUDE * magnitude, (sparsegpt, magnitude)


@pytest.mark.parametrize(("method", "budget"), list(WITHIN_DENSE))
def test_pruned_perplexity_stays_within_its_measured_reach_of_dense(
    pruned_perplexity, dense_perplexity, method, budget
):
    ratio = pruned_perplexity(method, budget) / dense_perplexity
    assert ratio < WITHIN_DENSE[method, budget], ratio


def test_replayed_block_inputs_equal_the_forward_hidden_states(gemma3):
    """The engine's input of every block equals the normal forward's hidden state, and the last block's replayed
    output equals its output in the forward, on samples longer than the sliding window."""
    model, config = gemma3.model, gemma3.model.config
    blocks = adapter_for(model).block_list(model)
    seq_len = config.sliding_window + 128
    assert {"sliding_attention", "full_attention"} <= set(config.layer_types)
    ids = calibration_tokens(gemma3.tokenizer, "wiki-summaries", samples=2, seq_len=seq_len, seed=0).ids

    last_output = []
    handle = blocks[-1].register_forward_hook(
        lambda module, args, out: last_output.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.inference_mode():  # the decoder alone: the 262k-token head is not needed
            hidden = model.get_decoder()(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        handle.remove()

    inputs = capture_block_inputs(model, blocks, ids, batch_size=2, device=CPU, activation_device=CPU)
    assert len(inputs) == 1
    full = config.layer_types.index("full_attention")
    for index, block in enumerate(blocks):
        assert torch.equal(inputs[0].hidden, hidden[index]), f"block {index} ({config.layer_types[index]})"
        if index == full:
            # the bug this guards against: the full-attention block run with block 0's (sliding-window) arguments
            wrong = run_block(block, 0, inputs, CPU)[0].hidden
            assert (wrong - hidden[index + 1]).abs().max() > 0.1 * hidden[index + 1].abs().max()
        inputs = run_block(block, index, inputs, CPU)
    assert torch.equal(inputs[0].hidden, last_output[0])


def test_structured_obs_prunes_gemma3_neurons_to_a_loadable_model(gemma3, eval_ids, dense_perplexity, tmp_path):
    """Issue 9 on the second real LLM: Gemma-3-270M has one KV head per block (which every block keeps, so its
    neurons go), and 63% of its parameters in the 262k-token embedding, so 10% of all parameters is about 38% of
    its MLP neurons. Measured (torch 2.13 CPU, CALIB, the 8 x 256 windows above; dense 45.41): obs 101.4, flap
    130.7, l2 6.7 million. Bounds: 15% above obs's value, and far below the magnitude baseline."""
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(gemma3.model)
    record = prunekit.prune_structure(model, gemma3.tokenizer, method="obs", remove=0.1, **CALIB)
    metrics = record["metrics"]
    assert abs(metrics["removed_fraction"]["achieved"] - 0.1) <= 0.02
    assert metrics["config_matches_tensors"]
    assert {(w["kv_heads"], w["heads"]) for w in metrics["widths"]} == {(1, 4)}
    assert model.config.intermediate_size == metrics["widths"][0]["neurons"] < 2048
    obs = perplexity(model, eval_ids, progress=False)["perplexity"]
    assert dense_perplexity < obs < 1.15 * 101.4, obs

    prunekit.save(model, gemma3.tokenizer, tmp_path / "out", record)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = eval_ids[:1, :32]
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(ids, use_cache=True, **settings),
                       reloaded.generate(ids, use_cache=False, **settings))
