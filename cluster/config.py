"""Typed configs from TOML files with ``--set section.key=value`` overrides.

Every command validates its whole config before doing any work, so a typo in a TOML
file fails in a second with the file, the dotted field and what was expected, not an
hour into a run.
"""

from __future__ import annotations

import difflib
import inspect
import tomllib
from collections.abc import Iterable, Iterator, Mapping
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


def _section(schema: type[BaseModel], path: Iterable[Any]) -> type[BaseModel] | None:
    """The model class a dotted location sits in, or None where it leaves the nested models."""
    for part in path:
        field = schema.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        schema = annotation
    return schema


def suggest_field(schema: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The nearest real field to a misspelt one (``engine.lrr`` -> ``engine.lr``), if any is close."""
    section = _section(schema, loc[:-1])
    if section is None:
        return None
    matches = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return ".".join([*map(str, loc[:-1]), matches[0]]) if matches else None


def describe_errors(source: str, error: ValidationError, schema: type[BaseModel] | None = None) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        got = item.get("input")
        shown = "" if isinstance(got, Mapping) else f" (got {got!r})"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            nearest = suggest_field(schema, item["loc"]) if schema else None
            message = f"unknown field; did you mean {nearest}?" if nearest else "unknown field"
        lines.append(f"{source}: field '{field}': {message}{shown}")
    return "\n".join(lines)


def validate(schema: type[ModelT], data: Mapping[str, Any], source: str = "<config>") -> ModelT:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(source, exc, schema)) from None


def _field_comments(schema: type[BaseModel]) -> dict[str, str]:
    """Each field's comment in the class source: the trailing ``# ...`` or the comment lines above it."""
    try:
        source = inspect.getsource(schema).splitlines()
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in source:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        name = stripped.split(":", 1)[0]
        if name in schema.model_fields and ":" in stripped:
            trailing = stripped.split("  # ", 1)[1] if "  # " in stripped else ""
            comments[name] = trailing or " ".join(above)
        above = []
    return comments


def describe_fields(schema: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """One line per leaf field: ``section.name = default  # description`` (for ``--help-config``)."""
    comments = _field_comments(schema)
    for name, field in schema.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from describe_fields(annotation, f"{prefix}{name}.")
            continue
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        description = field.description or comments.get(name, "")
        yield f"{prefix}{name} = {default}" + (f"  # {description}" if description else "")


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
