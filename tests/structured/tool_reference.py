"""The tool-call grammar's value moves as they were before the plain-text fast paths (git 1519552), kept as the
reference ``tests/structured/test_tool_text.py`` compares :class:`~glm5.structured.tool_grammar.ToolCallGrammar`
with: free text decoded token by token and searched for the closing tags (its state the decoded tail), every other
value state a walk of the whole trie, the allowed ids as one list and the index tensor made from that list. Only the
methods that changed are here, copied from that revision; the rest is inherited."""

from __future__ import annotations

from glm5.structured.constrained import _Grammar
from glm5.structured.json_automaton import VALUE, json_min_close
from glm5.structured.raw_text import RawText
from glm5.structured.tool_grammar import ToolCallGrammar
from glm5.tokenizer import special_tokens as st

_CLOSERS = (st.ARG_VALUE_END.encode(), st.TOOL_CALL_END.encode())


class OldRawText(RawText):
    """``_RawText.step`` as it was (the tag watch inline)."""

    def step(self, state, b: int):
        r = self.regex.step(state[0], b)
        if r is None:
            return None
        tail = state[1] + bytes([b])
        if any(tail.endswith(c) for c in _CLOSERS):
            return None
        while tail and not any(c.startswith(tail) for c in _CLOSERS):
            tail = tail[1:]
        return (r, tail)


class ReferenceToolCallGrammar(ToolCallGrammar):
    allowed_index = _Grammar.allowed_index  # the list of allowed(), made a tensor

    def _value_schema(self, tool, key):
        vs = super()._value_schema(tool, key)
        if isinstance(vs, RawText) and not isinstance(vs, OldRawText):
            vs = self._value_schemas[(tool, key)] = OldRawText(vs.regex)
        return vs

    def _value_mode(self, tool, key):
        mode = super()._value_mode(tool, key)
        return ("text", "") if mode[0] == "text" else mode

    def advance(self, state, tok: int):
        if state[0] == "val" and state[4][0] == "text" and tok in self.vocab.token_bytes:
            _, tool, used, key, mode = state
            text = mode[1] + self.vocab.token_bytes[tok].decode("utf-8", "replace")
            if st.ARG_VALUE_END in text or st.TOOL_CALL_END in text:
                return None
            return ("val", tool, used, key, ("text", text[-16:]))
        return super().advance(state, tok)

    def allowed(self, state, budget: int) -> list[int]:
        T = self.T
        k = state[0]
        left = budget - 1
        if k == "end":
            return list(self.vocab.eos_ids)
        if k == "after":
            return [T[st.OBSERVATION]] + ([T[st.TOOL_CALL_START]] if self.parallel and left >= self._call_cost() + 0 else [])
        cands: list[int] = []
        if k == "think":
            cands = [self.think_end]
            if left >= self.min_close(state):
                cands.extend(self.vocab.token_bytes)
            return cands
        if k == "start":
            return [T[st.TOOL_CALL_START]]
        if k == "free":  # text, the end of the turn, or a call if one still fits
            cands = list(self.vocab.eos_ids) + list(self.vocab.token_bytes)
            if self.min_close(("name", b"")) <= left:
                cands.append(T[st.TOOL_CALL_START])
            return cands
        # special-token moves
        specials = [T[t] for t in (st.TOOL_CALL_END, st.ARG_KEY_START, st.ARG_KEY_END, st.ARG_VALUE_START,
                                   st.ARG_VALUE_END)]
        out = []
        for tid in specials:
            s2 = self.advance(state, tid)
            if s2 is not None and self.min_close(s2) <= left:
                out.append(tid)
        # byte moves
        out.extend(self._old_byte_moves(state, left))
        if not out:  # nothing fits the budget: any legal move, shortest first
            legal = [tid for tid in specials if self.advance(state, tid) is not None]
            out = legal or self._old_byte_moves(state, 1 << 30)[:1]
        return out

    def _old_byte_moves(self, state, left: int) -> list[int]:
        k = state[0]
        if k == "name":
            def name_step():
                names = list(self.name_bytes.values())

                def step(typed, b):
                    t = typed + bytes([b])
                    return t if any(n.startswith(t) for n in names) else None
                return step

            return self._walk(("name",), name_step, state[1], lambda t: self.min_close(("name", t)) <= left)
        if k == "key":
            _, tool, used, _typed = state

            def key_step():
                free = [p.encode("utf-8") for p in self._free_keys(tool, used)]

                def step(typed, b):
                    t = typed + bytes([b])
                    return t if any(p.startswith(t) for p in free) else None
                return step

            return self._walk(("key", tool, used), key_step, state[3],
                              lambda t: self.min_close(("key", tool, used, t)) <= left)
        if k == "val":
            _, tool, used, key, mode = state
            rest = 1 + self._rest_cost(tool, used | {key})
            if mode[0] in ("schema", "enum"):
                return self._walk(("val", tool, key, mode[0]), lambda: self._value_step(tool, key, mode[0]), mode[1],
                                  lambda s: self._value_cost(tool, key, (mode[0], s)) + rest <= left)
            if mode[0] == "text":
                if rest > left:
                    return []
                ids = []
                for tid, data in self.vocab.token_bytes.items():
                    text = mode[1] + data.decode("utf-8", "replace")
                    if st.ARG_VALUE_END not in text and st.TOOL_CALL_END not in text:
                        ids.append(tid)
                return ids
            starts, int_only = mode[2], mode[3]

            def json_value_step():  # the value automaton itself did not change: the grammar's own
                return self._json_value_step(starts, int_only)

            def fits(s):
                inner = json_min_close(s) if not (s[0] == VALUE and not s[1]) else 1
                return inner + rest <= left

            return self._walk(("json", starts, int_only), json_value_step, mode[1], fits)
        return []
