"""Offloaded pruning (`prunekit.weights.offload`): blocks stay in files, one block in memory at a time.

The offloaded engine must give bit-identical pruned weights to the in-memory engine, write a directory that
`from_pretrained` loads, and never write its input.
"""

import gc
import hashlib
import sys
from pathlib import Path

import pytest
import torch
import transformers

import prunekit
from prunekit.errors import PrunekitError
from prunekit.measure import perplexity
from prunekit.measure.protocol import weights_sha256
from prunekit.weights import offload
from prunekit.weights.engine import block_weights
from tiny_models import FAMILIES, WINDOW, tiny_causal_lm

VOCAB = 128


def calibration(samples=6, length=3 * WINDOW, seed=1):
    return torch.randint(0, VOCAB, (samples, length), generator=torch.Generator().manual_seed(seed))


def saved(tmp_path, family, *, tie=False, layers=4, dtype=torch.float32):
    model = tiny_causal_lm(family, vocab=VOCAB, layers=layers, tie=tie).to(dtype)
    path = tmp_path / f"{family}-in"
    model.save_pretrained(path)
    return model.float(), path


def file_hashes(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(params=["read", "mapped"])
def outside(request, monkeypatch):
    """Run a test twice: the tensors outside the blocks read into memory, and (threshold 0) all of them that are
    stored in the model's dtype mapped from the file, as a large embedding is."""
    if request.param == "mapped":
        monkeypatch.setattr(offload, "MAP_MIN_BYTES", 0)
    return request.param


@pytest.mark.parametrize(("family", "tie"), [(f, False) for f in FAMILIES] + [("llama", True)])
def test_offloaded_model_computes_and_hashes_like_the_loaded_one(tmp_path, family, tie, outside):
    model, path = saved(tmp_path, family, tie=tie)
    offloaded, tokenizer = prunekit.load_offloaded(path)
    assert tokenizer is None and block_weights(offloaded).offloaded
    blocks = [p for n, p in offloaded.named_parameters() if ".0." in n or ".1." in n]
    assert blocks and all(p.device.type == "meta" for p in blocks)  # nothing of the blocks is in memory
    ids = calibration()
    assert perplexity(offloaded, ids, progress=False) == perplexity(model, ids, progress=False)
    assert weights_sha256(offloaded) == weights_sha256(model)
    assert prunekit.measure.parameter_counts(offloaded) == prunekit.measure.parameter_counts(model)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "opt", "phi"])
@pytest.mark.parametrize(("method", "options"), [
    ("wanda", dict(sparsity=0.5)),
    ("sparsegpt", dict(pattern="2:4")),
    ("wanda", dict(sparsity=0.6, allocation="owl", owl_threshold=2.0)),
])
def test_offloaded_pruning_is_bit_identical_to_in_memory(tmp_path, family, method, options, outside):
    model, path = saved(tmp_path, family)
    before = file_hashes(path)
    run = dict(method=method, calibration=calibration(), batch_size=4, progress=False, blocksize=16, **options)
    expected = prunekit.prune(model, **run, evaluation=calibration(seed=2), eval_seq_len=3 * WINDOW)
    offloaded, _ = prunekit.load_offloaded(path)
    record = prunekit.prune(offloaded, **run, evaluation=calibration(seed=2), eval_seq_len=3 * WINDOW)
    assert record["metrics"] == expected["metrics"]  # sparsity per layer, counts, hash, perplexities
    out = prunekit.save(offloaded, None, tmp_path / "out", record)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert file_hashes(path) == before  # the input is only read
    again, _, manifest = prunekit.load(out)
    assert weights_sha256(again) == record["metrics"]["pruned_weights_sha256"] == manifest["metrics"][
        "pruned_weights_sha256"]


