"""JSON Schema -> a byte automaton, for ``response_format: {"type": "json_schema", ...}`` (structured outputs).

:func:`compile_schema` checks a schema against the subset below and returns a :class:`SchemaAutomaton` with the
interface :class:`glm5.structured.constrained.JsonGrammar` walks the token trie with: ``start()``, ``step(state, byte)``
(``None`` = the byte leaves every document the schema accepts), ``min_close(state)`` (bytes of the shortest
valid completion, each a single-byte token of a byte-level vocabulary) and ``complete(state)``.

Supported (anything else is refused with :class:`SchemaError`, naming the keyword and where it is, rather than
silently not enforced):
* ``type`` (one or a list), ``enum``, ``const``, ``anyOf`` / ``oneOf`` (oneOf's exclusivity is not checked, as in
  xgrammar), ``allOf`` with one member, local ``$ref`` (``#/$defs/...``, ``#/definitions/...``, ``#``; recursion
  allowed), boolean schemas;
* objects: ``properties``, ``required``, ``additionalProperties`` (``false``, ``true`` or a schema; **absent means
  false**, like xgrammar's and vLLM's strict default). Declared properties come in schema order, optional ones may
  be skipped; extra keys (when allowed) are printable ASCII without escapes, at most 64 bytes, after the last
  required property;
* arrays: ``items``, ``prefixItems`` (no further items unless ``items`` is given), ``minItems``, ``maxItems``;
* strings: ``minLength``, ``maxLength`` (in characters), ``pattern`` (a regular expression the text contains a match
  of, unless anchored; :mod:`glm5.structured.regex` lists the syntax: Python's, with ASCII ``\\d \\w \\s``), ``format``
  (``date``, ``time``, ``date-time``, ``email``, ``hostname``, ``ipv4``, ``uuid``); not a pattern or format together
  with a length; integers: ``minimum``, ``maximum``,
  ``exclusiveMinimum``, ``exclusiveMaximum``; numbers without bounds;
* annotations are ignored: ``title``, ``description``, ``default``, ``examples``, ``$schema``, ``$id``, ``$comment``,
  ``deprecated``, ``readOnly``, ``writeOnly``, ``strict``.

The automaton itself is :mod:`glm5.structured.schema_automaton`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .regex import RegexAutomaton
from .schema_automaton import MAX_EXTRA_KEY, SchemaAutomaton, SchemaError, SchemaNode

__all__ = ["SchemaError", "SchemaAutomaton", "compile_schema", "MAX_EXTRA_KEY"]

_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                          "readOnly", "writeOnly", "strict", "$defs", "definitions"})
_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": set(), "boolean": set(), "null": set(),
}
_GENERIC = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
MAX_NODES = 1024
MAX_DEPTH = 64


def _dump(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


# ============================================================================================== compiling
class _Compiler:
    def __init__(self, root):
        self.root = root
        self.nodes: list[SchemaNode] = []
        self.by_ref: dict[str, int] = {}

    def add(self, node: SchemaNode) -> int:
        if len(self.nodes) >= MAX_NODES:
            raise SchemaError(f"schema too large (more than {MAX_NODES} parts)")
        self.nodes.append(node)
        return len(self.nodes) - 1

    def ref(self, ref: str, path: str) -> int:
        if ref in self.by_ref:
            return self.by_ref[ref]
        if ref != "#" and not ref.startswith("#/"):
            raise SchemaError(f"only local $ref ('#/...') is supported, got {ref!r}", path)
        target = self.root
        for part in [p for p in ref[2:].split("/") if p] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise SchemaError(f"$ref {ref!r} does not resolve", path)
        nid = self.add(SchemaNode("ref"))  # placeholder first, so a recursive reference finds it
        self.by_ref[ref] = nid
        self.nodes[nid].target = self.compile(target, ref)
        return nid

    def compile(self, s: Any, path: str) -> int:
        if path.count("/") > MAX_DEPTH:
            raise SchemaError(f"schema nested deeper than {MAX_DEPTH} levels", path[:200])
        if s is True:
            return self.add(SchemaNode("any"))
        if s is False:
            return self.add(SchemaNode("never"))
        if not isinstance(s, dict):
            raise SchemaError("a schema must be an object or a boolean", path)
        unknown = set(s) - _ANNOTATIONS - _GENERIC - set().union(*_KEYWORDS.values())
        if unknown:
            raise SchemaError(f"unsupported keyword {sorted(unknown)[0]!r}", path)
        if "$ref" in s:
            if set(s) - _ANNOTATIONS - {"$ref"}:
                raise SchemaError("$ref next to other keywords is not supported", path)
            if not isinstance(s["$ref"], str):
                raise SchemaError("$ref must be a string", path)
            return self.ref(s["$ref"], path)
        if "allOf" in s:
            parts = s["allOf"]
            if not isinstance(parts, list) or len(parts) != 1 or set(s) - _ANNOTATIONS - {"allOf"}:
                raise SchemaError("allOf is supported only with a single member and nothing beside it", path)
            return self.compile(parts[0], f"{path}/allOf/0")
        for key in ("anyOf", "oneOf"):
            if key in s:
                alts = s[key]
                if not isinstance(alts, list) or not alts:
                    raise SchemaError(f"{key} must be a non-empty array", path)
                if set(s) - _ANNOTATIONS - {key}:
                    raise SchemaError(f"{key} next to other keywords is not supported; move them into each branch",
                                      path)
                alt_ids = [self.compile(a, f"{path}/{key}/{i}") for i, a in enumerate(alts)]
                return self.add(SchemaNode("union", alts=alt_ids))
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list):
                raise SchemaError("enum must be an array", path)
            types = s.get("type")
            types = [types] if isinstance(types, str) else types
            if isinstance(types, list):  # a value must also have one of the types
                values = [v for v in values if any(_is_type(v, t) for t in types)]
            lits = frozenset(_dump(v) for v in values)
            return self.add(SchemaNode("lit", lits=lits) if lits else SchemaNode("never"))
        types = s.get("type")
        if types is None:  # keywords imply the type, as JSON Schema validators read them
            implied = [t for t, kws in _KEYWORDS.items() if kws & set(s) and t != "number"]
            types = implied or list(_KEYWORDS)
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(not isinstance(t, str) or t not in _KEYWORDS for t in types):
            raise SchemaError(f"type must be one of {sorted(_KEYWORDS)} or a list of them", path)
        for key in set(s) - _ANNOTATIONS - _GENERIC:
            if not any(key in _KEYWORDS[t] for t in types):
                raise SchemaError(f"keyword {key!r} does not apply to type {types}"
                                  + (" (bounds are supported on integers only)" if "imum" in key else ""), path)
        if set(types) == set(_KEYWORDS) and not set(s) - _ANNOTATIONS - {"type"}:
            return self.add(SchemaNode("any"))
        alts = [self.typed(t, s, path) for t in dict.fromkeys(types)]
        return alts[0] if len(alts) == 1 else self.add(SchemaNode("union", alts=alts))

    def typed(self, t: str, s: dict, path: str) -> int:
        if t in ("boolean", "null"):
            return self.add(SchemaNode("lit", lits=frozenset([b"true", b"false"] if t == "boolean" else [b"null"])))
        if t == "number":
            return self.add(SchemaNode("num"))
        if t == "integer":
            lo, hi = _int_bound(s, "minimum", path, True), _int_bound(s, "maximum", path, False)
            ex_lo, ex_hi = _int_bound(s, "exclusiveMinimum", path, True), _int_bound(s, "exclusiveMaximum", path, False)
            lo = max([v for v in (lo, None if ex_lo is None else ex_lo + 1) if v is not None], default=None)
            hi = min([v for v in (hi, None if ex_hi is None else ex_hi - 1) if v is not None], default=None)
            if lo is not None and hi is not None and lo > hi:
                return self.add(SchemaNode("never"))
            return self.add(SchemaNode("int", lo=lo, hi=hi))
        if t == "string":
            lo, hi = _count(s, "minLength", path), _count(s, "maxLength", path)
            if "pattern" in s or "format" in s:
                return self.add(SchemaNode("pat", regex=_string_regex(s, lo, hi, path)))
            if hi is not None and (lo or 0) > hi:
                return self.add(SchemaNode("never"))
            return self.add(SchemaNode("str", min_len=lo or 0, max_len=hi))
        if t == "array":
            prefix = s.get("prefixItems", [])
            if not isinstance(prefix, list):
                raise SchemaError("prefixItems must be an array", path)
            prefix_ids = [self.compile(p, f"{path}/prefixItems/{i}") for i, p in enumerate(prefix)]
            if "items" in s:
                items = self.compile(s["items"], f"{path}/items")
            else:  # strict: no items beyond prefixItems; a plain array holds any values
                items = self.add(SchemaNode("never" if prefix else "any"))
            lo, hi = _count(s, "minItems", path) or 0, _count(s, "maxItems", path)
            if hi is not None and lo > hi:
                return self.add(SchemaNode("never"))
            return self.add(SchemaNode("arr", prefix=prefix_ids, items=items, min_items=lo, max_items=hi))
        # object
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError("properties must be an object", path)
        req = s.get("required", [])
        if not isinstance(req, list) or any(not isinstance(r, str) for r in req):
            raise SchemaError("required must be an array of strings", path)
        missing = [r for r in req if r not in props]
        extra_schema = s.get("additionalProperties", False)
        if missing:
            raise SchemaError(f"required property {missing[0]!r} must be declared in properties", path)
        plist = [(name, _dump(name)[1:], self.compile(p, f"{path}/properties/{name}")) for name, p in props.items()]
        extra = None if extra_schema is False else self.compile(extra_schema, f"{path}/additionalProperties")
        return self.add(SchemaNode("obj", props=plist, required=frozenset(req), extra=extra))


def _is_type(v, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, {"string": str, "boolean": bool, "null": type(None), "object": dict, "array": list}.get(t, ()))


def _int_bound(s: dict, key: str, path: str, lower: bool):
    v = s.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SchemaError(f"{key} must be a finite number", path)
    return math.ceil(v) if lower else math.floor(v)


# ``format`` values enforced, as full-match patterns over the string's text: RFC 3339 dates and times with the real
# month lengths and leap years, without year 0000 and leap second 60, which Python's datetime and pydantic
# refuse (the output must parse wherever it goes); the others in their common practical form. Others are refused.
_YEAR = r"(?:[1-9]\d{3}|0[1-9]\d\d|00[1-9]\d|000[1-9])"
_DAY = r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)|02-(?:0[1-9]|1\d|2[0-8]))"
_LEAP = r"(?:\d\d(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)-02-29"
_DATE = rf"(?:{_YEAR}-{_DAY}|{_LEAP})"
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": rf"{_DATE}[Tt]{_TIME}",
    "email": rf"[A-Za-z0-9._%+-]{{1,64}}@{_LABEL}(?:\.{_LABEL}){{1,8}}",
    "hostname": rf"{_LABEL}(?:\.{_LABEL}){{0,8}}",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}


def _string_regex(s: dict, lo, hi, path: str, json_string: bool = True) -> RegexAutomaton:
    """The automaton of a string's ``pattern`` (found anywhere in the text, as JSON Schema says, unless anchored) or
    ``format``, over the JSON string's body (``json_string``) or over the raw text."""
    if lo or hi is not None:
        raise SchemaError("pattern / format together with minLength / maxLength is not supported (bound the length in "
                          "the pattern instead, e.g. ^.{1,20}$)", path)
    if "pattern" in s and "format" in s:
        raise SchemaError("pattern and format together are not supported", path)
    if "format" in s:
        fmt = s["format"]
        if fmt not in FORMATS:
            raise SchemaError(f"format {fmt!r} is not supported (supported: {', '.join(FORMATS)})", path)
        return RegexAutomaton(FORMATS[fmt], json_string=json_string)
    pattern = s["pattern"]
    if not isinstance(pattern, str):
        raise SchemaError("pattern must be a string", path)
    try:
        return RegexAutomaton(pattern, search=True, json_string=json_string)
    except ValueError as e:
        raise SchemaError(f"pattern: {e}", path) from None


