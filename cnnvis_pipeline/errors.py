"""User-facing errors and the safe-name rule.

- CnnvisError: an error the user can fix (bad input, bad config); the CLI prints its message and
  exits with status 2, without a traceback.
- check_name: names from the config (models, datasets, layers) become paths, so they must match a
  safe pattern.
"""

from __future__ import annotations

import re


class CnnvisError(Exception):
    """An error caused by the user's input; its message names the file, row or config key."""


# Model and dataset names: one path component, no dots so no "..", no separators.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Layer names are dotted module paths ("layer4.1.conv2"); each part is a Python-ish identifier/index,
# optionally followed by "@K", the K-th call of a re-used module ("layer3.1.relu@2").
SAFE_LAYER = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*(@[1-9][0-9]{0,2})?$")


def check_name(kind: str, name: str, *, where: str = "config") -> str:
    """Return `name` if it is safe to use as a path component, else raise CnnvisError."""
    pattern = SAFE_LAYER if kind == "layer" else SAFE_NAME
    if not isinstance(name, str) or not pattern.match(name) or len(name) > 128:
        rule = (
            "dotted module names of letters, digits and '_' (e.g. layer4.1.conv2), optionally "
            "with @K for the K-th call of a re-used module (layer3.1.relu@2)"
            if kind == "layer"
            else "1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
        raise CnnvisError(f"{where}: {kind} name {name!r} is not allowed: names must be {rule}")
    return name
