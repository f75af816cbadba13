import importlib
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from prunekit.errors import PrunekitError
from prunekit.measure import (
    ResourceMonitor,
    environment,
    layer_sparsity,
    nm_violations,
    parameter_counts,
    perplexity,
    result_record,
    sparsity_summary,
    tensor_sha256,
    weights_sha256,
)
from prunekit.measure import resources as resources_module
from tiny_models import tiny_causal_lm

VOCAB = 256


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    return tiny_causal_lm("llama", vocab=VOCAB, layers=2, seed=seed, tie=tie)


class FixedLogits(nn.Module):
    """A stand-in causal LM whose logits are zeros, except a NaN in each window listed in `nan_windows`."""

    def __init__(self, vocab: int = 10, nan_windows: tuple[int, ...] = ()):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.vocab = vocab
        self.nan_windows = set(nan_windows)
        self.seen_windows = 0
        self.calls = []

    def forward(self, input_ids, **kwargs):
        self.calls.append(
            {"kwargs": kwargs, "inference": torch.is_inference_mode_enabled(), "training": self.training}
        )
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row in range(input_ids.shape[0]):
            if self.seen_windows + row in self.nan_windows:
                logits[row, 1, 2] = float("nan")
        self.seen_windows += input_ids.shape[0]
        return SimpleNamespace(logits=logits)


# perplexity


def test_perplexity_matches_hf_loss_and_is_independent_of_batch_size():
    model = tiny_llama()
    torch.manual_seed(1)
    windows = torch.randint(0, VOCAB, (5, 12))
    with torch.no_grad():
        reference = torch.stack([model(input_ids=w[None], labels=w[None]).loss for w in windows]).mean()
    one = perplexity(model, windows, batch_size=1, progress=False)
    three = perplexity(model, windows, batch_size=3, progress=False)  # last batch is short
    assert one["nll"] == pytest.approx(reference.item(), abs=1e-5)
    assert three["nll"] == pytest.approx(one["nll"], abs=1e-5)
    assert one["perplexity"] == pytest.approx(math.exp(one["nll"]))
    assert (one["tokens"], one["windows"], one["seq_len"]) == (5 * 11, 5, 12)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    result = perplexity(FixedLogits(vocab=10), torch.randint(0, 10, (3, 6)), progress=False)
    assert result["nll"] == pytest.approx(math.log(10))
    assert result["perplexity"] == pytest.approx(10.0)


def test_perplexity_runs_in_inference_and_eval_mode_without_cache_and_restores_training():
    model = FixedLogits()
    model.train()
    perplexity(model, torch.randint(0, 10, (5, 4)), batch_size=2, progress=False)
    assert len(model.calls) == 3
    assert all(c["kwargs"] == {"use_cache": False} and c["inference"] for c in model.calls)
    assert not any(c["training"] for c in model.calls)
    assert model.training


def test_perplexity_names_the_window_with_non_finite_logits():
    with pytest.raises(PrunekitError, match="non-finite logits in perplexity window 3: "):
        perplexity(FixedLogits(nan_windows=(3,)), torch.randint(0, 10, (6, 4)), batch_size=2, progress=False)


def test_perplexity_progress_bar_goes_to_stderr_only_when_asked(capsys):
    windows = torch.randint(0, 10, (2, 4))
    perplexity(FixedLogits(), windows, progress=False)
    assert capsys.readouterr() == ("", "")
    perplexity(FixedLogits(), windows, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "perplexity" in err


def test_perplexity_on_another_device_goes_block_by_block_and_equals_the_plain_forward(monkeypatch):
    """On a device other than the model's, each block runs over every window before the next one (pruning's
    placement: one block on the device at a time) and the number is the plain forward's. The CPU stands in for the
    other device."""
    model = tiny_llama()
    windows = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))
    order = []
    for index, block in enumerate(model.model.layers):
        block.self_attn.q_proj.register_forward_pre_hook(lambda module, args, index=index: order.append(index))
    plain = perplexity(model, windows, batch_size=2, progress=False)
    assert order == [0, 1] * 3
    order.clear()
    # the module, not the function of the same name that prunekit.measure exports
    module = importlib.import_module("prunekit.measure.perplexity")
    monkeypatch.setattr(module, "_same_device", lambda requested, actual: False)
    blockwise = perplexity(model, windows, batch_size=2, device="cpu", progress=False)
    assert order == [0] * 3 + [1] * 3
    assert blockwise["nll"] == pytest.approx(plain["nll"], rel=1e-6)


def test_perplexity_on_another_device_computes_there_from_copies_and_leaves_the_model_in_place():
    """`meta` holds no data, so transformers' mask code stops the run early; by then the embedding has computed on
    the requested device with a copy of its weight (not the model's CPU weight), and the failed run has left the
    model where and as it was."""
    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    seen = []
    model.model.embed_tokens.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].device.type, module.weight.device.type)))
    with pytest.raises(RuntimeError, match="meta"):
        perplexity(model, torch.randint(0, VOCAB, (3, 12)), device="meta", progress=False)
    assert seen == [("meta", "meta")]
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all("forward" not in vars(block) and not block._forward_pre_hooks for block in model.model.layers)


