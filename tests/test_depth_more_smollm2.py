"""Shortened LLaMA's Taylor+ criterion on the real SmolLM2-135M (30 blocks). Its one-shot perplexity criterion
computes one calibration perplexity per block, too slow for this suite on 2 CPU cores; tests/test_depth_more.py
checks it on tiny models."""

import copy
import math

import pytest

import prunekit
from prunekit.measure import perplexity
from real_models import CALIB

pytestmark = pytest.mark.slow

# Perplexity on the first 4 evaluation windows (8 x 256 tokens of tests/conftest.py's eval_ids, halved) after
# removing 4 of 30 blocks, calibrated on 2 x 128 tokens (torch 2.13 CPU, 2 threads): taylor 29.15 (blocks 15, 16,
# 17, 26), perplexity criterion 37.40 (4, 7, 14, 18), random seed 0 46.14. With 16 x 256 calibration tokens and all
# 8 windows: taylor 23.30, perplexity criterion 23.90, random 44.85 (dense 13.28).
SHORT_BLOCKS = 4
SHORT_CALIB = dict(CALIB, calibration_samples=2, calibration_seq_len=128, batch_size=2)


@pytest.fixture(scope="module")
def shortened(smollm2, eval_ids):
    """(record, perplexity on 4 of the evaluation windows) after removing 4 blocks from a fresh copy with each
    method."""
    cache = {}

    def run(method: str):
        if method not in cache:
            model = copy.deepcopy(smollm2.model)
            record = prunekit.prune_depth(model, smollm2.tokenizer, method=method, blocks=SHORT_BLOCKS,
                                          **SHORT_CALIB)
            cache[method] = record, perplexity(model, eval_ids[:4], progress=False)["perplexity"]
        return cache[method]

    return run


def test_taylor_plus_beats_random_and_spares_the_ends(shortened):
    record, pruned = shortened("taylor")
    removed = record["metrics"]["removed_blocks"]
    assert len(removed) == SHORT_BLOCKS and math.isfinite(pruned)
    assert set(removed).isdisjoint({0, 1, 2, 3, 28, 29})  # the '+': first four and last two blocks stay
    scores = record["metrics"]["block_scores"]["taylor_importance"]
    assert len(scores) == 30 and all(s > 0 for s in scores)
    random = shortened("random")[1]
    assert pruned < 0.8 * random, (pruned, random)  # measured 0.63
