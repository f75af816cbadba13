"""The ADMM weight update (Boža 2024): kernel invariants on tensors, the registered methods, and one real layer."""

import contextlib
import copy

import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for, projection_weight
from prunekit.budget import Pattern
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count, select_mask
from prunekit.weights import admm
from prunekit.weights.admm import admm_prune, admm_update, ramp_sparsity, resolve_ramp_dtype
from prunekit.weights.methods import PruneOptions
from prunekit.weights.scores import wanda_scores
from prunekit.weights.sparsegpt import sparsegpt_prune
from prunekit.weights.stats import InputStats
from tiny_models import tiny_causal_lm


def _layer(rows=48, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # correlated input features with a few large outlier features, as in LLM activations
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, :4] *= 20.0
    stats = InputStats(cols, hessian=True)
    stats.add(x)
    return w, x, stats


def _error(x, w, pruned):
    return (x @ (w - pruned).t()).norm().item()


def test_zero_iterations_is_no_update():
    w, _, stats = _layer()
    mask = select_mask(wanda_scores(w, stats.norms), 0.5, Pattern(), "row")
    assert torch.equal(admm_update(w, stats.hessian, mask, iterations=0), w.masked_fill(~mask, 0))


def test_admm_with_a_fixed_mask_converges_to_the_least_squares_optimum():
    """Without damping, ADMM's fixed point is each row's exact optimum over its kept weights:
    w_S = H_SS^-1 H_S: w (the normal equations of min ||Xw - X_S w_S||)."""
    w, x, stats = _layer(rows=6)
    h = stats.hessian.double()
    mask = select_mask(wanda_scores(w, stats.norms), 0.5, Pattern(), "row")
    updated = admm_update(w, stats.hessian, mask, iterations=400, damping=0.0)
    for row in range(w.shape[0]):
        kept = mask[row]
        optimum = torch.linalg.solve(h[kept][:, kept], h[kept] @ w[row].double())
        torch.testing.assert_close(updated[row, kept].double(), optimum, rtol=2e-3, atol=2e-3)
    assert _error(x, w, updated) < 0.8 * _error(x, w, w * mask)


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)], ids=["unstructured", "2:4"])
def test_update_keeps_the_mask_exactly_and_lowers_the_error(pattern):
    w, x, stats = _layer()
    mask = select_mask(wanda_scores(w, stats.norms), 0.5, pattern, "row")
    updated = admm_update(w, stats.hessian, mask)
    assert (updated[~mask] == 0).all()
    assert _error(x, w, updated) < 0.9 * _error(x, w, w * mask)


@pytest.mark.parametrize("pattern, sparsity", [(Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5),
                                               (Pattern(4, 8), 0.5)])
