"""Config helpers shared by configs/ and the trainers: validation, hashing, persistence.

Configs are ml_collections ConfigDicts built by `configs/*.py:get_config(arg)`. Trainers call
`check(...)` on every field they rely on before any data read or compile, so a bad value
fails in a second, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def check_choice(config: Any, field: str, choices: tuple[str, ...]) -> None:
    value = get(config, field)
    check(value in choices, field, f"must be one of {choices}, got {value!r}")


def check_positive(config: Any, field: str, *, allow_zero: bool = False) -> None:
    value = get(config, field)
    ok = isinstance(value, int | float) and (value >= 0 if allow_zero else value > 0)
    check(ok, field, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def to_dict(config: Any) -> dict:
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def config_hash(config: Any, *, ignore: tuple[str, ...] = ()) -> str:
    """A short stable hash of the resolved config (fields in `ignore` excluded, dotted)."""
    tree = to_dict(config)
    for dotted in ignore:
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    payload = json.dumps(tree, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def save_json(config: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config (what actually ran) next to the results."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_dict(config), f, indent=2, sort_keys=True, default=str)
