"""Structured pruning: coupled groups (attention KV groups and MLP neurons declared by the adapters; channels of
any torch.fx-traceable model from its dependency graph), scorers, selection under a parameter budget, physical
removal with config sync, or masks."""

from prunekit.names import STRUCTURE_ALLOCATIONS, STRUCTURE_METHODS
from prunekit.structure.api import (
    check_structure_options,
    describe_structure,
    load_widths,
    prune_structure,
    saved_widths,
)
from prunekit.structure.batchnorm import recalibrate_batchnorm
from prunekit.structure.select import MODES, UNIT_KINDS

__all__ = ["MODES", "STRUCTURE_ALLOCATIONS", "STRUCTURE_METHODS", "UNIT_KINDS", "check_structure_options",
           "describe_structure", "load_widths", "prune_structure", "recalibrate_batchnorm", "saved_widths"]
