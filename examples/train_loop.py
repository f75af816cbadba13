"""Gradual magnitude pruning in a hand-written training loop: LeNet-300-100 on a 20k-image MNIST subset.

    python examples/train_loop.py          # about 20 s on one CPU thread

The only prunekit lines are the pruner's construction, `pruner.step()` after `optimizer.step()`, and
`pruner.finalize()`; everything else is an ordinary PyTorch loop.
"""

import time

import torch
from torch import nn

from prunekit.assets import load_images
from prunekit.measure import accuracy
from prunekit.nets import build_net
from prunekit.training import GradualMagnitude

torch.set_num_threads(1)
torch.manual_seed(0)

train = load_images("mnist", "train").subset(torch.randperm(60_000)[:20_000])
test = load_images("mnist", "test").subset(torch.arange(2_000))
model = build_net("lenet-300-100", seed=0)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

epochs, batch_size = 8, 100
steps = epochs * len(train.labels) // batch_size
# Prune from 10% to 70% of training, every 20 steps, to 95% sparsity (global magnitude ranking).
pruner = GradualMagnitude(model, final_sparsity=0.95, start_step=steps // 10, end_step=7 * steps // 10, frequency=20)

start = time.perf_counter()
for epoch in range(epochs):
    order = torch.randperm(len(train.labels))
    for idx in order.split(batch_size):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train.images[idx]), train.labels[idx]).backward()
        optimizer.step()
        pruner.step()
    print(f"epoch {epoch + 1}: step {pruner.step_count}, sparsity {pruner.sparsity():.3f} "
          f"(target {pruner.target_sparsity():.3f}), test accuracy "
          f"{accuracy(model, test.images, test.labels)['accuracy']:.4f}")

pruner.finalize()  # zeros baked into the weights; the model is a plain nn.Module again
zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))
total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
print(f"final: {zeros / total:.3f} of the weights are zero, test accuracy "
      f"{accuracy(model, test.images, test.labels)['accuracy']:.4f}, {time.perf_counter() - start:.1f} s of training")
