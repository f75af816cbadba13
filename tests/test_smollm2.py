"""Quality and end-to-end tests on the real SmolLM2-135M (small calibration so CI stays fast)."""

import copy
import hashlib
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for, projection_weight
from prunekit.assets import model_path
from prunekit.budget import Pattern
from prunekit.corpus import calibration_tokens
from prunekit.measure import perplexity
from prunekit.measure.protocol import weights_sha256
from prunekit.select import select_mask
from prunekit.weights.scores import wanda_scores
from prunekit.weights.sparsegpt import sparsegpt_prune
from prunekit.weights.stats import InputStats
from real_models import CALIB, pruned_perplexity_runner

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def pruned_perplexity(smollm2, eval_ids):
    """Perplexity after pruning a fresh copy of SmolLM2 with each (method, budget) pair, computed once."""
    return pruned_perplexity_runner(smollm2, eval_ids)


@pytest.fixture(scope="module")
def dense_perplexity(smollm2, eval_ids):
    return perplexity(smollm2.model, eval_ids, progress=False)["perplexity"]


@pytest.mark.parametrize("budget", ["0.5", "2:4"])
def test_wanda_and_sparsegpt_clearly_beat_magnitude(pruned_perplexity, dense_perplexity, budget):
    magnitude = pruned_perplexity("magnitude", budget)
    wanda = pruned_perplexity("wanda", budget)
    sparsegpt = pruned_perplexity("sparsegpt", budget)
    assert dense_perplexity < wanda and dense_perplexity < sparsegpt
    assert wanda < 0.7 * magnitude, (wanda, magnitude)
    assert sparsegpt < 0.7 * magnitude, (sparsegpt, magnitude)


# Perplexity / dense perplexity measured with these settings (dense 13.28; torch 2.13 CPU, 2 threads), rounded
# down; the thresholds are 15% above them, so a 15% regression of any method fails.
MEASURED_RATIO = {
    ("magnitude", "0.5"): 24.29, ("wanda", "0.5"): 2.755, ("sparsegpt", "0.5"): 2.494,
    ("magnitude", "2:4"): 106.0, ("wanda", "2:4"): 10.31, ("sparsegpt", "2:4"): 4.694,
}


@pytest.mark.parametrize("method, budget", list(MEASURED_RATIO))
def test_pruned_perplexity_stays_within_15_percent_of_the_measured_value(pruned_perplexity, dense_perplexity,
                                                                          method, budget):
    ratio = pruned_perplexity(method, budget) / dense_perplexity
    assert ratio < 1.15 * MEASURED_RATIO[method, budget], (method, budget, ratio)


def test_admm_perplexity_is_below_sparsegpts_at_half_sparsity(pruned_perplexity):
    """ADMM (Boža 2024, gradual mask) against SparseGPT at 50%, both from this module's runs (dense 13.28).
    Measured: ADMM 28.07, SparseGPT 33.14 (ratio 0.85; torch 2.13 CPU); the bound 0.93 leaves about 10% margin."""
    admm, sparsegpt = pruned_perplexity("admm", "0.5"), pruned_perplexity("sparsegpt", "0.5")
    assert admm < 0.93 * sparsegpt, (admm, sparsegpt)


def test_sparsegpt_reconstructs_a_real_layer_better_than_wanda(smollm2):
    """||XW^T - XŴ^T|| on the real inputs of one SmolLM2 projection, at 50% unstructured and 2:4."""
    model = smollm2.model
    layer = adapter_for(model).block_list(model)[3].get_submodule("mlp.down_proj")
    ids = calibration_tokens(smollm2.tokenizer, "wiki-summaries", samples=8, seq_len=256, seed=0).ids
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    stats = InputStats(x.shape[1], hessian=True)
    stats.add(x)
    w = projection_weight(layer).clone()
    # Measured error ratios 0.636 (unstructured) and 0.656 (2:4); the bounds are 15% above them.
    for pattern, bound in ((Pattern(), 0.73), (Pattern(2, 4), 0.75)):
        wanda = w * select_mask(wanda_scores(w, stats.norms), 0.5, pattern, "row")
        sparsegpt, _ = sparsegpt_prune(w, stats.hessian, sparsity=0.5, pattern=pattern)
        err_wanda = (x @ (w - wanda).t()).norm()
        err_sparsegpt = (x @ (w - sparsegpt).t()).norm()
        assert err_sparsegpt < bound * err_wanda, (str(pattern), err_sparsegpt, err_wanda)


def test_zero_sparsity_keeps_the_real_model_identical(smollm2, eval_ids):
    model = copy.deepcopy(smollm2.model)
    with torch.no_grad():
        before = model(input_ids=eval_ids[:1]).logits
    prunekit.prune(model, smollm2.tokenizer, method="sparsegpt", sparsity=0.0, **CALIB)
    with torch.no_grad():
        assert torch.equal(model(input_ids=eval_ids[:1]).logits, before)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_cli_prune_save_load_gives_identical_logits_and_leaves_the_input_untouched(tmp_path, smollm2, eval_ids):
    from prunekit.cli import main

    source = model_path("smollm2-135m")
    before = _tree_digest(source)
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(source), "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "4",
                 "--calib-seq-len", "128", "--no-eval", "--quiet", "--out", str(out)])
    assert code == 0
    assert _tree_digest(source) == before

    model, tokenizer, record = prunekit.load(out)
    assert (out / "model.safetensors").exists() and (out / "prunekit.json").exists()
    assert record["method"]["name"] == "wanda" and record["calibration"]["samples"] == 4
    assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert record["metrics"]["pruned_weights_sha256"] == weights_sha256(model)

    same = copy.deepcopy(smollm2.model)
    prunekit.prune(same, smollm2.tokenizer, method="wanda", sparsity=0.5, calibration="wiki-summaries",
                   calibration_samples=4, calibration_seq_len=128, progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=eval_ids[:2]).logits, same(input_ids=eval_ids[:2]).logits)
    assert tokenizer.decode(tokenizer("pruning works")["input_ids"]) == "pruning works"

    # and `prunekit eval` reads the saved directory back
    assert main(["eval", "--model", str(out), "--windows", "2", "--seq-len", "128", "--quiet", "--json"]) == 0
