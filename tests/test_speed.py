"""MACs, latency, generation/prefill speed and the speed record. No timing assertions: speed targets live in bench/."""

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.measure import count_macs, generation_speed, latency, prefill_speed, speed_record
from tiny_models import tiny_causal_lm


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 10))


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 8))


def test_conv_linear_macs_by_hand():
    # conv: 8 output channels x 10 x 10 positions x (3 input channels x 3 x 3 kernel); linear: 800 x 10
    per_example = 8 * 10 * 10 * 3 * 3 * 3 + 800 * 10
    assert count_macs(conv_net(), torch.randn(1, 3, 10, 10)) == per_example
    assert count_macs(conv_net(), (torch.randn(4, 3, 10, 10),)) == 4 * per_example


def test_halving_a_hidden_layer_halves_its_macs():
    dense, pruned = mlp(32), mlp(32)
    keep = torch.arange(0, 32, 2)
    with torch.no_grad():  # physically keep every second hidden unit, as structured removal would
        pruned[0] = nn.Linear(16, 16)
        pruned[0].weight.copy_(dense[0].weight[keep])
        pruned[0].bias.copy_(dense[0].bias[keep])
        pruned[2] = nn.Linear(16, 8)
        pruned[2].weight.copy_(dense[2].weight[:, keep])
    x = torch.randn(3, 16)
    before, after = count_macs(dense, x), count_macs(pruned, x)
    assert before == 3 * (16 * 32 + 32 * 8)
    assert after * 2 == before
    record = speed_record({"macs": before}, {"macs": after})
    assert record["macs"]["removed_fraction"] == pytest.approx(0.5)
    assert record["ideal_speedup"] == pytest.approx(2.0)


def test_decoder_macs_include_attention():
    model = tiny_causal_lm("llama", layers=2)  # hidden 64, 4 heads of 16 (2 KV heads), MLP 128, vocab 128
    tokens = 8
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 64 * 128  # per token, LM head included
    attention = 2 * 2 * tokens * tokens * 4 * 16  # q·kᵀ and attention·v in each of 2 layers, per query head
    ids = torch.randint(0, 128, (1, tokens))
    assert count_macs(model, {"input_ids": ids, "use_cache": False}) == tokens * linear + attention
    assert count_macs(model, ids) == tokens * linear + attention


def test_latency_keys_and_restored_state():
    model = conv_net().train()
    threads = torch.get_num_threads()
    result = latency(model, torch.randn(2, 3, 10, 10), batch_sizes=(1, 4), warmup=1, repeats=3, threads=1)
    assert result["threads"] == 1 and result["warmup"] == 1 and result["repeats"] == 3
    assert set(result["batch_sizes"]) == {"1", "4"}
    for stats in result["batch_sizes"].values():
        assert set(stats) == {"median_ms", "q1_ms", "q3_ms", "iqr_ms"}
        assert 0 < stats["q1_ms"] <= stats["median_ms"] <= stats["q3_ms"]
        assert stats["iqr_ms"] == pytest.approx(stats["q3_ms"] - stats["q1_ms"])
    assert torch.get_num_threads() == threads and model.training


def test_latency_calls_the_batch_maker_with_each_size():
    seen = []

    def make(batch_size: int) -> torch.Tensor:
        seen.append(batch_size)
        return torch.randn(batch_size, 16)

    latency(mlp(8), make, batch_sizes=(1, 16), warmup=0, repeats=1)
    assert seen == [1, 16]


def test_generation_and_prefill_speed():
    model = tiny_causal_lm("llama", layers=2)
    ids = torch.randint(3, 128, (2, 12))
    original = ids.clone()
    gen = generation_speed(model, ids, new_tokens=5, warmup=0, repeats=2)
    assert gen["new_tokens"] == 5 and gen["prompt_tokens"] == 12 and gen["threads"] == torch.get_num_threads()
    assert 0 < gen["q1_tokens_per_s"] <= gen["tokens_per_s"] <= gen["q3_tokens_per_s"]
    pre = prefill_speed(model, ids, warmup=0, repeats=2)
    assert pre["batch_size"] == 2 and pre["seq_len"] == 12 and pre["tokens_per_s"] > 0
    assert torch.equal(ids, original)


