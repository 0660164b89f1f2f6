"""Typing tool-call argument values by the tools' JSON schemas.

GLM-5 writes every argument value as raw text between ``<arg_value>`` tags:
strings verbatim, everything else as JSON. To rebuild typed JSON arguments
the parser asks, per (tool, argument):

* ``STRING``  - the schema allows only strings: keep the raw text, never
  strip it; these values can be streamed as they arrive;
* ``UNION``   - strings and other types (``["string", "null"]``,
  ``anyOf``...): JSON-decode and keep the result only if its type is allowed,
  else keep the raw text;
* ``TYPED``   - no string allowed: JSON-decode, then Python-literal-decode,
  else keep the raw text;
* ``INFER``   - unknown tool/argument or no usable schema: like ``TYPED``.

Only ``STRING`` values stream; the others are buffered until ``</arg_value>``
so that JSON normalisation never rewrites text already sent.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

__all__ = ["ToolSchemas", "ValueKind", "convert_value", "json_type"]


class ValueKind(Enum):
    STRING = "string"
    UNION = "union"
    TYPED = "typed"
    INFER = "infer"


_MAX_LITERAL_LEN = 10_000


def json_type(value: Any) -> str:
    """JSON-schema type name of a decoded JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "unknown"


def _is_json_value(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
    return False


def _decode_lenient(raw: str) -> tuple[bool, Any]:
    """``(ok, value)``: JSON first, then a Python literal; only JSON-representable results."""
    try:
        value = json.loads(raw)
        if _is_json_value(value):
            return True, value
    except (ValueError, RecursionError):
        pass
    if len(raw) <= _MAX_LITERAL_LEN:
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return False, None
        if isinstance(value, tuple):
            value = list(value)
        if _is_json_value(value):
            return True, value
    return False, None


def _allows(types: frozenset[str], value: Any) -> bool:
    t = json_type(value)
    return t in types or (t == "integer" and "number" in types)


def convert_value(raw: str, kind: ValueKind, types: frozenset[str] | None = None) -> Any:
    """Typed value of the raw ``<arg_value>`` text for a value of ``kind``."""
    if kind is ValueKind.STRING:
        return raw
    ok, value = _decode_lenient(raw)
    if kind is ValueKind.UNION:
        if ok and not isinstance(value, str) and types is not None and _allows(types, value):
            return value
        return raw
    return value if ok else raw


class ToolSchemas:
    """Index of OpenAI tool definitions by function name.

    Accepts ``{"type": "function", "function": {...}}`` items or bare
    ``{"name", "parameters"}`` function objects; ignores anything else.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self._params: dict[str, Mapping[str, Any]] = {}
        for tool in tools or ():
            if not isinstance(tool, Mapping):
                continue
            fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
            name = fn.get("name")
            if isinstance(name, str):
                params = fn.get("parameters")
                self._params[name] = params if isinstance(params, Mapping) else {}
        self.declared = bool(tools)

    @property
    def names(self) -> list[str]:
        return list(self._params)

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def longest_name_prefix(self, text: str) -> str | None:
        """The longest declared tool name that ``text`` starts with and is longer than."""
        best = None
        for name in self._params:
            if len(text) > len(name) and text.startswith(name) and (best is None or len(name) > len(best)):
                best = name
        return best

    def types_of(self, tool: str, arg: str) -> frozenset[str] | None:
        """Allowed JSON types of argument ``arg`` of ``tool``; ``None`` if unknown."""
        params = self._params.get(tool)
        if params is None:
            return None
        props = params.get("properties")
        if not isinstance(props, Mapping) or arg not in props:
            return None
        types = _schema_types(props[arg], params, 0)
        return frozenset(types) if types else None

    def kind_of(self, tool: str, arg: str) -> ValueKind:
        types = self.types_of(tool, arg)
        if types is None:
            return ValueKind.INFER
        if types == {"string"}:
            return ValueKind.STRING
        if "string" in types:
            return ValueKind.UNION
        return ValueKind.TYPED


def _resolve_ref(ref: str, root: Mapping[str, Any]) -> Any:
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            defs = root.get(prefix[2:-1])
            if isinstance(defs, Mapping):
                return defs.get(ref[len(prefix):])
    return None


def _schema_types(schema: Any, root: Mapping[str, Any], depth: int) -> set[str] | None:
    """Set of JSON types a (sub)schema admits; ``None`` when unconstrained/unknown."""
    if not isinstance(schema, Mapping) or depth > 8:
        return None
    if isinstance(schema.get("$ref"), str):
        return _schema_types(_resolve_ref(schema["$ref"], root), root, depth + 1)
    types: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        types.add(declared)
    elif isinstance(declared, list):
        types.update(t for t in declared if isinstance(t, str))
    for key in ("anyOf", "oneOf"):
        subs = schema.get(key)
        if isinstance(subs, list) and subs:
            for sub in subs:
                sub_types = _schema_types(sub, root, depth + 1)
                if sub_types is None:
                    return None
                types |= sub_types
    subs = schema.get("allOf")
    if isinstance(subs, list):
        constrained = [t for t in (_schema_types(s, root, depth + 1) for s in subs) if t]
        if constrained:
            common = set.intersection(*constrained)
            types = (types & common) if types else common
    if isinstance(schema.get("enum"), list) and not declared:
        types.update(json_type(v) for v in schema["enum"])
    if "const" in schema and not declared:
        types.add(json_type(schema["const"]))
    return types or None