def raw_string_regex(s: dict, path: str = "#") -> RegexAutomaton | None:
    """For a string schema written raw, not JSON-encoded (GLM-5's string tool arguments): the automaton of its
    ``pattern`` / ``format``, None when it has neither. SchemaError as for :func:`compile_schema`."""
    if "pattern" not in s and "format" not in s:
        return None
    return _string_regex(s, _count(s, "minLength", path), _count(s, "maxLength", path), path, json_string=False)


def _count(s: dict, key: str, path: str):
    v = s.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SchemaError(f"{key} must be a non-negative integer", path)
    return v


def compile_schema(schema: Any, root: Any = None) -> "SchemaAutomaton":
    """Compile ``schema`` (a JSON Schema as parsed JSON); raises :class:`SchemaError` for what is not supported
    or cannot be satisfied. ``root``: the document its ``$ref`` pointers resolve in (default: ``schema``; a tool's
    ``parameters`` for one of its properties)."""
    c = _Compiler(schema if root is None else root)
    try:
        root = c.compile(schema, "#")
        return SchemaAutomaton(c.nodes, root)
    except SchemaError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError, RecursionError) as e:
        # malformed values the checks above do not name (a NaN in an enum, a list where a name belongs, ...)
        raise SchemaError(f"invalid schema: {type(e).__name__}: {e}") from None
