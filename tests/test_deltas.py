"""Delta-parameter pruning (prunekit.deltas): DARE, DAREx-q, magnitude, activation-aware; merging; storage; CLI."""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path

import pytest
import torch
import transformers

import prunekit.cli
from prunekit.deltas import (
    activation_mask,
    activation_scores,
    dare,
    delta_input_stats,
    load_delta,
    lora_delta,
    merge_deltas,
    model_delta,
    optimal_rescale,
    output_error,
    prune_delta,
    save_delta,
    storage_bytes,
    ties_merge,
)
from prunekit.deltas import cli as delta_cli
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count
from prunekit.targets import target_weights
from tiny_models import tiny_causal_lm


def _fine_tune(model: torch.nn.Module, seed: int = 1, size: float = 0.02) -> torch.nn.Module:
    """A stand-in for a fine-tune: every parameter moved by Gaussian noise (embeddings and norms too)."""
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(size * torch.randn(parameter.shape, generator=generator))
    return tuned


@pytest.fixture(scope="module")
def models():
    base = tiny_causal_lm("llama", seed=0)
    return base, _fine_tune(base)


@pytest.fixture(scope="module")
def dirs(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("deltas")
    base, tuned = models
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def _calibration(samples: int = 4, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _one_line_error(call, match: str) -> str:
    with pytest.raises(PrunekitError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def _hash_tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- pure functions


def test_dare_expected_delta_is_the_delta():
    """E[Δ̂] = Δ: the mean of n DARE draws deviates from Δ by σ/√n with σ² = Δ²·p/(1 − p) per entry."""
    drop, draws = 0.7, 200
    delta = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    mean = torch.stack([dare(delta, drop, generator) for _ in range(draws)]).mean(0)
    # relative to Δ itself (not |Δ|), so that a bias of either sign shows in the mean of z
    z = (mean - delta) / (delta * math.sqrt(drop / (1 - drop) / draws))
    # every entry within 5 standard errors (a false alarm has probability ~1e-3 over 2000 entries) ...
    assert z.abs().max() < 5
    # ... and no bias overall: the mean of 2000 independent z-scores has standard deviation 1/√2000
    assert abs(z.mean().item()) * math.sqrt(len(z)) < 4
    # the estimator is not trivially exact: individual draws differ from the delta
    assert not torch.allclose(dare(delta, drop, generator), delta)


def test_dare_rescales_kept_entries_and_zeroes_the_rest():
    delta = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    pruned = dare(delta, 0.8, torch.Generator().manual_seed(3))
    kept = pruned != 0
    assert torch.allclose(pruned[kept], delta[kept] / 0.2)
    assert torch.equal(dare(delta, 0.0, torch.Generator().manual_seed(3)), delta)


def test_activation_score_matches_formula():
    delta = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.5, -1.0]])
    norms = torch.tensor([2.0, 1.0, 4.0])
    expected = torch.tensor([[2.0, 2.0, 2.0], [6.0, 0.5, 4.0]])
    assert torch.equal(activation_scores(delta, norms), expected)
    # one of three dropped per row (Wanda's row-wise comparison): the lowest score of each row
    mask = activation_mask(delta, norms, 1 / 3)
    assert torch.equal(mask, torch.tensor([[False, True, True], [True, False, True]]))


def test_ties_sign_election_on_hand_made_deltas():
    a = torch.tensor([1.0, -2.0, 3.0, 0.0, 1.0])
    b = torch.tensor([2.0, 1.0, -1.0, 0.0, -1.0])
    c = torch.tensor([-4.0, 3.0, -1.0, 5.0, 0.0])
    # sums -1, 2, 1, 5, 0: elected signs -, +, +, +, none; the mean is over agreeing nonzero entries only
    assert torch.equal(ties_merge([a, b, c]), torch.tensor([-4.0, 2.0, 3.0, 5.0, 0.0]))
    assert torch.equal(ties_merge([a, b, c], scale=0.5), torch.tensor([-2.0, 1.0, 1.5, 2.5, 0.0]))
    # plain task arithmetic differs on exactly the entries where signs conflict
    assert torch.equal(a + b + c, torch.tensor([-1.0, 2.0, 1.0, 5.0, 0.0]))


