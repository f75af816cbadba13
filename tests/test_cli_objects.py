"""`prunekit prune` prunes weights, structures or blocks: the object follows from the method and the budget, options
of another object are refused before any work, and the pruned model is saved and reloads."""

import pytest

import prunekit
from prunekit.cli import main


def _cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize("args, needle", [
    (["--method", "wanda", "--remove", "0.2"], "--remove applies to structures and blocks, not to weights"),
    (["--method", "flap", "--sparsity", "0.5"], "--sparsity applies to weights, not to structures"),
    (["--method", "angular", "--round-to", "8", "--blocks", "2"], "--round-to applies to structures, not to blocks"),
    (["--method", "random", "--remove", "0.2"], "say which with --object structures or --object blocks"),
    (["--method", "flap", "--object", "blocks", "--remove", "0.2"], "does not prune blocks"),
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--method", "wanda", "--sparsity", "0.5", "--admm-rho", "2"], "--admm-rho applies to ADMM methods"),
    (["--method", "admm", "--sparsity", "0.5", "--admm-rho", "-1"], "ADMM penalty rho -1.0"),
    (["--method", "wanda+admm", "--sparsity", "0.5", "--admm-ramp-dtype", "bfloat16"], "the gradual ADMM methods"),
    (["--method", "wanda", "--sparsity", "0.5", "--dsnot-cycles", "3"], "--dsnot-cycles applies to +dsnot methods"),
    (["--method", "flap", "--remove", "0.2", "--dsnot-cycles", "3"], "--dsnot-cycles applies to weights"),
    (["--method", "wanda", "--sparsity", "0.5", "--ecoflap-directions", "3"], "applies to --allocation ecoflap"),
    (["--method", "wanda", "--sparsity", "0.5", "--allocation", "ecoflap", "--ecoflap-epsilon", "0"], "epsilon"),
    (["--method", "wanda", "--pattern", "2:4", "--allocation", "lamp"], "fixes every layer at the same sparsity"),
    (["--method", "obs", "--remove", "0.2", "--no-reconstruct"], "cannot run with reconstruct=False"),
    (["--method", "wanda", "--sparsity", "0.5", "--reconstruct"], "--reconstruct applies to structures"),
    (["--method", "flap", "--remove", "1.5"], "remove=1.5"),
    (["--method", "flap", "--remove", "0.2", "--allocation", "lamp"], "allocation 'lamp'"),
    (["--method", "flap", "--remove", "0.2", "--units", "heads,layers"], "units="),
    (["--method", "angular", "--blocks", "2", "--remove", "0.2"], "exactly one budget"),
    (["--method", "angular", "--blocks", "2", "--allocation", "owl"], "--allocation applies to weights"),
    (["--method", "angular", "--blocks", "2", "--device", "cpu"], "--device applies to pruning weights"),
])
def test_options_of_another_object_are_refused_before_loading(tmp_path, capsys, args, needle):
    assert _cli(["prune", "--model", "smollm2-135m", "--out", str(tmp_path / "out"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


SMALL = ["--calib-samples", "4", "--calib-seq-len", "128", "--eval-windows", "2", "--eval-seq-len", "128", "--quiet",
         "--json"]


@pytest.mark.slow
@pytest.mark.parametrize("args, removed", [(["--method", "flap", "--remove", "0.2"], 0.2),
                                           (["--method", "wanda-sp", "--remove", "0.2", "--allocation", "global",
                                             "--no-speed"], 0.2),
                                           (["--method", "angular", "--blocks", "3"], None),
                                           (["--method", "random", "--object", "blocks", "--blocks", "3"], None)])
def test_structures_and_blocks_are_saved_and_reload(tmp_path, capsys, args, removed):
    out = tmp_path / "out"
    assert _cli(["prune", "--model", "smollm2-135m", "--out", str(out), *SMALL, *args]) == 0
    capsys.readouterr()
    model, _, record = prunekit.load(out)
    assert sum(p.numel() for p in model.parameters()) == record["metrics"]["parameters"]["after"]
    if removed is not None:
        assert abs(record["metrics"]["removed_fraction"]["achieved"] - removed) <= 0.02
        speed = record["metrics"]["speed"]  # MACs always, forward latency unless --no-speed
        assert speed["macs"]["after"] < speed["macs"]["before"]
        assert ("latency" in speed) == ("--no-speed" not in args)
    else:
        assert model.config.num_hidden_layers == 27 == len(record["metrics"]["kept_blocks"])
