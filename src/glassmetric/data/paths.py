"""Data paths of a config, with ``${NAME}`` replaced by the environment variable ``NAME``.

The real-data presets read their images from ``${GLASSMETRIC_DATA_ROOT}/<data set>``: set
``GLASSMETRIC_DATA_ROOT`` to the folder that holds the data sets (``cub50/``, ``cars_1_98/``, ...),
or give the data set's folder directly with ``data.root=...``. Variables are replaced when the
data is read, so a saved config stays valid on a machine whose data lives elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from glassmetric.errors import ConfigError

#: the environment variable the shipped presets name: the folder holding the data sets
DATA_ROOT_VARIABLE = "GLASSMETRIC_DATA_ROOT"

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_data_path(value: str, key: str) -> Path:
    """``value`` (the config's ``key``) with every ``${NAME}`` replaced by that variable.

    A variable that is unset or empty, or a path that does not exist, is a ConfigError naming
    the key, the variable and what to set.
    """

    def substitute(match: re.Match) -> str:
        name = match[1]
        found = os.environ.get(name)
        if not found:
            raise ConfigError(
                f"{key}: {value} needs the environment variable {name} (the folder that holds the data sets): "
                f"set {name}, or set {key} to the data set's own path"
            )
        return found

    path = Path(_VARIABLE.sub(substitute, value)).expanduser()
    if not path.exists():
        origin = f" ({value} with {', '.join(f'{n}={os.environ[n]}' for n in _VARIABLE.findall(value))})"
        raise ConfigError(f"{key}: {path} not found{origin if path != Path(value) else ''}; set {key} to where it is")
    return path
