"""Calibration statistics of one layer input, accumulated over calibration tokens."""

from __future__ import annotations

import torch

# Columns per strip of the X^T X update: the fastest of the strip widths tried (768, 512, 384) for a 1536-wide input
# on 2 cores; for 576 columns it is close to the best measured (288).
_GRAM_STRIP = 384


class InputStats:
    """Running statistics of the inputs X ([tokens, features]) of one projection or input group.

    norms: ||X_j||_2 per input feature j over all tokens (Wanda).
    mean, variance: per input feature over all tokens (DSnoT's expected reconstruction error and its variance).
    hessian: X^T X / tokens (SparseGPT's layer-wise Hessian up to a constant factor, which damping ignores).
    """

    def __init__(self, features: int, *, hessian: bool, device: torch.device | str = "cpu") -> None:
        self.tokens = 0
        self.square_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(features, features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        # float32 sums within one batch (relative error about 1e-7 at 4096 tokens; summing in float64 is 8x
        # slower on a CPU), accumulated across batches in float64
        self.square_sum += x.square().sum(0).double()
        self.sum += x.sum(0).double()
        if self.gram is not None:
            # X^T X is symmetric: accumulate only strips on and above the diagonal (about 40% fewer FLOPs for a
            # 1536-wide input) and mirror them when the Hessian is read.
            for start in range(0, x.shape[1], _GRAM_STRIP):
                strip = x[:, start:start + _GRAM_STRIP]
                self.gram[start:start + _GRAM_STRIP, start:].addmm_(strip.t(), x[:, start:])

    @property
    def norms(self) -> torch.Tensor:
        return self.square_sum.sqrt().float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance E[X_j²] - E[X_j]², clamped at 0 against rounding."""
        tokens = max(self.tokens, 1)
        return (self.square_sum / tokens - (self.sum / tokens).square()).clamp_min(0).float()

    @property
    def hessian(self) -> torch.Tensor:
        if self.gram is None:
            raise RuntimeError("these statistics were gathered without the Hessian")
        upper = self.gram.triu()
        return (upper + upper.triu(1).t()) / max(self.tokens, 1)