def _anon_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssAnon:")[1].split()[0]) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's /proc")
def test_a_large_embedding_is_mapped_not_held_and_writes_never_reach_the_file(tmp_path):
    tiny_causal_lm("llama", vocab=131072, layers=2).save_pretrained(tmp_path / "big")  # 32 MB embedding, 32 MB head
    before = file_hashes(tmp_path / "big")
    gc.collect()
    start = _anon_mb()
    offloaded, _ = prunekit.load_offloaded(tmp_path / "big")
    held = _anon_mb() - start
    assert held < 16, held  # measured: about 1 MB for the 64 MB of embedding and head (all of it when read)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "big")
    weight = offloaded.get_input_embeddings().weight
    assert torch.equal(weight, reference.get_input_embeddings().weight)
    assert torch.equal(offloaded.lm_head.weight, reference.lm_head.weight)
    with torch.no_grad():
        weight[:10].add_(1.0)  # the written pages become private copies; the file stays as it was
    assert torch.equal(weight[:10], reference.get_input_embeddings().weight[:10] + 1.0)
    assert file_hashes(tmp_path / "big") == before


def test_offloaded_prune_and_evaluate_read_each_block_once_per_pass(tmp_path, monkeypatch):
    _, path = saved(tmp_path, "llama")
    offloaded, _ = prunekit.load_offloaded(path)
    store = block_weights(offloaded)
    reads = []
    original = type(store).read
    monkeypatch.setattr(type(store), "read", lambda self, index: reads.append(index) or original(self, index))
    record = prunekit.prune(offloaded, method="magnitude", sparsity=0.5, progress=False)
    # the dense weights' hash, pruning, and one pass for the pruned hash, counts and per-layer sparsity
    assert sorted(reads) == sorted(list(range(4)) * 3)
    reads.clear()
    evaluated = prunekit.evaluate(offloaded, None, data=calibration(), progress=False)
    assert sorted(reads) == sorted(list(range(4)) * 2)  # perplexity, and one pass for the hash and sparsity
    assert evaluated["model"]["weights_sha256"] == record["metrics"]["pruned_weights_sha256"]
    assert evaluated["metrics"]["sparsity"] == record["metrics"]["sparsity"]["achieved"]


def test_a_half_precision_checkpoint_is_pruned_in_the_requested_dtype(tmp_path):
    _, path = saved(tmp_path, "llama", dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    run = dict(method="sparsegpt", sparsity=0.5, calibration=calibration(), progress=False, blocksize=16)
    prunekit.prune(model, **run)
    offloaded, _ = prunekit.load_offloaded(path, dtype=torch.float32)
    prunekit.prune(offloaded, **run)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(prunekit.save(offloaded, None, tmp_path / "o", {}))
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())
    assert weights_sha256(loaded) == weights_sha256(model)


def test_a_failed_prune_writes_nothing_and_the_work_folder_goes_with_the_model(tmp_path):
    _, path = saved(tmp_path, "llama")
    offloaded, _ = prunekit.load_offloaded(path, work_dir=tmp_path / "work-parent")
    work = block_weights(offloaded).work
    prunekit.prune(offloaded, method="wanda", sparsity=0.5, calibration=calibration(), progress=False)
    assert sorted(p.name for p in work.iterdir()) == [f"block-{i:05d}.safetensors" for i in range(4)]
    with pytest.raises(PrunekitError, match="exists"):
        prunekit.save(offloaded, None, path, {})  # never over the input
    del offloaded
    gc.collect()
    assert not work.exists()


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: prunekit.prune(m, method="wanda", sparsity=0.5, allocation="global", calibration=calibration()),
     "global"),
    (lambda m: prunekit.prune(m, method="pruner-zero", sparsity=0.5, calibration=calibration()), "backward"),
    (lambda m: prunekit.prune_structure(m, calibration(), method="l2", remove=0.2), "offloaded"),
    (lambda m: prunekit.prune_depth(m, method="reverse", blocks=1), "offloaded"),
])
def test_what_needs_the_whole_model_is_refused(tmp_path, call, match):
    _, path = saved(tmp_path, "llama")
    offloaded, _ = prunekit.load_offloaded(path)
    with pytest.raises(PrunekitError, match=match):
        call(offloaded)
    assert not any(block_weights(offloaded).work.iterdir())


