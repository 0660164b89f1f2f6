r"""``grammar`` structured output: the text is one sentence of a GBNF grammar (vLLM's ``structured_outputs.grammar``).

:class:`GbnfAutomaton` has the byte-automaton interface :class:`~glm5.structured.constrained.JsonGrammar` walks the
token trie with (``start``, ``step``, ``complete``, ``min_close``, ``string_room``); the whole output must be one
sentence derived from the start rule (default ``root``).

Syntax: llama.cpp's GBNF, which xgrammar's EBNF also accepts for this common subset:
* rules ``name ::= body`` (names ``[a-zA-Z0-9_-]+``), alternatives ``|``, sequences, groups ``( ... )``; ``()``,
  ``""`` and an empty alternative are the empty string;
* postfix ``*``, ``+``, ``?``, ``{m}``, ``{m,}``, ``{m,n}`` on any element (a string literal is one element);
* literals ``"..."`` and classes ``[a-z_]``, ``[^"\\]`` with escapes ``\n \r \t \\ \" \[ \] \-
  \xHH \uHHHH \UHHHHHHHH`` (``-`` before ``]`` is literal); ``.`` is any character, newline included;
* ``#`` comments; whitespace, newlines included, separates elements anywhere, and a rule ends where the next
  ``name ::=`` begins. llama.cpp reads every grammar it accepts the same way (it ends a rule at a line break outside
  parentheses and wants ``name ::=`` next); rules continued on the next line (``| alt`` or more elements) are
  accepted too, as xgrammar does.
Matching is over Unicode code points read from UTF-8 bytes; invalid UTF-8 (overlongs, surrogates, past U+10FFFF)
is dead as soon as it is certain.

Refused with a ValueError at compile time (the message names the rule, with line:column for syntax errors): syntax
errors; llama.cpp's token references ``<[id]>`` / ``!<...>`` (this grammar is over text); xgrammar's lookahead
``(= ...)`` and macros (``TagDispatch``, ``Regex``, ``Token``, ...); ``{,n}`` (neither parser takes it); undefined
rules, a missing start rule, rules defined twice; left recursion; rules that can never finish, an empty language;
``{m,n}`` with m > n, or a grammar past :data:`MAX_GRAMMAR_ELEMENTS` elements once repetitions are expanded.

Design: llama.cpp's pushdown approach, since a context-free language needs a stack (a DFA cannot count brackets) and
keeping every parse at once needs no backtracking. Rules compile to alternatives of elements (a character class or a
rule reference); repetitions become helper rules (``x{2,4}`` -> ``x x r2``, ``r2 ::= x r1 |``, ``r1 ::= x |``) that
refer to ``x`` once, so nesting stays linear in size. A *stack* is a tuple of positions, each the next element of
some alternative, its top a class; a state is the frozenset of live stacks plus an unfinished UTF-8 character. On a
character every stack whose top holds it moves on, and references on top are expanded until each top is a class or
the stack is empty (= accepting); a reference that ends its alternative drops its frame first, so right recursion and
``x*`` do not grow stacks. Equal states are equal values; transitions and ``min_close`` are cached per state
(bounded), so the token-trie walk repeats little work. ``min_close`` is exact: each rule's shortest derivation in
UTF-8 bytes is computed once (Knuth's algorithm), a position's cost is the rest of its alternative, a stack's the sum
over its frames; alternatives that can never finish are dropped, so every live stack can finish. Within a multi-byte
character only stacks whose class holds a completion of the bytes so far are kept, so its cost is the bytes still owed
plus what follows that class.

State explosion: a very ambiguous grammar (``x ::= "a" x "b" | "a" x "c" |``) can need exponentially many stacks for
some inputs, which cannot be told from the grammar in general. A state then keeps the :data:`MAX_STACKS` stacks with
the shortest completions (ties in a fixed order) and drops the rest: every kept stack is still a parse of the text, so
the output stays a sentence of the grammar and ``min_close`` stays exact; only some of the ways to continue are lost.
(``step`` raises ``ValueError`` only when one step would expand more than 8 × MAX_STACKS stacks.)
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from itertools import accumulate

from .charset import MAX_CP
from .gbnf_parser import MAX_GRAMMAR_ELEMENTS, _Parser

__all__ = ["GbnfAutomaton", "MAX_GRAMMAR_ELEMENTS", "MAX_STACKS"]

MAX_STACKS = 10_000  # stacks one state keeps (the cheapest to finish) when a grammar is very ambiguous
_CACHE_LIMIT = 20_000  # states whose transitions / min_close are cached; cleared when full (states stay valid)
_INF = float("inf")
_UTF8_LOWEST = {2: 0x80, 3: 0x800, 4: 0x10000}  # below these a sequence of that length is an overlong
_MISSING = object()


def _utf8_len(cp: int) -> int:
    return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4


# ================================================================================================ compiler
def _min_lengths(bodies: list[list[list[int]]], class_len: list[float]) -> list[float]:
    """Each rule's shortest derivation in UTF-8 bytes (inf: never finishes). Knuth's generalisation of Dijkstra:
    an alternative costs at least as much as any of its parts, so the cheapest rule not yet settled is final."""
    users: list[list[tuple[int, int]]] = [[] for _ in bodies]
    pending, known, heap = {}, {}, []
    for rid, alts in enumerate(bodies):
        for ai, alt in enumerate(alts):
            refs = [~e for e in alt if e < 0]
            pending[rid, ai] = len(refs)
            known[rid, ai] = sum(class_len[e] for e in alt if e >= 0)
            for r in refs:
                users[r].append((rid, ai))
            if not refs:
                heapq.heappush(heap, (known[rid, ai], rid))
    length = [_INF] * len(bodies)
    settled = [False] * len(bodies)
    while heap:
        d, rid = heapq.heappop(heap)
        if settled[rid]:
            continue
        settled[rid], length[rid] = True, d
        for user, ai in users[rid]:
            known[user, ai] += d
            pending[user, ai] -= 1
            if pending[user, ai] == 0 and not settled[user]:
                heapq.heappush(heap, (known[user, ai], user))
    return length


def _components(adjacent: list[list[int]]) -> list[int]:
    """Strongly connected components (Kosaraju, iterative): a component id per node."""
    n, order, seen = len(adjacent), [], [False] * len(adjacent)
    for root in range(n):
        if seen[root]:
            continue
        seen[root] = True
        path = [(root, iter(adjacent[root]))]
        while path:
            node, children = path[-1]
            for child in children:
                if not seen[child]:
                    seen[child] = True
                    path.append((child, iter(adjacent[child])))
                    break
            else:
                path.pop()
                order.append(node)
    reverse: list[list[int]] = [[] for _ in range(n)]
    for node in range(n):
        for child in adjacent[node]:
            reverse[child].append(node)
    component = [-1] * n
    for root in reversed(order):
        if component[root] < 0:
            component[root], todo = root, [root]
            while todo:
                for other in reverse[todo.pop()]:
                    if component[other] < 0:
                        component[other] = root
                        todo.append(other)
    return component


class GbnfAutomaton:
    """The byte automaton of "one sentence of this GBNF grammar" (see the module docstring), with the interface
    :class:`~glm5.structured.constrained.JsonGrammar` walks the token trie with. ``ValueError`` for a grammar it
    cannot enforce (the message names the rule, and line:column for syntax errors)."""

    def __init__(self, grammar_text: str, start: str = "root"):
        if not isinstance(grammar_text, str) or not grammar_text.strip():
            raise ValueError("gbnf: the grammar is empty")
        parser = _Parser(grammar_text)
        parser.parse()
        bodies = parser.bodies
        root = parser.ids.get(start)
        if root is None or bodies[root] is None:
            raise ValueError(f"gbnf: the grammar has no rule '{start}' (the start rule)")
        for rid, body in enumerate(bodies):
            if body is None:
                pos, user = parser.first_use[rid]
                raise ValueError(f"gbnf: undefined rule '{parser.owner[rid]}' (used at {parser.where(pos)} in rule "
                                 f"'{user}')")
        class_len = [_utf8_len(r[0][0]) if r else _INF for r in parser.classes]
        length = _min_lengths(bodies, class_len)
        self._check_left_recursion(bodies, length, parser.owner)

        reachable, todo = {root}, [root]
        while todo:
            for alt in bodies[todo.pop()]:
                for e in alt:
                    if e < 0 and ~e not in reachable:
                        reachable.add(~e)
                        todo.append(~e)
        if length[root] == _INF:
            raise ValueError(f"gbnf: the grammar's language is empty: '{start}' can never finish")
        for rid in sorted(reachable):
            if length[rid] == _INF:
                raise ValueError(f"gbnf: rule '{parser.owner[rid]}' can never finish (every alternative needs itself "
                                 "again or a character class that matches nothing)")

        def cost(e: int) -> float:
            return class_len[e] if e >= 0 else length[~e]

        # Flatten: position p holds a class (self._cls[p] >= 0) or a rule reference (self._ref[p] >= 0); self._next[p]
        # is the position after it in its alternative, -1 at the end. Alternatives that never finish are dropped, so
        # every live stack can finish and min_close is finite.
        self._cls: list[int] = []
        self._ref: list[int] = []
        self._next: list[int] = []
        self._rest: list[int] = []  # the fewest bytes from p (inclusive) to the end of its alternative
        self._alts: list[tuple[int, ...]] = [()] * len(bodies)  # first positions per rule (-1: empty alternative)
        for rid in reachable:
            firsts = []
            for alt in bodies[rid]:
                if any(cost(e) == _INF for e in alt):
                    continue
                base = len(self._next)
                self._cls += [e if e >= 0 else -1 for e in alt]
                self._ref += [~e if e < 0 else -1 for e in alt]
                self._next += [base + i for i in range(1, len(alt))] + [-1] * bool(alt)
                self._rest += reversed(list(accumulate(int(cost(e)) for e in reversed(alt))))
                firsts.append(base if alt else -1)
            self._alts[rid] = tuple(dict.fromkeys(firsts))
        self._after = [r - (class_len[c] if c >= 0 else 0) for r, c in zip(self._rest, self._cls)]
        self._ranges = parser.classes
        self._lows = [[lo for lo, _ in r] for r in parser.classes]
        self._ascii = [sum(1 << cp for lo, hi in r if lo < 0x80 for cp in range(lo, min(hi, 0x7F) + 1))
                       for r in parser.classes]
        self._rows: dict = {}  # state -> its 256 transitions, filled on use
        self._closes: dict = {}
        self._interned: dict = {}
        stacks: set[tuple[int, ...]] = set()
        seen: set[tuple[int, ...]] = set()
        for first in self._alts[root]:
            self._close(() if first < 0 else (first,), stacks, seen)
        self._start = self._intern((frozenset(stacks), 0, 0, 0))

    @staticmethod
    def _check_left_recursion(bodies, length, owner) -> None:
        """Refuse a rule that can reach itself before consuming a character while leaving elements pending (the
        stacks would grow without bound). Such a reference in the last place of its alternative pops its frame first,
        so it is harmless and allowed (that makes ``(x?)*`` work, which llama.cpp refuses)."""
        adjacent: list[list[int]] = [[] for _ in bodies]
        growing: list[tuple[int, int]] = []
        for rid, alts in enumerate(bodies):
            for alt in alts:
                for i, e in enumerate(alt):
                    if e >= 0:
                        break
                    adjacent[rid].append(~e)
                    if i + 1 < len(alt):
                        growing.append((rid, ~e))
                    if length[~e] != 0:
                        break
        component = _components(adjacent)
        for rid, target in growing:
            if component[rid] == component[target]:
                raise ValueError(f"gbnf: rule '{owner[rid]}' is left-recursive (it can reach itself before consuming "
                                 "a character); rewrite it with repetition, e.g. list ::= item (\",\" item)*")

    # ---------------------------------------------------------------------------------------- automaton
    # A state is (stacks, value, remaining, nbytes): the frozenset of live stacks (tuples of positions, top last) and,
    # inside a multi-byte character, the code point bits read so far, the bytes still to come and its length.
    def _intern(self, state):
        return self._interned.setdefault(state, state)

    def _close(self, stack: tuple[int, ...], out: set, seen: set) -> None:
        """Expand rule references on top of ``stack`` until every top is a class (or the stack is empty), into
        ``out``; ``seen`` is shared within one step so each stack is expanded once."""
        todo, height = [stack], len(stack) + len(self._alts) + 1  # more frames would mean missed left recursion
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            if len(seen) > 8 * MAX_STACKS or len(s) > height:
                raise ValueError(f"gbnf: the grammar is too ambiguous for this output: more than {8 * MAX_STACKS} "
                                 "parse stacks in one step")
            if s and self._ref[s[-1]] >= 0:
                top = s[-1]
                nxt = self._next[top]
                base = s[:-1] + (nxt,) if nxt >= 0 else s[:-1]  # a reference ending its alternative leaves no frame
                todo.extend(base + (f,) if f >= 0 else base for f in self._alts[self._ref[top]])
            else:
                out.add(s)

    def _in_class(self, cid: int, cp: int) -> bool:
        if cp < 0x80:
            return bool(self._ascii[cid] >> cp & 1)
        i = bisect_right(self._lows[cid], cp) - 1
        return i >= 0 and cp <= self._ranges[cid][i][1]

    def _meets(self, cid: int, lo: int, hi: int) -> bool:
        """Whether the class holds a code point in ``lo..hi``: the last range starting at or below ``hi`` must reach
        ``lo`` (the ones before it end earlier)."""
        i = bisect_right(self._lows[cid], hi) - 1
        return i >= 0 and self._ranges[cid][i][1] >= lo

    def _advance(self, stacks, cp: int):
        out: set[tuple[int, ...]] = set()
        seen: set[tuple[int, ...]] = set()
        for s in stacks:
            if s and self._in_class(self._cls[s[-1]], cp):
                nxt = self._next[s[-1]]
                self._close(s[:-1] + (nxt,) if nxt >= 0 else s[:-1], out, seen)
        if len(out) > MAX_STACKS:  # keep the parses closest to finishing (see the module docstring)
            rest = self._rest
            out = sorted(out, key=lambda s: (sum(rest[f] for f in s), s))[:MAX_STACKS]
        return self._intern((frozenset(out), 0, 0, 0)) if out else None

    def _step(self, state, byte: int):
        stacks, value, remaining, nbytes = state
        if remaining == 0:
            if byte < 0x80:
                return self._advance(stacks, byte)
            if 0xC2 <= byte <= 0xDF:
                value, nbytes = byte & 0x1F, 2
            elif 0xE0 <= byte <= 0xEF:
                value, nbytes = byte & 0x0F, 3
            elif 0xF0 <= byte <= 0xF4:
                value, nbytes = byte & 0x07, 4
            else:  # a continuation byte, an overlong lead (C0, C1) or beyond U+10FFFF
                return None
            remaining = nbytes - 1
        else:
            if byte & 0xC0 != 0x80:
                return None
            value, remaining = value << 6 | byte & 0x3F, remaining - 1
            if remaining == 0:
                return self._advance(stacks, value)
        # The code points these bytes can still become; classes hold no surrogates, so a surrogate prefix dies here,
        # and clamping drops overlongs and values past U+10FFFF.
        lo = max(value << 6 * remaining, _UTF8_LOWEST[nbytes])
        hi = min((value + 1 << 6 * remaining) - 1, MAX_CP)
        live = frozenset(s for s in stacks if s and lo <= hi and self._meets(self._cls[s[-1]], lo, hi))
        return self._intern((live, value, remaining, nbytes)) if live else None

    # ---------------------------------------------------------------------------------------- interface
    def start(self):
        return self._start

    def step(self, state, byte: int):
        """The state after one more byte, or None when no sentence of the grammar starts with the bytes so far."""
        row = self._rows.get(state)
        if row is None:
            if len(self._rows) >= _CACHE_LIMIT:
                self._rows.clear()
                self._interned.clear()
            row = self._rows[state] = [_MISSING] * 256
        hit = row[byte]
        if hit is _MISSING:
            hit = row[byte] = self._step(state, byte)
        return hit

    @staticmethod
    def complete(state) -> bool:
        return state[2] == 0 and () in state[0]

    def min_close(self, state) -> int:
        """The exact number of bytes the shortest way to a complete sentence still needs."""
        hit = self._closes.get(state)
        if hit is None:
            stacks, _, remaining, _ = state
            rest = self._rest
            if remaining:  # every kept stack's top class holds a completion of this character
                hit = remaining + min(sum(rest[f] for f in s[:-1]) + self._after[s[-1]] for s in stacks)
            else:
                hit = min(sum(rest[f] for f in s) for s in stacks)
            if len(self._closes) >= _CACHE_LIMIT:
                self._closes.clear()
            self._closes[state] = hit
        return hit

    @staticmethod
    def string_room(_state) -> bool:
        return False
