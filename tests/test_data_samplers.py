"""Dynamic samplers: InfoBatch keeps the expected gradient unbiased and visits the full data in its last epochs;
RS2 visits every example before repeating one. Both are installed explicitly on a DataLoader or a Trainer."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from prunekit.data.samplers import RS2, IndexedDataset, InfoBatch, infobatch_trainer_class, rs2_trainer_class
from prunekit.errors import PrunekitError
from prunekit.training.loop import ClassificationData, train

pytestmark = pytest.mark.usefixtures("one_thread")


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example losses, per-example flattened gradients) of a small model."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
    losses = nn.functional.cross_entropy(model(x), y, reduction="none").detach()
    return losses, torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def test_infobatch_expected_gradient_equals_the_full_data_gradient():
    torch.manual_seed(0)
    n = 200
    model = nn.Linear(5, 3)
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    losses, g = per_example_grads(model, x, y)
    full = g.mean(dim=0).double()
    sampler = InfoBatch(n, epochs=100_000, prune_ratio=0.5, anneal=1.0, seed=0)
    sampler.update(torch.arange(n), losses)  # the losses of a first full epoch, then the parameters stay fixed
    weighted, unweighted = [], []
    for _ in range(2000):
        index = torch.as_tensor(list(sampler))
        w = sampler.weights(index).double()
        # an epoch's gradient is the sum of the kept examples' weighted gradients, over the full data size
        weighted.append((w[:, None] * g[index].double()).sum(dim=0) / n)
        unweighted.append(g[index].double().sum(dim=0) / len(index))
    weighted, unweighted = torch.stack(weighted), torch.stack(unweighted)
    well = int((losses < losses.mean()).sum())
    assert len(index) == n - round(0.5 * well)  # exactly half of the well-learned examples were skipped
    # Under H0 (unbiased), each coordinate of the mean over 2000 independent epochs is within 4 standard errors of
    # the full gradient with probability > 1 − 6e-5 (CLT; 18 coordinates → < 0.2% family-wise); the seed is fixed.
    stderr = weighted.std(dim=0) / len(weighted) ** 0.5
    assert torch.all((weighted.mean(dim=0) - full).abs() < 4 * stderr)
    # The test has power: without InfoBatch's rescaling the estimate is biased far beyond that tolerance.
    bias = (unweighted.mean(dim=0) - full).abs() / (unweighted.std(dim=0) / len(unweighted) ** 0.5)
    assert bias.max() > 20


def test_infobatch_prunes_well_learned_only_and_visits_everything_in_the_last_epochs():
    n, epochs = 100, 8
    sampler = InfoBatch(n, epochs=epochs, prune_ratio=0.5, anneal=0.75, seed=1)
    losses = torch.linspace(0, 1, n)  # mean 0.5: examples 0..49 are well-learned
    first = list(sampler)
    assert sorted(first) == list(range(n))  # nothing recorded yet: the first epoch is full
    for epoch in range(1, epochs):
        sampler.update(torch.arange(n), losses)
        visited = list(sampler)
        assert len(visited) == len(set(visited))
        if epoch < 6:
            assert set(range(50, n)) <= set(visited) and len(visited) == 75
            assert torch.all(sampler.weights(torch.arange(50, n)) == 1)
            kept_well = [i for i in visited if i < 50]
            assert torch.all(sampler.weights(torch.tensor(kept_well)) == 2.0)
        else:  # the last 1 − anneal = 25% of epochs see every example once, unweighted
            assert sorted(visited) == list(range(n)) and torch.all(sampler.weights(torch.arange(n)) == 1)
    assert sampler.passes == n + 5 * 75 + 2 * n


def test_infobatch_is_deterministic_and_works_with_a_dataloader():
    def run(seed: int) -> list[list[int]]:
        sampler = InfoBatch(64, epochs=4, prune_ratio=0.7, anneal=0.5, seed=seed)
        loader = DataLoader(IndexedDataset(TensorDataset(torch.randn(64, 3), torch.arange(64) % 2)), batch_size=16,
                            sampler=sampler)
        epochs = []
        for _ in range(4):
            seen = []
            for index, _x, _y in loader:
                sampler.update(index, index.double() / 64)  # loss grows with the index
                seen += index.tolist()
            epochs.append(seen)
        return epochs

    epochs = run(0)
    assert epochs == run(0) and epochs != run(1)
    assert [len(e) for e in epochs] == [64, 64 - round(0.7 * 32), 64, 64]


def test_training_loop_reweights_with_infobatch_and_saves_passes():
    torch.manual_seed(0)
    x = torch.randn(256, 2)
    y = (x[:, 0] > 0).long()
    sampler = InfoBatch(256, epochs=6, prune_ratio=0.5, anneal=0.67, seed=0)
    model = nn.Linear(2, 2)
    epochs_seen = []
    history = train(model, ClassificationData(x, y), epochs=6, batch_size=32, lr=0.1, sampler=sampler,
                    on_epoch_end=lambda epoch, _: epochs_seen.append(epoch), progress=False)
    assert 256 * 3 < sampler.passes < 256 * 6 and history.example_passes == sampler.passes
    assert epochs_seen == list(range(6)) and len(history.rows) == 6
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    with pytest.raises(PrunekitError, match="budget in epochs"):
        train(model, ClassificationData(x, y), steps=10, sampler=sampler, progress=False)


def test_rs2_visits_every_example_before_repeating():
    n = 103
    sampler = RS2(n, 0.3, seed=0)
    assert len(sampler) == 31
    stream = [list(sampler) for _ in range(12)]
    for epoch in stream:
        assert len(epoch) == 31 and len(set(epoch)) == 31
    flat = sum(stream, [])
    for start in range(0, len(flat) - n, n):
        assert sorted(flat[start:start + n]) == list(range(n))
    again = RS2(n, 0.3, seed=0)
    again.set_epoch(7)
    assert list(again) == stream[7]
    assert stream != [list(RS2(n, 0.3, seed=1)) for _ in range(12)]


def test_sampler_arguments_are_checked():
    with pytest.raises(PrunekitError, match="at least one example"):
        InfoBatch(0, epochs=3)
    with pytest.raises(PrunekitError, match="prune_ratio 1.0"):
        InfoBatch(10, epochs=3, prune_ratio=1.0)
    with pytest.raises(PrunekitError, match="anneal 1.5"):
        InfoBatch(10, epochs=3, anneal=1.5)
    with pytest.raises(PrunekitError, match="keep fraction 0.0"):
        RS2(10, 0.0)
    sampler = InfoBatch(10, epochs=3)
    with pytest.raises(PrunekitError, match="non-finite"):
        sampler.update(torch.tensor([0]), torch.tensor([float("nan")]))
    with pytest.raises(PrunekitError, match="one loss per example"):
        sampler.update(torch.tensor([0, 1]), torch.tensor([0.5]))


def test_trainer_subclasses_install_the_samplers_on_their_instances_only(tmp_path):
    import transformers
    from datasets import Dataset

    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(1, 30, (48, 6))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    data = data.map(lambda _, i: {"example_index": i}, with_indices=True)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=4, per_device_train_batch_size=8,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    sampler = InfoBatch(48, epochs=4, prune_ratio=0.5, anneal=0.75, seed=0)
    trainer = infobatch_trainer_class()(model=model, args=args, train_dataset=data, data_sampler=sampler)
    trainer.train()
    assert sampler.seen.all() and 48 * 3 < sampler.passes < 48 * 4
    assert type(transformers.Trainer(model=model, args=args, train_dataset=data)._get_train_sampler()) is not InfoBatch
    rs2 = RS2(48, 0.5, seed=0)
    rs2_trainer_class()(model=model, args=args, train_dataset=data, data_sampler=rs2).train()
    assert rs2.epoch == 4
