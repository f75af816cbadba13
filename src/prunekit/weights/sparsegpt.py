"""SparseGPT: prune one layer and update the remaining weights to reconstruct its output.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023).
The layer-wise problem is min ||XW^T - X(M*W')^T|| over masks M and weights W'. Columns are pruned left to
right; the error of each pruned column is spread over the columns not yet visited using the inverse Hessian
H^-1 of H = X^T X (the Optimal Brain Surgeon update, Alg. 1). The mask is chosen adaptively, one block of
`blocksize` columns at a time ("lazy batch" updates), from w^2 / [H^-1]_jj^2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunekit.budget import Pattern
from prunekit.errors import PrunekitError
from prunekit.select import fraction_count, nm_mask


def inverse_hessian_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, which holds the OBS row updates."""
    h = hessian.double().clone()
    cols = h.shape[0]
    h.diagonal().add_(damping * h.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True).float()
    except torch.linalg.LinAlgError:
        raise PrunekitError(
            f"the {cols}x{cols} calibration Hessian is not positive definite even with damping {damping}; "
            "use more calibration samples or a larger --damping"
        ) from None


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    damping: float = 0.01,
    row_groups: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated weight, keep-mask) for a [out, in] weight and its [in, in] Hessian X^T X.

    `row_groups` lists the row counts of layers stacked in `weight` that share one input (q, k and v, say):
    unstructured selection is then done within each of them, so that every layer reaches its own sparsity,
    while the column sweep runs once for all of them.
    """
    if not torch.isfinite(hessian).all():
        raise PrunekitError("the calibration Hessian holds NaN or inf: the activations entering the layer are broken")
    w = weight.float().clone(memory_format=torch.contiguous_format)  # GPT-2's Conv1D hands in a transpose
    rows, cols = w.shape
    groups = list(row_groups) if row_groups else [rows]
    bounds = torch.tensor([0, *groups]).cumsum(0).tolist()

    h = hessian.float().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(h, damping)

    if pattern.is_nm:  # every column block must hold whole M-groups
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = w[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = hinv_block.diagonal()
        errors = torch.zeros_like(block)
        block_keep = torch.ones_like(block, dtype=torch.bool)
        if not pattern.is_nm:
            saliency = block.square() / diag.square()
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                k = fraction_count((hi - lo) * (end - start), sparsity)
                if k:
                    drop = torch.topk(saliency[lo:hi].flatten(), k, largest=False, sorted=False).indices
                    block_keep[lo:hi].view(-1)[drop] = False
        for j in range(end - start):
            if pattern.is_nm and j % pattern.m == 0:
                span = slice(j, j + pattern.m)
                block_keep[:, span] = nm_mask(block[:, span].square() / diag[span].square(), pattern.n, pattern.m)
            column = block[:, j]
            pruned = torch.where(block_keep[:, j], column, torch.zeros_like(column))
            error = (column - pruned) / diag[j]
            block[:, j:].sub_(error.unsqueeze(1) * hinv_block[j, j:].unsqueeze(0))
            block[:, j] = pruned
            errors[:, j] = error
        w[:, start:end] = block
        w[:, end:].sub_(errors @ hinv[start:end, end:])
        keep[:, start:end] = block_keep
    return w.to(weight.dtype), keep
