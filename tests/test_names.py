"""The names users type agree with the registries that implement them, and the command line starts without torch."""

import subprocess
import sys

from prunekit import names


def test_oneshot_names_match_the_method_registry():
    from prunekit import api

    assert tuple(api.METHODS) == names.ONESHOT_METHODS
    assert api.ONESHOT_ALLOCATIONS == names.ONESHOT_ALLOCATIONS
    assert set(names.ONESHOT_ALLOCATIONS) <= set(names.ALLOCATIONS)


def test_depth_names_match_the_depth_registry():
    from prunekit.depth.api import DEPTH_METHODS

    assert tuple(DEPTH_METHODS) == names.DEPTH_METHODS


def test_data_names_match_the_data_registry():
    from prunekit.data import api

    assert api.DATA_METHODS == names.DATA_METHODS
    assert api.MODES == names.DATA_MODES


def test_every_allocation_name_is_implemented():
    import torch

    from prunekit.allocation import allocate

    scores = {"a": torch.rand(8, 16), "b": torch.rand(16, 8)}
    for allocation in names.ALLOCATIONS:
        extra = {"min_density": 0.1} if allocation == "global-min" else {}
        masks = allocate(scores, 0.5, allocation, **extra)
        assert sum(int((~m).sum()) for m in masks.values()) == 128  # exactly half of the 256 weights removed


def test_the_command_line_parser_imports_no_heavy_module():
    code = ("import sys, prunekit.cli as cli; cli.build_parser(); "
            "print(' '.join(m for m in ('torch', 'transformers', 'numpy', 'pyarrow') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
