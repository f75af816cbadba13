"""Training-dynamics scorers: one score per training example from short training runs of a classifier.

Every scorer returns a float64 array of shape (N,), in input order, oriented HIGHER = HARDER. Where the paper's
quantity runs the other way the scorer returns its negation (`aum` returns −AUM, `margin` returns −margin).

How the dynamics are recorded: `record_dynamics` trains a fresh model (from `make_model`, initialised under the
run's seed) with SGD + momentum or Adam on shuffled minibatches, and at the end of every epoch evaluates EVERY
training example in eval mode (not the minibatch predictions logged during the epoch, as some papers do): this
costs one extra forward pass per example per epoch and makes each epoch's record a function of the weights at
that point only. Loss, EL2N, entropy and margin come from the last recorded epoch, forgetting and AUM from all
epochs. Scores with `runs > 1` are averaged over runs with seeds `seed, seed + 1, ...`.

Determinism: under a fixed `seed`, the initialisation (the global RNG is forked and seeded around `make_model()`)
and the shuffling (a seeded generator) are fixed, so on one thread the scores are identical run to run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.training.loop import ClassificationData, train


def _check_data(inputs: torch.Tensor, labels: torch.Tensor) -> None:
    if len(labels) == 0 or len(inputs) == 0:
        raise PrunekitError("cannot score an empty data set; give at least one example")
    if len(inputs) != len(labels) or labels.ndim != 1:
        raise PrunekitError(f"{len(inputs)} inputs for labels of shape {tuple(labels.shape)}; give one integer label "
                            "per input")
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise PrunekitError("inputs hold NaN or infinite values; clean them before scoring")


def _seeded_model(make_model: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model().to(device)


def _fit(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
         optimizer: str, seed: int, progress: bool,
         on_epoch_end: Callable[[int, nn.Module], None] | None = None) -> None:
    """The scorers' short training runs: prunekit's training loop with SGD (momentum 0.9) or Adam, weight decay
    5e-4 and a constant learning rate, as in the EL2N/forgetting papers' short runs."""
    train(model, ClassificationData(inputs, labels), epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
          momentum=0.9, weight_decay=5e-4, lr_schedule="constant", seed=seed, on_epoch_end=on_epoch_end,
          progress=progress)


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Logits of every input in eval mode, on the CPU; the model's train/eval mode is restored."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(inputs[s:s + batch_size].to(device)).float().cpu()
                          for s in range(0, len(inputs), batch_size)])
    finally:
        model.train(was_training)


@dataclass
class TrainingDynamics:
    """Per-epoch statistics of every example (arrays of shape (epochs, N)), recorded after each epoch."""

    loss: np.ndarray
    correct: np.ndarray
    el2n: np.ndarray
    assigned_margin: np.ndarray
    entropy: np.ndarray
    prob_margin: np.ndarray

    @classmethod
    def from_logits(cls, epochs_logits: list[torch.Tensor], labels: torch.Tensor) -> TrainingDynamics:
        fields = {name: [] for name in cls.__dataclass_fields__}
        for logits in epochs_logits:
            logits = logits.double()
            probs = logits.softmax(dim=1)
            onehot = nn.functional.one_hot(labels, logits.shape[1]).double()
            assigned = logits.gather(1, labels[:, None])[:, 0]
            other = logits.masked_fill(onehot.bool(), float("-inf")).max(dim=1).values
            top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
            fields["loss"].append(nn.functional.cross_entropy(logits, labels, reduction="none"))
            fields["correct"].append(logits.argmax(dim=1) == labels)
            fields["el2n"].append((probs - onehot).norm(dim=1))  # Paul et al. 2021, eq. 2
            fields["assigned_margin"].append(assigned - other)  # Pleiss et al. 2020, eq. 1
            fields["entropy"].append(-(probs * probs.clamp_min(1e-300).log()).sum(dim=1))
            fields["prob_margin"].append(top2[:, 0] - top2[:, -1])
        return cls(**{name: torch.stack(values).numpy() for name, values in fields.items()})

    def forgetting(self) -> np.ndarray:
        """Forgetting events (Toneva et al. 2019): correct at one recorded epoch, incorrect at the next.

        Examples never classified correctly count `epochs`, more than any learned example can reach (at most
        ⌊epochs/2⌋ events), so they rank hardest, like the paper's infinite count for unlearned examples.
        """
        events = (self.correct[:-1] & ~self.correct[1:]).sum(axis=0).astype(np.float64)
        events[~self.correct.any(axis=0)] = len(self.correct)
        return events

    def aum(self) -> np.ndarray:
        """Area under the margin (Pleiss et al. 2020): the assigned logit minus the largest other, averaged over
        epochs. Low (negative) AUM flags mislabeled examples."""
        return self.assigned_margin.mean(axis=0)


