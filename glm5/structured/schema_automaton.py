"""The byte automaton of a compiled JSON Schema (:func:`glm5.structured.json_schema.compile_schema` builds it).

Its interface is the one :class:`glm5.structured.constrained.JsonGrammar` walks the token trie with: ``start()``,
``step(state, byte)`` (``None`` = the byte leaves every document the schema accepts), ``min_close(state)`` (bytes
of the shortest valid completion, each a single-byte token of a byte-level vocabulary), ``complete(state)`` and
``string_room(state)``.

State: a frozenset of stacks (alternatives of ``anyOf`` and of ambiguous literals run side by side); a stack is a
tuple of frames, innermost last, and a value is complete when its frame is popped (the empty stack = done).
Output is compact JSON with at most one whitespace byte between tokens (as for ``json_object``).
"""

from __future__ import annotations

import math

from .json_automaton import (DIGITS, DONE, NUM_FINAL, WHITESPACE, json_complete, json_min_close, json_step,
                             number_next, string_next, value_start)
from .vocab import KeyRoom

__all__ = ["SchemaError", "SchemaNode", "SchemaAutomaton", "MAX_EXTRA_KEY"]

INF = math.inf
MAX_EXTRA_KEY = 64


class SchemaError(ValueError):
    def __init__(self, message: str, path: str = "#"):
        super().__init__(f"{message} (at {path})")
        self.path = path


