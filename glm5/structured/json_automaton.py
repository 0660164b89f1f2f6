"""A byte-level JSON automaton: the part of constrained decoding that knows JSON.

A state is ``(mode, stack, aux, ws)``; :func:`json_step` advances it by one byte (``None`` = the byte cannot
continue any valid JSON), :func:`json_min_close` is the fewest bytes that complete it, and
:func:`json_complete` says whether the text so far is a whole value. :mod:`glm5.structured.constrained` walks the
token trie with it, so one walk prunes every token whose bytes leave JSON.
"""

from __future__ import annotations

# state = (mode, stack, aux, ws): stack is a str of "{"/"[" (innermost last); ws = last byte was whitespace.
START, VALUE, _ARR_FIRST, _OBJ_FIRST, _KEY, _COLON, _AFTER, _STR, _NUM, _LIT, DONE = range(11)
# _STR aux = (is_key, pending): pending 0 | "esc" | ("u", n) | ("utf", n)
# _NUM aux = (sub, integer_only): sub in "minus", "zero", "int", "dot", "frac", "e", "esign", "exp"
NUM_FINAL = frozenset({"zero", "int", "frac", "exp"})  # number sub-states that may end the number
WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
MAX_DEPTH = 32

# what a typed value may start with (tool-call arguments): JSON type -> first bytes
TYPE_STARTS = {
    "string": frozenset(b'"'),
    "number": frozenset(b"-0123456789"),
    "integer": frozenset(b"-0123456789"),
    "boolean": frozenset(b"tf"),
    "null": frozenset(b"n"),
    "object": frozenset(b"{"),
    "array": frozenset(b"["),
}
TYPE_MIN = {"string": 2, "number": 1, "integer": 1, "boolean": 4, "null": 4, "object": 2, "array": 2}


def _after_value(stack: str):
    return (DONE, "", None, False) if not stack else (_AFTER, stack, None, False)


def value_start(stack: str, b: int, integer_only: bool = False):
    if b == ord("{"):
        return None if len(stack) >= MAX_DEPTH else (_OBJ_FIRST, stack + "{", None, False)
    if b == ord("["):
        return None if len(stack) >= MAX_DEPTH else (_ARR_FIRST, stack + "[", None, False)
    if b == ord('"'):
        return (_STR, stack, (False, 0), False)
    if b == ord("-"):
        return (_NUM, stack, ("minus", integer_only), False)
    if b == ord("0"):
        return (_NUM, stack, ("zero", integer_only), False)
    if b in DIGITS:
        return (_NUM, stack, ("int", integer_only), False)
    if b in _LITERALS:
        return (_LIT, stack, _LITERALS[b], False)
    return None


def _close(stack: str, b: int):
    if stack and ((b == ord("}") and stack[-1] == "{") or (b == ord("]") and stack[-1] == "[")):
        return _after_value(stack[:-1])
    return None


def string_next(pend, b: int):
    """Byte ``b`` inside a string that is not its closing quote: ``(pending, a character completed)``, or None.
    ``pending``: 0 | "esc" | ("u", hex digits left) | ("utf", continuation bytes left)."""
    if pend == 0:
        if b == ord("\\"):
            return "esc", False
        if b < 0x20 or b == 0x7F:
            return None
        if b < 0x80:
            return 0, True
        for lo, hi, more in ((0xC2, 0xDF, 1), (0xE0, 0xEF, 2), (0xF0, 0xF4, 3)):
            if lo <= b <= hi:
                return ("utf", more), False
        return None
    if pend == "esc":
        if b not in _ESCAPES:
            return None
        return (("u", 4), False) if b == ord("u") else (0, True)
    kind, n = pend
    if (kind == "u" and b not in _HEX) or (kind == "utf" and not 0x80 <= b <= 0xBF):
        return None
    return ((kind, n - 1), False) if n > 1 else (0, True)


def number_next(sub: str, b: int, integer_only: bool) -> str | None:
    """The number sub-state after byte ``b`` (None: ``b`` does not continue the number)."""
    if b in DIGITS:
        return {"minus": "zero" if b == ord("0") else "int", "int": "int", "dot": "frac", "frac": "frac",
                "e": "exp", "esign": "exp", "exp": "exp"}.get(sub)
    if b == ord(".") and sub in ("zero", "int") and not integer_only:
        return "dot"
    if b in b"eE" and sub in ("zero", "int", "frac") and not integer_only:
        return "e"
    if b in b"+-" and sub == "e":
        return "esign"
    return None


def json_step(s, b: int):
    """One byte through the JSON automaton; None if ``b`` cannot follow."""
    mode, stack, aux, ws = s
    if mode == _STR:
        is_key, pend = aux
        if pend == 0 and b == ord('"'):
            return (_COLON, stack, None, False) if is_key else _after_value(stack)
        nxt = string_next(pend, b)
        return None if nxt is None else (_STR, stack, (is_key, nxt[0]), False)
    if mode == _NUM:
        sub, int_only = aux
        nxt = number_next(sub, b, int_only)
        if nxt is not None:
            return (_NUM, stack, (nxt, int_only), False)
        if sub not in NUM_FINAL or not stack:  # a top-level number only ends with the value
            return None
        return json_step((_AFTER, stack, None, False), b)  # the number ended; b belongs to what follows
    if mode == _LIT:
        if b != aux[0]:
            return None
        return (_LIT, stack, aux[1:], False) if len(aux) > 1 else _after_value(stack)
    if mode == DONE:
        return None
    if b in WHITESPACE:
        if ws or mode == START:
            return None
        return (mode, stack, aux, True)
    if mode == START:
        return (_OBJ_FIRST, "{", None, False) if b == ord("{") else None
    if mode == VALUE:
        return value_start(stack, b)
    if mode == _ARR_FIRST:
        return _close(stack, b) or value_start(stack, b)
    if mode == _OBJ_FIRST:
        if b == ord('"'):
            return (_STR, stack, (True, 0), False)
        return _close(stack, b)
    if mode == _KEY:
        return (_STR, stack, (True, 0), False) if b == ord('"') else None
    if mode == _COLON:
        return (VALUE, stack, None, False) if b == ord(":") else None
    if mode == _AFTER:
        if b == ord(","):
            return (_KEY, stack, None, False) if stack[-1] == "{" else (VALUE, stack, None, False)
        return _close(stack, b)
    return None


def json_min_close(s) -> int:
    """Bytes of the shortest completion of state ``s`` (each is one single-byte token)."""
    mode, stack, aux, _ = s
    n = len(stack)
    if mode == _STR:
        is_key, pend = aux
        extra = 0 if pend == 0 else (1 if pend == "esc" else pend[1])
        return extra + 1 + (2 if is_key else 0) + n  # closing quote (+ ":0" for a key) + closers
    if mode == _NUM:
        sub = aux[0]
        return (0 if sub in NUM_FINAL else 1) + n
    if mode == _LIT:
        return len(aux) + n
    return {START: 2, VALUE: 1 + n, _ARR_FIRST: n, _OBJ_FIRST: n, _KEY: 4 + n, _COLON: 2 + n, _AFTER: n,
            DONE: 0}[mode]


def json_complete(s) -> bool:
    mode, stack, aux, _ = s
    return mode == DONE or (mode == _NUM and not stack and aux[0] in NUM_FINAL)


def json_accepts(text: str | bytes, top_level_object: bool = True) -> bool:
    """True if ``text`` is a complete value of the automaton (used by tests)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    s = (START, "", None, False) if top_level_object else (VALUE, "", None, False)
    for b in data:
        s = json_step(s, b)
        if s is None:
            return False
    return json_complete(s)
