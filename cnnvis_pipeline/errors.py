"""User-facing errors and the safe-name rule.

- CnnvisError: an error the user can fix (bad input, bad config); the CLI prints its message and
  exits with status 2, without a traceback.
- check_name: names from the config (models, datasets, layers) become paths, so they must match a
  safe pattern.
- check_size: a config's size (values, YAML aliases counted where they are used, and depth) is
  bounded, measured without expanding the aliases, before anything walks or serialises it.
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


MAX_CONFIG_NODES = 100_000  # values of the config, every YAML alias counted where it is used
MAX_CONFIG_DEPTH = 32


def check_size(cfg, *, max_nodes: int = MAX_CONFIG_NODES,
               max_depth: int = MAX_CONFIG_DEPTH) -> None:
    """Raise CnnvisError when the config, with its YAML aliases expanded, would hold more than
    `max_nodes` values or nest deeper than `max_depth`.

    A YAML loader shares one object for every use of an anchor, so a few lines of aliases can
    stand for 10^9 values that only appear when something copies, validates or serialises the
    config. The count is computed once per distinct object (memoised by identity), so the
    check takes time in the size of the file, never in the size of the expansion.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    stack: list[tuple[object, str, int, bool]] = [(cfg, "config", 1, False)]
    while stack:
        node, where, level, done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if level > max_depth:
            raise CnnvisError(f"{where}: the config nests deeper than {max_depth} levels; "
                              "a configuration is never that deep (a YAML anchor bomb?)")
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        if done:
            sizes[id(node)] = 1 + sum(sizes.get(id(v), 1) for _, v in children)
            depths[id(node)] = 1 + max((depths.get(id(v), 0) for _, v in children), default=0)
            if sizes[id(node)] > max_nodes:
                raise CnnvisError(
                    f"{where}: the config holds more than {max_nodes:,} values with its YAML "
                    "aliases expanded (a YAML anchor bomb?); refused before anything reads it"
                )
            continue
        if id(node) in sizes:
            continue
        stack.append((node, where, level, True))
        for k, v in children:
            if isinstance(v, (dict, list)) and id(v) not in sizes:
                stack.append((v, f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]",
                              level + 1, False))
    depth = depths.get(id(cfg), 0)
    if depth > max_depth:  # a shared node reached at a shallower level first
        raise CnnvisError(f"config: nests {depth} levels deep, more than {max_depth} "
                          "(a YAML anchor bomb?)")
