"""Depth pruning on tiny models of every supported family: scorers, budgets, removal that keeps the model usable."""

import copy
import math

import pytest
import torch
import transformers

import prunekit
from prunekit.adapters import adapter_for
from prunekit.depth import (
    PER_LAYER_LISTS,
    angular_distance,
    block_influence,
    choose_lowest,
    choose_run,
    random_blocks,
    remove_blocks,
    reverse_order,
    skipped_blocks,
    sleb_greedy,
)
from prunekit.errors import PrunekitError
from prunekit.measure import perplexity, weights_sha256
from tiny_models import FAMILIES, WINDOW, tiny_causal_lm

LAYERS = 7  # Gemma 3's sixth block (index 5) is its full-attention one; SmolLM3 drops rotary on index 3
REMOVED = [1, 3]  # a full-attention Qwen block, SmolLM3's no-rope block; Gemma 2's sliding and full types
IDS = torch.randint(3, 128, (3, 3 * WINDOW), generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


class _Identity:
    """The test's own stand-in for a skipped block: returns the hidden states it receives."""

    def __init__(self, blocks, indices):
        self.blocks, self.indices = blocks, indices

    def __enter__(self):
        for i in self.indices:
            self.blocks[i].forward = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]

    def __exit__(self, *exc):
        for i in self.indices:
            del self.blocks[i].forward


# --- scorers (pure functions) --------------------------------------------------------------------------------


def test_angular_distance_is_the_angle_over_pi():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    assert angular_distance(a, a) == pytest.approx(0.0, abs=1e-7)
    assert angular_distance(a[:1], -a[:1]) == pytest.approx(1.0)
    assert angular_distance(a[:1], torch.tensor([[0.0, 3.0]])) == pytest.approx(0.5)
    # the mean over rows: 0, 0.25 (45 degrees), 0
    assert angular_distance(a, torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])) == pytest.approx(0.25 / 3)


def test_block_influence_is_one_minus_the_mean_cosine():
    x = torch.randn(2, 5, 8)
    assert block_influence(x, 3 * x) == pytest.approx(0.0, abs=1e-12)
    assert block_influence(x, -x) == pytest.approx(2.0)
    y = torch.randn(2, 5, 8)
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
    assert block_influence(x, y) == pytest.approx(float(1 - cos.mean()))


def test_choosers_and_baselines():
    assert choose_run([0.3, 0.1, 0.2, 0.1], 3) == [1, 2, 3]  # argmin, ties to the shallower start
    assert choose_lowest([0.5, 0.1, 0.4, 0.1, 0.9], 3) == [1, 2, 3]
    assert reverse_order(10, 3) == [6, 7, 8]  # the final block (9) is spared
    assert reverse_order(10, 0) == []
    assert random_blocks(30, 6, 0) == random_blocks(30, 6, 0)
    assert random_blocks(30, 6, 0) != random_blocks(30, 6, 1)
    assert len(set(random_blocks(30, 6, 2))) == 6 and all(0 <= b < 30 for b in random_blocks(30, 6, 2))
    with pytest.raises(PrunekitError):
        reverse_order(4, 4)


def test_sleb_rescores_after_each_removal():
    """An oracle where block 0 is cheapest alone but costly once block 1 is gone: greedy must notice."""
    cost = {0: 1.0, 1: 2.0, 2: 3.0, 3: 5.0}

    def perplexity_without(removed):
        extra = 10.0 if {0, 1} <= set(removed) else 0.0
        return sum(cost[b] for b in removed) + extra

    order, steps = sleb_greedy(4, 2, perplexity_without)
    assert order == [0, 2]
    assert steps[0] == [1.0, 2.0, 3.0, 5.0]
    assert steps[1] == [None, 13.0, 4.0, 6.0]


# --- removal keeps the model usable, for every family --------------------------------------------------------


