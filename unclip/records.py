"""Records read from files (an export's config.json, a CLIP record) become configs only through here.

An export is something users share: its config.json is data written by someone else. Nothing in it
may reach a constructor unchecked, so every record is read against the dataclass it configures, an
allowlist: a key the dataclass does not have, a value of another type, or a nested record that is
not an object is refused with a RecordError naming the file and the key (`prior.diffusion.eta`).
Keys a record lacks take the dataclass's default (older exports were written with fewer fields).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A record that does not fit its schema; the message names the file and the key."""


def read_json_object(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A JSON file that must hold an object: any other content is a RecordError naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise RecordError(f"{path}: the {what} is empty")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(
            f"{path}: the {what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(value, dict):
        raise RecordError(f"{path}: the {what} must be a JSON object, not {_kind(value)}")
    return value


def from_record(cls: type, raw: Any, where: str, exclude: tuple[str, ...] = ()) -> Any:
    """`cls(**raw)` for a record read from a file, after checking every key and type (recursively
    for nested dataclasses). `where` names the file and key path for errors; `exclude` lists fields
    a record may not set even though the dataclass has them."""
    return cls(**check_record(cls, raw, where, exclude))


def check_record(cls: type, raw: Any, where: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record's keys and values, checked against `cls`'s fields and type hints; nested dataclass
    records become instances, JSON lists become tuples where the hint is a tuple."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where} must be an object, not {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            refused = "is not allowed in a record" if key in exclude else "is not a known key"
            raise RecordError(f"{where}.{key} {refused} (known: {', '.join(allowed)})")
        out[key] = check_value(value, hints[key], f"{where}.{key}")
    return out


def check_value(value: Any, hint: Any, where: str) -> Any:
    """`value` if it has the type `hint` describes (converted where JSON cannot say: list -> tuple,
    record -> dataclass), else a RecordError."""
    if dataclasses.is_dataclass(hint):
        return from_record(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return check_value(value, option, where)
            except RecordError as e:
                errors.append(e)
        raise RecordError(f"{where} must be {_describe(hint)}, got {_shown(value)}")
    if hint is type(None):
        if value is not None:
            raise RecordError(f"{where} must be null, got {_shown(value)}")
        return None
    if hint is Any:
        return _plain_json(value, where)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            raise RecordError(f"{where} must be a list, got {_shown(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecordError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or hint is tuple) else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where} must be an object, got {_shown(value)}")
        item = args[1] if len(args) == 2 else Any
        return {str(k): check_value(v, item, f"{where}.{k}") for k, v in value.items()}
    return _scalar(value, hint, where)


def _scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise RecordError(f"{where} must be true or false, got {_shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"{where} must be an integer, got {_shown(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RecordError(f"{where} must be a finite number, got {_shown(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecordError(f"{where} must be a string, got {_shown(value)}")
        return value
    raise RecordError(f"{where}: values of type {_describe(hint)} cannot come from a record")


def _plain_json(value: Any, where: str) -> Any:
    """Any JSON value (strings, finite numbers, booleans, null, lists and objects of them)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _scalar(value, float, where)
    if isinstance(value, list | tuple):
        return [_plain_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain_json(v, f"{where}.{k}") for k, v in value.items()}
    raise RecordError(f"{where} holds a {type(value).__name__}, which JSON cannot")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "an object"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (list, tuple) or hint in (list, tuple):
        return "a list"
    if typing.get_origin(hint) is dict:
        return "an object"
    return getattr(hint, "__name__", str(hint))


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _shown(value: Any) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
