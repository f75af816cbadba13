"""Every option of the one-shot methods is refused with one line naming the bad value, before any model changes."""

import math

import pytest

from prunekit.errors import PrunekitError
from prunekit.weights.ecoflap import check_ecoflap_options
from prunekit.weights.methods import PruneOptions


@pytest.mark.parametrize("field, value, message", [
    ("admm_rho", 0.0, "rho 0.0"), ("admm_rho", -1.0, "rho -1.0"), ("admm_rho", math.nan, "rho nan"),
    ("admm_rho", math.inf, "rho inf"), ("admm_rho", "1", "rho '1'"), ("admm_rho", True, "rho True"),
    ("admm_iterations", -1, "iterations -1"), ("admm_iterations", 2.5, "iterations 2.5"),
    ("admm_iterations", True, "iterations True"), ("admm_ramp", 0, "ramp 0"),
    ("admm_damping", 1.0, "damping 1.0"), ("admm_damping", math.nan, "damping nan"),
    ("dsnot_cycles", -1, "cycles -1"), ("dsnot_cycles", 1.5, "cycles 1.5"), ("dsnot_cycles", None, "cycles None"),
])
def test_bad_method_options_raise_one_line(field, value, message):
    with pytest.raises(PrunekitError, match=message) as error:
        PruneOptions(**{field: value})
    assert "\n" not in str(error.value)


def test_good_options_are_recorded():
    options = PruneOptions(admm_rho=0.5, admm_iterations=0, dsnot_cycles=0)
    assert options.as_dict()["admm_rho"] == 0.5 and options.as_dict()["dsnot_cycles"] == 0


@pytest.mark.parametrize("directions, epsilon, message", [
    (0, 1e-3, "directions 0"), (1.5, 1e-3, "directions 1.5"), (2, 0.0, "epsilon 0.0"), (2, 1.0, "epsilon 1.0"),
    (2, math.nan, "epsilon nan"),
])
def test_bad_ecoflap_options_raise_one_line(directions, epsilon, message):
    with pytest.raises(PrunekitError, match=message) as error:
        check_ecoflap_options(directions, epsilon)
    assert "\n" not in str(error.value)