def test_gradual_admm_masks_are_exact_and_beat_sparsegpt(pattern, sparsity):
    w, x, stats = _layer()
    updated, keep = admm_prune(w, stats.hessian, sparsity=sparsity, pattern=pattern)
    assert (updated[~keep] == 0).all()
    if pattern.is_nm:
        assert ((keep.reshape(w.shape[0], -1, pattern.m).sum(-1)) == pattern.n).all()
    else:  # compared per output row, as Wanda
        assert ((~keep).sum(1) == fraction_count(w.shape[1], sparsity)).all()
    sparsegpt, _ = sparsegpt_prune(w, stats.hessian, sparsity=sparsity, pattern=pattern, blocksize=16)
    assert _error(x, w, updated) <= _error(x, w, sparsegpt)


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)], ids=["unstructured", "2:4"])
def test_a_bfloat16_ramp_keeps_exact_masks_and_the_float32_error(pattern):
    """The ramp's W-steps in bfloat16 only rank weights for the next mask; the float32 steps after it converge to
    float32's weights: the same exact mask counts, and the reconstruction error within 1%."""
    w, x, stats = _layer()
    errors = {}
    for dtype in ("float32", "bfloat16"):
        updated, keep = admm_prune(w, stats.hessian, sparsity=0.5, pattern=pattern, ramp_dtype=dtype)
        assert (updated[~keep] == 0).all() and updated.dtype == w.dtype
        assert ((~keep).sum(1) == w.shape[1] // 2).all()
        errors[dtype] = _error(x, w, updated)
    assert errors["bfloat16"] == pytest.approx(errors["float32"], rel=0.01)


def test_auto_ramp_dtype_is_bfloat16_only_where_it_is_native(monkeypatch):
    assert resolve_ramp_dtype("float32", "cpu") == "float32"
    assert resolve_ramp_dtype("bfloat16", "cpu") == "bfloat16"
    for flags, expected in (({"avx512f", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"),
                            ({"asimd", "bf16"}, "bfloat16"), ({"avx2", "avx512f"}, "float32"), (set(), "float32")):
        monkeypatch.setattr(admm, "_cpu_flags", lambda flags=flags: frozenset(flags))
        assert resolve_ramp_dtype("auto", "cpu") == expected, flags
    assert resolve_ramp_dtype("auto", "meta") == "float32"
    with pytest.raises(PrunekitError, match="ADMM ramp dtype 'float16' is unknown"):
        resolve_ramp_dtype("float16", "cpu")


def test_the_record_holds_the_resolved_ramp_dtype():
    for choice in ("auto", "float32", "bfloat16"):
        model = tiny_causal_lm("llama", layers=2)
        record = prunekit.prune(model, method="admm", sparsity=0.5, calibration=_calibration(), progress=False,
                                admm_ramp_dtype=choice)
        assert record["method"]["admm_ramp_dtype"] == resolve_ramp_dtype(choice, "cpu")
        assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)


def test_gradual_admm_with_zero_iterations_is_wanda():
    w, _, stats = _layer()
    updated, keep = admm_prune(w, stats.hessian, sparsity=0.5, pattern=Pattern(), iterations=0)
    wanda = select_mask(wanda_scores(w, stats.norms), 0.5, Pattern(), "row")
    assert torch.equal(keep, wanda)
    assert torch.equal(updated, w.masked_fill(~wanda, 0))


def test_ramp_rises_monotonically_to_the_target():
    steps = [ramp_sparsity(step, 15, 0.6) for step in range(15)]
    assert all(a < b for a, b in zip(steps, steps[1:], strict=False))
    assert steps[0] > 0 and steps[-1] == 0.6


def test_dead_inputs_are_pruned_first_and_the_result_is_finite():
    w, x, _ = _layer()
    x[:, 5] = 0.0
    stats = InputStats(x.shape[1], hessian=True)
    stats.add(x)
    updated, keep = admm_prune(w, stats.hessian, sparsity=0.5, pattern=Pattern())
    assert not keep[:, 5].any()
    assert torch.isfinite(updated).all()


@pytest.mark.parametrize("options, bad", [(dict(rho=0.0), "rho 0.0"), (dict(rho=-1.0), "rho -1.0"),
                                          (dict(iterations=-1), "iterations -1"),
                                          (dict(damping=1.5), "damping 1.5")])
def test_bad_kernel_options_raise_one_line(options, bad):
    w, _, stats = _layer()
    mask = torch.ones_like(w, dtype=torch.bool)
    with pytest.raises(PrunekitError, match=bad) as error:
        admm_update(w, stats.hessian, mask, **options)
    assert "\n" not in str(error.value)
    with pytest.raises(PrunekitError, match="bool tensor"):
        admm_update(w, stats.hessian, mask.float())


def _calibration():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options, bad", [(dict(admm_rho=0.0), "rho 0.0"), (dict(admm_iterations=-2), "iterations -2"),
                                          (dict(admm_ramp_dtype="fp8"), "ramp dtype 'fp8'")])
def test_bad_prune_options_raise_before_the_model_changes(options, bad):
    model = tiny_causal_lm("llama", layers=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunekitError, match=bad) as error:
        prunekit.prune(model, method="admm", sparsity=0.5, calibration=_calibration(), progress=False, **options)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_admm_iterations_option_changes_the_result_and_zero_is_wanda():
    results = {}
    for method, iterations in (("wanda", 20), ("admm", 0), ("admm", 20)):
        model = tiny_causal_lm("llama", layers=2)
        prunekit.prune(model, method=method, sparsity=0.5, calibration=_calibration(), progress=False,
                       admm_iterations=iterations)
        results[method, iterations] = prunekit.target_weights(model)
    for name, weight in results["wanda", 20].items():
        assert torch.equal(results["admm", 0][name], weight), name
    assert any(not torch.equal(results["admm", 20][n], w) for n, w in results["wanda", 20].items())


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_update_after_wanda_keeps_wandas_first_block_masks(pattern):
    """`wanda+admm` takes Wanda's masks and changes only the kept weights (later blocks see different inputs, so
    only block 0's masks are comparable)."""
    masks = {}
    for method in ("wanda", "wanda+admm"):
        model = tiny_causal_lm("llama", layers=2)
        _, masks[method] = prunekit.prune(model, method=method, sparsity=None if pattern else 0.5, pattern=pattern,
                                          calibration=_calibration(), progress=False, return_masks=True)
        for name, weight in prunekit.target_weights(model).items():
            assert (weight[~masks[method][name]] == 0).all(), name
    first = [n for n in masks["wanda"] if ".0." in n]
    assert first and all(torch.equal(masks["wanda"][n], masks["wanda+admm"][n]) for n in first)