def _lat(median: float, spread: float) -> dict:
    return {"median_ms": median, "q1_ms": median - spread, "q3_ms": median + spread, "iqr_ms": 2 * spread}


def _timed(macs: int, by_batch: dict[str, dict], tokens_per_s: float | None = None) -> dict:
    result = {"macs": macs, "latency": {"threads": 2, "warmup": 3, "repeats": 10, "batch_sizes": by_batch}}
    if tokens_per_s is not None:
        result["generation"] = {"tokens_per_s": tokens_per_s, "q1_tokens_per_s": tokens_per_s - 0.1,
                                "q3_tokens_per_s": tokens_per_s + 0.1}
    return result


def test_speed_record_faster():
    dense = _timed(1000, {"1": _lat(10, 0.2), "16": _lat(100, 1)}, tokens_per_s=9.5)
    pruned = _timed(800, {"1": _lat(8.5, 0.2), "16": _lat(80, 1)}, tokens_per_s=12)
    record = speed_record(dense, pruned)
    assert record["not_faster"] is False and record["warning"] is None
    assert record["ideal_speedup"] == pytest.approx(1.25)
    assert record["latency"]["16"]["speedup"] == pytest.approx(1.25)
    assert record["latency"]["16"]["ideal_fraction"] == pytest.approx(1.0)
    assert record["generation"]["speedup"] == pytest.approx(12 / 9.5) and record["threads"] == 2


@pytest.mark.parametrize(("after", "reason"), [
    (_lat(97, 0.5), "below the 5% threshold although the quartiles are apart"),
    (_lat(80, 25), "a 25% median gain, but the quartiles overlap"),
    (_lat(120, 1), "slower"),
])
def test_speed_record_not_faster(after, reason):
    dense = _timed(1000, {"1": _lat(10, 0.2), "16": _lat(100, 1)})
    pruned = _timed(700, {"1": _lat(7, 0.2), "16": after})
    record = speed_record(dense, pruned)
    assert record["latency"]["1"]["faster"], reason
    assert not record["latency"]["16"]["faster"], reason
    assert record["not_faster"] is True
    assert "latency at batch 16" in record["warning"] and "batch 1 " not in record["warning"]


def test_speed_record_generation_slower_flags():
    dense = _timed(1000, {"1": _lat(10, 0.2)}, tokens_per_s=10)
    pruned = _timed(800, {"1": _lat(8, 0.2)}, tokens_per_s=10.2)
    record = speed_record(dense, pruned)
    assert record["not_faster"] and "generation tokens/s" in record["warning"]


def test_bad_inputs_raise():
    model = mlp(8)
    with pytest.raises(PrunekitError, match="batch_sizes"):
        latency(model, torch.randn(1, 16), batch_sizes=(0,))
    with pytest.raises(PrunekitError, match="repeats"):
        latency(model, torch.randn(1, 16), repeats=0)
    with pytest.raises(PrunekitError, match="threads"):
        latency(model, torch.randn(1, 16), threads=0)
    with pytest.raises(PrunekitError, match="example inputs"):
        count_macs(model, 3.0)
    with pytest.raises(PrunekitError, match="input_ids"):
        generation_speed(model, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(PrunekitError, match="macs"):
        speed_record({"latency": {}}, {"macs": 5})
    with pytest.raises(PrunekitError, match="batch sizes"):
        speed_record(_timed(10, {"1": _lat(1, 0.1)}), _timed(5, {"16": _lat(1, 0.1)}))


def test_speed_record_without_timings_does_not_claim_anything():
    record = speed_record({"macs": 1000}, {"macs": 750})
    assert record["not_faster"] is None and record["warning"] is None
    assert record["macs"]["removed_fraction"] == pytest.approx(0.25)
