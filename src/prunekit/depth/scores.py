"""Block scorers for depth pruning: pure functions of hidden states (or of a perplexity oracle), and the baselines.

The hidden state entering block l is x_l (x_0: the embeddings' output, x_L: the last block's output, before the
final norm). A scorer only says how removable blocks are; `choose_*` turns scores into the removed block indices.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.errors import PrunekitError
from prunekit.select import top_k_indices


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows of `a` and `b` [..., hidden], in float64 (residual streams are large and
    nearly parallel, where float32 cosines lose the digits that separate blocks)."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean angular distance arccos(cos(a, b)) / pi over matching rows of [..., hidden] (Gromov et al. 2024, eq. 7),
    in [0, 1]."""
    return float(torch.arccos(_cosine(a, b)).mean() / torch.pi)


def block_influence(block_input: torch.Tensor, block_output: torch.Tensor) -> float:
    """ShortGPT's block influence (Men et al. 2024, eq. 2): 1 - E[cos(x_l, x_{l+1})] over every token of every
    sample. Low influence: the block barely turns the residual stream, so removing it changes little."""
    return float(1.0 - _cosine(block_input, block_output).mean())


def choose_run(distances: list[float], n: int) -> list[int]:
    """The `n` contiguous blocks l*, ..., l*+n-1 whose ends are closest: l* = argmin_l d(x_l, x_{l+n}), where
    `distances[l]` = d(x_l, x_{l+n}) for every start l (Gromov et al. 2024); ties go to the shallower start."""
    if n < 1 or not distances:
        raise PrunekitError(f"a run of {n} blocks needs n >= 1 and at least one start; got {len(distances)} starts")
    start = int(top_k_indices(np.asarray(distances), 1, largest=False)[0])
    return list(range(start, start + n))


def choose_lowest(scores: list[float], n: int) -> list[int]:
    """The `n` blocks of lowest score (block influence), sorted; ties go to the lower index."""
    return sorted(int(i) for i in top_k_indices(np.asarray(scores), n, largest=False))


def reverse_order(num_blocks: int, n: int) -> list[int]:
    """The baseline that drops the deepest blocks but spares the final one, whose removal is known to be costly:
    blocks L-1-n .. L-2 (the "simple heuristic" of Gromov et al. 2024, section 4; ShortGPT's reverse order drops
    the final block too, a weaker baseline)."""
    if not 0 <= n < num_blocks:
        raise PrunekitError(f"cannot remove {n} of {num_blocks} blocks; use 0 <= n < {num_blocks}")
    return list(range(num_blocks - 1 - n, num_blocks - 1))


def random_blocks(num_blocks: int, n: int, seed: int) -> list[int]:
    """`n` distinct blocks drawn uniformly with `seed` (the random baseline), sorted."""
    if not 0 <= n < num_blocks:
        raise PrunekitError(f"cannot remove {n} of {num_blocks} blocks; use 0 <= n < {num_blocks}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(int(i) for i in torch.randperm(num_blocks, generator=generator)[:n])


def sleb_greedy(num_blocks: int, n: int, perplexity_without: Callable[[list[int]], float],
                candidates: list[int] | None = None) -> tuple[list[int], list[list[float | None]]]:
    """SLEB (Song et al. 2024, algorithm 1): remove one block at a time, each time the block whose removal (beside
    those already removed) gives the lowest calibration perplexity, re-scoring every remaining block after each
    removal. `perplexity_without(removed)` is the calibration perplexity with the blocks `removed` skipped.

    Only `candidates` (default: every block) are scored and removed. Returns the removed blocks in removal order
    and, per step, every block's perplexity (None: removed before, or not a candidate). Ties go to the lower index.
    """
    allowed = set(range(num_blocks) if candidates is None else candidates)
    if n > len(allowed):
        raise PrunekitError(f"cannot remove {n} of the {len(allowed)} candidate blocks; remove at most {len(allowed)}")
    removed: list[int] = []
    steps: list[list[float | None]] = []
    for _ in range(n):
        step = [perplexity_without(sorted([*removed, b])) if b in allowed and b not in removed else None
                for b in range(num_blocks)]
        best = min((b for b in allowed if b not in removed), key=lambda b: (step[b], b))
        removed.append(best)
        steps.append(step)
    return removed, steps
