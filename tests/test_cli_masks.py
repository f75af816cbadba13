"""Keep-masks as files: `prunekit.save_masks`/`load_masks`, `prunekit prune --save-masks`, `--method given+admm
--masks FILE` and `prunekit heal --masks FILE`."""

import hashlib

import pytest
import torch
import transformers
from safetensors.torch import save_file

import prunekit
from prunekit.artifacts.files import Staging
from prunekit.assets import model_path
from prunekit.cli import main
from prunekit.errors import PrunekitError

SEQ = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny dense Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path("smollm2-135m"), local_files_only=True)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("masks") / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _prune(model, out, *extra):
    return main(["prune", "--model", str(model), "--quiet", "--no-eval", "--calib-samples", "4", "--calib-seq-len",
                 str(SEQ), "--batch-size", "2", "--out", str(out), *extra])


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("prunekit: error: "), err
    assert needle in err, err


def _targets(path):
    model, _, _ = prunekit.load(path)
    return prunekit.target_weights(model)


def test_masks_round_trip_and_refuse_to_overwrite(tmp_path):
    masks = {"a.weight": torch.rand(4, 6) > 0.5, "b.weight": torch.zeros(3, 8, dtype=torch.bool)}
    path = prunekit.save_masks(masks, tmp_path / "m.safetensors")
    loaded = prunekit.load_masks(path)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
    with pytest.raises(PrunekitError, match="exists; pass --overwrite"):
        prunekit.save_masks({"a.weight": ~masks["a.weight"]}, path)
    assert torch.equal(prunekit.load_masks(path)["a.weight"], masks["a.weight"])
    prunekit.save_masks({"a.weight": ~masks["a.weight"]}, path, overwrite=True)
    assert list(prunekit.load_masks(path)) == ["a.weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporaries left behind


def test_bad_masks_are_refused_in_one_line(tmp_path):
    floats = tmp_path / "floats.safetensors"
    save_file({"a.weight": torch.ones(2, 2)}, floats)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    for path, message in [(tmp_path / "none.safetensors", "does not exist"), (tmp_path, "is not a file"),
                          (floats, "'a.weight' is F32, not a bool keep-mask"), (junk, "not a safetensors file")]:
        with pytest.raises(PrunekitError, match=message) as error:
            prunekit.load_masks(path)
        assert "\n" not in str(error.value)
    for masks, message in [({}, "no keep-masks"), ({"a.weight": torch.ones(2)}, "must be a bool tensor")]:
        with pytest.raises(PrunekitError, match=message):
            prunekit.save_masks(masks, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(PrunekitError, match="is a directory"):
        prunekit.save_masks({"a.weight": torch.ones(2, dtype=torch.bool)}, tmp_path, overwrite=True)
    assert tmp_path.is_dir() and (tmp_path / "floats.safetensors").is_file()


def test_staging_writes_every_output_or_none(tmp_path):
    with pytest.raises(RuntimeError), Staging() as stage:
        stage.path(tmp_path / "a.txt").write_text("a")
        stage.path(tmp_path / "d", directory=True).mkdir()
        raise RuntimeError("half-way")
    assert list(tmp_path.iterdir()) == []
    with Staging() as stage:
        stage.path(tmp_path / "a.txt").write_text("a")
        stage.path(tmp_path / "d", directory=True).mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]


def test_saved_masks_are_the_zeros_of_the_saved_model(tiny_dir, tmp_path, capsys):
    out, masks_file = tmp_path / "wanda", tmp_path / "wanda-masks.safetensors"
    assert _prune(tiny_dir, out, "--method", "wanda", "--sparsity", "0.5", "--save-masks", str(masks_file)) == 0
    assert f"masks      {masks_file}" in capsys.readouterr().out
    masks, targets = prunekit.load_masks(masks_file), _targets(out)
    assert masks.keys() == targets.keys()
    for name, keep in masks.items():
        assert torch.equal(keep, targets[name] != 0), name
        assert keep.float().mean().item() == 0.5


def test_given_admm_from_a_masks_file_reproduces_wanda_admm(tiny_dir, tmp_path, capsys):
    """The masks wanda+admm chose, saved and handed back to given+admm, give the very same pruned weights."""
    masks_file = tmp_path / "m.safetensors"
    assert _prune(tiny_dir, tmp_path / "joint", "--method", "wanda+admm", "--sparsity", "0.6",
                  "--save-masks", str(masks_file)) == 0
    assert _prune(tiny_dir, tmp_path / "given", "--method", "given+admm", "--masks", str(masks_file)) == 0
    joint, given = _targets(tmp_path / "joint"), _targets(tmp_path / "given")
    assert all(torch.equal(given[name], weight) for name, weight in joint.items())
    (_, _, record), (_, _, first) = prunekit.load(tmp_path / "given"), prunekit.load(tmp_path / "joint")
    assert record["method"]["masks"] == "given" and record["method"]["masks_file"] == str(masks_file)
    assert record["method"]["masks_sha256"] == hashlib.sha256(masks_file.read_bytes()).hexdigest()
    assert record["metrics"]["sparsity"]["achieved"] == first["metrics"]["sparsity"]["achieved"] > 0.59


def test_offloaded_masks_and_given_admm_equal_the_in_memory_ones(tiny_dir, tmp_path):
    in_memory, offloaded = tmp_path / "mem.safetensors", tmp_path / "off.safetensors"
    assert _prune(tiny_dir, tmp_path / "a", "--method", "sparsegpt", "--sparsity", "0.5", "--save-masks",
                  str(in_memory)) == 0
    assert _prune(tiny_dir, tmp_path / "b", "--method", "sparsegpt", "--sparsity", "0.5", "--offload",
                  "--save-masks", str(offloaded)) == 0
    first, second = prunekit.load_masks(in_memory), prunekit.load_masks(offloaded)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert _prune(tiny_dir, tmp_path / "c", "--method", "given+admm", "--masks", str(in_memory)) == 0
    assert _prune(tiny_dir, tmp_path / "d", "--method", "given+admm", "--masks", str(in_memory), "--offload") == 0
    memory, offload = _targets(tmp_path / "c"), _targets(tmp_path / "d")
    assert all(torch.equal(offload[name], weight) for name, weight in memory.items())


def test_heal_holds_the_masks_of_a_file_not_the_zeros(tiny_dir, tmp_path, capsys):
    """Masks that keep all of block 0: healing frees its zeros (LoRA's merge moves them) and holds block 1's."""
    pruned = tmp_path / "pruned"
    assert _prune(tiny_dir, pruned, "--method", "magnitude", "--sparsity", "0.5") == 0
    targets = _targets(pruned)
    masks = {name: torch.ones_like(w, dtype=torch.bool) if ".layers.0." in name else w != 0
             for name, w in targets.items()}
    masks_file = prunekit.save_masks(masks, tmp_path / "masks.safetensors")
    healed = tmp_path / "healed"
    assert main(["heal", "--model", str(pruned), "--method", "lora", "--tokens", str(2 * 2 * SEQ), "--batch-size",
                 "2", "--seq-len", str(SEQ), "--eval-seq-len", str(SEQ), "--eval-windows", "2", "--quiet",
                 "--masks", str(masks_file), "--out", str(healed)]) == 0, capsys.readouterr().err
    after = _targets(healed)
    for name, keep in masks.items():
        if ".layers.0." in name:
            assert (after[name][targets[name] == 0] != 0).float().mean() > 0.9, name
        else:
            assert torch.equal(after[name] == 0, ~keep), name
    _, _, record = prunekit.load(healed)
    assert record["method"]["masks"] == "given" and record["method"]["masks_file"] == str(masks_file)


@pytest.mark.parametrize("args, needle", [
    (["--method", "given+admm"], "applies the keep-masks of --masks FILE"),
    (["--method", "wanda", "--sparsity", "0.5", "--masks", "MASKS"], "--masks applies to method 'given+admm'"),
    (["--method", "sleb", "--blocks", "1", "--save-masks", "NEW"],
     "--save-masks applies to weights and structures, not to blocks"),
    (["--method", "l2", "--remove", "0.2", "--save-masks", "NEW"], "--save-masks for structures needs --mode mask"),
    (["--method", "wanda", "--sparsity", "0.5", "--mode", "mask"], "--mode applies to structures, not to weights"),
    (["--method", "given+admm", "--masks", "MASKS", "--sparsity", "0.5"], "leave sparsity, pattern and allocation"),
    (["--method", "given+admm", "--masks", "WRONG"], "must be a bool tensor of the weight's shape"),
    (["--method", "given+admm", "--masks", "MISSING"], "does not exist"),
    (["--method", "wanda", "--sparsity", "0.5", "--save-masks", "EXISTING"], "exists; pass --overwrite"),
    (["--method", "wanda", "--sparsity", "0.5", "--save-masks", "DIRECTORY", "--overwrite"], "is a directory"),
])
def test_bad_mask_options_exit_2_and_write_nothing(tiny_dir, tmp_path, capsys, args, needle):
    masks = {name: w != 0 for name, w in prunekit.target_weights(
        transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)).items()}
    prunekit.save_masks(masks, tmp_path / "masks.safetensors")
    name = next(iter(masks))
    prunekit.save_masks({name: torch.ones(2, 2, dtype=torch.bool)}, tmp_path / "wrong.safetensors")
    (tmp_path / "existing.safetensors").write_bytes(b"mine")
    (tmp_path / "directory").mkdir()
    (tmp_path / "directory" / "keep.txt").write_text("mine")
    paths = {"MASKS": "masks.safetensors", "WRONG": "wrong.safetensors", "MISSING": "missing.safetensors",
             "NEW": "new.safetensors", "EXISTING": "existing.safetensors", "DIRECTORY": "directory"}
    args = [str(tmp_path / paths[a]) if a in paths else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _prune(tiny_dir, tmp_path / "out", *args) == 2
    _one_line_error(capsys, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "existing.safetensors").read_bytes() == b"mine"
    assert (tmp_path / "directory" / "keep.txt").read_text() == "mine"


def test_a_structured_mask_goes_from_the_command_line_into_given_admm(tiny_dir, tmp_path, capsys):
    """`--object structures --mode mask --save-masks` writes whole-unit masks in the dense shapes, and `given+admm
    --masks` applies them to the dense model with the ADMM update."""
    out, masks_file = tmp_path / "l2", tmp_path / "l2-masks.safetensors"
    assert _prune(tiny_dir, out, "--method", "l2", "--remove", "0.002", "--mode", "mask", "--no-speed",
                  "--save-masks", str(masks_file)) == 0
    dense = prunekit.target_weights(transformers.AutoModelForCausalLM.from_pretrained(tiny_dir))
    masks, masked = prunekit.load_masks(masks_file), _targets(out)
    assert masks and all(masked[name].shape == dense[name].shape for name in masks)
    for name, keep in masks.items():
        assert torch.equal(masked[name], dense[name].masked_fill(~keep, 0)), name
        assert (keep.all(1) | ~keep.any(1)).all() or (keep.all(0) | ~keep.any(0)).all(), name  # whole units
    assert any(not keep.all() for keep in masks.values())
    given = tmp_path / "given"
    assert _prune(tiny_dir, given, "--method", "given+admm", "--masks", str(masks_file)) == 0
    updated = _targets(given)
    for name, keep in masks.items():
        assert (updated[name][~keep] == 0).all(), name
    assert any(not torch.equal(updated[n], masked[n]) for n in masks)  # the kept weights were re-fitted


def test_a_failed_prune_writes_neither_the_model_nor_the_masks(tmp_path, capsys):
    """NaN activations stop pruning after the model loaded: no output directory and no masks file."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path("smollm2-135m"), local_files_only=True)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = float("nan")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    tokenizer.save_pretrained(broken)
    assert _prune(broken, tmp_path / "out", "--method", "wanda", "--sparsity", "0.5",
                  "--save-masks", str(tmp_path / "m.safetensors")) == 2
    _one_line_error(capsys, "non-finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_the_masks_read_cannot_be_the_masks_written(tiny_dir, tmp_path, capsys):
    masks = prunekit.save_masks({"x": torch.ones(1, dtype=torch.bool)}, tmp_path / "m.safetensors")
    before = masks.read_bytes()
    assert _prune(tiny_dir, tmp_path / "out", "--method", "given+admm", "--masks", str(masks), "--save-masks",
                  str(masks), "--overwrite") == 2
    _one_line_error(capsys, "masks file")
    assert masks.read_bytes() == before and not (tmp_path / "out").exists()
