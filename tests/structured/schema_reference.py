"""The JSON Schema automaton's object keys as they were before extra keys forgot their text (git 8afd1e2), kept as
the reference ``tests/structured/test_extra_keys.py`` compares
:class:`~glm5.structured.schema_automaton.SchemaAutomaton` with: every key state holds the key typed so far
(``("K", nid, typed)``), so a state typing an extra key is new at every byte and no key state has a plain-text fast
path (``string_room`` is False there). Only the methods that changed are here, copied from that revision; the rest
is inherited."""

from __future__ import annotations

from glm5.structured.json_automaton import DONE, WHITESPACE, json_complete, json_min_close, json_step
from glm5.structured.schema_automaton import INF, SchemaAutomaton


class ReferenceSchemaAutomaton(SchemaAutomaton):
    """The old key handling over the same compiled nodes: ``ReferenceSchemaAutomaton(new.nodes, new.root)``."""

    def string_room(self, state) -> int | None | bool:
        """When every alternative is inside a string with no escape or UTF-8 sequence open and the same room (or
        inside a ``pattern`` string that already contains a match: unlimited room):
        the characters that may still be added (None: unlimited). Otherwise False. JsonGrammar then decides for
        all plain-text tokens of c characters with one of them, which relies on the state they lead to depending
        on c alone (it does: the string frame's character count)."""
        rooms = set()
        for s in state:
            if s and s[-1][0] == "P" and self.nodes[s[-1][1]].regex.absorbing(s[-1][2]):
                rooms.add(None)  # the pattern has matched: any plain text leaves the state as it is
                continue
            if not s or s[-1][0] != "S" or s[-1][2] != 0:
                return False
            n = self.nodes[s[-1][1]]
            rooms.add(None if n.max_len is None else n.max_len - s[-1][3])
        return rooms.pop() if len(rooms) == 1 else False

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
        if kind == "A":
            return self._array(f, rest, b)
        return []

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
