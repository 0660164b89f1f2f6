"""Raw text inside a GLM-5 tool call's argument value (string values are written raw, not JSON-encoded): it must not
contain ``</arg_value>`` or ``</tool_call>``, where the output parser would end the value.

* :func:`closer_tail` is that rule as a byte automaton: the state is the longest end of the text so far that begins
  one of the tags (at most 11 bytes, ~20 states), so it walks the token trie like any automaton and free-text states
  of the tool-call grammar stay few.
* :class:`RawText` is a ``pattern`` / ``format`` regex over such text (the regex's automaton and the tag watch).
* :func:`free_text_ids`: the tokens free text may go on with after a given tail. A token of whole UTF-8 characters
  without ``>`` (``TokenVocab.raw_plain``) can never complete a tag, since both end with their only ``>``; only the
  others (``TokenVocab.raw_special_trie``, a few percent) are walked, once per tail and vocabulary.

The tool-call grammar used to decode every token and search the text for the tags at every new state: the same
answer, since the tags are ASCII, a decoder ("replace") turns each ASCII byte into itself and every run of other bytes
into at least one non-ASCII character, so a tag occurs in the decoded text exactly when its bytes occur in the bytes
(``tests/structured/test_tool_text.py`` checks the two against each other).
"""

from __future__ import annotations

import numpy as np

from glm5.tokenizer import special_tokens as st

from .regex import RegexAutomaton
from .trie_walk import ByteTable
from .vocab import TokenVocab

__all__ = ["CLOSERS", "RawText", "closer_tail", "free_text_ids"]

CLOSERS = (st.ARG_VALUE_END.encode(), st.TOOL_CALL_END.encode())


def closer_tail(tail: bytes, b: int) -> bytes | None:
    """Byte ``b`` after text whose longest end beginning a closing tag is ``tail``: the new such end, or None when
    the text now ends with a tag."""
    tail += bytes([b])
    if any(tail.endswith(c) for c in CLOSERS):
        return None
    while tail and not any(c.startswith(tail) for c in CLOSERS):
        tail = tail[1:]
    return tail


def _zero(_state) -> float:
    return 0.0


def free_text_ids(vocab: TokenVocab, tail: bytes) -> np.ndarray:
    """The ordinary tokens that free text ending in ``tail`` (a :func:`closer_tail` state) may go on with, in increasing
    id order (int64): ``vocab.raw_plain`` and the tokens of the raw trie that write no tag. Kept in ``vocab.shared``:
    it depends on the vocabulary alone, and the server builds a tool-call grammar per request."""
    key = ("free text", tail)
    hit = vocab.shared.get(key)
    if hit is None:
        table = vocab.shared.get("free text table")
        if table is None:
            table = vocab.shared["free text table"] = ByteTable(closer_tail)
        ids, _ = vocab.walk_costs(tail, closer_tail, _zero, special="raw", table=table)
        hit = vocab.shared[key] = np.sort(np.concatenate([vocab.raw_plain, ids]))  # disjoint: one increasing list
    return hit


class RawText:
    """A raw string argument that must match a regex: the regex's automaton, with the bytes of ``</arg_value>`` /
    ``</tool_call>`` refused inside the value (the output parser would end the value there). State: (regex state,
    the longest tail of the value that begins one of those tags), so states stay as few as the regex's."""

    def __init__(self, regex: RegexAutomaton):
        self.regex = regex

    def start(self):
        return (self.regex.start(), b"")

    def step(self, state, b: int):
        r = self.regex.step(state[0], b)
        if r is None:
            return None
        tail = closer_tail(state[1], b)
        return None if tail is None else (r, tail)

    def complete(self, state) -> bool:
        return self.regex.complete(state[0])

    def min_close(self, state) -> int:
        return self.regex.min_close(state[0])

    def free(self, state) -> bool:
        """The regex is a search that has found its match (``RegexAutomaton.absorbing``): from here on every whole
        character keeps it, and only the tags are refused, as in free text."""
        return self.regex.absorbing(state[0])
