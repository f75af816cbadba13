"""Budgets and patterns: what fraction to remove, and in which shape.

One vocabulary for all of prunekit (DESIGN.md): `sparsity` is always the fraction of the targeted weights
that are zero, and `N:M` keeps N of every M consecutive weights along the input dimension.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from prunekit.errors import PrunekitError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """The shape a mask may take. `n` and `m` are None for unstructured sparsity."""

    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (1 - N/M); None for unstructured."""
        return None if self.m is None else 1.0 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.m is None else f"{self.n}:{self.m}"

    def check_width(self, width: int, layer: str) -> None:
        """Refuse a layer whose input width is not a whole number of M-groups."""
        if self.m is not None and width % self.m:
            raise PrunekitError(
                f"pattern {self} needs input widths divisible by {self.m}, but layer '{layer}' has width {width}"
            )


UNSTRUCTURED = Pattern()


def parse_pattern(text: str | Pattern | None) -> Pattern:
    """Parse 'unstructured' (or None) and 'N:M' with 0 < N < M."""
    if isinstance(text, Pattern):
        return text
    if text is None or text.strip().lower() == "unstructured":
        return UNSTRUCTURED
    match = _NM.match(text)
    if not match:
        raise PrunekitError(f"pattern '{text}' is not understood; use 'unstructured' or 'N:M' such as '2:4'")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise PrunekitError(
            f"pattern '{text}' is impossible: N:M keeps N of every M weights and needs 0 < N < M (e.g. 2:4)"
        )
    return Pattern(n, m)


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """A sparsity is a fraction removed, in [0, 1); 0 is a valid no-op."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise PrunekitError(f"{what} {sparsity!r} is not a number; use a fraction in [0, 1) such as 0.5") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise PrunekitError(f"{what} {sparsity!r} is outside [0, 1): it is the fraction of weights removed")
    return value


@dataclass(frozen=True)
class WeightBudget:
    """How many weights to remove and in which pattern: the target of one-shot weight pruning."""

    sparsity: float
    pattern: Pattern = UNSTRUCTURED

    def __str__(self) -> str:
        return str(self.pattern) if self.pattern.is_nm else f"{self.sparsity:g} unstructured"


def weight_budget(sparsity: float | None = None, pattern: str | Pattern | None = None) -> WeightBudget:
    """Reconcile `sparsity` with `pattern`: an N:M pattern fixes the sparsity at 1 - N/M."""
    parsed = parse_pattern(pattern)
    if parsed.is_nm:
        implied = parsed.sparsity
        if sparsity is not None and not math.isclose(check_sparsity(sparsity), implied, abs_tol=1e-9):
            raise PrunekitError(
                f"sparsity {sparsity} contradicts pattern {parsed}, which removes exactly {implied:g}; "
                "give one or the other"
            )
        return WeightBudget(implied, parsed)
    if sparsity is None:
        raise PrunekitError("no budget given: pass a sparsity in [0, 1) or an N:M pattern")
    return WeightBudget(check_sparsity(sparsity), parsed)
