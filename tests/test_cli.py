"""Bad input on the command line: a one-line error naming the problem, exit code 2, nothing written."""

import subprocess
import sys

import pytest
import torch
import transformers

from prunekit.assets import model_path
from prunekit.cli import main

SMOLLM2 = "smollm2-135m"


def _prune(tmp_path, *extra, model=SMOLLM2):
    return main(["prune", "--model", str(model), "--quiet", "--no-eval", "--calib-samples", "2", "--calib-seq-len",
                 "64", "--out", str(tmp_path / "out"), *extra])


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("prunekit: error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("args, needles", [
    (["--method", "wanda", "--sparsity", "1.5"], ["sparsity 1.5", "[0, 1)"]),
    (["--method", "wanda", "--sparsity", "-0.1"], ["sparsity -0.1"]),
    (["--method", "wanda", "--pattern", "4:2"], ["pattern '4:2' is impossible"]),
    (["--method", "wanda", "--pattern", "0:4"], ["pattern '0:4' is impossible"]),
    (["--method", "wanda", "--pattern", "2:5"], ["2:5 needs input widths divisible by 5", "width 576"]),
    (["--method", "wanda", "--pattern", "two:four"], ["pattern 'two:four' is not understood"]),
    (["--method", "bogus", "--sparsity", "0.5"], ["unknown method 'bogus'"]),
    (["--method", "wanda", "--allocation", "global", "--pattern", "2:4"], ["GLOBAL allocates a different sparsity"]),
    (["--method", "wanda", "--sparsity", "0.5", "--calib-samples", "100000"], ["calibration text has"]),
])
def test_bad_budget_method_or_calibration(tmp_path, capsys, args, needles):
    assert _prune(tmp_path, *args) == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_missing_model(tmp_path, capsys):
    assert _prune(tmp_path, "--sparsity", "0.5", model=tmp_path / "nowhere") == 2
    _one_line_error(capsys, "nowhere")
    assert not (tmp_path / "out").exists()


def test_calibration_file_too_short(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert _prune(tmp_path, "--sparsity", "0.5", "--calib", str(short)) == 2
    _one_line_error(capsys, "calibration text has", "need")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert _prune(tmp_path, "--method", "magnitude", "--sparsity", "0.5") == 2
    _one_line_error(capsys, "exists", "--overwrite")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_output_inside_the_input_model_is_refused(tmp_path, capsys):
    source = model_path(SMOLLM2)
    code = main(["prune", "--model", str(source), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
                 "--out", str(source / "pruned")])
    assert code == 2
    _one_line_error(capsys, "input model")
    assert not (source / "pruned").exists()


def _save_tiny(tmp_path, config, name, nan=False):
    """A tiny local model directory with SmolLM2's tokenizer (its vocabulary size is 49152)."""
    from prunekit.assets import load_causal_lm

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if nan:
        with torch.no_grad():
            model.get_input_embeddings().weight[:] = float("nan")
    path = tmp_path / name
    model.save_pretrained(path)
    load_causal_lm(SMOLLM2).tokenizer.save_pretrained(path)
    return path


def test_nan_activations(tmp_path, capsys):
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    path = _save_tiny(tmp_path, config, "nan-llama", nan=True)
    assert _prune(tmp_path, "--method", "wanda", "--sparsity", "0.5", model=path) == 2
    _one_line_error(capsys, "non-finite")
    assert not (tmp_path / "out").exists()


def test_model_with_no_supported_decoder_blocks(tmp_path, capsys):
    config = transformers.BloomConfig(vocab_size=49152, hidden_size=16, n_layer=2, n_head=2)
    path = _save_tiny(tmp_path, config, "bloom")
    assert _prune(tmp_path, "--method", "magnitude", "--sparsity", "0.5", model=path) == 2
    _one_line_error(capsys, "no supported decoder blocks", "bloom")
    assert not (tmp_path / "out").exists()


def test_console_script_exit_codes(tmp_path):
    """The installed `prunekit` command itself: 2 on bad input, with the message on stderr."""
    result = subprocess.run([sys.executable, "-m", "prunekit.cli", "prune", "--model", SMOLLM2, "--sparsity", "2",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "sparsity 2.0 is outside [0, 1)" in result.stderr
    assert not (tmp_path / "out").exists()