def _check_consistent(model, original_config, kept):
    blocks = adapter_for(model).block_list(model)
    config = model.config
    assert config.num_hidden_layers == len(blocks) == len(kept)
    for field in PER_LAYER_LISTS:
        if getattr(original_config, field, None) is not None:
            assert getattr(config, field) == [getattr(original_config, field)[i] for i in kept]
    if getattr(config, "max_window_layers", None) is not None and config.sliding_window is not None:
        # Qwen's rule for deriving layer types must give the types the kept blocks have
        derived = ["sliding_attention" if i >= config.max_window_layers else "full_attention" for i in range(len(kept))]
        assert derived == config.layer_types
    indexed = 0
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                assert module.layer_idx == new_index
                indexed += 1
    assert indexed >= len(blocks)  # every block's attention addresses the cache


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_blocks_equals_skipping_them(family):
    model = tiny_causal_lm(family, layers=LAYERS)
    with _Identity(adapter_for(model).block_list(model), REMOVED):
        expected = _logits(model)
    original_config = copy.deepcopy(model.config)
    remove_blocks(model, REMOVED)
    kept = [i for i in range(LAYERS) if i not in REMOVED]
    _check_consistent(model, original_config, kept)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_model_reloads_and_generates_with_the_kv_cache(family, tmp_path):
    model = tiny_causal_lm(family, layers=LAYERS)
    remove_blocks(model, REMOVED)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == LAYERS - len(REMOVED)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=0)
    prompt = IDS[:2, : 2 * WINDOW]  # longer than the sliding window, so windowed caches are exercised
    for candidate in (model, reloaded):
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        cached = candidate.generate(prompt, use_cache=True, **settings)
        uncached = candidate.generate(prompt, use_cache=False, **settings)
        assert cached.shape == (2, 2 * WINDOW + 6)
        assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_per_layer_lists_are_all_known(family):
    """Every config list with one entry per block is rewritten by remove_blocks (PER_LAYER_LISTS)."""
    model = tiny_causal_lm(family, layers=5)
    per_layer = {key for key, value in model.config.to_dict().items() if isinstance(value, list) and len(value) == 5}
    assert per_layer <= set(PER_LAYER_LISTS), per_layer


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zero_blocks_is_the_identity(family):
    model = tiny_causal_lm(family, layers=3)
    before, config = _logits(model), model.config.to_dict()
    digest = weights_sha256(model)
    record = prunekit.prune_depth(model, method="block-influence", blocks=0, calibration=IDS, progress=False)
    assert weights_sha256(model) == digest and model.config.to_dict() == config
    assert torch.equal(_logits(model), before)
    assert record["metrics"]["removed_blocks"] == [] and record["metrics"]["removed_fraction"]["achieved"] == 0


def test_skipped_blocks_puts_the_blocks_back():
    model = tiny_causal_lm("gemma3_text", layers=LAYERS)
    before = _logits(model)
    with skipped_blocks(model, REMOVED):
        skipped = _logits(model)
    with _Identity(adapter_for(model).block_list(model), REMOVED):
        torch.testing.assert_close(skipped, _logits(model), rtol=0, atol=0)
    assert torch.equal(_logits(model), before)


# --- prune_depth: scorers on a model, budgets, records -------------------------------------------------------


def _with_identity_blocks(family, identity):
    """A model whose blocks `identity` add nothing to the residual stream (zero output projections)."""
    model = tiny_causal_lm(family, layers=LAYERS)
    adapter = adapter_for(model)
    for index in identity:
        block = adapter.block_list(model)[index]
        for name in (adapter.attention[-1], adapter.mlp[-1]):
            for tensor in block.get_submodule(name).parameters():
                tensor.data.zero_()
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
@pytest.mark.parametrize("method", ["angular", "block-influence"])
def test_informed_methods_find_blocks_that_do_nothing(family, method):
    model = _with_identity_blocks(family, [3, 4])
    expected = _logits(model)
    record = prunekit.prune_depth(model, method=method, blocks=2, calibration=IDS, angular_tokens="all",
                                  progress=False)
    assert record["metrics"]["removed_blocks"] == [3, 4]
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
def test_sleb_does_at_least_as_well_as_removing_blocks_that_do_nothing(family):
    """On a random model some removals even lower the perplexity; SLEB's must not be worse than removing the two
    identity blocks, which leaves the calibration perplexity unchanged."""
    model = _with_identity_blocks(family, [3, 4])
    dense = perplexity(model, IDS, progress=False)["perplexity"]
    prunekit.prune_depth(model, method="sleb", blocks=2, calibration=IDS, progress=False)
    assert perplexity(model, IDS, progress=False)["perplexity"] <= dense * (1 + 1e-6)


def test_record_holds_the_scores_of_every_block():
    metrics = {}
    for method in ("angular", "block-influence", "sleb"):
        model = tiny_causal_lm("qwen2", layers=LAYERS)
        metrics[method] = prunekit.prune_depth(model, method=method, blocks=2, calibration=IDS, progress=False,
                                               evaluation=IDS)["metrics"]
    assert len(metrics["angular"]["block_scores"]["angular_distance_by_start"]) == LAYERS - 2 + 1
    influences = metrics["block-influence"]["block_scores"]["block_influence"]
    assert len(influences) == LAYERS
    assert metrics["block-influence"]["removed_blocks"] == sorted(sorted(range(LAYERS), key=influences.__getitem__)[:2])
    steps = metrics["sleb"]["block_scores"]["calibration_perplexity_by_step"]
    order = metrics["sleb"]["removal_order"]
    assert [step.count(None) for step in steps] == [0, 1]
    assert steps[1][order[0]] is None
    for step, chosen in zip(steps, order, strict=True):
        assert step[chosen] == min(v for v in step if v is not None)
    # the last step's score of the chosen block is the calibration perplexity of the pruned model
    model = tiny_causal_lm("qwen2", layers=LAYERS)
    remove_blocks(model, order)
    assert perplexity(model, IDS, progress=False)["perplexity"] == pytest.approx(steps[-1][order[-1]], rel=1e-5)
    for m in metrics.values():
        assert m["blocks"] == {"target": 2, "achieved": 2, "before": LAYERS, "after": LAYERS - 2}
        assert m["parameters"]["after"] < m["parameters"]["before"]
        assert m["dense"]["perplexity"] != m["pruned"]["perplexity"]


