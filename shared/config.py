"""Typed recipe configs: dataclass schemas loaded from YAML with ``key=value`` overrides.

Every recipe declares its schema as nested dataclasses. :func:`load_config` reads YAML with ``yaml.safe_load``,
applies the recipe's ``quick`` overrides (for ``--quick``) and the command line's ``key=value`` overrides, and
checks every key and type before any work starts: an unknown or misspelt key fails with the valid keys listed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from modaltune.shared.errors import ConfigError, suggest

C = TypeVar("C")


def field_docs(cls: type) -> dict[str, str]:
    """The ``help`` metadata of each field of a dataclass schema (used by ``--help`` and the docs test)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def doc(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a one-line ``help`` text; mutable defaults are copied per instance.

    ``factory`` builds the default instead (e.g. a section whose defaults differ from its class's own).
    """
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: typing.cast(Any, value).copy(), metadata={"help": help})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def from_dict(cls: type[C], data: Any, where: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively.

    Example:
        >>> @dataclasses.dataclass
        ... class Opt:
        ...     lr: float = 1e-4
        >>> from_dict(Opt, {"lr": 3}).lr
        3.0
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown config key {path!r}{suggest(str(key), names)}; "
                f"valid keys{' under ' + repr(where) if where else ''}: {', '.join(names)}"
            )
        f = fields[key]
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and f.default_factory is not dataclasses.MISSING:
            # a partial section starts from this field's own default, not the section class's
            value = {**to_dict(f.default_factory()), **value}
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check(where)
    if not where:  # a whole config: checks across its sections
        for cross in CROSS_CHECKS:
            cross(obj)
    return obj


# Checks of a whole config that involve more than one section (e.g. an optimizer that refuses a tuning method),
# registered by the module that owns the rule; each raises ConfigError.
CROSS_CHECKS: list[Callable[[Any], None]] = []


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if tp is dict:
        tp = dict[str, Any]
    elif tp is list:
        tp = list[Any]
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean: `cache.mode=off` means "off"
        if value not in choices:
            raise ConfigError(
                f"{path}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
                f"{suggest(str(value), [str(c) for c in choices])}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str):  # `targets=q_proj` on the command line
                value = [value]
            else:
                raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a boolean: `cache.mode=off` means "off"
            return "on" if value else "off"
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported schema type {tp!r}")  # a schema bug, not a user error


def to_dict(cfg: Any) -> Any:
    """A plain-data copy of a config (for YAML/JSON)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``a.b=value`` strings; values are read as YAML (``lr=1e-4``, ``targets=[q_proj,v_proj]``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=50)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return out


def apply_dotted(data: dict[str, Any], dotted: dict[str, Any], source: str) -> dict[str, Any]:
    """Set ``a.b.c: value`` entries into a nested mapping (a copy); creates missing levels.

    A part may index a list: ``stages[1].max_steps: 200``.
    """
    result = _deep_copy(data)
    for key, value in dotted.items():
        node: Any = result
        parts = key.split(".")
        for depth, part in enumerate(parts):
            name, index = _split_index(part, key, source)
            last = depth == len(parts) - 1
            if index is None:
                if last:
                    node[name] = value
                    break
                child = node.get(name)
                if child is None:
                    child = node[name] = {}
            else:
                seq = node.get(name)
                if not isinstance(seq, list) or not -len(seq) <= index < len(seq):
                    raise ConfigError(f"{source}: cannot set {key!r}: {name!r} has no item {index}")
                if last:
                    seq[index] = value
                    break
                child = seq[index]
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: cannot set {key!r}: {part!r} is a value, not a section")
            node = child
    return result


def _split_index(part: str, key: str, source: str) -> tuple[str, int | None]:
    if not part.endswith("]"):
        return part, None
    name, _, index = part[:-1].partition("[")
    try:
        return name, int(index)
    except ValueError:
        raise ConfigError(f"{source}: {key!r}: list index in {part!r} must be a whole number") from None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(
    cls: type[C],
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    quick: bool = False,
    base: dict[str, Any] | None = None,
) -> C:
    """Load a recipe config: YAML file (or ``base``), then ``quick`` overrides, then command-line overrides.

    The YAML may hold a top-level ``quick:`` mapping of dotted keys; ``--quick`` applies it. Command-line
    overrides win over both.
    """
    data = read_yaml(path) if path is not None else _deep_copy(base or {})
    quick_overrides = data.get("quick") or {}
    if not isinstance(quick_overrides, dict):
        raise ConfigError("'quick' must be a mapping of dotted keys to values")
    if quick:
        data = apply_dotted(data, quick_overrides, "quick")
    data = apply_dotted(data, parse_overrides(overrides or []), "command line")
    return from_dict(cls, data)


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` laid over ``base``: mappings merge key by key, anything else (lists included) is replaced.

    Example:
        >>> overlay({"train": {"lr": 5e-4, "max_steps": 90}, "tags": [1]}, {"train": {"lr": 1e-4}, "tags": [2]})
        {'train': {'lr': 0.0001, 'max_steps': 90}, 'tags': [2]}
    """
    out = _deep_copy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = overlay(out[key], value)
        else:
            out[key] = _deep_copy(value)
    return out


def config_reference(cls: type, values: Any, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every key of schema ``cls`` as ``(dotted key, type, value, help)``, values taken from ``values`` (a resolved
    config of that schema); nested sections are walked, so the list is what ``key=value`` accepts."""
    hints = get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, value, tp = prefix + f.name, getattr(values, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            rows.append((key, "section", None, f.metadata.get("help", "")))
            rows += config_reference(tp, value, key + ".")
        else:
            rows.append((key, _type_name(tp), to_dict(value), f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    return getattr(tp, "__name__", str(tp))


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from modaltune.shared.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