def test_admm_with_owl_allocation_meets_the_mean_target():
    model = tiny_causal_lm("llama", layers=4)
    record = prunekit.prune(model, method="admm", sparsity=0.6, allocation="owl", calibration=_calibration(),
                            progress=False)
    assert record["method"]["admm_iterations"] == PruneOptions().admm_iterations
    assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(0.6, abs=2e-3)
    assert len(set(record["method"]["owl_block_sparsities"])) > 1


class _Recorded(Exception):
    pass


@pytest.mark.slow
def test_admm_reconstructs_a_real_layer_better_than_sparsegpt(smollm2):
    """||XWᵀ - XŴᵀ|| on the real inputs of SmolLM2's block-3 MLP down projection (8 x 256 calibration tokens).
    Measured ADMM / SparseGPT error ratios: 0.66 (50%) and 0.70 (2:4); the bound leaves about 15% margin. The
    bfloat16 ramp gives the float32 error to within 0.1% (measured: equal to 4 significant digits)."""
    from prunekit.corpus import calibration_tokens

    model = smollm2.model
    layer = adapter_for(model).block_list(model)[3].get_submodule("mlp.down_proj")
    ids = calibration_tokens(smollm2.tokenizer, "wiki-summaries", samples=8, seq_len=256, seed=0).ids
    seen = []

    def record(module, args):
        seen.append(args[0].reshape(-1, args[0].shape[-1]))
        raise _Recorded  # the blocks after this layer need not run

    handle = layer.register_forward_pre_hook(record)
    with torch.no_grad(), contextlib.suppress(_Recorded):
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    stats = InputStats(x.shape[1], hessian=True)
    stats.add(x)
    w = projection_weight(layer).clone()
    for pattern in (Pattern(), Pattern(2, 4)):
        admm, keep = admm_prune(w, stats.hessian, sparsity=0.5, pattern=pattern)
        sparsegpt, _ = sparsegpt_prune(w, stats.hessian, sparsity=0.5, pattern=pattern)
        assert (admm[~keep] == 0).all() and (~keep).sum().item() == w.numel() // 2
        ratio = _error(x, w, admm) / _error(x, w, sparsegpt)
        assert ratio < 0.8, (str(pattern), ratio)
        fast, fast_keep = admm_prune(w, stats.hessian, sparsity=0.5, pattern=pattern, ramp_dtype="bfloat16")
        assert (fast[~fast_keep] == 0).all() and (~fast_keep).sum().item() == w.numel() // 2
        assert _error(x, w, fast) == pytest.approx(_error(x, w, admm), rel=1e-3), str(pattern)


# ---------------------------------------------------------------------------------------------------------------
# 'given+admm': any keep-masks, then the ADMM update

def _logit_error(model, dense, ids):
    with torch.no_grad():
        return float((model(ids).logits - dense(ids).logits).pow(2).mean())


def test_given_masks_reproduce_wanda_admm_bit_for_bit():
    dense = tiny_causal_lm("llama", layers=3)
    model = copy.deepcopy(dense)
    _, masks = prunekit.prune(model, method="wanda+admm", sparsity=0.5, calibration=_calibration(), progress=False,
                              return_masks=True)
    given = copy.deepcopy(dense)
    record = prunekit.prune(given, method="given+admm", masks=masks, calibration=_calibration(), progress=False)
    targets = prunekit.target_weights(given)
    assert all(torch.equal(w, targets[n]) for n, w in prunekit.target_weights(model).items())
    assert record["metrics"]["sparsity"]["target"] == record["metrics"]["sparsity"]["achieved"] == 0.5
    assert record["method"]["masks"] == "given" and record["method"]["masked_weights"] == len(masks)


