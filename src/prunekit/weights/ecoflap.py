"""ECoFLaP's zeroth-order block importance (Sung et al. 2024, "ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning
for Vision-Language Models", Sec. 3.2), and the block sparsities it gives.

ECoFLaP ranks blocks by the first-order importance of their weights, |θ ⊙ ∇θ L| summed over the block, with the
gradient estimated forward-only by finite differences of the loss under random perturbations (so no backward pass
and no gradient memory). prunekit's variant perturbs one block at a time, along random directions scaled by the
weights themselves, z = |W| ⊙ u with u ~ N(0, I) over the block's targeted weights, and takes the central difference

    score_b = mean over directions of |L(W + εz) − L(W − εz)| / (2ε)  ≈  E|Σ_i ∂L/∂w_i |w_i| u_i|
            = sqrt(2/π) ||∇L ⊙ W||_2 over block b,

the block's first-order Taylor importance in the L2 norm, from two forward passes per direction. L is the mean
next-token loss on the calibration tokens. The weights are restored bit for bit after each block.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import Adapter
from prunekit.allocation import ecoflap_sparsities
from prunekit.errors import PrunekitError
from prunekit.weights.engine import BlockPlan

ECOFLAP_DIRECTIONS = 2
ECOFLAP_EPSILON = 1e-3


def check_ecoflap_options(directions: int, epsilon: float) -> None:
    """Refuse ECoFLaP settings that cannot run, before anything changes."""
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise PrunekitError(f"ECoFLaP directions {directions!r} must be a whole number >= 1")
    if not isinstance(epsilon, int | float) or isinstance(epsilon, bool) or not 0 < epsilon < 1:
        raise PrunekitError(f"ECoFLaP epsilon {epsilon!r} must be in (0, 1): the relative size of the perturbation")


def _mean_loss(model: nn.Module, token_ids: torch.Tensor, batch_size: int, device: torch.device) -> float:
    total, predicted = 0.0, 0
    for batch in token_ids.split(batch_size):
        batch = batch.to(device)
        count = batch.shape[0] * (batch.shape[1] - 1)
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.double().item() * count
        predicted += count
    return total / predicted


def ecoflap_block_scores(
    model: nn.Module, adapter: Adapter, token_ids: torch.Tensor, *, directions: int = ECOFLAP_DIRECTIONS,
    epsilon: float = ECOFLAP_EPSILON, seed: int = 0, batch_size: int = 8, progress: bool = False,
) -> list[float]:
    """The zeroth-order importance of every block's targeted weights (module docstring), computed where the model
    is, with `2 * directions` forward passes over `token_ids` per block. The model is left unchanged."""
    check_ecoflap_options(directions, epsilon)
    if token_ids.shape[1] < 2:
        raise PrunekitError(f"ECoFLaP needs sequences of at least 2 tokens, got {token_ids.shape[1]}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    scores = []
    blocks = adapter.block_list(model)
    with torch.no_grad():
        for block in tqdm(blocks, desc="ECoFLaP block scores", unit="block", disable=not progress):
            weights = [module.weight for module in adapter.projections(block).values()]
            originals = [w.detach().clone() for w in weights]
            differences = []
            try:
                for _ in range(directions):
                    steps = [epsilon * w.abs() * torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
                             for w in originals]
                    losses = []
                    for sign in (1.0, -1.0):
                        for w, original, step in zip(weights, originals, steps, strict=True):
                            w.copy_(original + sign * step)
                        losses.append(_mean_loss(model, token_ids, batch_size, device))
                    differences.append(abs(losses[0] - losses[1]) / (2 * epsilon))
            finally:
                for w, original in zip(weights, originals, strict=True):
                    w.copy_(original)
            scores.append(sum(differences) / directions)
    return scores


def ecoflap_plan(
    model: nn.Module, adapter: Adapter, token_ids: torch.Tensor, *, sparsity: float, limit: float,
    directions: int = ECOFLAP_DIRECTIONS, epsilon: float = ECOFLAP_EPSILON, seed: int = 0, batch_size: int = 8,
    progress: bool = False,
) -> BlockPlan:
    """ECoFLaP's block scores on the dense model, then each block's sparsity (`ecoflap_sparsities`, at most `limit`
    from the target, parameter-weighted mean exactly `sparsity`)."""
    scores = ecoflap_block_scores(model, adapter, token_ids, directions=directions, epsilon=epsilon, seed=seed,
                                  batch_size=batch_size, progress=progress)
    sizes = [sum(m.weight.numel() for m in adapter.projections(block).values()) for block in adapter.block_list(model)]
    return BlockPlan(ecoflap_sparsities(scores, sparsity, limit, sizes), block_scores=scores)
