"""Typed loading of YAML into frozen dataclasses, with errors that name the file, the line and the key.

The dataclass *is* the schema: its type hints say what each key holds, and `field(metadata=...)` adds bounds
and a one-line doc. The same definitions produce the JSON Schema shipped for editors (`json_schema`), so the
two cannot drift apart.

    >>> @dataclass(frozen=True)
    ... class Link:
    ...     bandwidth_gbps: float = field(metadata=spec(gt=0, doc="GB/s"))
    >>> build(Link, {"bandwidth_gbps": 16}, LineMap.empty("x.yaml"))
    Link(bandwidth_gbps=16.0)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Mapping, Union

from .errors import DescriptorError

Path_ = tuple  # a key path inside the document: ("backends", 0, "options", "device")


def spec(*, doc: str = "", ge: float | None = None, gt: float | None = None, finite: bool = False) -> dict:
    """Field metadata: a one-line doc and numeric bounds, read by the validator and the JSON Schema writer;
    `finite` also refuses NaN and infinities (which every comparison with a bound lets through)."""
    return {"doc": doc, "ge": ge, "gt": gt, "finite": finite}


@dataclass(frozen=True)
class LineMap:
    """Where each key and value of a YAML document sits (made by `dioe.yamlfile` as it reads the file)."""

    file: str
    lines: Mapping[Path_, int]

    @classmethod
    def empty(cls, file: str) -> "LineMap":
        return cls(file, {})

    def line(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest ancestor present in the document."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def error(self, path: Path_, message: str) -> DescriptorError:
        return DescriptorError(self.file, self.line(path), dotted(path), message)


def dotted(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _describe(tp: Any) -> str:
    """Human words for a type hint, used in 'expected ...' messages."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin in (Mapping, dict, typing.get_origin(Mapping[str, int])):
        k, v = typing.get_args(tp)
        return f"a mapping of {_describe(k)} to {_describe(v)}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in fields(tp))}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", Any: "any value"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def build(tp: Any, value: Any, where: LineMap, path: Path_ = ()) -> Any:
    """Check `value` against the type hint `tp` and convert it (lists to tuples, mappings to dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        _check_finite(value, where, path)
        return value
    if tp is type(None):
        if value is not None:
            raise where.error(path, f"expected null, got {value!r}")
        return None
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return build(option, value, where, path)
            except DescriptorError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise where.error(path, f"expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise where.error(path, f"expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):   # YAML and JSON give lists; a dataclass's asdict, tuples
            raise where.error(path, f"expected {_describe(tp)}, got {type(value).__name__} {value!r}")
        return tuple(build(item_tp, v, where, path + (i,)) for i, v in enumerate(value))
    if origin is not None and issubclass(origin, Mapping):
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise where.error(path, f"expected {_describe(tp)}, got {type(value).__name__} {value!r}")
        return {build(key_tp, k, where, path + (k,)): build(value_tp, v, where, path + (k,)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, where, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise where.error(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(path, f"expected an integer, got {value!r}")
        _check_finite(value, where, path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(path, f"expected a number, got {value!r}")
        _check_finite(value, where, path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise where.error(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"schema type {tp!r} is not supported")  # a bug in our schema, not in the user's file


@functools.cache
def _hints(cls: type) -> dict:
    """A dataclass's type hints, resolved once: resolving them costs more than building the value."""
    return typing.get_type_hints(cls)


def _build_dataclass(cls: type, value: Any, where: LineMap, path: Path_) -> Any:
    if not isinstance(value, dict):
        raise where.error(path, f"expected {_describe(cls)}, got {type(value).__name__} {value!r}")
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    for key in value:
        if key not in known:
            near = [k for k in known if k.startswith(str(key)[:3])]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise where.error(path + (key,), f"unknown key{hint}; expected one of: {', '.join(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                raise where.error(path + (name,), f"missing required key; expected {_describe(hints[name])}")
            continue
        built = build(hints[name], value[name], where, path + (name,))
        _check_bounds(built, f.metadata, where, path + (name,))
        kwargs[name] = built
    obj = cls(**kwargs)
    check = getattr(obj, "_validate", None)
    if check is not None:
        check(where, path)  # cross-field rules the types alone cannot say
    return obj


def _check_finite(value: Any, where: LineMap, path: Path_) -> None:
    """Every number finite, also inside free-form values: .inf and .nan are valid YAML floats, and would reach
    int() (an OverflowError) or slip through every comparison (nan < 0 is False)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise where.error(path, f"expected a finite number, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            raise where.error(path, f"expected a finite number, got an integer of {len(str(value))} digits") \
                from None
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, where, path + (i,))
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, where, path + (k,))


def _check_bounds(value: Any, meta: Mapping, where: LineMap, path: Path_) -> None:
    items = [(path + (k,), v) for k, v in value.items()] if isinstance(value, Mapping) else [(path, value)]
    for at, v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if meta.get("finite") and not math.isfinite(v):
            raise where.error(at, f"expected a finite number, got {v!r}")
        if meta.get("ge") is not None and v < meta["ge"]:
            raise where.error(at, f"expected a number >= {meta['ge']}, got {v!r}")
        if meta.get("gt") is not None and v <= meta["gt"]:
            raise where.error(at, f"expected a number > {meta['gt']}, got {v!r}")


def json_schema(tp: Any, meta: Mapping | None = None) -> dict:
    """The JSON Schema (draft 2020-12) of a type hint or dataclass, for editors that validate YAML."""
    meta = meta or {}
    origin = typing.get_origin(tp)
    out: dict[str, Any]
    if tp is Any:
        out = {}
    elif tp is type(None):
        out = {"type": "null"}
    elif origin in (Union, types.UnionType):
        out = {"anyOf": [json_schema(a) for a in typing.get_args(tp)]}
    elif origin is Literal:
        out = {"enum": list(typing.get_args(tp))}
    elif origin is tuple:
        out = {"type": "array", "items": json_schema(typing.get_args(tp)[0])}
    elif origin is not None and issubclass(origin, Mapping):
        key_tp, value_tp = typing.get_args(tp)
        out = {"type": "object", "additionalProperties": json_schema(value_tp, meta)}
        if typing.get_origin(key_tp) is Literal:
            out["propertyNames"] = {"enum": list(typing.get_args(key_tp))}
        meta = {}
    elif dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props = {f.name: json_schema(hints[f.name], f.metadata) for f in fields(tp) if f.init}
        required = [f.name for f in fields(tp)
                    if f.init and f.default is MISSING and f.default_factory is MISSING]
        out = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            out["required"] = required
        if tp.__doc__:
            out["description"] = tp.__doc__.strip().splitlines()[0]
    else:
        out = {"type": {str: "string", int: "integer", float: "number", bool: "boolean"}[tp]}
    if meta.get("doc"):
        out["description"] = meta["doc"]
    if meta.get("ge") is not None:
        out["minimum"] = meta["ge"]
    if meta.get("gt") is not None:
        out["exclusiveMinimum"] = meta["gt"]
    return out


__all__ = ["LineMap", "build", "dotted", "field", "json_schema", "spec"]
