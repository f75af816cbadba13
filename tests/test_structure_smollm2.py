"""Structured pruning of the real SmolLM2-135M: 20% of all parameters removed as MLP neurons, calibrated vs l2."""

import copy

import pytest

import prunekit
from prunekit.measure import perplexity
from real_models import CALIB

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned(smollm2, eval_ids):
    """(record, perplexity) after removing 20% of SmolLM2's parameters with each method, computed once."""
    cache = {}

    def run(method):
        if method not in cache:
            model = copy.deepcopy(smollm2.model)
            record = prunekit.prune_structure(model, smollm2.tokenizer, method=method, remove=0.2,
                                              allocation="uniform", units=("neurons",), **CALIB)
            cache[method] = record, perplexity(model, eval_ids, progress=False)["perplexity"]
        return cache[method]

    return run


def test_flap_beats_the_magnitude_baseline_by_orders_of_magnitude(pruned):
    # Measured (torch 2.13 CPU, 2 threads, dense 13.28): l2 263,016 (magnitude collapses, as Torch-Pruning's
    # magnitude importance does at this budget), flap 41.9. The threshold is 15% above flap's measured value.
    _, l2 = pruned("l2")
    record, flap = pruned("flap")
    assert flap < 0.01 * l2, (flap, l2)
    assert flap < 1.15 * 41.9, flap
    params = record["metrics"]["parameters"]
    assert abs(record["metrics"]["removed_fraction"]["achieved"] - 0.2) <= 0.02
    assert params["before"] - params["after"] == params["removed"]
    assert record["metrics"]["config_matches_tensors"]
    assert record["method"]["bias_compensation"] == ["mlp"]


def test_obs_with_least_squares_reconstruction_beats_flap(pruned):
    # Structured OBS re-fits down_proj (and its bias) on the pruned model's own activations, block after block.
    # Measured with this small calibration (16 × 256 tokens, torch 2.13 CPU): obs 38.5, flap 41.9; with the one-shot
    # protocol's 32 × 512 the gap is wider (29.2 against 41.8, BENCHMARKS.md). Thresholds: 5% below flap, and 10%
    # above obs's measured value.
    record, obs = pruned("obs")
    _, flap = pruned("flap")
    assert record["method"]["reconstruct"] and record["method"]["bias_compensation"] == ["mlp"]
    assert abs(record["metrics"]["removed_fraction"]["achieved"] - 0.2) <= 0.02
    assert obs < 0.95 * flap and obs < 1.1 * 38.5, (obs, flap)