class SchemaNode:
    """A compiled schema: ``kind`` in any | never | lit | str | pat | int | num | obj | arr | union | ref (``pat``:
    a string whose text ``regex``, a :class:`~glm5.structured.regex.RegexAutomaton` over the JSON string body,
    accepts)."""

    __slots__ = ("kind", "lits", "min_len", "max_len", "lo", "hi", "props", "required", "extra", "items",
                 "prefix", "min_items", "max_items", "alts", "target", "regex")

    def __init__(self, kind: str, **kw):
        self.kind = kind
        self.lits = self.props = self.required = self.prefix = self.alts = self.regex = None
        self.min_len = self.min_items = 0
        self.max_len = self.max_items = self.lo = self.hi = self.extra = self.items = self.target = None
        for k, v in kw.items():
            setattr(self, k, v)


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
    ("J", json_state)              inside an unconstrained value (glm5.structured.json_automaton)
    ("L", nid, typed)              inside one of node nid's literals (enum, const, true/false/null)
    ("S", nid, pending, chars)     inside a string after its opening quote
    ("P", nid, regex_state)        inside a ``pat`` string after its opening quote
    ("N", nid, sub, neg, digits)   inside a number (digits: the integer part, kept for bounded integers)
    ("O", nid, idx, phase, prop, ws)  an object; idx = next declared property that may come; phase first|after|
                                   key|colon (prop: the value's node after the colon)
    ("K", nid, typed)              an object key after its opening quote, its text a prefix of a declared name's
                                   (the parent O frame is below it)
    ("X", nid, count)              an object key whose text (count bytes) begins no declared name: it can only be an
                                   extra key, and what may follow depends on its length alone (see _extra_key)
    ("A", nid, count, phase, ws)   an array with count items begun; phase first|after|item
    """

    def __init__(self, nodes: list[SchemaNode], root: int):
        self.nodes = nodes
        self.root = root
        self.minlen = self._min_lengths()
        if self.minlen[root] == INF:
            raise SchemaError("no JSON value satisfies this schema")
        self._after_cost: dict[tuple[int, int, str], float] = {}
        self._name_prefixes: dict[int, frozenset[bytes]] = {}

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

    def _node_min(self, n: SchemaNode, ml) -> float:
        k = n.kind
        if k in ("any", "num"):
            return 1
        if k == "never":
            return INF
        if k == "lit":
            return min(len(x) for x in n.lits)
        if k == "str":
            return 2 + n.min_len
        if k == "pat":
            return 2 + n.regex.min_close(n.regex.start())
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

    def _item(self, n: SchemaNode, i: int) -> int:
        return n.prefix[i] if i < len(n.prefix) else n.items

    def _resolve(self, nid: int) -> int:
        while self.nodes[nid].kind == "ref":
            nid = self.nodes[nid].target
        return nid

    def _member_cost(self, n: SchemaNode, j: int) -> float:
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

    def _declared(self, n: SchemaNode, idx: int) -> list[int]:
        """Declared properties that may come next: from idx up to and including the first required one."""
        out = []
        for j in range(idx, len(n.props)):
            if self.minlen[n.props[j][2]] < INF:
                out.append(j)
            if n.props[j][0] in n.required:
                break
        return out

    def _extra_ok(self, n: SchemaNode, idx: int) -> bool:
        return n.extra is not None and self.minlen[n.extra] < INF and not any(
            n.props[j][0] in n.required for j in range(idx, len(n.props)))

    def _arr_rest(self, n: SchemaNode, count: int, phase: str) -> float:
        need = max(0, n.min_items - count)
        if phase == "item":
            need = max(need, 1)
        items = sum(self.minlen[self._item(n, i)] for i in range(count, count + need))
        commas = need if phase == "after" else max(0, need - 1)
        return items + commas + 1

    def _arr_more(self, n: SchemaNode, count: int) -> bool:
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
        """When every alternative is inside a string with no escape or UTF-8 sequence open and the same room (or
        inside a ``pattern`` string that already contains a match: unlimited room):
        the characters that may still be added (None: unlimited). When every alternative is inside an extra object
        key (an X frame) with the same room: :class:`~glm5.structured.vocab.KeyRoom` of that room. Otherwise False.
        JsonGrammar then decides for all plain-text tokens of c characters (printable-ASCII tokens of c bytes in a
        key) with one of them, which relies on the state they lead to depending on c alone (it does: the string
        frame's character count, the X frame's byte count)."""
        rooms = set()
        for s in state:
            if s and s[-1][0] == "X":
                rooms.add(KeyRoom(MAX_EXTRA_KEY - s[-1][2]))
                continue
            if s and s[-1][0] == "P" and self.nodes[s[-1][1]].regex.absorbing(s[-1][2]):
                rooms.add(None)  # the pattern has matched: any plain text leaves the state as it is
                continue
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
            if kind in ("K", "X"):  # the key's cost includes its object's rest
                total += self._key_cost(f, s[i - 1]) if kind == "K" else self._extra_cost(f[1], s[i - 1][2])
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
            elif kind == "P":
                total += self.nodes[f[1]].regex.min_close(f[2]) + 1
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
        if sub not in NUM_FINAL:
            return False
        n = self.nodes[nid]
        return n.kind != "int" or _int_extra_digits(neg, digits, n.lo, n.hi) == 0

    def _num_cost(self, f) -> float:
        _, nid, sub, neg, digits = f
        n = self.nodes[nid]
        if n.kind == "int":
            return _int_extra_digits(neg, digits, n.lo, n.hi)
        return 0 if sub in NUM_FINAL else 1

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

    def _extra_cost(self, nid: int, idx: int) -> float:
        """An X frame's cost: ``"`` ``:`` the extra value and the object's rest. It is what _key_cost gives for a
        key text that begins no declared name: no declared candidate, and no clash (a name equal to the text
        would begin with it), so the text itself does not count."""
        n = self.nodes[nid]
        if not self._extra_ok(n, idx):
            return INF
        return 1 + 1 + self.minlen[n.extra] + self._obj_rest(nid, idx, "after")

    def _key_frame(self, o, typed: bytes):
        """The frame of key text ``typed`` in the object of O frame ``o``, None when no key goes on
        from it: ("K", nid, typed) while it begins a declared name, then ("X", nid, len(typed)), which forgets the
        text (nothing that follows depends on it but through its length), so that extra keys' states repeat."""
        nid, idx = o[1], o[2]
        prefixes = self._name_prefixes.get(nid)
        if prefixes is None:
            prefixes = self._name_prefixes[nid] = frozenset(
                enc[:k] for _, enc, _ in self.nodes[nid].props for k in range(len(enc) + 1))
        if typed in prefixes:
            k = ("K", nid, typed)
            return k if self._key_cost(k, o) < INF else None
        if not self._extra_prefix(typed) or self._extra_cost(nid, idx) == INF:
            return None
        return ("X", nid, len(typed))

    @staticmethod
    def _extra_prefix(typed: bytes) -> bool:
        return len(typed) <= MAX_EXTRA_KEY and all(0x20 <= c < 0x7F and c not in b'"\\' for c in typed)

    def _step(self, s, b: int) -> list:
        if not s:
            return []  # done: nothing may follow
        f, rest = s[-1], s[:-1]
        kind = f[0]
        if kind == "V":
            if b in WHITESPACE:
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
        if kind == "P":
            regex = self.nodes[f[1]].regex
            out = [rest] if b == ord('"') and regex.complete(f[2]) else []  # a raw quote only ever closes
            r = regex.step(f[2], b)
            return out + ([rest + (("P", f[1], r),)] if r is not None else [])
        if kind == "N":
            return self._number(f, rest, b)
        if kind == "O":
            return self._object(f, rest, b)
        if kind == "K":
            return self._key(f, rest, b)
        if kind == "X":
            return self._extra_key(f, rest, b)
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
        if k == "pat":
            return [rest + (("P", nid, n.regex.start()),)] if b == ord('"') else []
        if k in ("num", "int"):
            if b == ord("-"):
                f = ("N", nid, "minus", True, "")
            elif b in DIGITS:
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
        if pend == 0:
            if b == ord('"'):
                return [rest] if chars >= n.min_len else []
            if n.max_len is not None and chars >= n.max_len:  # no room for another character
                return []
        nxt = string_next(pend, b)
        if nxt is None:
            return []
        pend, done = nxt
        if done:  # counted up to the larger bound only, so that long unbounded strings share one state
            chars = min(chars + 1, max(n.min_len, n.max_len or 0))
        return [rest + (("S", nid, pend, chars),)]

    def _number(self, f, rest, b: int) -> list:
        _, nid, sub, neg, digits = f
        n = self.nodes[nid]
        is_int = n.kind == "int"
        nxt = number_next(sub, b, is_int)
        if nxt is not None:
            g = ("N", nid, nxt, neg, digits + chr(b) if is_int else "")
            return [rest + (g,)] if not is_int or self._num_cost(g) < INF else []
        if not self._num_final(f) or not rest:  # a top-level number only ends with the document
            return []
        return self._step(rest, b)  # the number ended; the byte belongs to the parent

    def _object(self, f, rest, b: int) -> list:
        _, nid, idx, phase, prop, ws = f
        n = self.nodes[nid]
        if b in WHITESPACE:
            return [] if ws else [rest + (("O", nid, idx, phase, prop, True),)]
        if phase == "colon":
            return [rest + (("O", nid, idx, "after", None, False), ("V", prop, False))] if b == ord(":") else []
        if b == ord("}") and phase in ("first", "after"):
            return [rest] if not any(n.props[j][0] in n.required for j in range(idx, len(n.props))) else []
        if b == ord(",") and phase == "after":
            ok = self._declared(n, idx) or self._extra_ok(n, idx)
            return [rest + (("O", nid, idx, "key", None, False),)] if ok else []
        if b == ord('"') and phase in ("first", "key"):
            o = ("O", nid, idx, phase, None, False)
            k = self._key_frame(o, b"")
            return [rest + (o, k)] if k is not None else []
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
        k2 = self._key_frame(o, t)
        if k2 is not None:
            out.append(rest + (k2,))
        return out

    def _extra_key(self, x, rest, b: int) -> list:
        """A byte of an extra key (X frame). As _key for a text that begins no declared name: the quote closes it
        (no declared name matches, none clashes); a byte goes on while the text stays printable ASCII without quote
        or backslash, at most MAX_EXTRA_KEY bytes (_extra_prefix)."""
        _, nid, count = x
        o = rest[-1]
        if b == ord('"'):
            return [rest[:-1] + (("O", nid, o[2], "colon", self.nodes[nid].extra, False),)]
        if 0x20 <= b < 0x7F and b != ord("\\") and count < MAX_EXTRA_KEY:
            return [rest + (("X", nid, count + 1),)]
        return []

    def _array(self, f, rest, b: int) -> list:
        _, nid, count, phase, ws = f
        n = self.nodes[nid]
        if b in WHITESPACE:
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
