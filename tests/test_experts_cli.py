"""`prunekit experts`: the verb prunes a saved MoE model, writes a reloadable directory, and refuses bad input in one
line before writing anything."""

import argparse
import json

import pytest
import torch
import transformers

from prunekit import api
from prunekit.assets import model_path
from prunekit.errors import PrunekitError
from prunekit.experts import CRITERIA
from prunekit.experts import cli as experts_cli
from tiny_models import tiny_moe_lm


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny OLMoE with SmolLM2's tokenizer (and so its vocabulary), saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("moe")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path("smollm2-135m"))
    tiny_moe_lm("olmoe", vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prunekit")
    experts_cli.add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(["experts", *argv])


def test_criteria_listed_without_importing_torch_match_the_package():
    assert tuple(CRITERIA) == experts_cli.CRITERIA


def test_prunes_saves_and_reloads(moe_dir, tmp_path):
    out = tmp_path / "pruned"
    args = parse("--model", str(moe_dir), "--criterion", "frequency", "--remove", "0.5", "--calib-samples", "2",
                 "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--quiet", "--out", str(out))
    record = args.run(args)
    assert record["metrics"]["experts"]["after"] == 3
    assert record["calibration"]["samples"] == 2
    assert "perplexity" in record["metrics"]["pruned"]
    assert "experts    6 -> 3 per layer" in args.summary(record)
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["method"]["criterion"] == "frequency"
    model, _, _ = api.load(out)
    assert model.config.num_experts == 3
    ids = torch.randint(3, 1000, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize(("argv", "message"), [
    (("--criterion", "router_norm", "--remove", "1"), "needs the pretrained model"),
    (("--remove", "6", "--no-eval"), "leaves none"),
])
def test_bad_input_writes_nothing(moe_dir, tmp_path, argv, message):
    out = tmp_path / "pruned"
    args = parse("--model", str(moe_dir), *argv, "--calib-samples", "2", "--calib-seq-len", "32", "--quiet",
                 "--out", str(out))
    with pytest.raises(PrunekitError, match=message):
        args.run(args)
    assert not out.exists()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_inside_prunes_expert_weights(moe_dir, tmp_path, method):
    out = tmp_path / "inside"
    args = parse("--model", str(moe_dir), "--inside", method, "--sparsity", "0.5", "--calib-samples", "2",
                 "--calib-seq-len", "32", "--no-eval", "--quiet", "--out", str(out))
    record = args.run(args)
    assert record["metrics"]["sparsity"]["achieved"] == 0.5
    assert "target 0.5000, achieved 0.5000" in args.summary(record)
    model, _, _ = api.load(out)
    experts = model.model.layers[1].mlp.experts
    assert (experts.down_proj == 0).float().mean() == 0.5 and model.config.num_experts == 6


@pytest.mark.parametrize(("argv", "message"), [
    (("--inside", "wanda"), "--inside needs --sparsity"),
    (("--remove", "1", "--inside", "wanda", "--sparsity", "0.5"), "either --remove"),
    (("--inside", "wanda", "--sparsity", "0.5", "--merge"), "apply to removing whole experts"),
    (("--inside", "wanda", "--sparsity", "1.5"), r"in \[0, 1\)"),
])
def test_inside_bad_options_write_nothing(moe_dir, tmp_path, argv, message):
    out = tmp_path / "inside"
    args = parse("--model", str(moe_dir), *argv, "--quiet", "--out", str(out))
    with pytest.raises(PrunekitError, match=message):
        args.run(args)
    assert not out.exists()
