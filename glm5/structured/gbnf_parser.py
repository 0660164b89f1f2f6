"""The GBNF parser behind :mod:`glm5.structured.gbnf` (the syntax it reads, and what it refuses, are described
there): grammar text -> rules as alternatives of elements (character classes and rule references), repetitions and
groups expanded into helper rules. :class:`~glm5.structured.gbnf.GbnfAutomaton` compiles the result into its
pushdown automaton."""

from __future__ import annotations

import re

from .charset import MAX_CP, Ranges, complement, normalise

__all__ = ["MAX_GRAMMAR_ELEMENTS"]

MAX_GRAMMAR_ELEMENTS = 100_000  # elements in all rules after repetitions are expanded
MAX_GROUP_DEPTH = 100  # nested parentheses: the parser recurses per level (deeper hit Python's recursion limit)
_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_RULE_HEAD = re.compile(r"([a-zA-Z0-9_-]+)[ \t]*::=")  # llama.cpp allows no line break before ::=
_SPACE = re.compile(r"(?:[ \t\r\n]|#[^\n]*)*")
_DIGITS = re.compile(r"[0-9]+")
_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "\\": 0x5C, '"': 0x22, "[": 0x5B, "]": 0x5D, "-": 0x2D}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_POSTFIX = {"*": (0, None), "+": (1, None), "?": (0, 1)}
_XGRAMMAR_MACROS = frozenset({"TagDispatch", "TokenTagDispatch", "Token", "ExcludeToken", "Regex"})


