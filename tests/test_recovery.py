"""Healing pruned causal LMs: zeros survive every method, PERP trains only what it says, training learns, a resumed
run reaches the same weights, distillation does what its formula says, and bad input is refused before any change."""

import copy
import math
import sys

import pytest
import torch

import prunekit
from prunekit import names
from prunekit.errors import PrunekitError
from prunekit.measure import weights_sha256
from prunekit.recovery import HEAL_METHODS, heal, layer_pairs, perp_parameters, warmup_cosine
from prunekit.recovery.methods import add_lora, merge_lora
from tiny_models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ = 128, 32


def pattern_ids(rows: int, seed: int) -> torch.Tensor:
    """Token rows that a tiny model learns within a few steps: arithmetic progressions modulo the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB - 3, (rows, 1), generator=generator)
    stride = torch.randint(1, 4, (rows, 1), generator=generator)
    return (start + stride * torch.arange(SEQ)) % (VOCAB - 3) + 3


TRAIN, HELD_OUT = pattern_ids(64, 0), pattern_ids(4, 1)
FAST = dict(data=TRAIN, eval_data=HELD_OUT, seq_len=SEQ, eval_seq_len=SEQ, batch_size=4, progress=False)


def sparse_model(family: str = "llama", pattern: str | None = None, **kwargs):
    model = tiny_causal_lm(family, **kwargs)
    prunekit.prune(model, method="magnitude", sparsity=None if pattern else 0.5, pattern=pattern, progress=False,
                   calibration_seq_len=SEQ)
    return model


def zero_positions(model) -> dict[str, torch.Tensor]:
    return {name: (w == 0).clone() for name, w in prunekit.target_weights(model).items()}


@pytest.mark.parametrize("family,pattern", [("llama", None), ("llama", "2:4"), ("gpt2", None), ("opt", "2:4")])
def test_lora_merge_keeps_exactly_the_zeros_and_changes_the_rest(family, pattern):
    model = sparse_model(family, pattern)
    zeros, before = zero_positions(model), copy.deepcopy(prunekit.target_weights(model))
    record = heal(model, method="lora", tokens=8 * 4 * SEQ, lr=1e-2, **FAST)
    after = prunekit.target_weights(model)
    assert type(model).__module__.startswith("transformers")  # the adapters are gone, merged into the weights
    assert not any("lora" in name for name, _ in model.named_parameters())
    for name, was_zero in zeros.items():
        assert torch.equal(after[name] == 0, was_zero), name
        assert not torch.equal(after[name], before[name]), f"{name}: the merge changed nothing"
    sparsity = record["metrics"]["sparsity"]
    assert sparsity["before"] == sparsity["after"]
    assert sparsity["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_lora_merge_keeps_masks_passed_from_prune():
    model = tiny_causal_lm("llama")
    _, masks = prunekit.prune(model, method="magnitude", sparsity=0.5, progress=False, return_masks=True)
    heal(model, method="lora", tokens=4 * 4 * SEQ, lr=1e-2, masks=masks, **FAST)
    for name, weight in prunekit.target_weights(model).items():
        assert torch.equal(weight != 0, masks[name]), name


def test_lora_merge_reproduces_the_unmerged_model():
    model = tiny_causal_lm("llama")
    modules = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    peft_model = add_lora(model, modules, rank=4, alpha=8)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the adapters do something
    with torch.no_grad():
        unmerged = model(input_ids=HELD_OUT).logits
        merged_model = merge_lora(peft_model, {})
        merged = merged_model(input_ids=HELD_OUT).logits
    assert merged_model is model
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_full_fine_tuning_holds_the_masks_and_leaves_no_buffers():
    model = sparse_model("llama")
    zeros = zero_positions(model)
    dense_before = copy.deepcopy(model.model.embed_tokens.weight)
    record = heal(model, method="full", tokens=8 * 4 * SEQ, lr=1e-3, **FAST)
    for name, weight in prunekit.target_weights(model).items():
        assert torch.equal(weight == 0, zeros[name]), name
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert not torch.equal(model.model.embed_tokens.weight, dense_before)  # every parameter trained
    assert record["metrics"]["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are restored


@pytest.mark.parametrize("family,head", [("opt", False), ("llama", False), ("llama", True)])
def test_perp_changes_only_biases_and_norms(family, head):
    model = sparse_model(family)
    trained = {name for name, _ in perp_parameters(model, head=head)}
    assert trained and all(("norm" in n or n.endswith("bias") or n == "lm_head.weight") for n in trained), trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heal(model, method="perp", tokens=8 * 4 * SEQ, lr=1e-2, perp_head=head, **FAST)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trained
    assert changed == trained  # and each of them did train
    assert ("lm_head.weight" in changed) == head


# A rank-8 adapter on a random 64-wide model learns the progressions slowly (measured: loss 4.84 -> 4.43, perplexity
# 127 -> 98 in 48 steps); full fine-tuning fast (4.80 -> 2.69, 127 -> 11.5).
@pytest.mark.parametrize("method,lr,loss_ratio,perplexity_ratio",
                         [("lora", 1e-2, 0.95, 0.85), ("full", 3e-3, 0.7, 0.2)])
def test_healing_lowers_the_loss_and_the_held_out_perplexity(method, lr, loss_ratio, perplexity_ratio):
    model = sparse_model("llama")
    tokens = 48 * 4 * SEQ + 100  # the incomplete step is not trained
    record = heal(model, method=method, tokens=tokens, lr=lr, warmup=0.1, **FAST)
    losses, metrics = record["metrics"]["loss"]["per_step"], record["metrics"]
    assert len(losses) == 48 and metrics["tokens"] == {"target": tokens, "achieved": 48 * 4 * SEQ}
    assert sum(losses[-4:]) < loss_ratio * sum(losses[:4])
    assert metrics["after"]["perplexity"] < perplexity_ratio * metrics["before"]["perplexity"]


def test_the_schedule_warms_up_then_decays_to_zero():
    rates = [warmup_cosine(1.0, step, 10, 2) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0] and rates[-1] > 0
    assert all(a > b for a, b in zip(rates[2:], rates[3:], strict=False))
    assert warmup_cosine(1.0, 10, 10, 2) == pytest.approx(0.0, abs=1e-12)


class Interrupt(Exception):
    pass


def stop_at(step: int):
    def on_step(done: int, loss: float) -> None:
        if done == step:
            raise Interrupt

    return on_step


@pytest.mark.parametrize("family,method", [("llama", "lora"), ("gpt2", "full")])  # GPT-2 trains with dropout
def test_a_resumed_run_reaches_the_same_weights(tmp_path, family, method):
    start = sparse_model(family)
    options = dict(method=method, tokens=6 * 4 * SEQ, lr=3e-3, seed=3, **FAST)
    straight = copy.deepcopy(start)
    reference = heal(straight, **options)
    interrupted = copy.deepcopy(start)
    with pytest.raises(Interrupt):
        heal(interrupted, checkpoint_dir=tmp_path, checkpoint_every=2, on_step=stop_at(3), **options)
    if method == "lora":  # the adapters are dropped on failure: the model is as it was
        assert weights_sha256(interrupted) == weights_sha256(start)
    resumed = copy.deepcopy(start)
    record = heal(resumed, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True, **options)
    assert record["metrics"]["resumed_from"] == 2
    assert sorted(p.name for p in (tmp_path / "latest").iterdir()) == ["state.json", "tensors.safetensors"]
    assert record["metrics"]["loss"]["per_step"] == reference["metrics"]["loss"]["per_step"]
    assert weights_sha256(resumed) == weights_sha256(straight)
    with pytest.raises(PrunekitError, match="another run .*lr"):
        heal(copy.deepcopy(start), checkpoint_dir=tmp_path, resume=True, **{**options, "lr": 1e-3})


def test_distilling_a_model_into_itself_costs_nothing():
    model = tiny_causal_lm("llama")
    record = heal(model, method="full", tokens=4 * SEQ, lr=1e-3, distill="logits+hidden", teacher=copy.deepcopy(model),
                  distill_alpha=1.0, **FAST)
    assert record["metrics"]["loss"]["first"] == pytest.approx(0.0, abs=1e-6)


def test_distillation_pulls_a_pruned_student_towards_its_teacher():
    teacher = tiny_causal_lm("llama")
    heal(teacher, method="full", tokens=32 * 4 * SEQ, lr=1e-2, **FAST)  # a teacher worth learning from
    student = copy.deepcopy(teacher)
    prunekit.prune(student, method="magnitude", sparsity=0.7, progress=False, calibration_seq_len=SEQ)
    teacher_hash = weights_sha256(teacher)
    record = heal(student, method="lora", tokens=16 * 4 * SEQ, lr=1e-2, distill="logits", teacher=teacher,
                  distill_alpha=1.0, **FAST)
    losses = record["metrics"]["loss"]["per_step"]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    assert weights_sha256(teacher) == teacher_hash
    assert record["method"]["distill"] == "logits" and record["method"]["temperature"] == 2.0


def test_layer_pairs_follow_the_kept_blocks_or_spread_evenly():
    assert layer_pairs(3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert layer_pairs(2, 4) == [(1, 2), (2, 4)]
    assert layer_pairs(3, 5, [0, 2, 3]) == [(1, 1), (2, 3), (3, 5)]
    with pytest.raises(PrunekitError, match="layer_map"):
        layer_pairs(3, 5, [0, 3, 2])


def test_depth_pruned_model_heals_with_hidden_distillation():
    teacher = tiny_causal_lm("llama", layers=4)
    student = copy.deepcopy(teacher)
    pruned = prunekit.prune_depth(student, method="reverse", blocks=1, progress=False)
    kept = pruned["metrics"]["kept_blocks"]
    record = heal(student, method="lora", tokens=8 * 4 * SEQ, lr=1e-2, distill="logits+hidden", teacher=teacher,
                  layer_map=kept, **FAST)
    assert record["method"]["layer_pairs"] == [[1, 1], [2, 2], [3, 4]]
    assert student.config.num_hidden_layers == 3
    assert record["metrics"]["after"]["perplexity"] < record["metrics"]["before"]["perplexity"]


def test_width_pruned_model_with_uneven_blocks_heals():
    model = tiny_causal_lm("llama", layers=3)
    prunekit.prune_structure(model, method="l1", remove=0.2, allocation="global", units=("neurons",),
                             progress=False)
    widths = {model.model.layers[i].mlp.up_proj.out_features for i in range(3)}
    record = heal(model, method="lora", tokens=8 * 4 * SEQ, lr=1e-2, **FAST)
    assert {model.model.layers[i].mlp.up_proj.out_features for i in range(3)} == widths
    assert record["metrics"]["after"]["perplexity"] < record["metrics"]["before"]["perplexity"]


def unsupported_model():
    import transformers

    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("options,message", [
    (dict(tokens=100), r"tokens=100 is less than one optimizer step of 128 tokens"),
    (dict(method="sparse-lora"), r"unknown healing method 'sparse-lora'; use one of lora, full, perp"),
    (dict(lora_rank=0), r"lora_rank=0 must be an integer >= 1"),
    (dict(distill="logits"), r"needs both distill= and teacher="),
    (dict(distill="kl", teacher="x"), r"distill='kl' is not a distillation mode"),
    (dict(warmup=0.9), r"warmup=0.9 must be a number in \[0.0, 0.5\]"),
    (dict(resume=True), r"resume=True needs checkpoint_dir="),
    (dict(eval_data=TRAIN), r"is the training text"),
    (dict(masks={"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64, dtype=torch.bool)}),
     r"marks nonzero weights as pruned"),
])
def test_bad_input_is_one_line_and_changes_nothing(options, message):
    model = sparse_model("llama")
    digest = weights_sha256(model)
    with pytest.raises(PrunekitError, match=message) as error:
        heal(model, **{**FAST, "method": "lora", "tokens": 4 * 4 * SEQ, **options})
    assert "\n" not in str(error.value)
    assert weights_sha256(model) == digest


def test_lora_needs_adapter_roles_and_says_what_works_instead():
    model = unsupported_model()
    digest = weights_sha256(model)
    with pytest.raises(PrunekitError, match=r"BloomForCausalLM \(model_type 'bloom'\) has none: heal it with "
                                            r"method 'full' or 'perp'"):
        heal(model, method="lora", tokens=4 * 4 * SEQ, **FAST)
    assert weights_sha256(model) == digest


def test_the_names_the_cli_offers_are_the_implemented_ones():
    from prunekit.recovery.distill import DISTILL_MODES

    assert tuple(HEAL_METHODS) == names.HEAL_METHODS
    assert DISTILL_MODES == names.DISTILL_MODES


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny sparse Llama with SmolLM2's tokenizer (and vocabulary), saved as prunekit saves pruned models."""
    from transformers import AutoTokenizer

    from prunekit.assets import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path("smollm2-135m"), local_files_only=True)
    model = sparse_model("llama", vocab=len(tokenizer))
    record = prunekit.prune(model, method="magnitude", sparsity=0.5, progress=False, calibration_seq_len=SEQ)
    out = tmp_path_factory.mktemp("cli") / "pruned"
    prunekit.save(model, tokenizer, out, record)
    return out


