import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from prunekit.artifacts import MANIFEST, atomic_directory, load_pruned, save_pruned
from prunekit.errors import PrunekitError
from tiny_models import tiny_causal_lm

VOCAB = 256
RECORD = {
    "prunekit_record": 1,
    "method": {"name": "magnitude", "sparsity": 0.5},
    "metrics": {"perplexity": 3.5},
}


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    return tiny_causal_lm("llama", vocab=VOCAB, layers=2, seed=seed, tie=tie)


def letter_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def snapshot(directory: Path) -> dict[str, bytes]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def existing_output(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out, snapshot(out)


def make_save_pretrained_fail(monkeypatch, model):
    def fail(directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", fail)


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 10))


def test_round_trip_gives_bit_identical_logits_tokenizer_and_record(tmp_path, ids):
    model, tokenizer = tiny_llama(), letter_tokenizer()
    out = save_pruned(model, tokenizer, tmp_path / "out", RECORD)
    assert out == tmp_path / "out"
    assert {"config.json", "model.safetensors", MANIFEST, "tokenizer.json"} <= set(snapshot(out))
    assert json.loads((out / MANIFEST).read_text()) == RECORD
    loaded, loaded_tokenizer, record = load_pruned(out)
    assert record == RECORD
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded_tokenizer("pruned")["input_ids"] == tokenizer("pruned")["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left


def test_round_trip_without_tokenizer_returns_none(tmp_path):
    save_pruned(tiny_llama(), None, tmp_path / "out", RECORD)
    _, tokenizer, _ = load_pruned(tmp_path / "out")
    assert tokenizer is None


def test_load_honours_dtype(tmp_path):
    save_pruned(tiny_llama(), None, tmp_path / "out", RECORD)
    loaded, _, _ = load_pruned(tmp_path / "out", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_tied_embeddings_round_trip(tmp_path, ids):
    model = tiny_llama(tie=True)
    save_pruned(model, None, tmp_path / "out", RECORD)
    loaded, _, _ = load_pruned(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_zeros_stay_zeros_exactly(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.up_proj.weight
            weight.mul_(torch.rand_like(weight) < 0.5)
    save_pruned(model, None, tmp_path / "out", RECORD)
    loaded, _, _ = load_pruned(tmp_path / "out")
    for before, after in zip(model.model.layers, loaded.model.layers, strict=True):
        assert torch.equal(after.mlp.up_proj.weight == 0, before.mlp.up_proj.weight == 0)
        assert torch.equal(after.mlp.up_proj.weight, before.mlp.up_proj.weight)


def test_refuses_existing_output_before_any_work(tmp_path, monkeypatch):
    out, before = existing_output(tmp_path)
    model = tiny_llama()
    monkeypatch.setattr(model, "save_pretrained", lambda *a, **k: pytest.fail("saved despite refusal"))
    with pytest.raises(
        PrunekitError, match=re.escape(f"output directory '{out}' exists; pass --overwrite to replace it")
    ):
        save_pruned(model, None, out, RECORD)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_the_old_directory(tmp_path, ids):
    out, _ = existing_output(tmp_path)
    model = tiny_llama()
    save_pruned(model, None, out, RECORD, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert torch.equal(logits(load_pruned(out)[0], ids), logits(model, ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    model = tiny_llama()
    make_save_pretrained_fail(monkeypatch, model)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, None, tmp_path / "out", RECORD)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_with_overwrite_keeps_the_old_directory(tmp_path, monkeypatch):
    out, before = existing_output(tmp_path)
    model = tiny_llama()
    make_save_pretrained_fail(monkeypatch, model)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, None, out, RECORD, overwrite=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_record_that_json_cannot_hold_fails_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_pruned(tiny_llama(), None, tmp_path / "out", {"metrics": torch.tensor(1.0)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_path_that_is_a_file_is_refused(tmp_path, overwrite):
    target = tmp_path / "model"
    target.write_text("not a directory")
    with pytest.raises(PrunekitError, match="is a file"):
        save_pruned(tiny_llama(), None, target, RECORD, overwrite=overwrite)
    assert target.read_text() == "not a directory"


def test_atomic_directory_works_beside_the_output_and_creates_parents(tmp_path):
    out = tmp_path / "runs" / "a" / "out"
    with atomic_directory(out, overwrite=False) as tmp:
        assert tmp.parent == out.parent and tmp.is_dir() and not out.exists()
        (tmp / "file.txt").write_text("done")
    assert (out / "file.txt").read_text() == "done"
    assert not tmp.exists()


def test_load_refuses_a_missing_directory(tmp_path):
    with pytest.raises(PrunekitError, match="does not exist"):
        load_pruned(tmp_path / "nowhere")


def test_load_refuses_a_missing_manifest(tmp_path):
    out = save_pruned(tiny_llama(), None, tmp_path / "out", RECORD)
    (out / MANIFEST).unlink()
    with pytest.raises(PrunekitError, match=re.escape(f"'{out}' has no {MANIFEST}")):
        load_pruned(out)


def test_load_refuses_a_manifest_that_is_not_json(tmp_path):
    out = save_pruned(tiny_llama(), None, tmp_path / "out", RECORD)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(PrunekitError, match=r"prunekit\.json' is not valid JSON"):
        load_pruned(out)


def test_load_never_unpickles(tmp_path):
    out = save_pruned(tiny_llama(), None, tmp_path / "out", RECORD)
    state = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    (out / "model.safetensors").unlink()
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(PrunekitError, match="only in a pickle format"):
        load_pruned(out)
