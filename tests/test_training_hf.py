"""The Hugging Face Trainer callback steps the pruner once per optimizer step and finalizes at the end."""

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from prunekit.select import removal_count
from prunekit.training import GradualMagnitude, PruningCallback, prunable_weights

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
    total = sum(w.numel() for w in prunable_weights(model).values())
    assert [step for step, _, _ in recorder.seen] == list(range(1, 9))
    assert [count for _, count, _ in recorder.seen] == list(range(1, 9))  # one pruner step per optimizer step
    for _, count, achieved in recorder.seen:
        assert achieved == removal_count(total, pruner.target_sparsity(count)) / total
    changes = [count for (_, count, a), (_, _, b) in zip(recorder.seen[1:], recorder.seen, strict=False) if a != b]
    assert changes == [4, 6]  # step 2 prunes to the cubic target 0 of start_step, then steps 4 and 6
    # finalize=True baked the zeros in and removed the masks.
    assert not any(k.endswith("_mask") for k in model.state_dict())
    zeros = sum(int((w == 0).sum()) for w in prunable_weights(model).values())
    assert zeros == removal_count(total, 0.8)
