"""Structured pruning: coupled groups (attention KV groups, MLP neurons), scorers, selection under a parameter
budget, physical removal with config sync, or masks."""

from prunekit.names import STRUCTURE_ALLOCATIONS, STRUCTURE_METHODS
from prunekit.structure.api import MODES, check_structure_options, load_widths, prune_structure, saved_widths
from prunekit.structure.select import UNIT_KINDS

__all__ = ["MODES", "STRUCTURE_ALLOCATIONS", "STRUCTURE_METHODS", "UNIT_KINDS", "check_structure_options",
           "load_widths", "prune_structure", "saved_widths"]
