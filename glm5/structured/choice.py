"""``choice`` structured output: the text is exactly one of a few given strings (vLLM's ``choice``), e.g. a label
for classification. The byte automaton walks a trie of the choices' UTF-8 bytes; a state is a trie node."""

from __future__ import annotations

from collections.abc import Sequence

MAX_CHOICES = 1024
MAX_CHOICE_BYTES = 1024


class ChoiceAutomaton:
    """The byte automaton of "one of ``choices``", with the interface :class:`~glm5.structured.constrained.JsonGrammar`
    walks the token trie with: ``start()``, ``step(state, byte)`` (None = dead), ``complete(state)``,
    ``min_close(state)`` (bytes still needed, each one token at worst) and ``string_room`` (no string fast path)."""

    def __init__(self, choices: Sequence[str]):
        if isinstance(choices, str) or not choices:
            raise ValueError("choice: give a non-empty list of strings")
        if len(choices) > MAX_CHOICES:
            raise ValueError(f"choice: at most {MAX_CHOICES} strings, got {len(choices)}")
        self.children: list[dict[int, int]] = [{}]
        self.terminal: list[bool] = [False]
        for c in choices:
            if not isinstance(c, str) or not c:
                raise ValueError(f"choice: every choice must be a non-empty string, got {c!r}")
            data = c.encode("utf-8")
            if len(data) > MAX_CHOICE_BYTES:
                raise ValueError(f"choice: a choice is at most {MAX_CHOICE_BYTES} bytes of UTF-8")
            node = 0
            for b in data:
                nxt = self.children[node].get(b)
                if nxt is None:
                    nxt = self.children[node][b] = len(self.children)
                    self.children.append({})
                    self.terminal.append(False)
                node = nxt
            self.terminal[node] = True
        # bytes from each node to the nearest end of a choice; children have larger ids, so one reverse pass
        self.remaining = [0] * len(self.children)
        for node in range(len(self.children) - 1, -1, -1):
            self.remaining[node] = 0 if self.terminal[node] else 1 + min(self.remaining[c]
                                                                         for c in self.children[node].values())

    @staticmethod
    def start() -> int:
        return 0

    def step(self, state: int, byte: int) -> int | None:
        return self.children[state].get(byte)

    def complete(self, state: int) -> bool:
        return self.terminal[state]

    def min_close(self, state: int) -> int:
        return self.remaining[state]

    @staticmethod
    def string_room(_state) -> bool:
        return False
