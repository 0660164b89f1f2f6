"""``regex`` structured output: the text is one full match of a regular expression (vLLM's ``regex``); also JSON
Schema's ``pattern`` / ``format`` on strings (``search`` and ``json_string``, see :class:`RegexAutomaton`).

:class:`RegexAutomaton` has the byte-automaton interface :class:`~glm5.structured.constrained.JsonGrammar` walks the
token trie with (``start``, ``step``, ``complete``, ``min_close``, ``string_room``).

How: the pattern is parsed into a small syntax tree, character classes are turned into the UTF-8 byte sequences of
their code points (so the automaton reads bytes, as the token trie does, and never needs a decoder state), the tree
becomes a Thompson NFA over bytes, and the DFA is built lazily: a state is the frozenset of NFA states reachable
after the bytes so far, and each state's 256 transitions are computed on first use and cached (bounded). Most
patterns visit few DFA states, while ``(a|b)*a(a|b){20}``-style patterns that blow up when built eagerly cost only
the states a generation touches. ``min_close`` is exact: each NFA state's byte distance to acceptance is
precomputed once (a 0-1 BFS backwards over the NFA), and a DFA state's is the minimum over its members.

Syntax (Python's ``re``, with ``re.fullmatch`` semantics: the whole output must match):
* literals and escapes ``\\n \\t \\r \\f \\v \\a \\0 \\xhh \\uhhhh \\Uhhhhhhhh``, escaped punctuation;
* ``.`` (any character but newline), classes ``[a-z_]``, ``[^...]``, ``\\d \\w \\s`` and their negations, with
  **ASCII** meanings (``[0-9]``, ``[A-Za-z0-9_]``, ``[ \\t\\n\\r\\f\\v]``), as in JSON Schema, outlines and
  ``re.ASCII``; non-ASCII literals are matched exactly;
* groups ``(...)``, ``(?:...)``, ``(?P<name>...)``, ``(?<name>...)``; alternation ``|``;
* quantifiers ``* + ? {n} {n,} {,m} {n,m}`` and their lazy forms (laziness does not change which texts match);
* ``^`` / ``\\A`` at the start and ``$`` / ``\\Z`` / ``\\z`` at the end (implied anyway).
Refused with a ValueError (they are not regular, or change semantics we would silently not enforce): backreferences,
lookaround, word boundaries, anchors elsewhere, inline flags, possessive quantifiers, conditionals, ``\\N{...}``,
and patterns whose NFA would exceed :data:`MAX_NFA_STATES`.
"""

from __future__ import annotations

import re
from collections import deque

from .charset import MAX_CP, complement, normalise, subtract

__all__ = ["RegexAutomaton", "MAX_NFA_STATES", "MAX_REPEAT", "MAX_GROUP_DEPTH"]

MAX_NFA_STATES = 50_000
MAX_REPEAT = 1000
MAX_GROUP_DEPTH = 100  # nested groups: parsing and building recurse per level (deeper hit Python's recursion limit)
_TRANSITION_CACHE = 20_000  # DFA states whose transitions are kept; cleared when full (states stay valid)

_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE = [(0x09, 0x0D), (0x20, 0x20)]
_ANY_BUT_NEWLINE = [(0, 0x09), (0x0B, MAX_CP)]
_BRACES = re.compile(r"([0-9]*)(,)?([0-9]*)")  # the body of {n}, {n,}, {,m}, {n,m}
_SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "a": 0x07}


# ================================================================================================ classes
_JSON_ESCAPED = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
_SHORT_ESCAPES = {0x22: b'\\"', 0x5C: b"\\\\", 0x08: b"\\b", 0x0C: b"\\f", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}


def _json_escape(cp: int) -> bytes:
    """The one escape a JSON string writes ``cp`` with (the short form where there is one, else ``\\u00xx``)."""
    return _SHORT_ESCAPES.get(cp) or b"\\u%04x" % cp