def test_angular_tokens_option_changes_the_distances():
    distances = {}
    for tokens in ("last", "all"):
        model = tiny_causal_lm("llama", layers=LAYERS)
        record = prunekit.prune_depth(model, method="angular", blocks=2, calibration=IDS, angular_tokens=tokens,
                                      progress=False)
        distances[tokens] = record["metrics"]["block_scores"]["angular_distance_by_start"]
        assert record["method"]["angular_tokens"] == tokens
    assert distances["last"] != distances["all"]


def test_parameter_budget_rounds_to_whole_blocks():
    model = tiny_causal_lm("llama", layers=LAYERS)
    blocks = adapter_for(model).block_list(model)
    block_fraction = sum(p.numel() for p in blocks[0].parameters()) / sum(p.numel() for p in model.parameters())
    record = prunekit.prune_depth(model, method="reverse", remove=0.3, progress=False)
    expected = math.floor(0.3 / block_fraction + 0.5)
    metrics = record["metrics"]
    assert metrics["blocks"]["achieved"] == expected == LAYERS - len(blocks)
    assert metrics["removed_fraction"]["target"] == 0.3
    assert abs(metrics["removed_fraction"]["achieved"] - 0.3) <= block_fraction / 2 + 1e-9
    assert metrics["removed_blocks"] == reverse_order(LAYERS, expected)


def test_random_baseline_follows_the_seed():
    removed = []
    for seed in (0, 0, 1):
        model = tiny_causal_lm("gpt2", layers=LAYERS)
        removed.append(prunekit.prune_depth(model, method="random", blocks=3, seed=seed,
                                            progress=False)["metrics"]["removed_blocks"])
    assert removed[0] == removed[1] == random_blocks(LAYERS, 3, 0) and removed[0] != removed[2]


@pytest.mark.parametrize("options, message", [
    (dict(method="reverse", blocks=LAYERS), "remove all"),
    (dict(method="reverse", blocks=-1), "blocks=-1"),
    (dict(method="reverse", blocks=1.5), "blocks=1.5"),
    (dict(method="reverse", remove=1.0), "remove=1.0"),
    (dict(method="reverse", remove=0.99), "remove all"),
    (dict(method="reverse", remove=-0.1), "remove=-0.1"),
    (dict(method="reverse", blocks=1, remove=0.2), "exactly one budget"),
    (dict(method="reverse"), "exactly one budget"),
    (dict(method="shortest", blocks=1), "depth method 'shortest'"),
    (dict(method="angular", blocks=1, angular_tokens="first"), "angular_tokens 'first'"),
    (dict(method="angular", blocks=1, calibration="wiki-summaries"), "needs a tokenizer"),
    (dict(method="angular", blocks=1, calibration=IDS, batch_size=0), "batch size 0"),
])
def test_bad_inputs_raise_and_leave_the_model_untouched(options, message):
    model = tiny_causal_lm("gemma3_text", layers=LAYERS)
    digest, config, before = weights_sha256(model), model.config.to_dict(), _logits(model)
    with pytest.raises(PrunekitError, match=message) as error:
        prunekit.prune_depth(model, progress=False, **options)
    assert "\n" not in str(error.value)
    assert weights_sha256(model) == digest and model.config.to_dict() == config
    assert torch.equal(_logits(model), before)


def test_gpt2_scaled_by_layer_index_refuses_renumbering():
    def model():
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=128, n_layer=4, n_head=4, n_embd=64, n_positions=64,
                                         scale_attn_by_inverse_layer_idx=True)
        return transformers.AutoModelForCausalLM.from_config(config).eval()

    scaled = model()
    digest = weights_sha256(scaled)
    with pytest.raises(PrunekitError, match="scale_attn_by_inverse_layer_idx"):
        prunekit.prune_depth(scaled, method="reverse", blocks=1, progress=False)  # block 2: block 3 moves up
    assert weights_sha256(scaled) == digest and scaled.config.n_layer == 4
    remove_blocks(scaled, [3])  # the last block renumbers nothing
    assert scaled.config.n_layer == 3
