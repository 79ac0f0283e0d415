"""Typed configs from TOML files with ``--set section.key=value`` overrides.

Every command validates its whole config before doing any work, so a typo in a TOML
file fails in a second with the file, the dotted field and what was expected, not an
hour into a run.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not match its schema."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value``; the value is read as a TOML literal, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return ``data`` with each ``section.key=value`` override written into it."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def describe_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        got = item.get("input")
        shown = "" if isinstance(got, Mapping) else f" (got {got!r})"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{source}: field '{field}': {message}{shown}")
    return "\n".join(lines)


def validate(schema: type[ModelT], data: Mapping[str, Any], source: str = "<config>") -> ModelT:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(source, exc)) from None


def load_config(
    schema: type[ModelT], path: str | Path | None = None, overrides: Iterable[str] = ()
) -> ModelT:
    """Load ``path`` (optional: schema defaults otherwise), apply overrides, validate."""
    data = read_toml(path) if path else {}
    overrides = list(overrides)
    apply_overrides(data, overrides)
    source = str(path) if path else "<defaults>"
    if overrides:
        source += " + --set " + " ".join(overrides)
    return validate(schema, data, source)
