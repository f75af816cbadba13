"""Classification accuracy (and mean loss) of a model on tensors, in batches, without gradients."""

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024,
             device: str | torch.device | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` in eval mode; the model's train/eval mode is restored."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(labels), batch_size):
            x = inputs[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
    finally:
        model.train(was_training)
    n = len(labels)
    return {"accuracy": correct / n, "loss": loss_sum / n, "examples": n}