def test_darex_q_label_free_rescale_reduces_output_error():
    """On inputs with a few dominant features, DARE's 1/(1 − p) overshoots; the least-squares scale does better."""
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(16, 32, generator=generator, dtype=torch.float64)
    x = torch.randn(256, 32, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, 32, dtype=torch.float64)
    gram = x.t() @ x
    drop = 0.9
    dare_pruned = dare(delta, drop, torch.Generator().manual_seed(1))
    kept = dare_pruned * (1 - drop)
    scale = optimal_rescale(delta, kept, gram)
    error_q = output_error(delta, kept * scale, gram)
    error_dare = output_error(delta, dare_pruned, gram)
    assert error_q < 0.5 * error_dare
    assert torch.isclose(error_dare, ((x @ delta.t() - x @ dare_pruned.t()) ** 2).sum())
    # s* is the minimum of the quadratic: moving it either way increases the error
    for nudged in (scale * 0.95, scale * 1.05):
        assert output_error(delta, kept * nudged, gram) > error_q


# ---------------------------------------------------------------- reading deltas


def test_model_delta_from_directories_matches_models(models, dirs):
    base, tuned = models
    from_models = model_delta(base, tuned)
    from_dirs = prune_delta(*map(str, dirs), method="magnitude", drop=0.0, progress=False).tensors
    assert from_models.keys() == from_dirs.keys()
    assert all(torch.equal(from_models[n], from_dirs[n]) for n in from_models)
    state = model_delta(base.state_dict(), tuned.state_dict())
    assert torch.equal(state["model.embed_tokens.weight"], from_models["model.embed_tokens.weight"])


def test_mismatched_shapes_name_the_first_tensor(models):
    base, _ = models
    other = tiny_causal_lm("llama", vocab=160)
    _one_line_error(lambda: model_delta(base, other), "model.embed_tokens.weight")
    fewer = tiny_causal_lm("llama", layers=2)
    _one_line_error(lambda: model_delta(base, fewer), "model.layers.2.")


def test_refuses_missing_and_pickled_directories(tmp_path, dirs):
    base, _ = dirs
    _one_line_error(lambda: prune_delta(str(base), str(tmp_path / "absent"), drop=0.5), "not a directory")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    _one_line_error(lambda: prune_delta(str(base), str(pickled), drop=0.5), "pickle")