def test_given_structured_mask_is_kept_exactly_and_admm_brings_the_outputs_closer():
    dense = tiny_causal_lm("llama", layers=3)
    masked = copy.deepcopy(dense)
    _, masks = prunekit.prune_structure(masked, method="l2", remove=0.2, mode="mask", calibration=_calibration(),
                                        progress=False)
    model = copy.deepcopy(dense)
    record = prunekit.prune(model, method="given+admm", masks=masks, calibration=_calibration(), progress=False)
    targets = prunekit.target_weights(model)
    for name, keep in masks.items():
        assert (targets[name][~keep] == 0).all(), name
    # an untouched group (all True) keeps its dense weights exactly; a pruned one is updated
    dense_targets = prunekit.target_weights(dense)
    assert any(not torch.equal(targets[n], dense_targets[n] * masks[n]) for n in masks)
    ids = _calibration()
    # measured: mean squared logit error to the dense model 2.2e-4 with the mask alone, 9.6e-5 after ADMM
    assert _logit_error(model, dense, ids) < 0.7 * _logit_error(masked, dense, ids)
    assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(record["metrics"]["sparsity"]["target"])


def test_a_weight_without_a_given_mask_stays_whole():
    dense = tiny_causal_lm("llama", layers=2)
    _, masks = prunekit.prune(copy.deepcopy(dense), method="wanda", sparsity=0.5, calibration=_calibration(),
                              progress=False, return_masks=True)
    kept = {n: m for n, m in masks.items() if ".1." in n}  # block 1 only
    model = copy.deepcopy(dense)
    record = prunekit.prune(model, method="given+admm", masks=kept, calibration=_calibration(), progress=False)
    targets, originals = prunekit.target_weights(model), prunekit.target_weights(dense)
    assert all(torch.equal(targets[n], originals[n]) for n in targets if ".0." in n)
    assert record["method"]["block_sparsities"] == [0.0, 0.5]


@pytest.mark.parametrize("options, message", [
    (dict(method="given+admm"), "method 'given\\+admm' needs masks="),
    (dict(method="wanda", sparsity=0.5, masks={}), "masks= are applied by method 'given\\+admm'"),
    (dict(method="given+admm", sparsity=0.5, masks={}), "leave sparsity, pattern and allocation unset"),
    (dict(method="given+admm", masks={"model.layers.0.mlp.nope.weight": torch.ones(2, 2, dtype=torch.bool)}),
     "names no prunable weight"),
    (dict(method="given+admm", masks={"model.layers.0.mlp.down_proj.weight": torch.ones(2, 2, dtype=torch.bool)}),
     "must be a bool tensor of the weight's shape"),
    (dict(method="given+admm", masks={"model.layers.0.mlp.down_proj.weight": torch.ones(64, 128)}),
     "must be a bool tensor of the weight's shape"),
])
def test_bad_given_masks_raise_one_line_before_the_model_changes(options, message):
    model = tiny_causal_lm("llama", layers=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunekitError, match=message) as error:
        prunekit.prune(model, calibration=_calibration(), progress=False, **options)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_refuses_given_admm_in_one_line(tmp_path, capsys):
    from prunekit.cli import main

    code = main(["prune", "--model", "smollm2-135m", "--method", "given+admm", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "applies the keep-masks of --masks FILE" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_admm_update_recovers_a_structured_mask_on_smollm2(smollm2, eval_ids):
    """ADMM as the weight update after a structured mask (issue 11): 20% of SmolLM2's parameters masked by l2
    (heads and neurons, no re-fitting), then the kept weights updated on 16 x 256 calibration tokens."""
    from prunekit.measure import perplexity
    from real_models import CALIB

    masked = copy.deepcopy(smollm2.model)
    _, masks = prunekit.prune_structure(masked, smollm2.tokenizer, method="l2", remove=0.2, mode="mask", **CALIB)
    updated = copy.deepcopy(smollm2.model)
    prunekit.prune(updated, smollm2.tokenizer, method="given+admm", masks=masks, **CALIB)
    before = perplexity(masked, eval_ids, progress=False)["perplexity"]
    after = perplexity(updated, eval_ids, progress=False)["perplexity"]
    # measured (torch 2.13 CPU, 8 x 256 held-out windows): 225,346 with the mask alone, 242.8 after ADMM
    assert before > 1e4 and after < 350