def _utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The code points ``lo..hi`` (surrogates skipped) as a list of byte-range sequences: every sequence is a list of
    (low, high) byte ranges, one per byte position, and the sequences' products are exactly the encodings."""
    out: list[list[tuple[int, int]]] = []
    for lo, hi in normalise([(lo, hi)]):  # surrogates have no encoding
        for top in (0x7F, 0x7FF, 0xFFFF, MAX_CP):  # split where the encoded length changes
            if lo > hi:
                break
            if lo <= top:
                _split_aligned(lo, min(hi, top), out)
                lo = top + 1
    return out


def _split_aligned(lo: int, hi: int, out: list) -> None:
    a, b = chr(lo).encode(), chr(hi).encode()  # same length here
    n = len(a)
    # Split until every continuation position spans its full 0x80..0xBF range below the first differing byte, so
    # the range is the product of per-position byte ranges.
    for i in range(1, n):
        mask = (1 << (6 * i)) - 1  # the code point bits held by the last i bytes
        if lo & ~mask != hi & ~mask:
            if lo & mask:
                _split_aligned(lo, lo | mask, out)
                _split_aligned((lo | mask) + 1, hi, out)
                return
            if hi & mask != mask:
                _split_aligned(lo, (hi & ~mask) - 1, out)
                _split_aligned(hi & ~mask, hi, out)
                return
    out.append([(a[j], b[j]) for j in range(n)])


# ================================================================================================= parser
def _shown(pattern: str) -> str:
    """The pattern as error messages quote it: whole when short, else its start."""
    return repr(pattern) if len(pattern) <= 80 else repr(pattern[:77]) + "..."


