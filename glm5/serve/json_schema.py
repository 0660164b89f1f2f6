"""JSON Schema -> a byte automaton, for ``response_format: {"type": "json_schema", ...}`` (structured outputs).

:func:`compile_schema` checks a schema against the subset below and returns a :class:`SchemaAutomaton` with the
interface :class:`glm5.serve.constrained.JsonGrammar` walks the token trie with: ``start()``, ``step(state, byte)``
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
* strings: ``minLength``, ``maxLength`` (in characters); integers: ``minimum``, ``maximum``,
  ``exclusiveMinimum``, ``exclusiveMaximum``; numbers without bounds;
* annotations are ignored: ``title``, ``description``, ``default``, ``examples``, ``$schema``, ``$id``, ``$comment``,
  ``deprecated``, ``readOnly``, ``writeOnly``, ``strict``.

Output is compact JSON with at most one whitespace byte between tokens (as for ``json_object``).

State: a frozenset of stacks (alternatives of ``anyOf`` and of ambiguous literals run side by side); a stack is a
tuple of frames, innermost last, and a value is complete when its frame is popped (the empty stack = done).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .json_automaton import DONE, json_complete, json_min_close, json_step, value_start

__all__ = ["SchemaError", "SchemaAutomaton", "compile_schema"]

INF = math.inf
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_NUM_FINAL = frozenset({"zero", "int", "frac", "exp"})
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                          "readOnly", "writeOnly", "strict", "$defs", "definitions"})
_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "string": {"minLength", "maxLength"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": set(), "boolean": set(), "null": set(),
}
_GENERIC = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
MAX_EXTRA_KEY = 64
MAX_NODES = 1024
MAX_DEPTH = 64


class SchemaError(ValueError):
    def __init__(self, message: str, path: str = "#"):
        super().__init__(f"{message} (at {path})")
        self.path = path


def _dump(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


class _Node:
    """A compiled schema: ``kind`` in any | never | lit | str | int | num | obj | arr | union | ref."""

    __slots__ = ("kind", "lits", "min_len", "max_len", "lo", "hi", "props", "required", "extra", "items",
                 "prefix", "min_items", "max_items", "alts", "target")

    def __init__(self, kind: str, **kw):
        self.kind = kind
        self.lits = self.props = self.required = self.prefix = self.alts = None
        self.min_len = self.min_items = 0
        self.max_len = self.max_items = self.lo = self.hi = self.extra = self.items = self.target = None
        for k, v in kw.items():
            setattr(self, k, v)


# ============================================================================================== compiling
class _Compiler:
    def __init__(self, root):
        self.root = root
        self.nodes: list[_Node] = []
        self.by_ref: dict[str, int] = {}

    def add(self, node: _Node) -> int:
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
        nid = self.add(_Node("ref"))  # placeholder first, so a recursive reference finds it
        self.by_ref[ref] = nid
        self.nodes[nid].target = self.compile(target, ref)
        return nid

    def compile(self, s: Any, path: str) -> int:
        if path.count("/") > MAX_DEPTH:
            raise SchemaError(f"schema nested deeper than {MAX_DEPTH} levels", path[:200])
        if s is True:
            return self.add(_Node("any"))
        if s is False:
            return self.add(_Node("never"))
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
                return self.add(_Node("union", alts=[self.compile(a, f"{path}/{key}/{i}") for i, a in enumerate(alts)]))
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list):
                raise SchemaError("enum must be an array", path)
            types = s.get("type")
            types = [types] if isinstance(types, str) else types
            if isinstance(types, list):  # a value must also have one of the types
                values = [v for v in values if any(_is_type(v, t) for t in types)]
            lits = frozenset(_dump(v) for v in values)
            return self.add(_Node("lit", lits=lits) if lits else _Node("never"))
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
            return self.add(_Node("any"))
        alts = [self.typed(t, s, path) for t in dict.fromkeys(types)]
        return alts[0] if len(alts) == 1 else self.add(_Node("union", alts=alts))

    def typed(self, t: str, s: dict, path: str) -> int:
        if t in ("boolean", "null"):
            return self.add(_Node("lit", lits=frozenset([b"true", b"false"] if t == "boolean" else [b"null"])))
        if t == "number":
            return self.add(_Node("num"))
        if t == "integer":
            lo, hi = _int_bound(s, "minimum", path, True), _int_bound(s, "maximum", path, False)
            ex_lo, ex_hi = _int_bound(s, "exclusiveMinimum", path, True), _int_bound(s, "exclusiveMaximum", path, False)
            lo = max([v for v in (lo, None if ex_lo is None else ex_lo + 1) if v is not None], default=None)
            hi = min([v for v in (hi, None if ex_hi is None else ex_hi - 1) if v is not None], default=None)
            if lo is not None and hi is not None and lo > hi:
                return self.add(_Node("never"))
            return self.add(_Node("int", lo=lo, hi=hi))
        if t == "string":
            lo, hi = _count(s, "minLength", path), _count(s, "maxLength", path)
            return self.add(_Node("str", min_len=lo or 0, max_len=hi) if hi is None or (lo or 0) <= hi else _Node("never"))
        if t == "array":
            prefix = s.get("prefixItems", [])
            if not isinstance(prefix, list):
                raise SchemaError("prefixItems must be an array", path)
            prefix_ids = [self.compile(p, f"{path}/prefixItems/{i}") for i, p in enumerate(prefix)]
            if "items" in s:
                items = self.compile(s["items"], f"{path}/items")
            else:  # strict: no items beyond prefixItems; a plain array holds any values
                items = self.add(_Node("never" if prefix else "any"))
            lo, hi = _count(s, "minItems", path) or 0, _count(s, "maxItems", path)
            if hi is not None and lo > hi:
                return self.add(_Node("never"))
            return self.add(_Node("arr", prefix=prefix_ids, items=items, min_items=lo, max_items=hi))
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
        return self.add(_Node("obj", props=plist, required=frozenset(req), extra=extra))


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


# ============================================================================================== integers
def _int_extra_digits(neg: bool, digits: str, lo, hi) -> float:
    """Fewest digits to append to ``-?digits`` for an integer in [lo, hi] (0: it already is one; INF: none)."""
    if digits == "0":
        ks = [0]  # no digit may follow a leading zero
    else:
        span = max(len(str(abs(b))) for b in (lo, hi, 0) if b is not None)
        ks = range(0 if digits else 1, span + 2)
    m = int(digits) if digits else 0
    for k in ks:
        if digits:
            a, b = m * 10 ** k, m * 10 ** k + 10 ** k - 1
        else:
            a, b = (0 if k == 1 else 10 ** (k - 1)), 10 ** k - 1
        if neg:
            a, b = -b, -a
        if (hi is None or a <= hi) and (lo is None or b >= lo):
            return k
    return INF


# ============================================================================================== automaton
class SchemaAutomaton:
    """Frames (hashable tuples):
    ("V", nid, ws)                 a value of node nid is expected (ws: one whitespace byte was just taken)
    ("J", json_state)              inside an unconstrained value (glm5.serve.json_automaton)
    ("L", nid, typed)              inside one of node nid's literals (enum, const, true/false/null)
    ("S", nid, pending, chars)     inside a string after its opening quote
    ("N", nid, sub, neg, digits)   inside a number (digits: the integer part, kept for bounded integers)
    ("O", nid, idx, phase, prop, ws)  an object; idx = next declared property that may come; phase first|after|
                                   key|colon (prop: the value's node after the colon)
    ("K", nid, typed)              an object key after its opening quote (the parent O frame is below it)
    ("A", nid, count, phase, ws)   an array with count items begun; phase first|after|item
    """

    def __init__(self, nodes: list[_Node], root: int):
        self.nodes = nodes
        self.root = root
        self.minlen = self._min_lengths()
        if self.minlen[root] == INF:
            raise SchemaError("no JSON value satisfies this schema")
        self._after_cost: dict[tuple[int, int, str], float] = {}

    # ---- static costs
    def _min_lengths(self) -> list[float]:
        ml = [INF] * len(self.nodes)
        for _ in range(len(self.nodes) + 1):  # Bellman-Ford style: recursion through $ref converges
            changed = False
            for i, n in enumerate(self.nodes):
                v = self._node_min(n, ml)
                if v < ml[i]:
                    ml[i], changed = v, True
            if not changed:
                break
        return ml

    def _node_min(self, n: _Node, ml) -> float:
        k = n.kind
        if k in ("any", "num"):
            return 1
        if k == "never":
            return INF
        if k == "lit":
            return min(len(x) for x in n.lits)
        if k == "str":
            return 2 + n.min_len
        if k == "int":
            return min(_int_extra_digits(False, "", n.lo, n.hi), 1 + _int_extra_digits(True, "", n.lo, n.hi))
        if k == "union":
            return min(ml[a] for a in n.alts)
        if k == "ref":
            return ml[n.target] if n.target is not None else INF
        if k == "arr":
            items = [self._item(n, i) for i in range(n.min_items)]
            return 2 + sum(ml[i] for i in items) + max(0, n.min_items - 1)
        req = [(enc, p) for name, enc, p in n.props if name in n.required]
        return 2 + sum(1 + len(enc) + 1 + ml[p] for enc, p in req) + max(0, len(req) - 1)

    def _item(self, n: _Node, i: int) -> int:
        return n.prefix[i] if i < len(n.prefix) else n.items

    def _resolve(self, nid: int) -> int:
        while self.nodes[nid].kind == "ref":
            nid = self.nodes[nid].target
        return nid

    def _member_cost(self, n: _Node, j: int) -> float:
        _, enc, p = n.props[j]
        return 1 + len(enc) + 1 + self.minlen[p]

    def _obj_rest(self, nid: int, idx: int, phase: str) -> float:
        """Bytes to close object nid from a member boundary: phase first (after '{'), after (after a value) or
        key (after ',': a member must follow)."""
        key = (nid, idx, phase)
        hit = self._after_cost.get(key)
        if hit is not None:
            return hit
        n = self.nodes[nid]
        req = [j for j in range(idx, len(n.props)) if n.props[j][0] in n.required]
        members = sum(self._member_cost(n, j) for j in req)
        if phase == "first":
            cost = members + max(0, len(req) - 1) + 1
        elif phase == "after":
            cost = members + len(req) + 1
        elif req:
            cost = members + len(req) - 1 + 1
        else:  # after a comma with nothing required left: the cheapest member that may still come
            cands = [self._member_cost(n, j) + self._obj_rest(nid, j + 1, "after") for j in self._declared(n, idx)]
            if self._extra_ok(n, idx):  # "k":value} (one character more if a declared property is called "")
                cands.append(2 + any(enc == b'"' for _, enc, _ in n.props) + 1 + self.minlen[n.extra] + 1)
            cost = min(cands, default=INF)
        self._after_cost[key] = cost
        return cost

    def _declared(self, n: _Node, idx: int) -> list[int]:
        """Declared properties that may come next: from idx up to and including the first required one."""
        out = []
        for j in range(idx, len(n.props)):
            if self.minlen[n.props[j][2]] < INF:
                out.append(j)
            if n.props[j][0] in n.required:
                break
        return out

    def _extra_ok(self, n: _Node, idx: int) -> bool:
        return n.extra is not None and self.minlen[n.extra] < INF and not any(
            n.props[j][0] in n.required for j in range(idx, len(n.props)))

    def _arr_rest(self, n: _Node, count: int, phase: str) -> float:
        need = max(0, n.min_items - count)
        if phase == "item":
            need = max(need, 1)
        items = sum(self.minlen[self._item(n, i)] for i in range(count, count + need))
        commas = need if phase == "after" else max(0, need - 1)
        return items + commas + 1

    def _arr_more(self, n: _Node, count: int) -> bool:
        return (n.max_items is None or count < n.max_items) and self.minlen[self._item(n, count)] < INF

    # ---- interface
    def start(self):
        return frozenset([(("V", self.root, True),)])  # ws=True: no leading whitespace

    def complete(self, state) -> bool:
        return any(self._stack_complete(s) for s in state)

    def _stack_complete(self, s) -> bool:
        if not s:
            return True
        if len(s) != 1:
            return False
        f = s[0]
        if f[0] == "N":
            return self._num_final(f)
        if f[0] == "J":
            return json_complete(f[1])
        return False

    def string_room(self, state) -> int | None | bool:
        """When every alternative is inside a string with no escape or UTF-8 sequence open and the same room:
        the characters that may still be added (None: unlimited). Otherwise False. Plain text tokens of at most
        that many characters are then allowed without walking them (JsonGrammar)."""
        rooms = set()
        for s in state:
            if not s or s[-1][0] != "S" or s[-1][2] != 0:
                return False
            n = self.nodes[s[-1][1]]
            rooms.add(None if n.max_len is None else n.max_len - s[-1][3])
        return rooms.pop() if len(rooms) == 1 else False

    def min_close(self, state) -> float:
        return min((self._stack_cost(s) for s in state), default=INF)

    def step(self, state, b: int):
        out = set()
        for s in state:
            out.update(self._step(s, b))
        return frozenset(out) if out else None

    # ---- per stack
    def _stack_cost(self, s) -> float:
        total, i = 0, len(s) - 1
        while i >= 0:
            f = s[i]
            kind = f[0]
            if kind == "K":  # the key's cost includes its object's rest
                total += self._key_cost(f, s[i - 1])
                i -= 2
                continue
            if kind == "V":
                total += self.minlen[f[1]]
            elif kind == "J":
                total += json_min_close(f[1])
            elif kind == "L":
                total += min(len(x) - len(f[2]) for x in self.nodes[f[1]].lits if x.startswith(f[2]))
            elif kind == "S":
                total += self._str_cost(f)
            elif kind == "N":
                total += self._num_cost(f)
            elif kind == "O":
                _, nid, idx, phase, prop, _ws = f
                total += (1 + self.minlen[prop] + self._obj_rest(nid, idx, "after") if phase == "colon"
                          else self._obj_rest(nid, idx, phase))
            elif kind == "A":
                total += self._arr_rest(self.nodes[f[1]], f[2], f[3])
            i -= 1
        return total

    def _str_cost(self, f) -> int:
        _, nid, pend, chars = f
        n = self.nodes[nid]
        if pend == 0:
            return max(0, n.min_len - chars) + 1
        extra = 1 if pend == "esc" else pend[1]
        return extra + max(0, n.min_len - chars - 1) + 1

    def _num_final(self, f) -> bool:
        _, nid, sub, neg, digits = f
        if sub not in _NUM_FINAL:
            return False
        n = self.nodes[nid]
        return n.kind != "int" or _int_extra_digits(neg, digits, n.lo, n.hi) == 0

    def _num_cost(self, f) -> float:
        _, nid, sub, neg, digits = f
        n = self.nodes[nid]
        if n.kind == "int":
            return _int_extra_digits(neg, digits, n.lo, n.hi)
        return 0 if sub in _NUM_FINAL else 1

    def _key_cost(self, k, o) -> float:
        _, nid, typed = k
        _, _, idx, _, _, _ = o
        n = self.nodes[nid]
        cands = [len(n.props[j][1]) - len(typed) + 1 + self.minlen[n.props[j][2]] + self._obj_rest(nid, j + 1, "after")
                 for j in self._declared(n, idx) if n.props[j][1].startswith(typed)]
        if self._extra_ok(n, idx) and self._extra_prefix(typed):
            clash = any(enc == typed + b'"' for _, enc, _ in n.props)
            if not clash or len(typed) < MAX_EXTRA_KEY:
                cands.append((2 if clash else 1) + 1 + self.minlen[n.extra] + self._obj_rest(nid, idx, "after"))
        return min(cands, default=INF)

    @staticmethod
    def _extra_prefix(typed: bytes) -> bool:
        return len(typed) <= MAX_EXTRA_KEY and all(0x20 <= c < 0x7F and c not in b'"\\' for c in typed)

    def _step(self, s, b: int) -> list:
        if not s:
            return []  # done: nothing may follow
        f, rest = s[-1], s[:-1]
        kind = f[0]
        if kind == "V":
            if b in _WS:
                return [] if f[2] else [rest + (("V", f[1], True),)]
            return self._begin(rest, f[1], b)
        if kind == "J":
            j = json_step(f[1], b)
            if j is not None:
                return [rest + (("J", j),)] if j[0] != DONE else [rest]
            if json_complete(f[1]):  # a bare number ended: the byte belongs to the parent
                return self._step(rest, b) if rest else []
            return []
        if kind == "L":
            typed = f[2] + bytes([b])
            lits = self.nodes[f[1]].lits
            out = [rest] if typed in lits else []
            if any(len(x) > len(typed) and x.startswith(typed) for x in lits):
                out.append(rest + (("L", f[1], typed),))
            return out
        if kind == "S":
            return self._string(f, rest, b)
        if kind == "N":
            return self._number(f, rest, b)
        if kind == "O":
            return self._object(f, rest, b)
        if kind == "K":
            return self._key(f, rest, b)
        if kind == "A":
            return self._array(f, rest, b)
        return []

    def _begin(self, rest, nid: int, b: int) -> list:
        n = self.nodes[nid]
        k = n.kind
        if k == "ref":
            return self._begin(rest, self._resolve(nid), b)
        if k == "union":
            out = []
            for a in n.alts:
                if self.minlen[a] < INF:
                    out.extend(self._begin(rest, a, b))
            return out
        if k == "any":
            j = value_start("", b)
            return [] if j is None else [rest + (("J", j),)]
        if k == "lit":
            return self._step(rest + (("L", nid, b""),), b)
        if k == "str":
            return [rest + (("S", nid, 0, 0),)] if b == ord('"') else []
        if k in ("num", "int"):
            if b == ord("-"):
                f = ("N", nid, "minus", True, "")
            elif b in _DIGITS:
                f = ("N", nid, "zero" if b == ord("0") else "int", False, chr(b) if k == "int" else "")
            else:
                return []
            return [rest + (f,)] if self._num_cost(f) < INF else []
        if k == "obj":
            return [rest + (("O", nid, 0, "first", None, False),)] if b == ord("{") else []
        if k == "arr":
            return [rest + (("A", nid, 0, "first", False),)] if b == ord("[") else []
        return []

    def _string(self, f, rest, b: int) -> list:
        _, nid, pend, chars = f
        n = self.nodes[nid]
        cap = max(n.min_len, n.max_len if n.max_len is not None else 0)

        def char_done():
            c = chars + 1
            return [rest + (("S", nid, 0, min(c, cap)),)]

        room = n.max_len is None or chars < n.max_len
        if pend == 0:
            if b == ord('"'):
                return [rest] if chars >= n.min_len else []
            if not room or b < 0x20 or b == 0x7F:
                return []
            if b == ord("\\"):
                return [rest + (("S", nid, "esc", chars),)]
            if b < 0x80:
                return char_done()
            for lo, hi, more in ((0xC2, 0xDF, 1), (0xE0, 0xEF, 2), (0xF0, 0xF4, 3)):
                if lo <= b <= hi:
                    return [rest + (("S", nid, ("utf", more), chars),)]
            return []
        if pend == "esc":
            if b not in _ESCAPES:
                return []
            return [rest + (("S", nid, ("u", 4), chars),)] if b == ord("u") else char_done()
        kind, left = pend
        if (kind == "u" and b not in _HEX) or (kind == "utf" and not 0x80 <= b <= 0xBF):
            return []
        return char_done() if left == 1 else [rest + (("S", nid, (kind, left - 1), chars),)]

    def _number(self, f, rest, b: int) -> list:
        _, nid, sub, neg, digits = f
        n = self.nodes[nid]
        is_int = n.kind == "int"
        nxt = None
        if b in _DIGITS:
            nxt = {"minus": "zero" if b == ord("0") else "int", "int": "int", "dot": "frac", "frac": "frac",
                   "e": "exp", "esign": "exp", "exp": "exp"}.get(sub)
        elif b == ord(".") and sub in ("zero", "int") and not is_int:
            nxt = "dot"
        elif b in b"eE" and sub in ("zero", "int", "frac") and not is_int:
            nxt = "e"
        elif b in b"+-" and sub == "e":
            nxt = "esign"
        if nxt is not None:
            g = ("N", nid, nxt, neg, digits + chr(b) if is_int else "")
            return [rest + (g,)] if not is_int or self._num_cost(g) < INF else []
        if not self._num_final(f) or not rest:  # a top-level number only ends with the document
            return []
        return self._step(rest, b)  # the number ended; the byte belongs to the parent

    def _object(self, f, rest, b: int) -> list:
        _, nid, idx, phase, prop, ws = f
        n = self.nodes[nid]
        if b in _WS:
            return [] if ws else [rest + (("O", nid, idx, phase, prop, True),)]
        if phase == "colon":
            return [rest + (("O", nid, idx, "after", None, False), ("V", prop, False))] if b == ord(":") else []
        if b == ord("}") and phase in ("first", "after"):
            return [rest] if not any(n.props[j][0] in n.required for j in range(idx, len(n.props))) else []
        if b == ord(",") and phase == "after":
            ok = self._declared(n, idx) or self._extra_ok(n, idx)
            return [rest + (("O", nid, idx, "key", None, False),)] if ok else []
        if b == ord('"') and phase in ("first", "key"):
            k = ("K", nid, b"")
            o = ("O", nid, idx, phase, None, False)
            return [rest + (o, k)] if self._key_cost(k, o) < INF else []
        return []

    def _key(self, k, rest, b: int) -> list:
        _, nid, typed = k
        o, below = rest[-1], rest[:-1]
        idx = o[2]
        n = self.nodes[nid]
        t = typed + bytes([b])
        out = []
        if b == ord('"'):  # the closing quote (a declared name's escaped quote is handled as a continuation)
            for j in self._declared(n, idx):
                if n.props[j][1] == t:
                    out.append(below + (("O", nid, j + 1, "colon", n.props[j][2], False),))
            if self._extra_ok(n, idx) and self._extra_prefix(typed) and not any(enc == t for _, enc, _ in n.props):
                out.append(below + (("O", nid, idx, "colon", n.extra, False),))
        k2 = ("K", nid, t)
        if self._key_cost(k2, o) < INF:
            out.append(rest[:-1] + (o, k2))
        return out

    def _array(self, f, rest, b: int) -> list:
        _, nid, count, phase, ws = f
        n = self.nodes[nid]
        if b in _WS:
            return [] if ws else [rest + (("A", nid, count, phase, True),)]
        if b == ord("]") and phase in ("first", "after"):
            return [rest] if count >= n.min_items else []
        if b == ord(",") and phase == "after":
            return [rest + (("A", nid, count, "item", False),)] if self._arr_more(n, count) else []
        if phase in ("first", "item") and self._arr_more(n, count):
            return self._begin(rest + (("A", nid, count + 1, "after", False),), self._item(n, count), b)
        return []

    def accepts(self, text: str | bytes) -> bool:
        """True if ``text`` is a whole document of this automaton (tests)."""
        s = self.start()
        for b in text.encode("utf-8") if isinstance(text, str) else text:
            s = self.step(s, b)
            if s is None:
                return False
        return self.complete(s)
