"""Typed configuration: YAML and ``key=value`` overrides become frozen dataclasses.

Configuration stops here. Builders elsewhere take the parsed values as flat keyword
arguments; no class downstream receives a config object whole.

An unknown key, a value of the wrong type, or a malformed override is a ``ConfigError``
that names the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot be used, with the key that holds it."""


def parse(cls: type, data: Any, *, where: str = "") -> Any:
    """Builds the dataclass ``cls`` from plain data (dicts, lists, scalars), checking every key.

    Args:
        cls: a dataclass type, possibly with nested dataclasses, lists, dicts, unions and literals.
        data: the mapping read from YAML.
        where: the dotted key of ``data`` (used in error messages).

    Returns:
        An instance of ``cls``.
    """
    return _convert(cls, data, where or cls.__name__)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, key)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, key)
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_convert(k_tp, k, f"{key}.{k}"): _convert(v_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    raise ConfigError(f"{key}: unsupported type {tp!r} in the config schema")


def _convert_union(tp: Any, value: Any, key: str) -> Any:
    options = get_args(tp)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: a value is required")
    # Dataclasses accept mappings; scalars go to the scalar members. Try in declared order.
    errors = []
    for option in options:
        if option is type(None):
            continue
        if dataclasses.is_dataclass(option) and not isinstance(value, dict):
            continue
        try:
            return _convert(option, value, key)
        except ConfigError as err:
            errors.append(str(err))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    names = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _convert_dataclass(cls: type, value: Any, key: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of {cls.__name__} fields, got {value!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(
            f"{key}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, field in fields.items():
        sub = f"{key}.{name}"
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a check across fields (__post_init__): say where in the file it failed
        raise ConfigError(f"{key}: {err}" if key and not str(err).startswith(key) else str(err)) from None


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Applies ``a.b.c=value`` strings to nested plain data (values are parsed as YAML scalars).

    ``tasks=[cola,rte]`` and ``optim.lr=3e-5`` both work; a key path through a non-mapping
    is an error.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r}: empty key in {path!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads 3e-5 as a string; a user means a number
        data = _set_path(data, keys, value, item)
    return data


def _set_path(node: Any, keys: list[str], value: Any, item: str) -> Any:
    """A copy of ``node`` with ``value`` at ``keys``; a numeric key indexes a list (``methods.1.name``)."""
    key, rest = keys[0], keys[1:]
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise ConfigError(f"override {item!r}: {key!r} is not an index of a list of {len(node)}")
        copy = list(node)
        copy[int(key)] = _set_path(copy[int(key)], rest, value, item) if rest else value
        return copy
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: cannot set {key!r} inside {node!r}")
    copy = dict(node)
    copy[key] = _set_path(copy.get(key), rest, value, item) if rest else value
    return copy


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text) and text.strip().lower() not in {"nan", "inf", "-inf"}


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (YAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:  # the mapping's own keys: `<<: *anchor` merges may be overridden
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = key_node.value
        if key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]}, again on line {line})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping (safe loader, duplicate keys refused); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return _fix_yaml_floats(data)


def _fix_yaml_floats(node: Any) -> Any:
    # PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; treat such strings as numbers.
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and "e" in node.lower() and _looks_numeric(node):
        return float(node)
    return node


def load(cls: type, path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Any:
    """Reads ``path`` (or nothing), applies overrides and validates into ``cls``."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    where = Path(path).name if path is not None else cls.__name__
    return parse(cls, data, where=where)


def first_difference(old: Any, new: Any, key: str = "") -> str | None:
    """The dotted key of the first difference between two plain-data configs, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if found is not None:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{key}.{i}")
            if found is not None:
                return found
        return None
    return None if old == new else (key or "<root>")


def closest(value, known, *, cutoff: float = 0.6) -> str | None:
    """The registered name closest to a misspelt ``value`` (difflib), or None: the "did you mean"
    of every name check."""
    import difflib

    close = difflib.get_close_matches(str(value), list(known), n=1, cutoff=cutoff)
    return close[0] if close else None


def check_same_settings(stored: dict, current: dict, *, where: str, ignore: tuple[str, ...] = ()) -> None:
    """Raises ConfigError when a resumed run's stored settings differ from the current ones."""
    key = first_difference(_drop(stored, ignore), _drop(current, ignore))
    if key is not None:
        raise ConfigError(f"{where} was made with different settings ({key}: {_get(stored, key)!r} then, "
                          f"{_get(current, key)!r} now); use another output_dir or delete it to start over")


def _drop(data: dict, dotted: tuple[str, ...]) -> dict:
    data = json.loads(json.dumps(data))
    for path in dotted:
        node = data
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(keys[-1], None)
    return data


def _get(data: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if isinstance(data, dict):
            data = data.get(k)
        elif isinstance(data, list) and k.isdigit() and int(k) < len(data):
            data = data[int(k)]
        else:
            return None
    return data