class _Parser:
    """Recursive descent over the pattern. Nodes: ("set", ranges), ("cat", [nodes]), ("alt", [nodes]),
    ("rep", node, min, max_or_None)."""

    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0
        self.anchored_start = self.anchored_end = False
        self.depth = 0  # groups open at self.i

    def error(self, what: str) -> ValueError:
        return ValueError(f"regex {_shown(self.p)}: {what} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self):
        if self.p.startswith("^"):
            self.i, self.anchored_start = 1, True
        elif self.p.startswith("\\A"):
            self.i, self.anchored_start = 2, True
        node = self.alternation()
        if self.i < len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while self.i < len(self.p) and self.p[self.i] not in "|)":
            if self._at_end_anchor():
                break
            atom = self.atom()
            items.append(self.quantified(atom))
        return items[0] if len(items) == 1 else ("cat", items)

    def _at_end_anchor(self) -> bool:
        """``$`` / ``\\Z`` / ``\\z`` are accepted only as the pattern's last token (outside any group)."""
        rest = self.p[self.i:]
        if rest in ("$", "\\Z", "\\z"):
            self.i, self.anchored_end = len(self.p), True
            return True
        return False

    def quantified(self, atom):
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{":
                bounds = self._braces()
                if bounds is None:
                    return atom
                lo, hi = bounds
            else:
                return atom
            if self.peek() == "?":
                self.i += 1  # lazy: the same set of full matches
            elif self.peek() == "+":
                raise self.error("possessive quantifiers are not supported")
            if (hi is not None and hi > MAX_REPEAT) or lo > MAX_REPEAT:
                raise self.error(f"repetition bounds above {MAX_REPEAT}")
            if hi is not None and lo > hi:
                raise self.error(f"bad repetition {{{lo},{hi}}} (min > max)")
            atom = ("rep", atom, lo, hi)
            if self.peek() in ("*", "+", "?", "{") and self._braces_or_op_follows():
                raise self.error("multiple repeat")

    def _braces_or_op_follows(self) -> bool:
        if self.peek() != "{":
            return True
        save = self.i
        ok = self._braces() is not None
        self.i = save
        return ok

    def _braces(self):
        """``{n}``, ``{n,}``, ``{,m}``, ``{n,m}``; anything else leaves ``{`` a literal, as Python does."""
        j = self.p.find("}", self.i)
        m = _BRACES.fullmatch(self.p, self.i + 1, j) if j >= 0 else None
        if m is None or (m.group(2) is None and not m.group(1)):
            return None
        self.i = j + 1
        lo_s, comma, hi_s = m.groups()
        lo = int(lo_s) if lo_s else 0
        return (lo, lo) if comma is None else (lo, int(hi_s) if hi_s else None)

    def atom(self):
        c = self.p[self.i]
        if c == "(":
            return self.group()
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            self.i += 1
            return ("set", _ANY_BUT_NEWLINE)
        if c in "*+?":
            raise self.error("nothing to repeat")
        if c == "{" and self._braces_or_op_follows():
            raise self.error("nothing to repeat")
        if c == "^":
            raise self.error("'^' is supported only at the start of the pattern")
        if c == "$":
            raise self.error("'$' is supported only at the end of the pattern")
        if c == "\\":
            return ("set", self.escape(in_class=False))
        self.i += 1
        return ("set", [(ord(c), ord(c))])

    def group(self):
        self.depth += 1
        if self.depth > MAX_GROUP_DEPTH:
            raise self.error(f"groups nested deeper than {MAX_GROUP_DEPTH} levels")
        self.i += 1
        if self.p.startswith("?", self.i):
            rest = self.p[self.i + 1:]
            if rest.startswith(":"):
                self.i += 2
            elif rest.startswith("P<") or (rest.startswith("<") and not rest.startswith(("<=", "<!"))):
                j = self.p.find(">", self.i)
                if j < 0:
                    raise self.error("unterminated group name")
                self.i = j + 1
            elif rest.startswith(("=", "!", "<=", "<!")):
                raise self.error("lookaround assertions are not supported")
            elif rest.startswith("P="):
                raise self.error("backreferences are not supported")
            elif rest.startswith("("):
                raise self.error("conditional groups are not supported")
            else:
                raise self.error("inline flags and other (?...) extensions are not supported")
        node = self.alternation()
        if self.peek() != ")":
            raise self.error("missing ')'")
        self.i += 1
        self.depth -= 1
        return node

    def char_class(self) -> list[tuple[int, int]]:
        start = self.i
        self.i += 1
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                self.i = start
                raise self.error("unterminated character class")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo_set = self._class_item()
            dash = self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]"
            if dash and not (len(lo_set) == 1 and lo_set[0][0] == lo_set[0][1]):
                raise self.error("bad character range (a class like \\d cannot start a range)")
            if dash:
                self.i += 1
                hi_set = self._class_item()
                if len(hi_set) != 1 or hi_set[0][0] != hi_set[0][1]:
                    raise self.error("bad character range")
                lo, hi = lo_set[0][0], hi_set[0][0]
                if lo > hi:
                    raise self.error(f"bad character range {chr(lo)!r}-{chr(hi)!r}")
                ranges.append((lo, hi))
            else:
                ranges.extend(lo_set)
        out = complement(ranges) if negate else normalise(ranges)
        if not out:
            raise self.error("character class matches nothing")
        return out

    def _class_item(self) -> list[tuple[int, int]]:
        c = self.p[self.i]
        if c == "\\":
            return self.escape(in_class=True)
        if c == "[" and self.p.startswith(("[:", "[=", "[."), self.i):
            raise self.error("POSIX classes like [:alpha:] are not supported")
        self.i += 1
        return [(ord(c), ord(c))]

    def escape(self, in_class: bool) -> list[tuple[int, int]]:
        self.i += 1
        if self.i >= len(self.p):
            raise self.error("bad escape (end of pattern)")
        c = self.p[self.i]
        self.i += 1
        classes = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
        if c in classes:
            return normalise(classes[c])
        if c.lower() in classes:
            return complement(classes[c.lower()])
        if c in _SIMPLE_ESCAPES:
            return [(_SIMPLE_ESCAPES[c],) * 2]
        if c == "b" and in_class:
            return [(0x08, 0x08)]
        if c in ("x", "u", "U"):
            n = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"bad escape \\{c}")
            self.i += n
            cp = int(digits, 16)
            if cp > MAX_CP:
                raise self.error(f"bad escape \\{c}{digits}")
            return [(cp, cp)]
        if c == "0":
            digits = ""
            while len(digits) < 2 and self.peek() is not None and self.peek() in "01234567":
                digits += self.p[self.i]
                self.i += 1
            cp = int(digits or "0", 8)
            return [(cp, cp)]
        if c.isdigit():
            raise self.error("backreferences are not supported")
        if c in "bBAZz":
            raise self.error(f"\\{c} is not supported here (word boundaries and inner anchors are not regular "
                             "constraints on the text)")
        if c == "N":
            raise self.error("\\N{...} named characters are not supported")
        if c.isascii() and c.isalnum():
            raise self.error(f"bad escape \\{c}")
        return [(ord(c), ord(c))]


