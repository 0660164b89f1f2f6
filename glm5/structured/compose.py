"""Byte automata built from other byte automata: a literal, a sequence, an alternation and a repetition.

:mod:`glm5.structured.structural_tag` assembles its formats from these (``const_string``, ``sequence``, ``or``,
``tag``, ``star`` ...), with the JSON Schema, regex and GBNF automata as leaves. Every automaton here has the interface
:class:`~glm5.structured.constrained.JsonGrammar` walks the token trie with: ``start()``, ``step(state, byte)`` (None =
dead), ``complete(state)``, ``min_close(state)`` (exact: the fewest bytes to a complete state) and ``string_room``.

The combinators are nondeterministic: a state is a frozenset of alternatives, so a part that is complete but could
also go on (a JSON number before an end string that starts with a digit, ``"ab" | "a"`` then ``"b"``) keeps both
readings until the bytes decide. Costs compose exactly because parts are independent: finishing a sequence from part
``i`` costs finishing part ``i`` plus the shortest of each later part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INF = float("inf")
_DONE = None  # the sub-state of a sequence / repetition alternative that has finished


class Literal:
    """Exactly ``data``; a state is the number of bytes written."""

    def __init__(self, data: bytes):
        self.data = data

    @staticmethod
    def start() -> int:
        return 0

    def step(self, state: int, byte: int) -> int | None:
        return state + 1 if state < len(self.data) and self.data[state] == byte else None

    def complete(self, state: int) -> bool:
        return state == len(self.data)

    def min_close(self, state: int) -> int:
        return len(self.data) - state

    @staticmethod
    def string_room(_state) -> bool:
        return False


def _single_room(parts: Sequence[Any], state: frozenset):
    """The string room of the one alternative inside a JSON string (see ``JsonGrammar``); False otherwise."""
    if len(state) != 1:
        return False
    (i, s), = state
    return False if s is _DONE else parts[i].string_room(s)


class Concat:
    """``parts`` one after the other. State: frozenset of (part index, part state); (len(parts), None) = finished."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        n = len(self.parts)
        self.after = [0] * (n + 1)  # after[i]: the shortest parts i.. from their starts
        for i in range(n - 1, -1, -1):
            p = self.parts[i]
            self.after[i] = self.after[i + 1] + p.min_close(p.start())

    def _enter(self, i: int, s, out: set) -> None:
        """Add (i, s) and, while part i is complete there, the start of the next part (the epsilon closure)."""
        while True:
            if (i, s) in out:
                return
            out.add((i, s))
            if i == len(self.parts) or not self.parts[i].complete(s):
                return
            i += 1
            s = self.parts[i].start() if i < len(self.parts) else _DONE

    def start_at(self, i: int, s) -> frozenset:
        """The state in part ``i`` at its state ``s`` (a tag entered after its trigger: the begin partly written)."""
        out: set = set()
        self._enter(i, s, out)
        return frozenset(out)

    def start(self) -> frozenset:
        return self.start_at(0, self.parts[0].start() if self.parts else _DONE)

    def step(self, state: frozenset, byte: int) -> frozenset | None:
        out: set = set()
        for i, s in state:
            if s is _DONE and i == len(self.parts):
                continue
            s2 = self.parts[i].step(s, byte)
            if s2 is not None:
                self._enter(i, s2, out)
        return frozenset(out) if out else None

    def complete(self, state: frozenset) -> bool:
        return (len(self.parts), _DONE) in state

    def min_close(self, state: frozenset) -> float:
        return min((self.after[i] if i == len(self.parts) else self.parts[i].min_close(s) + self.after[i + 1]
                    for i, s in state), default=INF)

    def string_room(self, state: frozenset):
        return _single_room(self.parts, state)


class Alternatives:
    """One of ``parts``. State: frozenset of (part index, part state)."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)

    def start(self) -> frozenset:
        return frozenset((i, p.start()) for i, p in enumerate(self.parts))

    def step(self, state: frozenset, byte: int) -> frozenset | None:
        out = set()
        for i, s in state:
            s2 = self.parts[i].step(s, byte)
            if s2 is not None:
                out.add((i, s2))
        return frozenset(out) if out else None

    def complete(self, state: frozenset) -> bool:
        return any(self.parts[i].complete(s) for i, s in state)

    def min_close(self, state: frozenset) -> float:
        return min((self.parts[i].min_close(s) for i, s in state), default=INF)

    def string_room(self, state: frozenset):
        return _single_room(self.parts, state)


class Repeat:
    """``part`` between ``lo`` and ``hi`` times (``hi`` None: no limit). State: frozenset of (iteration, part state),
    iterations counted from 1 and, without a limit, no further than ``lo`` (later ones behave alike, which keeps the
    states finite); (0, None) = may stop here."""

    def __init__(self, part: Any, lo: int, hi: int | None):
        self.part, self.lo, self.hi = part, lo, hi
        self.once = part.min_close(part.start())

    def _enter(self, c: int, s, out: set) -> None:
        while True:
            if (c, s) in out:
                return
            out.add((c, s))
            if s is _DONE or not self.part.complete(s):
                return
            if c >= self.lo:
                out.add((0, _DONE))
            if self.hi is not None and c >= self.hi:
                return
            c = c + 1 if self.hi is not None else min(c + 1, max(self.lo, 1))
            s = self.part.start()

    def start(self) -> frozenset:
        out: set = set()
        if self.lo == 0:
            out.add((0, _DONE))
        if self.hi != 0:
            self._enter(1, self.part.start(), out)
        return frozenset(out)

    def step(self, state: frozenset, byte: int) -> frozenset | None:
        out: set = set()
        for c, s in state:
            if s is _DONE:
                continue
            s2 = self.part.step(s, byte)
            if s2 is not None:
                self._enter(c, s2, out)
        return frozenset(out) if out else None

    def complete(self, state: frozenset) -> bool:
        return (0, _DONE) in state

    def min_close(self, state: frozenset) -> float:
        return min((0 if s is _DONE else self.part.min_close(s) + max(0, self.lo - c) * self.once for c, s in state),
                   default=INF)

    def string_room(self, state: frozenset):
        if len(state) != 1:
            return False
        (_, s), = state
        return False if s is _DONE else self.part.string_room(s)
