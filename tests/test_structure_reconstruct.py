"""Least-squares reconstruction and structured OBS: the fit against its closed form, and the sequential path."""

import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for
from prunekit.errors import PrunekitError
from prunekit.measure.protocol import weights_sha256
from prunekit.structure.reconstruct import Gram, obs_keep, refit
from prunekit.structure.remove import config_mismatch
from tiny_models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))


CLOSE = dict(rtol=1e-4, atol=1e-4)  # each batch's X̃ᵀX̃ is computed in float32


def gram_of(x):
    gram = Gram(x.shape[1])
    gram.add(x)
    return gram


def layer(out=5, channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, channels, generator=g, dtype=torch.float64),
            torch.randn(out, generator=g, dtype=torch.float64),
            torch.randn(200, channels, generator=g, dtype=torch.float64) + 0.5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_keeping_every_channel_returns_the_layer_unchanged(with_bias):
    w, b, x = layer()
    new_w, new_b = refit(w, b, gram_of(x), torch.arange(8), with_bias=with_bias, damp=0.0)
    torch.testing.assert_close(new_w, w, **CLOSE)
    torch.testing.assert_close(new_b, b, **CLOSE)


@pytest.mark.parametrize("with_bias", [True, False])
def test_refit_is_the_least_squares_solution(with_bias):
    w, b, x = layer()
    kept = torch.tensor([0, 2, 3, 6])
    new_w, new_b = refit(w, b, gram_of(x), kept, with_bias=with_bias, damp=0.0)
    target = x @ w.T + b
    design = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=x.dtype)], 1) if with_bias else x[:, kept]
    solution = torch.linalg.lstsq(design, target - (0 if with_bias else b)).solution.T
    torch.testing.assert_close(new_w, solution[:, :len(kept)], **CLOSE)
    if with_bias:
        torch.testing.assert_close(new_b, solution[:, -1], **CLOSE)
    else:
        torch.testing.assert_close(new_b, b)
    # and it is better than dropping the columns (with a bias: than FLAP's bias-only compensation)
    error = lambda w_, b_: (x[:, kept] @ w_.T + b_ - target).square().sum()  # noqa: E731
    gone = torch.tensor([1, 4, 5, 7])
    baseline = b + w[:, gone] @ x[:, gone].mean(0) if with_bias else b
    assert error(new_w, new_b) < error(w[:, kept], baseline)


def test_a_channel_that_is_a_copy_of_another_is_removed_without_error():
    w, b, x = layer()
    x[:, 5] = 2 * x[:, 1]  # channel 5 is redundant: channel 1 can carry it
    new_w, new_b = refit(w, b, gram_of(x), torch.tensor([0, 1, 2, 3, 4, 6, 7]), with_bias=True, damp=0.0)
    kept = x[:, [0, 1, 2, 3, 4, 6, 7]]
    torch.testing.assert_close(kept @ new_w.T + new_b, x @ w.T + b, **CLOSE)


def test_obs_removes_the_redundant_and_the_silent_units_first():
    w, b, x = layer(channels=12)
    x[:, 4:6] = 0  # unit 2 (channels 4, 5) never fires
    x[:, 8:10] = 3 * x[:, 0:2]  # unit 4 repeats unit 0
    channels = torch.arange(12).view(6, 2)
    kept = obs_keep(w, b, gram_of(x), channels, 4, with_bias=True, damp=1e-9)
    assert 2 not in kept.tolist() and len(kept) == 4
    assert not {0, 4} <= set(kept.tolist())  # one of the copies went
    assert torch.equal(obs_keep(w, b, gram_of(x), channels, 6, with_bias=True), torch.arange(6))


@pytest.mark.parametrize("method", ["obs", "flap", "l2"])
def test_reconstructed_mask_and_removal_give_identical_outputs(method):
    removed, masked = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    options = dict(method=method, remove=0.3, calibration=IDS, progress=False, reconstruct=True)
    record = prunekit.prune_structure(removed, **options)
    masked_record, masks = prunekit.prune_structure(masked, mode="mask", **options)
    assert record["method"]["reconstruct"] and record["metrics"]["widths"] == masked_record["metrics"]["widths"]
    with torch.no_grad():
        torch.testing.assert_close(removed(IDS).logits, masked(IDS).logits, rtol=1e-4, atol=1e-5)
    for name, mask in masks.items():
        assert not masked.get_parameter(name)[~mask].any()
    assert config_mismatch(removed, adapter_for(removed)) is None
    achieved = record["metrics"]["removed_fraction"]["achieved"]
    assert abs(achieved - 0.3) <= 0.02


def test_reconstruction_brings_the_pruned_model_closer_to_the_dense_one():
    dense = tiny_causal_lm("llama")
    with torch.no_grad():
        reference = dense(IDS).logits
    errors = {}
    for reconstruct in (False, True):
        model = tiny_causal_lm("llama")
        prunekit.prune_structure(model, method="flap", remove=0.3, calibration=IDS, progress=False,
                                 reconstruct=reconstruct)
        with torch.no_grad():
            errors[reconstruct] = (model(IDS).logits - reference).square().mean().item()
    assert errors[True] < errors[False]


@pytest.mark.parametrize("options, message", [
    (dict(method="obs", reconstruct=False), "cannot run with reconstruct=False"),
    (dict(method="obs", allocation="global"), "allocation='uniform'"),
    (dict(method="l2", reconstruct="yes"), "must be True, False or None"),
])
def test_bad_reconstruction_options_are_one_line_errors(options, message):
    model = tiny_causal_lm("llama")
    before = weights_sha256(model)
    with pytest.raises(PrunekitError, match=message) as error:
        prunekit.prune_structure(model, remove=0.3, calibration=IDS, progress=False, **options)
    assert "\n" not in str(error.value) and weights_sha256(model) == before


def test_the_record_counts_macs_always_and_times_on_request():
    model = tiny_causal_lm("llama")
    record = prunekit.prune_structure(model, method="l2", remove=0.3, progress=False, speed=True)
    speed = record["metrics"]["speed"]
    assert 0 < speed["macs"]["after"] < speed["macs"]["before"]
    assert speed["ideal_speedup"] == pytest.approx(speed["macs"]["before"] / speed["macs"]["after"])
    assert set(speed["latency"]) == {"1", "16"} and isinstance(speed["not_faster"], bool)
    masked, _ = prunekit.prune_structure(tiny_causal_lm("llama"), method="l2", remove=0.3, progress=False,
                                         mode="mask")
    # zeros are still multiplied: masking removes no MACs, and nothing was timed
    assert masked["metrics"]["speed"]["macs"]["removed_fraction"] == 0
    assert masked["metrics"]["speed"]["not_faster"] is None


@pytest.mark.parametrize("options", [dict(units=("heads",)), dict(speed=True), dict(reconstruct=True)])
def test_options_of_hugging_face_models_are_refused_for_traced_ones(options):
    from prunekit.nets import build_net

    net = build_net("resnet-small", seed=0)
    before = weights_sha256(net)
    with pytest.raises(PrunekitError, match="apply to Hugging Face models") as error:
        prunekit.prune_structure(net, torch.randn(1, 1, 28, 28), remove=0.3, progress=False, **options)
    assert "\n" not in str(error.value) and weights_sha256(net) == before
