"""The Hugging Face Trainer callback steps the pruner once per optimizer step and finalizes at the end; on Hugging
Face language models the pruners target the projections one-shot pruning targets, never embeddings or the head."""

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from prunekit.select import fraction_count
from prunekit.training import GradualMagnitude, PruningCallback, target_weights
from tiny_models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Recorder(TrainerCallback):
    def __init__(self, pruner):
        self.pruner, self.seen = pruner, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append((state.global_step, self.pruner.step_count, self.pruner.sparsity()))


def test_callback_prunes_on_the_configured_steps(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(6, generator=generator), "labels": int(torch.randint(0, 3, (1,), generator=generator))}
            for _ in range(64)]
    model = TinyClassifier()
    pruner = GradualMagnitude(model, 0.8, start_step=2, end_step=6, frequency=2)
    recorder = Recorder(pruner)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=0.05, weight_decay=0.01,
                             save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                             logging_strategy="no", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[PruningCallback(pruner, finalize=True), recorder])
    trainer.train()
    total = sum(w.numel() for w in target_weights(model).values())
    assert [step for step, _, _ in recorder.seen] == list(range(1, 9))
    assert [count for _, count, _ in recorder.seen] == list(range(1, 9))  # one pruner step per optimizer step
    for _, count, achieved in recorder.seen:
        assert achieved == fraction_count(total, pruner.target_sparsity(count)) / total
    changes = [count for (_, count, a), (_, _, b) in zip(recorder.seen[1:], recorder.seen, strict=False) if a != b]
    assert changes == [4, 6]  # step 2 prunes to the cubic target 0 of start_step, then steps 4 and 6
    # finalize=True baked the zeros in and removed the masks.
    assert not any(k.endswith("_mask") for k in model.state_dict())
    zeros = sum(int((w == 0).sum()) for w in target_weights(model).values())
    assert zeros == fraction_count(total, 0.8)


PROJECTIONS = {
    "gpt2": ("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    "llama": ("model.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trainer_prunes_the_projections_of_a_tied_language_model(tmp_path, family):
    """GPT-2 keeps its projections in Conv1D ([in, out]) and ties its head to the embedding, as does this Llama:
    the masks cover exactly the block projections, each at the exact sparsity, and the tied embedding is trained
    but never pruned."""
    model = tiny_causal_lm(family, tie=True).train()
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding
    dense_embedding = embedding.detach().clone()
    prefix, projections = PROJECTIONS[family]
    expected = [f"{prefix}.{i}.{p}.weight" for i in range(3) for p in projections]
    pruner = GradualMagnitude(model, 0.5, start_step=1, end_step=3, frequency=1, allocation="uniform")
    assert list(pruner.masks.masks) == expected
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (16, 16), generator=generator)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.01, save_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True, logging_strategy="no", dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[PruningCallback(pruner)]).train()
    assert pruner.step_count == 5
    for name, mask in pruner.masks.masks.items():
        weight = model.get_parameter(name)
        assert mask.shape == weight.shape  # the stored layout: [in, out] for GPT-2's Conv1D
        assert int((~mask).sum()) == fraction_count(weight.numel(), 0.5), name
        assert torch.equal(weight.detach() == 0, ~mask), name  # pruned exactly the masked entries, held
    # The embedding (and the head tied to it) was trained, never masked.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not torch.equal(embedding.detach(), dense_embedding)
    assert int((embedding == 0).sum()) == 0
    assert sorted(k for k in model.state_dict() if k.endswith("_mask")) == sorted(f"{n}_mask" for n in expected)