# ================================================================================================= parser
class _Parser:
    """Recursive descent over the grammar text. A rule body is a list of alternatives, each a list of elements: a
    class id ``c >= 0`` or a rule reference ``~rule_id`` (negative). Groups with several alternatives and
    repetitions become helper rules, reported under the name of the rule they were made in."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.rule: str | None = None  # the rule being parsed, for messages and as the owner of helper rules
        self.ids: dict[str, int] = {}
        self.owner: list[str] = []  # the user rule each rule belongs to (helpers: the rule they were made in)
        self.bodies: list[list[list[int]] | None] = []
        self.first_use: dict[int, tuple[int, str | None]] = {}  # rule id -> where it is first referenced, and by
        self.classes: list[Ranges] = []
        self.class_ids: dict[Ranges, int] = {}
        self.size = 0
        self.depth = 0  # parentheses open at self.pos

    # ---------------------------------------------------------------------------------------- helpers
    def where(self, pos: int) -> str:
        return f"line {self.text.count(chr(10), 0, pos) + 1}:{pos - self.text.rfind(chr(10), 0, pos)}"

    def fail(self, msg: str, pos: int | None = None):
        rule = f" in rule '{self.rule}'" if self.rule else ""
        raise ValueError(f"gbnf: syntax error at {self.where(self.pos if pos is None else pos)}{rule}: {msg}")

    def peek(self, k: int = 0) -> str:
        return self.text[self.pos + k: self.pos + k + 1]

    def skip_space(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()

    def rule_id(self, name: str) -> int:
        rid = self.ids.get(name)
        if rid is None:
            rid = self.ids[name] = self.new_rule(owner=name)
        return rid

    def new_rule(self, owner: str | None = None, body=None) -> int:
        self.owner.append(owner or self.rule or "")
        self.bodies.append(body)
        return len(self.bodies) - 1

    def grow(self, n: int, pos: int) -> None:
        self.size += n
        if self.size > MAX_GRAMMAR_ELEMENTS:
            self.fail(f"the grammar expands to more than {MAX_GRAMMAR_ELEMENTS} elements (repetitions too large?)", pos)

    def class_id(self, ranges: Ranges) -> int:
        cid = self.class_ids.get(ranges)
        if cid is None:
            cid = self.class_ids[ranges] = len(self.classes)
            self.classes.append(ranges)
        return cid

    # ---------------------------------------------------------------------------------------- grammar
    def parse(self) -> None:
        self.skip_space()
        while self.pos < len(self.text):
            self.parse_rule()
            self.skip_space()

    def parse_rule(self) -> None:
        start = self.pos
        head = _RULE_HEAD.match(self.text, start)
        if head is None:
            name = _NAME.match(self.text, start)
            if name is None:
                self.fail(f"expected a rule name, got {self.peek()!r}")
            self.pos = _SPACE.match(self.text, name.end()).end()
            self.fail(f"expected '::=' after the rule name '{name.group()}'")
        name, self.pos = head.group(1), head.end()
        rid = self.rule_id(name)
        if self.bodies[rid] is not None:
            self.fail(f"rule '{name}' is defined twice", start)
        self.rule = name
        body = self.parse_alternates()
        if self.peek() == ")":
            self.fail("unmatched ')'")
        self.bodies[rid] = body
        self.rule = None

    def parse_alternates(self) -> list[list[int]]:
        alts = [self.parse_sequence()]
        while self.peek() == "|":
            self.pos += 1
            alts.append(self.parse_sequence())
        return alts

    def parse_sequence(self) -> list[int]:
        seq: list[int] = []
        while True:
            self.skip_space()
            if self.peek() in ("", "|", ")") or _RULE_HEAD.match(self.text, self.pos):
                return seq  # a rule ends where the next "name ::=" begins
            atom = self.parse_atom()
            while True:  # postfix operators, each applying to the result of the ones before (as llama.cpp)
                self.skip_space()
                c, at = self.peek(), self.pos
                if c in _POSTFIX:
                    self.pos += 1
                    atom = self.repeat(atom, *_POSTFIX[c], at)
                elif c == "{":
                    atom = self.repeat(atom, *self.parse_bounds(), at)
                else:
                    break
            seq.extend(atom)

    def parse_atom(self) -> list[int]:
        """One element before its postfix operators, as the list of elements it stands for."""
        c, start = self.peek(), self.pos
        if c == '"':
            self.pos += 1
            out = []
            while self.peek() != '"':
                if not self.peek():
                    self.fail("unterminated string literal", start)
                cp = self.parse_char()
                out.append(self.class_id(((cp, cp),)))
            self.pos += 1
            self.grow(len(out), start)
            return out
        if c == "[":
            return [self.parse_class()]
        if c == ".":
            self.pos += 1
            self.grow(1, start)
            return [self.class_id(complement(()))]
        if c == "(":
            if self.peek(1) == "=":
                self.fail("lookahead assertions '(= ...)' (an xgrammar extension) are not supported")
            self.depth += 1
            if self.depth > MAX_GROUP_DEPTH:
                self.fail(f"parentheses nested deeper than {MAX_GROUP_DEPTH} levels")
            self.pos += 1
            alts = self.parse_alternates()
            if self.peek() != ")":
                self.fail(f"expected ')' to close the '(' at {self.where(start)}")
            self.pos += 1
            self.depth -= 1
            if len(alts) == 1:
                return alts[0]
            self.grow(1, start)
            return [~self.new_rule(body=alts)]
        if c in ("<", "!"):
            self.fail("token references (<...>, !<...>) are not supported: this grammar is over text")
        name_match = _NAME.match(self.text, start)
        if name_match:
            name, self.pos = name_match.group(), name_match.end()
            if name in _XGRAMMAR_MACROS:
                self.skip_space()
                if self.peek() == "(":
                    self.fail(f"xgrammar's {name}(...) is not supported", start)
            rid = self.rule_id(name)
            self.first_use.setdefault(rid, (start, self.rule))
            self.grow(1, start)
            return [~rid]
        self.fail("unexpected end of grammar" if not c else f"unexpected {c!r}")

    def parse_char(self) -> int:
        """One character of a literal or class, escapes decoded."""
        at, c = self.pos, self.peek()
        if c != "\\":
            self.pos += 1
            if 0xD800 <= ord(c) <= 0xDFFF:
                self.fail("a surrogate is not a character", at)
            return ord(c)
        esc = self.peek(1)
        if esc in _ESCAPES and esc:
            self.pos += 2
            return _ESCAPES[esc]
        if esc in _HEX_ESCAPES and esc:
            digits = self.text[at + 2: at + 2 + _HEX_ESCAPES[esc]]
            if len(digits) != _HEX_ESCAPES[esc] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"expected {_HEX_ESCAPES[esc]} hex digits after '\\{esc}'", at)
            cp = int(digits, 16)
            if cp > MAX_CP or 0xD800 <= cp <= 0xDFFF:
                self.fail(f"'\\{esc}{digits}' is not a Unicode scalar value", at)
            self.pos = at + 2 + len(digits)
            return cp
        self.fail(f"unknown escape '\\{esc}'", at)

    def parse_class(self) -> int:
        start = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges = []
        while self.peek() != "]":
            if not self.peek():
                self.fail("unterminated character class", start)
            at = self.pos
            lo = hi = self.parse_char()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                hi = self.parse_char()
                if hi < lo:
                    self.fail(f"character range {chr(lo)!r}-{chr(hi)!r} is reversed", at)
            ranges.append((lo, hi))
        self.pos += 1
        self.grow(1, start)
        return self.class_id(complement(ranges) if negated else normalise(ranges))

    def parse_int(self) -> int:
        digits = _DIGITS.match(self.text, self.pos)
        if digits is None:
            self.fail("expected an integer in the repetition bounds")
        self.pos = digits.end()
        self.skip_space()
        return int(digits.group())

    def parse_bounds(self) -> tuple[int, int | None]:
        start = self.pos
        self.pos += 1
        self.skip_space()
        lo, hi = self.parse_int(), None
        if self.peek() == "}":
            hi = lo
        elif self.peek() == ",":
            self.pos += 1
            self.skip_space()
            if self.peek() != "}":
                hi = self.parse_int()
            if self.peek() != "}":
                self.fail("expected '}' to close the repetition bounds")
        else:
            self.fail("expected ',' or '}' in the repetition bounds")
        self.pos += 1
        if hi is not None and lo > hi:
            self.fail(f"repetition {{{lo},{hi}}} has its minimum above its maximum", start)
        return lo, hi

    def repeat(self, atom: list[int], lo: int, hi: int | None, at: int) -> list[int]:
        """``atom{lo,hi}`` (hi None: unbounded) as elements, with helper rules for the optional copies."""
        if not atom:  # "" repeated is still ""
            return []
        self.grow(lo + 2 * ((hi - lo) if hi is not None else 1) + 1, at)  # before building anything
        item = atom[0] if len(atom) == 1 else ~self.new_rule(body=[atom])
        out = [item] * lo
        if hi is None:
            star = self.new_rule()
            self.bodies[star] = [[item, ~star], []]
            out.append(~star)
        elif hi > lo:
            tail: list[int] = []
            for _ in range(hi - lo):  # r_k ::= item r_(k-1) | "" -- at most k more copies
                tail = [~self.new_rule(body=[[item, *tail], []])]
            out.extend(tail)
        return out