def test_perplexity_on_another_device_needs_a_supported_decoder():
    with pytest.raises(PrunekitError, match="evaluating on meta a model that lives on cpu goes block by block"):
        perplexity(FixedLogits(), torch.randint(0, 10, (2, 4)), device="meta", progress=False)


@pytest.mark.parametrize(
    ("windows", "batch_size", "message"),
    [
        (torch.zeros(2, 4), 4, "int64"),
        (torch.zeros(8, dtype=torch.int64), 4, "int64"),
        (torch.zeros(2, 1, dtype=torch.int64), 4, "length >= 2"),
        (torch.zeros(0, 4, dtype=torch.int64), 4, "at least 1 window"),
        (torch.zeros(2, 4, dtype=torch.int64), 0, "batch_size 0"),
    ],
)
def test_perplexity_rejects_bad_input(windows, batch_size, message):
    with pytest.raises(PrunekitError, match=message):
        perplexity(FixedLogits(), windows, batch_size=batch_size, progress=False)


# sparsity and parameters


def test_layer_sparsity_and_summary_count_zeros_exactly():
    weights = {"a": torch.tensor([[0.0, 1.0], [0.0, 2.0]]), "b": torch.ones(12), "c": torch.zeros(0)}
    per_layer = layer_sparsity(weights)
    assert per_layer["a"] == {"zeros": 2, "numel": 4, "sparsity": 0.5}
    assert per_layer["b"] == {"zeros": 0, "numel": 12, "sparsity": 0.0}
    assert per_layer["c"] == {"zeros": 0, "numel": 0, "sparsity": 0.0}
    summary = sparsity_summary(weights)
    # weighted by size: 2 zeros of 16 elements, not the mean of the per-layer ratios
    assert (summary["overall"], summary["zeros"], summary["numel"]) == (2 / 16, 2, 16)
    assert summary["per_layer"] == per_layer


def test_sparsity_summary_rejects_no_weights():
    with pytest.raises(PrunekitError, match="no weights"):
        sparsity_summary({})


def test_parameter_counts_counts_tied_parameters_once():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 3, bias=True))
    model.append(nn.Linear(3, 4, bias=False))
    model[2].weight = model[0].weight
    with torch.no_grad():
        model[0].weight[0].zero_()
    assert parameter_counts(model) == {"total": 12 + 12 + 3, "nonzero": 12 + 12 + 3 - 3}


def test_parameter_counts_of_a_tied_llama():
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    embedding = VOCAB * 64
    assert parameter_counts(untied)["total"] - parameter_counts(tied)["total"] == embedding


def test_nm_violations_counts_groups_with_too_many_nonzeros():
    weight = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    )
    assert nm_violations(weight, 2, 4) == 2
    assert nm_violations(weight, 3, 4) == 1
    assert nm_violations(weight, 4, 4) == 0


