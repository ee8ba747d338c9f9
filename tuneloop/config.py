"""Typed configuration: dataclasses loaded from YAML, env and ``key=value`` overrides.

Contract
--------
* Every config is a (possibly nested) dataclass whose fields carry their help
  text in ``field(metadata={"help": ...})`` — the TRL ``SFTConfig`` habit.
* :func:`build` merges, in increasing priority: the dataclass defaults, a YAML
  mapping (a file or a dict), environment variables ``TUNELOOP_<SECTION>__<FIELD>``
  (only when ``env_prefix`` is given; any other variable with that prefix is an
  error unless named in ``env_other``) and ``key=value`` overrides where ``key``
  may be dotted (``lora.r=16``).
* Values are coerced to the field's annotated type (``int``, ``float``, ``bool``,
  ``str``, ``list[...]``, ``Optional[...]``, nested dataclasses). Values in
  overrides are parsed as YAML scalars/lists (``targets=[q_proj,v_proj]``).
* An unknown key raises :class:`ConfigError` naming the valid keys; a value of
  the wrong type raises :class:`ConfigError` naming the key and expected type.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix (unknown key, bad type, bad file)."""


def field_help(cls: type[DataclassInstance]) -> dict[str, str]:
    """Flat ``{dotted_key: help}`` for every leaf field of ``cls`` (recursing)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            for k, v in field_help(tp).items():
                out[f"{f.name}.{k}"] = v
        else:
            default = _default_of(f)
            h = f.metadata.get("help", "")
            out[f.name] = f"{h} (default: {default!r})" if h else f"(default: {default!r})"
    return out


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def load_yaml(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; ``None`` or a missing default file gives ``{}``."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[x,y]"]`` -> nested dict ``{"a": {"b": 1}, "c": ["x", "y"]}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key, value)
    return out


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {key!r} conflicts with a scalar value")
    d[parts[-1]] = value


def env_overrides(
    cls: type[DataclassInstance],
    prefix: str,
    environ: Mapping[str, str] | None = None,
    other: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """Values from ``{prefix}SECTION__FIELD`` env vars (``__`` separates levels).

    Every other variable starting with ``prefix`` is an error naming the valid ones (a misspelt
    key must not be ignored), except the names in ``other`` (variables that are not settings keys,
    e.g. ``TUNELOOP_HOME``)."""
    environ = os.environ if environ is None else environ
    valid = set(field_help(cls))
    out: dict[str, Any] = {}
    unknown = []
    for k, raw in environ.items():
        if not k.startswith(prefix) or k in other:
            continue
        key = k[len(prefix) :].lower().replace("__", ".")
        if key not in valid:
            unknown.append(k)
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key, value)
    if unknown:
        keys = ", ".join(prefix + k.upper().replace(".", "__") for k in sorted(valid))
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(sorted(unknown))}: {prefix}<SECTION>__<KEY> must name a "
            f"settings key (see `tuneloop config keys`). Valid settings variables: {keys}; other variables: "
            f"{', '.join(sorted(other))}"
        )
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def build(
    cls: type[T],
    data: Mapping[str, Any] | None = None,
    overrides: list[str] | None = None,
    env_prefix: str | None = None,
    path: str = "",
    env_other: frozenset[str] | set[str] = frozenset(),
) -> T:
    """Instantiate dataclass ``cls`` from ``data`` + env + ``overrides`` (see module doc)."""
    merged: dict[str, Any] = dict(data or {})
    if env_prefix:
        merged = deep_merge(merged, env_overrides(cls, env_prefix, other=env_other))
    merged = deep_merge(merged, parse_overrides(overrides))
    return from_dict(cls, merged, path)


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build ``cls`` from a mapping, coercing types; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in section '{path}'" if path else ""
        raise ConfigError(f"unknown config key(s){where}: {', '.join(unknown)}. Valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value or {}, key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, key) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if tp is Path:
        return Path(str(value))
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (for recording a run's config)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(obj).items()}
