"""Calibration statistics of one layer input, accumulated over calibration tokens."""

from __future__ import annotations

import torch


class InputStats:
    """Running statistics of the inputs X ([tokens, features]) of one projection or input group.

    norms: ||X_j||_2 per input feature j over all tokens (Wanda).
    hessian: X^T X / tokens (SparseGPT's layer-wise Hessian up to a constant factor, which damping ignores).
    """

    def __init__(self, features: int, *, hessian: bool, device: torch.device | str = "cpu") -> None:
        self.tokens = 0
        self.square_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(features, features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.square_sum += x.square().sum(0, dtype=torch.float64)
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)

    @property
    def norms(self) -> torch.Tensor:
        return self.square_sum.sqrt().float()

    @property
    def hessian(self) -> torch.Tensor:
        if self.gram is None:
            raise RuntimeError("these statistics were gathered without the Hessian")
        return self.gram / max(self.tokens, 1)