def test_nm_violations_is_zero_for_a_two_four_mask():
    weight = torch.randn(6, 16)
    keep = weight.abs().reshape(-1, 4).topk(2, dim=1).indices
    mask = torch.zeros(weight.numel() // 4, 4).scatter_(1, keep, 1.0).reshape_as(weight)
    assert nm_violations(weight * mask, 2, 4) == 0
    assert nm_violations(weight, 2, 4) == weight.numel() // 4


@pytest.mark.parametrize(
    ("shape", "n", "m", "message"),
    [((4, 6), 2, 4, "multiple of 4"), ((4, 8), 5, 4, "5:4"), ((4, 8), 1, 0, "1:0"), ((), 2, 4, "multiple")],
)
def test_nm_violations_rejects_bad_input(shape, n, m, message):
    with pytest.raises(PrunekitError, match=message):
        nm_violations(torch.ones(shape), n, m)


# resources


TRANSIENT = """
import json, time, torch
from prunekit.measure import ResourceMonitor
with ResourceMonitor() as mon:
    block = torch.ones(300 * 2**20 // 4)  # filled, so its pages are resident
    time.sleep(0.1)
    del block  # freed before exit: only the sampler can have seen it
    time.sleep(0.05)
assert mon.as_dict() == {"wall_s": mon.wall_s, "entry_rss_mb": mon.entry_rss_mb, "peak_rss_mb": mon.peak_rss_mb,
                         "peak_cuda_mb": mon.peak_cuda_mb}
print(json.dumps(mon.as_dict()))
"""


def test_resource_monitor_sees_a_transient_300_mb_tensor():
    # A fresh process: in a long test session the allocator may hand back pages that are already resident, and a
    # new tensor then does not raise the resident set at all.
    out = subprocess.run([sys.executable, "-c", TRANSIENT], capture_output=True, text=True, check=True).stdout
    mon = json.loads(out)
    assert mon["peak_rss_mb"] - mon["entry_rss_mb"] >= 250
    assert mon["wall_s"] >= 0.15
    assert mon["peak_cuda_mb"] is None or not torch.cuda.is_available()


def test_resource_monitor_records_and_stops_when_the_block_raises():
    mon = ResourceMonitor()
    with pytest.raises(RuntimeError, match="boom"), mon:
        raise RuntimeError("boom")
    assert mon.wall_s is not None and mon.peak_rss_mb >= mon.entry_rss_mb
    assert mon._sampler is None


def test_resource_monitor_falls_back_to_ru_maxrss_without_proc(monkeypatch, tmp_path):
    import resource

    monkeypatch.setattr(resources_module, "_STATM", tmp_path / "missing")
    with ResourceMonitor() as mon:
        pass
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert mon.peak_rss_mb == pytest.approx(max_rss_mb, rel=0.05)


# protocol card


def test_environment_reports_versions_and_threads():
    env = environment()
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["prunekit"] and env["transformers"] and env["python"]
    assert env["cpu_count"] >= 1
    json.dumps(env)


def test_weights_sha256_equal_for_equal_weights_and_changes_with_one_weight():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    assert weights_sha256(a) == weights_sha256(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert weights_sha256(a) != weights_sha256(b)
    assert weights_sha256(a) != weights_sha256(tiny_llama(seed=0).to(torch.bfloat16))


def test_weights_sha256_hashes_shared_storage_once_under_the_first_name():
    tied = nn.Module()
    tied.a = nn.Linear(3, 4, bias=False)
    tied.b = nn.Linear(3, 4, bias=False)
    tied.b.weight = tied.a.weight
    single = nn.Module()
    single.a = tied.a
    assert sorted(tied.state_dict()) == ["a.weight", "b.weight"]
    assert weights_sha256(tied) == weights_sha256(single)


def test_weights_sha256_of_tied_llama_is_stable():
    assert weights_sha256(tiny_llama(tie=True)) == weights_sha256(tiny_llama(tie=True))


def test_weights_sha256_rejects_meta_weights():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(PrunekitError, match="meta device"):
        weights_sha256(model)


def test_tensor_sha256_depends_on_values_dtype_and_shape_not_layout():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_sha256(t.T) == tensor_sha256(t.T.contiguous())
    assert tensor_sha256(t) != tensor_sha256(t.reshape(4, 3))
    assert tensor_sha256(t) != tensor_sha256(t.double())
    assert tensor_sha256(t.bfloat16()) == tensor_sha256(t.bfloat16().clone())
    u = t.clone()
    u[2, 3] = -1
    assert tensor_sha256(t) != tensor_sha256(u)


def record_fields(**overrides):
    fields = {
        "model": {"source": "tiny", "weights_sha256": "abc"},
        "method": {"name": "magnitude", "sparsity": 0.5},
        "calibration": None,
        "evaluation": {"set": "x", "seq_len": 12},
        "metrics": {"perplexity": 12.5},
        "resources": {"wall_s": 1.0},
    }
    return {**fields, **overrides}


def test_result_record_holds_the_card_and_round_trips_through_json():
    record = result_record(**record_fields(), extra={"target": {"sparsity": 0.5}})
    assert record["prunekit_record"] == 1
    assert record["environment"]["torch"] == torch.__version__
    assert record["metrics"] == {"perplexity": 12.5} and record["calibration"] is None
    assert record["target"] == {"sparsity": 0.5}
    assert json.loads(json.dumps(record)) == record


def test_result_record_names_the_field_json_cannot_hold():
    fields = record_fields(metrics={"perplexity": 12.5, "per_layer": [1.0, torch.tensor(2.0)]})
    with pytest.raises(TypeError, match=r"metrics\.per_layer\[1\] \(of type Tensor\)"):
        result_record(**fields)


def test_result_record_refuses_extra_fields_that_replace_its_own():
    with pytest.raises(PrunekitError, match="metrics"):
        result_record(**record_fields(), extra={"metrics": {}})


def test_in_turns_alternates_the_calls_after_one_warm_up_each():
    from prunekit.measure import in_turns

    order = []
    calls = {name: (lambda item, name=name: order.append((name, item)) or f"{name}{item}") for name in ("a", "b")}
    timed = in_turns(calls, [1, 2, 3], rounds=2)
    assert order[:2] == [("a", 1), ("b", 1)]  # the warm-up, on the first input
    assert order[2:] == [(name, item) for _ in range(2) for item in (1, 2, 3) for name in ("a", "b")]
    assert timed["outputs"] == {"a": ["a1", "a2", "a3"], "b": ["b1", "b2", "b3"]}  # the first round's
    assert all(len(s) == 6 and min(s) >= 0 for s in timed["seconds"].values())
    with pytest.raises(PrunekitError, match="rounds=0"):
        in_turns(calls, [1], rounds=0)
    with pytest.raises(PrunekitError, match="at least one call and one input"):
        in_turns(calls, [])
