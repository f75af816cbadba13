"""Pruner-Zero, OWL with N:M, ECoFLaP and the new options through `prunekit.prune` (needs api.py's wiring)."""

import copy

import pytest
import torch

import prunekit
from prunekit.api import check_prune_options
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count
from tiny_models import tiny_causal_lm


def _calibration():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


def test_pruner_zero_through_prune_is_exact_and_leaves_no_gradients():
    model = tiny_causal_lm("llama", layers=2)
    record = prunekit.prune(model, method="pruner-zero", sparsity=0.6, calibration=_calibration(), progress=False)
    assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(0.6, abs=1e-2)  # rounded per row
    for name, weight in prunekit.target_weights(model).items():
        assert ((weight == 0).sum(1) == fraction_count(weight.shape[1], 0.6)).all(), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_owl_with_nm_through_prune(pattern):
    model = tiny_causal_lm("llama", layers=6)
    record = prunekit.prune(model, method="wanda", pattern=pattern, allocation="owl", owl_limit=0.25,
                            calibration=_calibration(), progress=False)
    patterns = record["method"]["owl_block_patterns"]
    assert len(set(patterns)) > 1
    assert record["metrics"]["sparsity"]["achieved"] == 0.5
    n_m = [tuple(map(int, p.split(":"))) for p in patterns]
    for name, weight in prunekit.target_weights(model).items():
        n, m = n_m[int(name.split(".")[2])]
        assert ((weight != 0).reshape(weight.shape[0], -1, m).sum(-1) <= n).all(), name


def test_owl_with_2_4_at_the_default_limit_warns_and_prunes_as_uniform_does():
    def pruned(allocation):
        model = tiny_causal_lm("llama", layers=6)
        record = prunekit.prune(model, method="wanda", pattern="2:4", allocation=allocation,
                                calibration=_calibration(), progress=False)
        return record, prunekit.target_weights(model)

    with pytest.warns(UserWarning, match="every block keeps 2:4"):
        record, owl = pruned("owl")
    assert record["method"]["owl_block_patterns"] == ["2:4"] * 6
    _, uniform = pruned("uniform")
    assert all(torch.equal(owl[name], uniform[name]) for name in uniform)


def test_ecoflap_through_prune_meets_the_mean():
    model = tiny_causal_lm("llama", layers=4)
    record = prunekit.prune(model, method="wanda", sparsity=0.6, allocation="ecoflap", calibration=_calibration(),
                            progress=False)
    assert record["metrics"]["sparsity"]["achieved"] == pytest.approx(0.6, abs=2e-3)
    assert len(set(record["method"]["block_sparsities"])) == 4
    assert len(record["method"]["ecoflap_block_scores"]) == 4


@pytest.mark.parametrize("options, bad", [
    (dict(admm_rho=0.0), "rho 0.0"), (dict(admm_iterations=-1), "iterations -1"), (dict(dsnot_cycles=-2), "cycles -2"),
    (dict(ecoflap_directions=0), "directions 0"), (dict(ecoflap_epsilon=2.0), "epsilon 2.0"),
])
def test_new_options_are_checked_before_the_model_changes(options, bad):
    with pytest.raises(PrunekitError, match=bad) as error:
        check_prune_options("wanda+dsnot", 0.5, None, "uniform", **options)
    assert "\n" not in str(error.value)
    model = tiny_causal_lm("llama", layers=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunekitError, match=bad):
        prunekit.prune(model, method="wanda+dsnot", sparsity=0.5, calibration=_calibration(), progress=False,
                       **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ecoflap_refuses_nm_patterns():
    with pytest.raises(PrunekitError, match="ECOFLAP"):
        check_prune_options("wanda", None, "2:4", "ecoflap")