# ==================================================================================================== NFA
class _Nfa:
    """Thompson construction over bytes: ``edges[s]`` = list of (lo, hi, target) byte transitions, ``eps[s]`` =
    epsilon targets; one start and one accept state."""

    def __init__(self, json_string: bool = False):
        self.edges: list[list[tuple[int, int, int]]] = []
        self.eps: list[list[int]] = []
        self.json_string = json_string

    def new(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise ValueError(f"regex too large: its automaton would exceed {MAX_NFA_STATES} states")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, node) -> tuple[int, int]:
        """(entry, exit) states of a fragment."""
        kind = node[0]
        if kind == "set":
            entry, exit_ = self.new(), self.new()
            ranges, escapes = node[1], []
            if self.json_string:  # '"', '\\' and control characters appear in a JSON string only escaped
                escapes = [_json_escape(c) for lo, hi in ranges for c in range(lo, min(hi, 0x5C) + 1)
                           if c < 0x20 or c in (0x22, 0x5C)]
                ranges = subtract(ranges, _JSON_ESCAPED)
            seqs = [seq for lo, hi in ranges for seq in _utf8_sequences(lo, hi)]
            seqs += [[(b, b) for b in esc] for esc in escapes]
            for seq in seqs:
                s = entry
                for k, (blo, bhi) in enumerate(seq):
                    t = exit_ if k == len(seq) - 1 else self.new()
                    self.edges[s].append((blo, bhi, t))
                    s = t
            return entry, exit_
        if kind == "cat":
            entry, cur = None, None
            for child in node[1]:
                a, b = self.build(child)
                if cur is None:
                    entry = a
                else:
                    self.eps[cur].append(a)
                cur = b
            return entry, cur
        if kind == "alt":
            entry, exit_ = self.new(), self.new()
            for child in node[1]:
                a, b = self.build(child)
                self.eps[entry].append(a)
                self.eps[b].append(exit_)
            return entry, exit_
        if kind == "empty":
            s = self.new()
            return s, s
        _, child, lo, hi = node
        entry = cur = self.new()
        for _ in range(lo):  # the mandatory copies
            a, b = self.build(child)
            self.eps[cur].append(a)
            cur = b
        if hi is None:  # then a loop
            a, b = self.build(child)
            self.eps[cur].append(a)
            self.eps[b].append(cur)
            return entry, cur
        exit_ = self.new()
        self.eps[cur].append(exit_)
        for _ in range(hi - lo):  # then optional copies, each may stop
            a, b = self.build(child)
            self.eps[cur].append(a)
            self.eps[b].append(exit_)
            cur = b
        return entry, exit_


def _empty_sequences(node):
    """Replace the empty sequences a parse can produce (``()``, ``a|``) by an explicit node."""
    if node == ("cat", []):
        return ("empty",)
    if node[0] in ("cat", "alt"):
        return (node[0], [_empty_sequences(c) for c in node[1]])
    if node[0] == "rep":
        return ("rep", _empty_sequences(node[1]), node[2], node[3])
    return node


