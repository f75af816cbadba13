"""`prunekit prune` of the built-in networks: traced structured pruning, measured, saved, reloadable."""

import json

import pytest
import torch

import prunekit
from prunekit.cli import main


def _cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit_info:
        return exit_info.code


def test_small_cnn_is_pruned_measured_and_saved(tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(["prune", "--model", "small-cnn", "--remove", "0.3", "--out", str(out), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "untrained: random initialisation, seed 0" in summary and "per image" in summary
    assert "batch 16" in summary and f"saved      {out}" in summary

    model, _, record = prunekit.load(out)
    assert record["method"]["name"] == "taylor" and record["model"]["source"] == "small-cnn"
    assert record["calibration"]["batches"] == 4  # the default, taylor, saw the 32 calibration inputs
    removed = record["metrics"]["removed_fraction"]
    assert abs(removed["achieved"] - 0.3) <= 0.02
    assert sum(p.numel() for p in model.parameters()) == record["metrics"]["parameters"]["after"]
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_remove_macs_and_json(tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(["prune", "--model", "resnet-small", "--method", "taylor", "--remove-macs", "0.4", "--no-speed",
                 "--allocation", "global", "--seed", "3", "--json", "--out", str(out), "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert abs(record["metrics"]["macs_removed_fraction"]["achieved"] - 0.4) <= 0.02
    assert record["method"]["allocation"] == "global" and record["method"]["seed"] == 3
    assert record["calibration"]["batches"] == 4  # taylor saw the calibration batches, not one example
    assert record["calibration"]["source"].startswith("32 uniform random inputs")
    assert "latency" not in record["metrics"]["speed"]
    assert record["output"] == str(out) and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--remove", "1.5"], "remove=1.5"),
    (["--remove", "0.3", "--remove-macs", "0.3"], "exactly one budget"),
    (["--remove", "0.3", "--method", "wanda"], "method 'wanda' is unknown"),
    (["--remove", "0.3", "--sparsity", "0.5"], "--sparsity applies to language models"),
    (["--remove", "0.3", "--calib", "shakespeare"], "--calib applies to language models"),
    (["--remove", "0.3", "--eval-seq-len", "128"], "--eval-seq-len applies to language models"),
    (["--remove", "0.3", "--no-eval"], "--no-eval applies to language models"),
    (["--remove", "0.3", "--device", "cpu"], "--device applies to language models"),
    (["--remove", "0.3", "--object", "weights"], "--object weights does not apply"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    assert _cli(["prune", "--model", "small-cnn", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _cli(["prune", "--model", "small-cnn", "--remove", "0.3", "--out", str(out), "--quiet"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert _cli(["prune", "--model", "small-cnn", "--remove", "0.3", "--no-speed", "--out", str(out), "--overwrite",
                 "--quiet"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_remove_macs_is_refused_for_blocks_and_weights(tmp_path, capsys):
    for budget in (["--method", "angular", "--blocks", "2"], ["--method", "wanda", "--sparsity", "0.5"]):
        assert _cli(["prune", "--model", "smollm2-135m", *budget, "--remove-macs", "0.3", "--out",
                     str(tmp_path / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--remove-macs applies to structures, not to" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_mobilenet_v2_reports_top1_agreement(tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(["prune", "--model", "mobilenet-v2", "--method", "taylor", "--remove", "0.3", "--no-speed",
                 "--json", "--out", str(out), "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    agreement = record["metrics"]["top1_agreement"]
    # measured: 28 of 64 (0.44) before recalibration, exactly the share of the dense model's most frequent class
    # (the pruned network predicts that one class for every crop); 8 of 64 after, with a dozen classes predicted
    assert agreement["images"] == 64 and 0 < agreement["agreement"] <= 1, agreement
    assert 0 <= agreement["before_recalibration"] <= 1
    recalibration = record["metrics"]["batchnorm_recalibration"]
    assert recalibration["layers"] == 52 and recalibration["examples"] == 32, recalibration
    assert record["model"]["weights"].startswith("ImageNet")
    model, _, _ = prunekit.load(out)
    assert sum(p.numel() for p in model.parameters()) == record["metrics"]["parameters"]["after"]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 52


def test_recalibrate_bn_is_refused_where_it_cannot_apply(tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(["prune", "--model", "lenet-300-100", "--remove", "0.3", "--recalibrate-bn", "--out", str(out),
                 "--quiet"]) == 2
    assert "has no BatchNorm layers" in capsys.readouterr().err and not out.exists()
    assert _cli(["prune", "--model", "smollm2-135m", "--method", "flap", "--remove", "0.2", "--recalibrate-bn",
                 "--out", str(out), "--quiet"]) == 2
    assert "--recalibrate-bn applies to networks with BatchNorm" in capsys.readouterr().err and not out.exists()


def test_small_cnn_statistics_are_recalibrated_by_default(tmp_path, capsys):
    for flag, expected in ((), True), (("--no-recalibrate-bn",), False):
        out = tmp_path / f"out{len(flag)}"
        assert _cli(["prune", "--model", "small-cnn", "--method", "l2", "--remove", "0.3", "--no-speed", *flag,
                     "--json", "--out", str(out), "--quiet"]) == 0
        record = json.loads(capsys.readouterr().out)
        assert ("batchnorm_recalibration" in record["metrics"]) is expected


def test_remove_macs_prunes_a_language_model_by_its_macs(tmp_path, capsys):
    import transformers

    from prunekit.assets import load_causal_lm

    # the LM head over 49,152 tokens is most of a tiny model's MACs, and cannot shrink: wide MLPs leave room
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=2048, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    source = tmp_path / "tiny"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(source)
    load_causal_lm("smollm2-135m").tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    assert _cli(["prune", "--model", str(source), "--method", "l2", "--remove-macs", "0.15", "--no-eval",
                 "--no-speed", "--json", "--out", str(out), "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    macs = record["metrics"]["macs_removed_fraction"]
    assert abs(macs["achieved"] - 0.15) <= 0.02 and record["method"]["remove_macs"] == 0.15
    assert macs["achieved"] == pytest.approx(record["metrics"]["speed"]["macs"]["removed_fraction"])