def record_dynamics(make_model: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *,
                    seed: int = 0, epochs: int = 10, batch_size: int = 128, lr: float = 0.05,
                    optimizer: str = "sgd", device: str | torch.device | None = None,
                    progress: bool = False) -> tuple[TrainingDynamics, nn.Module]:
    """Train one fresh model for `epochs` epochs, evaluating every example after each epoch.

    Returns the recorded dynamics and the trained model (e.g. for its penultimate features).
    """
    _check_data(inputs, labels)
    if epochs < 1:
        raise PrunekitError(f"recording training dynamics needs epochs >= 1, got {epochs}")
    device = torch.device(device or "cpu")
    labels = labels.long()
    model = _seeded_model(make_model, seed, device)
    recorded: list[torch.Tensor] = []
    _fit(model, inputs, labels, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed,
         progress=progress, on_epoch_end=lambda _, m: recorded.append(predict_logits(m, inputs, device=device)))
    return TrainingDynamics.from_logits(recorded, labels.cpu()), model


def per_example_grad_norms(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 128,
                           device: str | torch.device | None = None) -> np.ndarray:
    """‖∇_w ℓ(x, y)‖₂ over all trainable parameters, for every example, in eval mode.

    Uses torch.func (functional_call + vmap + grad): the full per-example gradient, not a last-layer proxy.
    Eval mode makes batch norm use its running statistics, so each example's gradient is its own.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_of(p, x, y):
        logits = functional_call(model, (p, buffers), (x[None],))
        return nn.functional.cross_entropy(logits, y[None])

    per_example = vmap(grad(loss_of), in_dims=(None, 0, 0))
    norms = []
    try:
        for s in range(0, len(labels), batch_size):
            grads = per_example(params, inputs[s:s + batch_size].to(device), labels[s:s + batch_size].to(device))
            squared = sum(g.flatten(1).pow(2).sum(dim=1) for g in grads.values())
            norms.append(squared.sqrt().double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(norms).numpy()


def _runs(scorer_name: str, runs: int, epochs: int, min_epochs: int) -> None:
    if runs < 1:
        raise PrunekitError(f"{scorer_name} needs runs >= 1, got {runs}")
    if epochs < min_epochs:
        raise PrunekitError(f"{scorer_name} needs epochs >= {min_epochs}, got {epochs}")


def _averaged(statistic: Callable[[TrainingDynamics], np.ndarray], name: str, make_model, inputs, labels, *,
              seed: int, epochs: int, runs: int, batch_size: int, lr: float, device, progress: bool) -> np.ndarray:
    _check_data(inputs, labels)
    _runs(name, runs, epochs, 1)
    total = np.zeros(len(labels))
    for run in tqdm(range(runs), desc=f"{name} runs", disable=not progress):
        dynamics, _ = record_dynamics(make_model, inputs, labels, seed=seed + run, epochs=epochs,
                                      batch_size=batch_size, lr=lr, device=device, progress=progress)
        total += statistic(dynamics)
    return total / runs


def random_scores(make_model: Callable[[], nn.Module] | None, inputs: torch.Tensor, labels: torch.Tensor, *,
                  seed: int = 0, epochs: int = 0, runs: int = 1, batch_size: int = 128, lr: float = 0.0,
                  device=None, progress: bool = True) -> np.ndarray:
    """Uniform random scores in [0, 1) under `seed`; every other argument is accepted and ignored."""
    _check_data(inputs, labels)
    return np.random.default_rng(seed).random(len(labels))


def loss_scores(make_model: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                epochs: int = 3, runs: int = 3, batch_size: int = 128, lr: float = 0.05, device=None,
                progress: bool = True) -> np.ndarray:
    """Cross-entropy of each example after `epochs` epochs of training, averaged over `runs` runs."""
    return _averaged(lambda d: d.loss[-1], "loss", make_model, inputs, labels, seed=seed, epochs=epochs, runs=runs,
                     batch_size=batch_size, lr=lr, device=device, progress=progress)


def el2n_scores(make_model: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                epochs: int = 2, runs: int = 4, batch_size: int = 128, lr: float = 0.05, device=None,
                progress: bool = True) -> np.ndarray:
    """EL2N (Paul et al. 2021): ‖softmax(f(x)) − onehot(y)‖₂ early in training (after `epochs` epochs; the paper
    scores at 10% of training), averaged over `runs` runs with different seeds."""
    return _averaged(lambda d: d.el2n[-1], "el2n", make_model, inputs, labels, seed=seed, epochs=epochs, runs=runs,
                     batch_size=batch_size, lr=lr, device=device, progress=progress)


def grand_scores(make_model: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                 epochs: int = 0, runs: int = 4, batch_size: int = 128, lr: float = 0.05, device=None,
                 progress: bool = True) -> np.ndarray:
    """GraNd (Paul et al. 2021): the expected norm of the per-example loss gradient over all parameters.

    Each of `runs` models (seeds `seed, seed + 1, ...`) is trained for `epochs` epochs (0 = at initialisation, the
    paper's headline setting) and the full per-example gradient norm is taken with torch.func (see
    `per_example_grad_norms`, eval-mode batch norm, `batch_size` examples at a time); the norms are averaged over
    runs.
    """
    _check_data(inputs, labels)
    _runs("grand", runs, epochs, 0)
    device = torch.device(device or "cpu")
    labels = labels.long()
    total = np.zeros(len(labels))
    for run in tqdm(range(runs), desc="grand runs", disable=not progress):
        model = _seeded_model(make_model, seed + run, device)
        if epochs:
            _fit(model, inputs, labels, epochs=epochs, batch_size=batch_size, lr=lr, optimizer="sgd", seed=seed + run,
                 progress=False)
        total += per_example_grad_norms(model, inputs, labels, batch_size=batch_size, device=device)
    return total / runs


def forgetting_scores(make_model: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *,
                      seed: int = 0, epochs: int = 10, runs: int = 1, batch_size: int = 128, lr: float = 0.05,
                      device=None, progress: bool = True) -> np.ndarray:
    """Forgetting events (Toneva et al. 2019) over `epochs` recorded epochs, averaged over `runs` runs; examples
    never learned count `epochs` (see `TrainingDynamics.forgetting`)."""
    _runs("forgetting", runs, epochs, 2)
    return _averaged(TrainingDynamics.forgetting, "forgetting", make_model, inputs, labels, seed=seed, epochs=epochs,
                     runs=runs, batch_size=batch_size, lr=lr, device=device, progress=progress)


def aum_scores(make_model: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
               epochs: int = 10, runs: int = 1, batch_size: int = 128, lr: float = 0.05, device=None,
               progress: bool = True) -> np.ndarray:
    """−AUM (Pleiss et al. 2020): the negated area under the margin over `epochs` epochs, averaged over `runs`, so
    that likely mislabeled examples (low AUM) score highest."""
    return -_averaged(TrainingDynamics.aum, "aum", make_model, inputs, labels, seed=seed, epochs=epochs, runs=runs,
                      batch_size=batch_size, lr=lr, device=device, progress=progress)


def entropy_scores(make_model: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                   epochs: int = 3, runs: int = 3, batch_size: int = 128, lr: float = 0.05, device=None,
                   progress: bool = True) -> np.ndarray:
    """Entropy of the predicted distribution after `epochs` epochs (uncertainty sampling, as in Coleman et al.
    2020), averaged over `runs`; it ignores the label."""
    return _averaged(lambda d: d.entropy[-1], "entropy", make_model, inputs, labels, seed=seed, epochs=epochs,
                     runs=runs, batch_size=batch_size, lr=lr, device=device, progress=progress)


def margin_scores(make_model: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                  epochs: int = 3, runs: int = 3, batch_size: int = 128, lr: float = 0.05, device=None,
                  progress: bool = True) -> np.ndarray:
    """−margin: minus the gap between the two most probable classes after `epochs` epochs (Coleman et al. 2020),
    averaged over `runs`; small gaps (uncertain examples) score highest. It ignores the label."""
    return -_averaged(lambda d: d.prob_margin[-1], "margin", make_model, inputs, labels, seed=seed, epochs=epochs,
                      runs=runs, batch_size=batch_size, lr=lr, device=device, progress=progress)


TRAINING_SCORERS: dict[str, Callable[..., np.ndarray]] = {
    "random": random_scores,
    "loss": loss_scores,
    "el2n": el2n_scores,
    "grand": grand_scores,
    "forgetting": forgetting_scores,
    "aum": aum_scores,
    "entropy": entropy_scores,
    "margin": margin_scores,
}