# ============================================================================================= automaton
class RegexAutomaton:
    """The byte automaton of "the text fully matches ``pattern``" (see the module docstring for the syntax).
    A state is a frozenset of NFA states; ``step`` returns None when no match can continue.

    ``search``: JSON Schema's ``pattern`` semantics instead: the text need only *contain* a match, unless the
    pattern is anchored with ``^`` / ``$``. ``json_string``: the bytes are the body of a JSON string literal (between
    its quotes) whose decoded text must match; characters that JSON must escape are read in their one canonical
    escape (``\\"``, ``\\n``, ``\\u001f`` ...), so every matching text has exactly one encoding here.
    """

    def __init__(self, pattern: str, *, search: bool = False, json_string: bool = False):
        if not isinstance(pattern, str):
            raise ValueError(f"regex: the pattern must be a string, got {type(pattern).__name__}")
        parser = _Parser(pattern)
        tree = _empty_sequences(parser.parse())
        if search:
            anything = ("rep", ("set", [(0, MAX_CP)]), 0, None)
            tree = ("cat", [*([] if parser.anchored_start else [anything]), tree,
                            *([] if parser.anchored_end else [anything])])
        self.pattern = pattern
        nfa = _Nfa(json_string)
        entry, self.accept = nfa.build(tree)
        self._edges, self._eps = nfa.edges, nfa.eps
        self._distance = self._distances_to_accept()
        # Searching without an end anchor, a text that contains a match accepts whatever follows: every state with
        # the accept state in it is the same state. Merging them keeps the DFA small (the other threads would
        # otherwise make a new state after every character of a long string).
        self._absorbing = None
        if search and not parser.anchored_end:
            self._absorbing = self._closure([self.accept])
        self._start = self._closure([entry])
        if not self._start:
            raise ValueError(f"regex {_shown(pattern)} matches nothing")
        self._next: dict[frozenset, list] = {}

    def _distances_to_accept(self) -> list[float]:
        """Bytes from each NFA state to the accept state (0-1 BFS over reversed edges; inf = cannot finish)."""
        n = len(self._edges)
        rev_eps: list[list[int]] = [[] for _ in range(n)]
        rev_byte: list[list[int]] = [[] for _ in range(n)]
        for s in range(n):
            for t in self._eps[s]:
                rev_eps[t].append(s)
            for _, _, t in self._edges[s]:
                rev_byte[t].append(s)
        dist = [float("inf")] * n
        dist[self.accept] = 0
        queue = deque([self.accept])
        while queue:
            t = queue.popleft()
            d = dist[t]
            for s in rev_eps[t]:
                if d < dist[s]:
                    dist[s] = d
                    queue.appendleft(s)
            for s in rev_byte[t]:
                if d + 1 < dist[s]:
                    dist[s] = d + 1
                    queue.append(s)
        return dist

    def _closure(self, states) -> frozenset:
        """Epsilon closure, keeping only states that have bytes (or are the accept state) and can still finish."""
        seen, stack = set(states), list(states)
        while stack:
            for t in self._eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        if self._absorbing is not None and self.accept in seen:
            return self._absorbing
        inf = float("inf")
        return frozenset(s for s in seen if self._distance[s] < inf and (self._edges[s] or s == self.accept))

    def start(self) -> frozenset:
        return self._start

    def step(self, state: frozenset, byte: int) -> frozenset | None:
        row = self._next.get(state)
        if row is None:
            if len(self._next) >= _TRANSITION_CACHE:
                self._next.clear()
            row = self._next[state] = [False] * 256
        nxt = row[byte]
        if nxt is False:
            targets = [t for s in state for lo, hi, t in self._edges[s] if lo <= byte <= hi]
            nxt = self._closure(targets) or None
            row[byte] = nxt
        return nxt

    def absorbing(self, state: frozenset) -> bool:
        """True for the state of a search that has found its match: every further character keeps it."""
        return state is self._absorbing

    def complete(self, state: frozenset) -> bool:
        return self.accept in state

    def min_close(self, state: frozenset) -> int:
        return int(min(self._distance[s] for s in state))

    @staticmethod
    def string_room(_state) -> bool:
        return False