def test_cli_heals_a_saved_model_and_saves_it_atomically(saved_tiny, tmp_path, capsys):
    from prunekit.cli import main

    out = tmp_path / "healed"
    code = main(["heal", "--model", str(saved_tiny), "--method", "lora", "--tokens", str(4 * 2 * SEQ),
                 "--batch-size", "2", "--seq-len", str(SEQ), "--eval-seq-len", str(SEQ), "--eval-windows", "2",
                 "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "perplexity" in capsys.readouterr().out
    model, _, record = prunekit.load(out)
    source, _, _ = prunekit.load(saved_tiny)
    assert record["method"]["name"] == "lora" and record["pruning"]["name"] == "magnitude"
    assert record["metrics"]["tokens"]["achieved"] == 4 * 2 * SEQ
    for name, weight in prunekit.target_weights(model).items():
        assert torch.equal(weight == 0, prunekit.target_weights(source)[name] == 0), name


@pytest.mark.parametrize("extra,message", [
    (["--tokens", "10"], "less than one optimizer step"),
    (["--distill", "logits"], "--distill and --teacher go together"),
    (["--resume"], "--resume needs --checkpoint-dir"),
])
def test_cli_bad_input_exits_2_with_one_line(saved_tiny, tmp_path, capsys, extra, message):
    from prunekit.cli import main

    code = main(["heal", "--model", str(saved_tiny), "--out", str(tmp_path / "healed"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "healed").exists()


def test_cli_refuses_to_write_over_its_input(saved_tiny, capsys):
    from prunekit.cli import main

    code = main(["heal", "--model", str(saved_tiny), "--out", str(saved_tiny), "--overwrite", "--quiet"])
    assert code == 2 and "is the input model itself" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_heals_smollm2_after_wanda(smollm2, eval_ids):
    """50% Wanda on SmolLM2-135M, then mask-preserving LoRA on 8k wiki-summaries training tokens lowers the held-out
    perplexity, zeros unchanged. The budget is sized for 2 CPU cores: a LoRA step of 1k tokens takes ~7 s on an idle
    machine (about 1.5 minutes for this test, an estimate); it took 330 s on a shared machine at load 12. Measured:
    44.49 -> 35.30 (8k tokens, lr 1e-3), 44.49 -> 35.10 (16k tokens, lr 5e-4)."""
    model = copy.deepcopy(smollm2.model)
    prunekit.prune(model, smollm2.tokenizer, method="wanda", sparsity=0.5, calibration_samples=8,
                   calibration_seq_len=256, progress=False)
    zeros = zero_positions(model)
    record = heal(model, smollm2.tokenizer, method="lora", tokens=8192, seq_len=256, batch_size=4,
                  eval_data=eval_ids[:4], progress=False)
    metrics = record["metrics"]
    print(f"\nSmolLM2 50% Wanda: perplexity {metrics['before']['perplexity']:.2f} -> "
          f"{metrics['after']['perplexity']:.2f} after LoRA on {metrics['tokens']['achieved']} tokens in "
          f"{record['resources']['heal']['wall_s']:.0f} s", file=sys.stderr)
    assert metrics["after"]["perplexity"] < 0.9 * metrics["before"]["perplexity"]
    assert math.isfinite(metrics["after"]["perplexity"])
    for name, weight in prunekit.target_weights(model).items():
        assert torch.equal(weight == 0, zeros[name]), name
