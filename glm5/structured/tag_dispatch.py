"""Free text that switches to structure when a trigger appears: the byte automaton behind ``structural_tag``'s
``triggered_tags`` (vLLM's legacy ``structures`` + ``triggers``) and ``any_text``.

:class:`TagDispatch` has the interface :class:`~glm5.structured.constrained.JsonGrammar` walks the token trie with
(``start``, ``step``, ``complete``, ``min_close``, ``string_room``).

Semantics (xgrammar's): the output is free text until one of the *dispatch strings* first ends in it:
* a trigger: the text from the trigger on must go on as one of the tags whose ``begin`` starts with that trigger
  (``begin``, then the tag's content and end); free text follows again, or, with ``stop_after_first``, nothing;
* an end string (``ends``: the end of the tag this text is the content of): the text is over.
At the top level (no ends) the free text may stop anywhere between characters. Free text is valid UTF-8 and must not
contain an ``excludes`` string. ``at_least_one``: the output starts with a tag (no text before the first).

Exact on bytes, whatever the token boundaries: the free text is scanned one byte at a time by an Aho-Corasick
automaton over every dispatch and exclude string (the free *thread*, alive while no such string has ended inside the
free text), and every place a dispatch string could have begun is followed by a *match thread* (string, bytes matched)
started there. The first match thread to finish wins (earliest end, as with xgrammar's Aho-Corasick dispatch) and
ends the others; several finishing on the same byte are alternatives. So a trigger split across tokens is caught, a
token that carries a trigger and goes on is checked against the tags, and an exclude string that straddles the start
of the end string does not count (the content before the end does not contain it).

``min_close`` is exact: from a free state it is a shortest path (Dijkstra over bytes, each byte class represented
once) to a place where the text may stop or to a dispatch string's end plus the cheapest way to finish from there;
from inside a tag it is the tag's own ``min_close`` plus what follows a tag. Costs and transitions are cached per
state, so a walk of the vocabulary from a free-text state costs dictionary lookups after the first.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from itertools import count
from typing import Any

from .compose import INF, Concat, Alternatives, Literal

__all__ = ["MAX_STRING", "MAX_STRINGS_TOTAL", "TagDispatch", "utf8_next"]

_CACHE_LIMIT = 200_000  # cached transitions / costs per automaton; cleared when full (states stay valid)
# A free state holds a match thread per way the text can end in a dispatch string's prefix, so self-similar strings
# ("aaaa...") make states as large as the strings: bounded, so that no spec makes compiling or a step slow.
MAX_STRING = 256  # bytes in one trigger / end string / exclude
MAX_STRINGS_TOTAL = 8192  # bytes in all of them together
_DONE = ("d",)  # the item of a finished dispatch (its end string written, or stopped after the first tag)


def utf8_next(pending, b: int):
    """UTF-8 validity one byte at a time: ``pending`` is 0 between characters or (bytes left, low, high) for the range
    the next byte must fall in; returns the new one, or None for a byte that cannot come here (overlongs, surrogates
    and code points past U+10FFFF included)."""
    if pending == 0:
        if b < 0x80:
            return 0
        if 0xC2 <= b <= 0xDF:
            return (1, 0x80, 0xBF)
        if 0xE0 <= b <= 0xEF:
            return (2, 0xA0 if b == 0xE0 else 0x80, 0x9F if b == 0xED else 0xBF)
        if 0xF0 <= b <= 0xF4:
            return (3, 0x90 if b == 0xF0 else 0x80, 0x8F if b == 0xF4 else 0xBF)
        return None
    left, lo, hi = pending
    if not lo <= b <= hi:
        return None
    return 0 if left == 1 else (left - 1, 0x80, 0xBF)


class _Scanner:
    """Aho-Corasick over byte strings: ``delta(node, byte)``; ``hit[node]``: some string ends at this node."""

    def __init__(self, strings: Sequence[bytes]):
        self.goto: list[dict[int, int]] = [{}]
        self.hit = [False]
        for s in strings:
            node = 0
            for b in s:
                nxt = self.goto[node].get(b)
                if nxt is None:
                    nxt = self.goto[node][b] = len(self.goto)
                    self.goto.append({})
                    self.hit.append(False)
                node = nxt
            self.hit[node] = True
        self.fail = [0] * len(self.goto)
        queue = list(self.goto[0].values())
        for u in queue:  # breadth first, so a node's failure link is set before its children's
            for b, v in self.goto[u].items():
                f = self.fail[u]
                while f and b not in self.goto[f]:
                    f = self.fail[f]
                self.fail[v] = self.goto[f].get(b, 0)
                self.hit[v] = self.hit[v] or self.hit[self.fail[v]]
                queue.append(v)
        self._delta: dict[tuple[int, int], int] = {}

    def delta(self, node: int, b: int) -> int:
        key = (node, b)
        hit = self._delta.get(key)
        if hit is None:
            n = node
            while n and b not in self.goto[n]:
                n = self.fail[n]
            hit = self._delta[key] = self.goto[n].get(b, 0)
        return hit


class TagDispatch:
    """Free text with triggered tags (see the module docstring).

    ``triggers``: byte strings; ``tags``: (begin, body) pairs, ``body`` the automaton of what follows ``begin`` (the
    content and the end); a tag belongs to each trigger its begin starts with. ``ends``: the strings that end the
    text (empty: top level, the text may stop between characters). A state is a frozenset of items:
    ("f", utf8 pending, scanner node or None, match threads) free text; ("t", tag, state) inside a tag;
    ("e", state) writing an end after the first tag with ``stop_after_first``; ("d",) finished.
    """

    def __init__(self, triggers: Sequence[bytes] = (), tags: Sequence[tuple[bytes, Any]] = (),
                 ends: Sequence[bytes] = (), excludes: Sequence[bytes] = (), at_least_one: bool = False,
                 stop_after_first: bool = False):
        strings = (*triggers, *ends, *excludes)
        if any(not p for p in strings):
            raise ValueError("triggers, end strings and excludes must be non-empty")
        if any(len(p) > MAX_STRING for p in strings) or sum(map(len, strings)) > MAX_STRINGS_TOTAL:
            raise ValueError(f"triggers, the end strings that end free text and excludes are limited to {MAX_STRING} "
                             f"bytes each and {MAX_STRINGS_TOTAL} in all")
        self.tags = [Concat([Literal(begin), body]) for begin, body in tags]
        self.begins = [begin for begin, _ in tags]
        self.patterns = [*triggers, *ends]  # the dispatch strings: triggers first
        self.n_triggers = len(triggers)
        self.ends = tuple(ends)
        self.at_least_one, self.stop_after_first = at_least_one, stop_after_first
        self.trigger_tags = [[k for k, b in enumerate(self.begins) if b.startswith(t)] for t in triggers]
        self.final = (Literal(self.ends[0]) if len(self.ends) == 1 else Alternatives([Literal(e) for e in self.ends])
                      if self.ends else None)
        self.scanner = _Scanner([*self.patterns, *excludes])
        self._first: dict[int, list[int]] = {}
        for p, s in enumerate(self.patterns):
            self._first.setdefault(s[0], []).append(p)
        used = {b for s in (*self.patterns, *excludes) for b in s}
        spare = [b for b in range(0x20, 0x7F) if b not in used] or [b for b in range(0x80) if b not in used]
        # bytes in no string all act alike (the scanner back at its root, every match thread ended): one stands in
        self._alphabet0 = sorted(used | set(spare[:1])) if spare else list(range(256))
        self.fresh = ("f", 0, 0, frozenset())
        self._free_next: dict[tuple, Any] = {}
        self._next: dict[tuple, Any] = {}
        self._costs: dict[Any, float] = {}
        # What follows a tag costs the cheapest way out of fresh free text, which never goes through another tag
        # (that would end in fresh free text again, and cost more): so it is computed with the tags left out.
        self.after_tag = INF
        if stop_after_first:
            self.after_tag = self.final.min_close(self.final.start()) if self.final else 0
        self._pattern_cost = self._dispatch_costs()
        self.fresh_cost = self._free_cost(self.fresh)
        if not stop_after_first:
            self.after_tag = self.fresh_cost
            self._pattern_cost = self._dispatch_costs()
        self._costs.clear()
        if self.min_close(self.start()) == INF:
            raise ValueError("no output can finish: a trigger always ends inside the end string before it does")

    def _dispatch_costs(self) -> list[float]:
        costs = []
        for p, s in enumerate(self.patterns):
            if p >= self.n_triggers:
                costs.append(0)
            else:
                costs.append(min((self.tags[k].min_close(self.tags[k].start_at(0, len(s))) + self.after_tag
                                  for k in self.trigger_tags[p]), default=INF))
        return costs

    # ---- items
    def _tag_item(self, k: int, s, out: set) -> None:
        out.add(("t", k, s))
        if self.tags[k].complete(s):
            if not self.stop_after_first:
                out.add(self.fresh)
            elif self.final is None:
                out.add(_DONE)
            else:
                self._final_item(self.final.start(), out)

    def _final_item(self, s, out: set) -> None:
        out.add(("e", s))
        if self.final.complete(s):
            out.add(_DONE)

    def _dispatched(self, p: int, out: set) -> None:
        if p >= self.n_triggers:
            out.add(_DONE)
            return
        for k in self.trigger_tags[p]:
            self._tag_item(k, self.tags[k].start_at(0, len(self.patterns[p])), out)

    def _free_step(self, item: tuple, b: int):
        """A free item after byte ``b``: ("dispatch", patterns that ended), a free item, or None."""
        key = (item, b)
        hit = self._free_next.get(key, False)
        if hit is not False:
            return hit
        _, pending, node, threads = item
        ended, live = [], set()
        for p, j in threads:
            s = self.patterns[p]
            if s[j] == b:
                if j + 1 == len(s):
                    ended.append(p)
                else:
                    live.add((p, j + 1))
        if node is not None and pending == 0:  # a dispatch string may begin here
            for p in self._first.get(b, ()):
                if len(self.patterns[p]) == 1:
                    ended.append(p)
                else:
                    live.add((p, 1))
        if ended:  # the earliest end wins: the free text and the other match threads stop here
            result = ("dispatch", tuple(sorted(set(ended))))
        else:
            nxt = utf8_next(pending, b) if node is not None else None
            node2 = None
            if nxt is not None:
                node2 = self.scanner.delta(node, b)
                if self.scanner.hit[node2]:  # an exclude string ended inside the free text
                    node2 = None
            result = None if node2 is None and not live else ("f", nxt if node2 is not None else 0, node2,
                                                               frozenset(live))
        if len(self._free_next) >= _CACHE_LIMIT:
            self._free_next.clear()
        self._free_next[key] = result
        return result

    def _free_cost(self, item: tuple) -> float:
        """The fewest bytes from a free item to a place where the output may stop, by Dijkstra over its free items."""
        hit = self._costs.get(item)
        if hit is not None:
            return hit
        tie = count()
        heap: list = [(0, next(tie), item)]
        seen = set()
        best = INF
        while heap:
            d, _, it = heapq.heappop(heap)
            if it is None or (not self.ends and it[2] is not None and it[1] == 0):
                best = d  # a dispatch string's end and its cheapest finish, or top-level text that may stop here
                break
            if it in seen:
                continue
            seen.add(it)
            pending = it[1]
            for b in self._alphabet0 if pending == 0 else range(pending[1], pending[2] + 1):
                r = self._free_step(it, b)
                if r is None:
                    continue
                if r[0] == "dispatch":
                    c = d + 1 + min(self._pattern_cost[p] for p in r[1])
                    if c < INF:
                        heapq.heappush(heap, (c, next(tie), None))
                elif r not in seen:
                    heapq.heappush(heap, (d + 1, next(tie), r))
        if len(self._costs) >= _CACHE_LIMIT:
            self._costs.clear()
        self._costs[item] = best
        return best

    # ---- interface
    def start(self) -> frozenset:
        if not self.at_least_one:
            return frozenset([self.fresh])
        out: set = set()
        for k, tag in enumerate(self.tags):
            self._tag_item(k, tag.start(), out)
        return frozenset(out)

    def step(self, state: frozenset, b: int) -> frozenset | None:
        key = (state, b)
        hit = self._next.get(key, False)
        if hit is not False:
            return hit
        out: set = set()
        for item in state:
            kind = item[0]
            if kind == "f":
                r = self._free_step(item, b)
                if r is not None and r[0] == "dispatch":
                    for p in r[1]:
                        self._dispatched(p, out)
                elif r is not None:
                    out.add(r)
            elif kind == "t":
                s2 = self.tags[item[1]].step(item[2], b)
                if s2 is not None:
                    self._tag_item(item[1], s2, out)
            elif kind == "e":
                s2 = self.final.step(item[1], b)
                if s2 is not None:
                    self._final_item(s2, out)
        result = frozenset(out) if out else None
        if len(self._next) >= _CACHE_LIMIT:
            self._next.clear()
        self._next[key] = result
        return result

    def complete(self, state: frozenset) -> bool:
        return _DONE in state or (not self.ends and any(i[0] == "f" and i[2] is not None and i[1] == 0 for i in state))

    def min_close(self, state: frozenset) -> float:
        best = INF
        for item in state:
            kind = item[0]
            if kind == "f":
                c = self._free_cost(item)
            elif kind == "t":
                c = self.tags[item[1]].min_close(item[2]) + self.after_tag
            elif kind == "e":
                c = self.final.min_close(item[1])
            else:
                c = 0
            best = min(best, c)
        return best

    def string_room(self, state: frozenset):
        if len(state) != 1:
            return False
        (item,) = state
        return self.tags[item[1]].string_room(item[2]) if item[0] == "t" else False
