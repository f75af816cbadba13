"""Errors that prunekit raises for bad input.

Anything a user can get wrong (a path, a budget, a pattern, a model family, calibration data) raises
`PrunekitError` with a one-line message naming the bad value and what would be accepted. The CLI turns
it into exit code 2; any other exception is an internal error (exit code 1).
"""


class PrunekitError(ValueError):
    """Bad input: the message names the problem and what would be accepted."""
