"""`prunekit graph` and the structured-pruning corners of `prunekit prune`: traced networks, encoders."""

import json

import pytest

from prunekit.cli import main


def _cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit_info:
        return exit_info.code


def test_graph_lists_the_coupled_groups_of_a_traced_network(capsys):
    assert _cli(["graph", "--model", "resnet-small", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["input_shape"] == [1, 1, 28, 28]
    groups = record["groups"]
    # the stem's output channels are one group with its BatchNorm and every consumer of the residual stream
    stem = next(line for line in groups if "stem.0.weight[dim 0]" in line)
    assert "stem.1.weight[dim 0]" in stem and "layer1.conv1.weight[dim 1]" in stem
    assert any("pinned" in line and "stem.0.weight[dim 1]" in line for line in groups)  # the image's channel


@pytest.mark.parametrize("args, needle", [
    (["--model", "resnet-small", "--input-shape", "1,x"], "must be integers"),
    (["--model", "resnet-small", "--input-shape", "0,1,28,28"], "positive sizes"),
    (["--model", "smollm2-135m", "--input-shape", "1,8"], "applies to traced networks"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_graph_bad_input_is_one_line(capsys, args, needle):
    assert _cli(["graph", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_an_encoder_is_pruned_by_structures_only(tmp_path, capsys):
    assert _cli(["prune", "--model", "minilm-l6", "--method", "wanda", "--sparsity", "0.5", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is an encoder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