def test_bad_directories_are_refused(tmp_path):
    with pytest.raises(PrunekitError, match="neither"):
        prunekit.load_offloaded(tmp_path / "missing")
    _, path = saved(tmp_path, "llama")
    with pytest.raises(PrunekitError, match="dtype"):
        prunekit.load_offloaded(path, dtype=torch.int8)
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    offloaded, _ = prunekit.load_offloaded(path)
    with pytest.raises(PrunekitError, match="NaN"):
        prunekit.prune(offloaded, method="wanda", sparsity=0.5, calibration=calibration(), progress=False)
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PrunekitError, match="no tensor 'model.layers.2.mlp.up_proj.weight'"):
        prunekit.load_offloaded(path)


def test_true_sequential_calibrates_later_groups_on_the_pruned_ones():
    """The first input group (q, k, v) sees the dense block input either way; the groups after it see the
    outputs of pruned projections, so their choice changes, and every count stays exact."""
    run = dict(method="wanda", sparsity=0.5, calibration=calibration(), progress=False, return_masks=True)
    record_a, plain = prunekit.prune(tiny_causal_lm("llama", vocab=VOCAB), **run)
    record_b, true_sequential = prunekit.prune(tiny_causal_lm("llama", vocab=VOCAB), **run, true_sequential=True)
    assert record_b["method"]["true_sequential"] and not record_a["method"]["true_sequential"]
    for name in plain:
        if ".0.self_attn.q_proj" in name or ".0.self_attn.v_proj" in name:
            assert torch.equal(plain[name], true_sequential[name]), name
    assert not torch.equal(plain["model.layers.0.mlp.down_proj.weight"],
                           true_sequential["model.layers.0.mlp.down_proj.weight"])
    assert record_b["metrics"]["sparsity"]["zeros"] == record_a["metrics"]["sparsity"]["zeros"]


def test_true_sequential_is_refused_where_it_changes_nothing():
    with pytest.raises(PrunekitError, match="true-sequential"):
        prunekit.prune(tiny_causal_lm("llama", vocab=VOCAB), method="magnitude", sparsity=0.5, true_sequential=True)


def _tiny_with_tokenizer(tmp_path):
    from prunekit.assets import load_causal_lm

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    path = tmp_path / "tiny"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    load_causal_lm("smollm2-135m").tokenizer.save_pretrained(path)
    return path


def test_cli_offload_writes_what_the_in_memory_run_writes(tmp_path, capsys):
    from prunekit.cli import main

    path = _tiny_with_tokenizer(tmp_path)
    run = ["prune", "--model", str(path), "--method", "sparsegpt", "--sparsity", "0.5", "--true-sequential",
           "--calib-samples", "4", "--calib-seq-len", "32", "--eval-windows", "2", "--eval-seq-len", "32", "--quiet",
           "--json"]
    assert main([*run, "--out", str(tmp_path / "a")]) == 0
    assert main([*run, "--offload", "--out", str(tmp_path / "b")]) == 0
    _, _, a = prunekit.load(tmp_path / "a")
    _, _, b = prunekit.load(tmp_path / "b")
    assert a["method"]["true_sequential"]
    assert a["metrics"]["pruned_weights_sha256"] == b["metrics"]["pruned_weights_sha256"]
    assert a["metrics"]["pruned"] == b["metrics"]["pruned"]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--method", "wanda", "--sparsity", "0.5", "--allocation", "lamp", "--offload"], "allocation 'lamp'"),
    (["--method", "pruner-zero", "--sparsity", "0.5", "--offload"], "backward pass"),
    (["--method", "flap", "--remove", "0.2", "--offload"], "--offload applies to weights"),
    (["--method", "magnitude", "--sparsity", "0.5", "--true-sequential"], "true-sequential"),
])
def test_cli_offload_and_true_sequential_refusals(tmp_path, capsys, extra, needle):
    from prunekit.cli import main

    assert main(["prune", "--model", "smollm2-135m", "--quiet", "--no-eval", *extra,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()