@pytest.mark.parametrize("drop", [-0.1, 1.0, 1.5, True, "0.5"])
def test_drop_outside_range_is_refused(models, drop):
    base, tuned = models
    _one_line_error(lambda: prune_delta(base, tuned, drop=drop), "drop")


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("method", ["dare", "magnitude", "activation"])
def test_zero_drop_is_the_identity(models, method):
    base, tuned = models
    calibration = _calibration() if method == "activation" else None
    pruned = prune_delta(base, tuned, method=method, drop=0.0, calibration=calibration, progress=False)
    merged = merge_deltas(copy.deepcopy(base), [pruned])
    for (name, p), q in zip(merged.named_parameters(), tuned.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_dare_kept_fraction_is_binomial_and_targets_only_projections(models):
    base, tuned = models
    drop = 0.9
    pruned = prune_delta(base, tuned, method="dare", drop=drop, seed=4, progress=False)
    assert set(pruned.pruned) == set(target_weights(base))
    total = pruned.info["pruned_numel"]
    kept = pruned.info["kept_fraction_overall"] * total
    assert abs(kept - total * (1 - drop)) < 4 * math.sqrt(total * drop * (1 - drop))
    full = model_delta(base, tuned)
    for name, tensor in pruned.tensors.items():
        if name in pruned.pruned:
            nonzero = tensor != 0
            assert torch.allclose(tensor[nonzero], full[name][nonzero] / (1 - drop))
        else:  # embeddings, norms, LM head: kept dense and whole
            assert torch.equal(tensor, full[name])
    assert "model.embed_tokens.weight" in pruned.tensors and "model.embed_tokens.weight" not in pruned.pruned
    # the seed decides the mask
    again = prune_delta(base, tuned, method="dare", drop=drop, seed=4, progress=False)
    other = prune_delta(base, tuned, method="dare", drop=drop, seed=5, progress=False)
    name = pruned.pruned[0]
    assert torch.equal(again.tensors[name], pruned.tensors[name])
    assert not torch.equal(other.tensors[name], pruned.tensors[name])


def test_magnitude_keeps_exactly_the_largest(models):
    base, tuned = models
    drop = 0.73
    pruned = prune_delta(base, tuned, method="magnitude", drop=drop, tensors="all", progress=False)
    full = model_delta(base, tuned)
    assert set(pruned.pruned) == set(full)  # tensors="all": embeddings and norms too
    for name in pruned.pruned:
        kept = pruned.tensors[name] != 0
        numel = full[name].numel()
        assert kept.sum().item() == numel - fraction_count(numel, drop), name
        assert pruned.info["kept_fraction"][name] == (numel - fraction_count(numel, drop)) / numel
        assert torch.equal(pruned.tensors[name][kept], full[name][kept])  # no rescaling
        if (~kept).any():
            assert full[name][kept].abs().min() >= full[name][~kept].abs().max()


def test_activation_prunes_by_weighted_score_per_row(models):
    base, tuned = models
    calibration = _calibration()
    pruned = prune_delta(base, tuned, method="activation", drop=0.5, calibration=calibration, progress=False)
    stats = delta_input_stats(tuned, list(pruned.pruned), calibration, gram=False, progress=False)
    full = model_delta(base, tuned)
    for name in pruned.pruned:
        kept = pruned.tensors[name] != 0
        assert torch.all(kept.sum(1) == full[name].shape[1] - fraction_count(full[name].shape[1], 0.5))
        scores = activation_scores(full[name], stats[name].norms.double())
        # within each row every kept score is at least every dropped one
        low_kept = torch.where(kept, scores, torch.inf).min(1).values
        high_dropped = torch.where(kept, -torch.inf, scores).max(1).values
        assert torch.all(low_kept >= high_dropped), name
    magnitude = prune_delta(base, tuned, method="magnitude", drop=0.5, progress=False)
    assert any(not torch.equal(pruned.tensors[n] != 0, magnitude.tensors[n] != 0) for n in pruned.pruned)


def test_darex_q_label_free_beats_dare_per_layer(models):
    base, tuned = models
    calibration, drop = _calibration(), 0.95
    dare_delta = prune_delta(base, tuned, method="dare", drop=drop, seed=2, progress=False)
    darex = prune_delta(base, tuned, method="darex-q", drop=drop, seed=2, calibration=calibration, progress=False)
    stats = delta_input_stats(tuned, list(darex.pruned), calibration, gram=True, progress=False)
    full = model_delta(base, tuned)
    for name in darex.pruned:
        assert torch.equal(darex.tensors[name] != 0, dare_delta.tensors[name] != 0)  # same seed, same mask
        gram = stats[name].hessian
        assert output_error(full[name], darex.tensors[name], gram) <= output_error(full[name], dare_delta.tensors[name],
                                                                                    gram)
        assert darex.info["q"][name] == pytest.approx(1 / darex.info["rescale"][name])
    assert any(abs(q - (1 - drop)) > 0.01 for q in darex.info["q"].values())


def test_darex_q_with_validation_picks_the_best_q(models):
    base, tuned = models
    ids = _calibration(seed=7)
    target = _logits(tuned, ids)
    grid = [0.05, 0.2, 0.5, 1.0]

    def validate(model):
        return (_logits(model, ids) - target).square().mean().item()

    pruned = prune_delta(base, tuned, method="darex-q", drop=0.95, seed=2, validate=validate, q_grid=grid,
                         progress=False)
    search = pruned.info["q_search"]
    assert search["q"] == grid[min(range(len(grid)), key=search["losses"].__getitem__)]
    assert len(set(search["losses"])) == len(grid)  # q changed the merged model
    merged = merge_deltas(copy.deepcopy(base), [pruned])
    assert validate(merged) == pytest.approx(min(search["losses"]), rel=1e-5)
    _one_line_error(lambda: prune_delta(base, tuned, method="dare", drop=0.5, validate=validate), "validate")


# ---------------------------------------------------------------- LoRA


def _lora_adapter(model, path: Path, **config) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(path)
    return peft_model


@pytest.mark.parametrize("family, modules, fan_in_fan_out", [("llama", ["q_proj", "v_proj", "down_proj"], False),
                                                             ("gpt2", ["c_attn", "c_fc"], True)])
def test_lora_delta_matches_peft_merge(tmp_path, family, modules, fan_in_fan_out):
    base = tiny_causal_lm(family)
    peft_model = _lora_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=modules,
                               fan_in_fan_out=fan_in_fan_out)
    merged_by_peft = peft_model.merge_and_unload()
    delta = lora_delta(base, tmp_path / "adapter")
    assert len(delta) == len(modules) * 3
    ours = merge_deltas(copy.deepcopy(base), [delta])
    for (name, p), q in zip(ours.named_parameters(), merged_by_peft.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    pruned = prune_delta(base, lora=tmp_path / "adapter", method="dare", drop=0.0, progress=False)
    assert set(pruned.tensors) == set(delta)


def test_lora_with_the_wrong_base_is_refused(tmp_path):
    _lora_adapter(tiny_causal_lm("llama"), tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    _one_line_error(lambda: lora_delta(tiny_causal_lm("llama", layers=2), tmp_path / "adapter"),
                    "model.layers.2.self_attn.q_proj.weight")
    _one_line_error(lambda: lora_delta(tiny_causal_lm("gpt2"), tmp_path / "adapter"), "does not have")
    _one_line_error(lambda: lora_delta(tiny_causal_lm("llama"), tmp_path / "absent"), "not a directory")


# ---------------------------------------------------------------- merging and storage


def test_merge_validates_before_changing_the_model(models):
    base, tuned = models
    pruned = prune_delta(base, tuned, method="dare", drop=0.5, progress=False)
    target = tiny_causal_lm("llama", vocab=160)
    before = copy.deepcopy(target.state_dict())
    _one_line_error(lambda: merge_deltas(target, [pruned]), "model.embed_tokens.weight")
    _one_line_error(lambda: merge_deltas(target, [pruned], method="mean"), "merge method")
    assert all(torch.equal(before[n], t) for n, t in target.state_dict().items())


def test_task_arithmetic_and_ties_of_several_deltas(models):
    base, tuned = models
    other = _fine_tune(base, seed=9)
    deltas = [prune_delta(base, t, method="dare", drop=0.5, seed=s, progress=False)
              for s, t in ((0, tuned), (1, other))]
    summed = merge_deltas(copy.deepcopy(base), deltas, scale=0.5)
    ties = merge_deltas(copy.deepcopy(base), deltas, method="ties")
    name = deltas[0].pruned[0]
    weight = dict(base.named_parameters())[name].double()
    a, b = deltas[0].tensors[name], deltas[1].tensors[name]
    assert torch.allclose(dict(summed.named_parameters())[name].double(), weight + 0.5 * (a + b), atol=1e-6)
    assert torch.allclose(dict(ties.named_parameters())[name].double(), weight + ties_merge([a, b]), atol=1e-6)


def test_pruned_delta_round_trips(models, tmp_path):
    base, tuned = models
    pruned = prune_delta(base, tuned, method="dare", drop=0.9, seed=0, progress=False)
    storage = save_delta(pruned, tmp_path / "delta")
    loaded = load_delta(tmp_path / "delta")
    assert loaded.pruned == pruned.pruned and loaded.tensors.keys() == pruned.tensors.keys()
    for name, tensor in pruned.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor.float().double()), name  # stored as float32
    assert loaded.info["kept_fraction"] == pruned.info["kept_fraction"]
    nonzero = sum(int(torch.count_nonzero(pruned.tensors[n])) for n in pruned.pruned)
    rest = sum(t.numel() for n, t in pruned.tensors.items() if n not in pruned.pruned)
    assert storage == {**storage_bytes(pruned), "file_bytes": storage["file_bytes"]}
    assert storage["sparse_bytes"] == 8 * nonzero + 4 * rest  # int32 index + float32 value per kept entry
    assert storage["sparse_bytes"] < storage["file_bytes"] < storage["sparse_bytes"] + 2**16  # plus the header
    assert storage["pruned_tensors_sparse_bytes"] < 0.25 * storage["pruned_tensors_dense_bytes"]
    _one_line_error(lambda: save_delta(pruned, tmp_path / "delta"), "exists")


# ---------------------------------------------------------------- command line


def _cli(argv: list[str], monkeypatch) -> int:
    parser = prunekit.cli.ArgumentParser(prog="prunekit")
    delta_cli.add_parser(parser.add_subparsers(dest="verb", required=True))
    monkeypatch.setattr(prunekit.cli, "build_parser", lambda: parser)
    return prunekit.cli.main(argv)


def test_cli_writes_delta_and_merged_model_that_reloads(dirs, models, tmp_path, monkeypatch, capsys):
    base_dir, tuned_dir = dirs
    inputs = {d: _hash_tree(d) for d in dirs}
    out, merged = tmp_path / "delta", tmp_path / "merged"
    code = _cli(["delta", "--base", str(base_dir), "--tuned", str(tuned_dir), "--method", "dare", "--drop", "0",
                 "--out", str(out), "--merge-out", str(merged), "--quiet"], monkeypatch)
    assert code == 0, capsys.readouterr().err
    assert "kept       1.0000" in capsys.readouterr().out
    assert {d: _hash_tree(d) for d in dirs} == inputs  # inputs untouched on disk
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(merged, local_files_only=True).eval()
    ids = _calibration(seed=3)
    assert torch.equal(_logits(reloaded, ids), _logits(models[1], ids))
    assert (merged / "prunekit.json").is_file() and (out / "delta.json").is_file()
    code = _cli(["delta", "--base", str(base_dir), "--tuned", str(tuned_dir), "--method", "magnitude", "--drop",
                 "0.9", "--out", str(tmp_path / "d2"), "--json", "--quiet"], monkeypatch)
    assert code == 0
    record = __import__("json").loads(capsys.readouterr().out)
    assert record["method"]["name"] == "magnitude" and record["metrics"]["storage"]["sparse_bytes"] < \
        record["metrics"]["storage"]["dense_bytes"]


@pytest.mark.parametrize("case", ["drop", "out-is-base", "out-inside-tuned", "mismatch", "missing", "calib-for-dare",
                                  "scale-without-merge"])
def test_cli_bad_input_exits_2_and_writes_nothing(case, dirs, tmp_path, monkeypatch, capsys):
    base_dir, tuned_dir = dirs
    wrong = tmp_path / "wrong"
    if case == "mismatch":
        tiny_causal_lm("llama", vocab=160).save_pretrained(wrong)
    out = tmp_path / "delta"
    args = {"drop": ["--drop", "1.0"], "out-is-base": ["--drop", "0.5"], "out-inside-tuned": ["--drop", "0.5"],
            "mismatch": ["--drop", "0.5"], "missing": ["--drop", "0.5"],
            "calib-for-dare": ["--drop", "0.5", "--calib", "wiki-summaries"],
            "scale-without-merge": ["--drop", "0.5", "--scale", "2"]}[case]
    tuned = {"mismatch": wrong, "missing": tmp_path / "absent"}.get(case, tuned_dir)
    out = {"out-is-base": base_dir, "out-inside-tuned": tuned_dir / "delta"}.get(case, out)
    before = {d: _hash_tree(d) for d in dirs}
    listing = sorted(p.name for p in tmp_path.iterdir())
    code = _cli(["delta", "--base", str(base_dir), "--tuned", str(tuned), "--out", str(out), "--quiet", *args],
                monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("prunekit: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert {d: _hash_tree(d) for d in dirs} == before


@pytest.mark.parametrize("method", ["activation", "darex-q"])
def test_calibrated_methods_read_conv1d_weights_as_out_by_in(method):
    """GPT-2's Conv1D stores [in, out]: row-wise selection and the layer error use the [out, in] view."""
    base = tiny_causal_lm("gpt2")
    tuned = _fine_tune(base)
    calibration = _calibration()
    pruned = prune_delta(base, tuned, method=method, drop=0.5, calibration=calibration, progress=False)
    name = "transformer.h.0.mlp.c_fc.weight"  # [64 in, 256 out]
    assert name in pruned.pruned
    stats = delta_input_stats(tuned, [name], calibration, gram=True, progress=False)
    assert stats[name].norms.shape == (64,)
    if method == "activation":  # 32 of the 64 inputs kept in every output row
        assert torch.all((pruned.tensors[name] != 0).sum(0) == 32)
    else:
        full = model_delta(base, tuned)[name].t()
        dare_delta = prune_delta(base, tuned, method="dare", drop=0.5, progress=False).tensors[name].t()
        assert output_error(full, pruned.tensors[name].t(), stats[name].hessian) <= output_error(
            full, dare_delta, stats[name].hessian)


def test_cli_merges_several_deltas_into_their_base(dirs, models, tmp_path, monkeypatch, capsys):
    base_dir, tuned_dir = dirs
    base, tuned = models
    other_dir = tmp_path / "other"
    _fine_tune(base, seed=9).save_pretrained(other_dir)
    for name, source, method in (("d1", tuned_dir, "dare"), ("d2", other_dir, "magnitude")):
        assert _cli(["delta", "--base", str(base_dir), "--tuned", str(source), "--method", method, "--drop", "0.5",
                     "--out", str(tmp_path / name), "--quiet"], monkeypatch) == 0
    for method in ("sum", "ties"):
        out = tmp_path / f"merged-{method}"
        code = _cli(["delta-merge", "--base", str(base_dir), "--delta", str(tmp_path / "d1"), "--delta",
                     str(tmp_path / "d2"), "--method", method, "--scale", "0.7", "--out", str(out), "--quiet"],
                    monkeypatch)
        assert code == 0, capsys.readouterr().err
        expected = merge_deltas(copy.deepcopy(base), [load_delta(tmp_path / "d1"), load_delta(tmp_path / "d2")],
                                scale=0.7, method=method)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        for (name, p), q in zip(reloaded.named_parameters(), expected.parameters(), strict=True):
            assert torch.equal(p, q), name
    assert "ties" in capsys.readouterr().out
    # a delta merged into another base of the same architecture is refused by the recorded weight hash
    listing = sorted(p.name for p in tmp_path.iterdir())
    code = _cli(["delta-merge", "--base", str(other_dir), "--delta", str(tmp_path / "d1"), "--out",
                 str(tmp_path / "wrong-base"), "--quiet"], monkeypatch)
    assert code == 2 and "taken from a base with weights" in capsys.readouterr().err
    code = _cli(["delta-merge", "--base", str(base_dir), "--delta", str(base_dir), "--out", str(tmp_path / "x"),
                 "--quiet"], monkeypatch)
    assert code == 2 and "not a pruned delta" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_cli_reads_a_lora_adapter_and_refuses_a_pickled_one(tmp_path, monkeypatch, capsys):
    base = tiny_causal_lm("llama")
    base.save_pretrained(tmp_path / "base")
    peft_model = _lora_adapter(base, tmp_path / "adapter", r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"])
    merged_by_peft = peft_model.merge_and_unload()
    code = _cli(["delta", "--base", str(tmp_path / "base"), "--lora", str(tmp_path / "adapter"), "--drop", "0",
                 "--out", str(tmp_path / "delta"), "--merge-out", str(tmp_path / "merged"), "--quiet"], monkeypatch)
    assert code == 0, capsys.readouterr().err
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    for (name, p), q in zip(reloaded.named_parameters(), merged_by_peft.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    assert load_delta(tmp_path / "delta").info["sources"]["lora"] == str(tmp_path / "adapter")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    _one_line_error(lambda: lora_delta(base, pickled), "pickle")


def test_cli_method_list_matches_the_library():
    from prunekit.deltas import DELTA_METHODS

    assert delta_cli.METHODS == DELTA_METHODS


def test_calibrated_methods_refuse_networks_without_an_adapter():
    base = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    tuned = _fine_tune(base)
    pruned = prune_delta(base, tuned, method="magnitude", drop=0.5, progress=False)
    assert set(pruned.pruned) == {"0.weight", "2.weight"}  # biases kept dense
    _one_line_error(lambda: prune_delta(base, tuned, method="activation", drop=0.5, calibration=_calibration()),
                    "Hugging Face decoders")
    _one_line_error(lambda: prune_delta(base.state_dict(), tuned.state_dict(), method="dare", drop=0.5),
                    "tensors='all'")
    state = prune_delta(base.state_dict(), tuned.state_dict(), method="dare", drop=0.5, tensors="all",
                        progress=False)
    assert set(state.pruned) == set(base.state_dict()) and state.info["base_weights_sha256"] is None
