"""The grammar of GLM-5 tool calls, for ``tool_choice: "required"`` or a named tool: the output is one or more
well-formed calls of the allowed tools, with known argument names, the required ones present, and values checked
against their schemas (:class:`ToolCallGrammar`; the machinery it shares with the JSON grammars is
:mod:`glm5.structured.constrained`).

A value state's allowed tokens come from the shared fast paths where there is one, not from a walk of the whole
trie: free text and a raw ``pattern`` string that has found its match from the plain raw-text tokens
(:mod:`glm5.structured.raw_text`), strings inside JSON values from the plain-text tokens by character count, as
:class:`~glm5.structured.constrained.JsonGrammar` does (see :meth:`ToolCallGrammar._fast_moves`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from glm5.tokenizer import special_tokens as st
from glm5.tokenizer.tool_schema import ToolSchemas, ValueKind

from .constrained import TokenVocab, _Grammar, _JsonObjectAutomaton, _Moves
from .json_automaton import TYPE_MIN, TYPE_STARTS, VALUE, json_complete, json_min_close, json_step, value_start
from .json_schema import SchemaAutomaton, SchemaError, compile_schema, raw_string_regex
from .raw_text import RawText as _RawText
from .raw_text import closer_tail, free_text_ids
from .trie_walk import ByteTable
from .vocab import KeyRoom

__all__ = ["ToolCallGrammar"]


class ToolCallGrammar(_Grammar):
    """``(<tool_call>NAME(<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>)*</tool_call>)+<|observation|>``.

    NAME is one of ``names`` (a named tool_choice gives one); KEY one of the tool's declared properties,
    each at most once, and ``</tool_call>`` only once the required ones are there; VALUE free text for
    string/union/unknown-typed arguments (one of the ``enum`` strings when there are some, a match of the
    ``pattern`` / ``format`` when there is one), a JSON value of the declared schema otherwise. ``parallel`` allows
    several calls. With ``thinking``, reasoning text and ``</think>`` may come first. ``optional`` (``tool_choice:
    "auto"`` with ``strict`` tools): text comes first and may end the turn (EOS) without any call; once
    ``<tool_call>`` is written, the calls are held to the grammar.
    """

    def __init__(self, vocab: TokenVocab, tools: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None,
                 parallel: bool = True, thinking: bool = False, optional: bool = False):
        super().__init__(vocab)
        self.optional = optional
        self.schemas = ToolSchemas(tools)
        self.names = list(names) if names else self.schemas.names
        self.parallel = parallel
        need = [st.TOOL_CALL_START, st.TOOL_CALL_END, st.ARG_KEY_START, st.ARG_KEY_END, st.ARG_VALUE_START,
                st.ARG_VALUE_END, st.OBSERVATION]
        ids = {t: vocab.id(t) for t in need}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the tool-call tokens {missing}")
        self.T = ids
        self.think_end = vocab.id(st.THINK_END)
        self.thinking = thinking and self.think_end is not None
        self.props: dict[str, dict[str, Any]] = {}
        self.required: dict[str, frozenset[str]] = {}
        self.params: dict[str, Any] = {}
        for name in self.names:
            self.props[name], self.required[name], self.params[name] = self._params(tools, name)
        self._value_schemas: dict[tuple[str, str], Any] = {}
        self.name_bytes = {n: n.encode("utf-8") for n in self.names}
        self._tables: dict[tuple, ByteTable] = {}  # byte automata's transitions met in walks (see _walk)
        self._fast: dict[tuple, Any] = {}  # value states' moves from plain-text lists (see _fast_moves)
        self._fast_held = 0  # ids held by _fast's own arrays, bounded

    @staticmethod
    def _params(tools, name):
        for t in tools:
            fn = t.get("function", t) if isinstance(t, Mapping) else {}
            if fn.get("name") == name:
                params = fn.get("parameters") or {}
                props = params.get("properties") if isinstance(params, Mapping) else None
                props = dict(props) if isinstance(props, Mapping) else {}
                req = params.get("required") if isinstance(params, Mapping) else None
                req = frozenset(r for r in (req or []) if isinstance(r, str) and r in props)
                return props, req, params
        return {}, frozenset(), {}

    # ---- value typing
    def _value_schema(self, tool: str, key: str) -> SchemaAutomaton | _RawText | frozenset[bytes] | None:
        """How an argument's value is constrained beyond its top-level type: a non-string value whose schema
        compiles (glm5.structured.json_schema) is checked in full; a string with ``enum``/``const`` strings must be
        one of them, and one with ``pattern`` / ``format`` must match it (GLM-5 writes string values raw). Anything
        else (a schema using keywords the compiler refuses included) keeps the top-level typing below."""
        ck = (tool, key)
        if ck not in self._value_schemas:
            prop, out = self.props[tool].get(key), None
            kind = self.schemas.kind_of(tool, key)
            if kind is ValueKind.TYPED:
                try:
                    out = compile_schema(prop, root=self.params[tool])
                except SchemaError:
                    out = None
            elif kind is ValueKind.STRING and isinstance(prop, Mapping):
                values = [prop["const"]] if "const" in prop else prop.get("enum")
                if (isinstance(values, list) and values and all(isinstance(v, str) for v in values)
                        and not any(st.ARG_VALUE_END in v or st.TOOL_CALL_END in v for v in values)):
                    out = frozenset(v.encode("utf-8") for v in values)
                else:
                    try:
                        regex = raw_string_regex(prop)
                    except SchemaError:
                        regex = None
                    out = _RawText(regex) if regex is not None else None
            self._value_schemas[ck] = out
        return self._value_schemas[ck]

    def _value_mode(self, tool: str, key: str):
        vs = self._value_schema(tool, key)
        if isinstance(vs, (SchemaAutomaton, _RawText)):
            return ("schema", vs.start())
        if vs is not None:
            return ("enum", b"")
        kind = self.schemas.kind_of(tool, key)
        if kind is not ValueKind.TYPED:
            return ("text", b"")  # the closing-tag watch's state (raw_text.closer_tail)
        types = self.schemas.types_of(tool, key) or frozenset()
        starts = frozenset().union(*(TYPE_STARTS.get(t, frozenset()) for t in types)) or None
        int_only = types <= {"integer"}
        return ("json", (VALUE, "", None, False), starts, int_only)

    def _value_cost(self, tool: str, key: str, mode) -> int:
        """Bytes that complete a value in ``mode`` (a value token ends it)."""
        if mode[0] == "text":
            return 0
        if mode[0] == "schema":
            return self._value_schema(tool, key).min_close(mode[1])
        if mode[0] == "enum":
            return min(len(v) - len(mode[1]) for v in self._value_schema(tool, key) if v.startswith(mode[1]))
        return self._min_value(tool, key) if mode[1][0] == VALUE and not mode[1][1] else json_min_close(mode[1])

    def _min_value(self, tool: str, key: str) -> int:
        vs = self._value_schema(tool, key)
        if vs is not None:
            return self._value_cost(tool, key, self._value_mode(tool, key))
        kind = self.schemas.kind_of(tool, key)
        if kind is not ValueKind.TYPED:
            return 0
        types = self.schemas.types_of(tool, key) or frozenset()
        return min((TYPE_MIN.get(t, 1) for t in types), default=1)

    def _pair_cost(self, tool: str, key: str) -> int:
        return 1 + len(key.encode("utf-8")) + 1 + 1 + self._min_value(tool, key) + 1

    def _rest_cost(self, tool: str, used: frozenset[str]) -> int:
        """Tokens for the missing required pairs + </tool_call> + <|observation|>."""
        return sum(self._pair_cost(tool, k) for k in self.required[tool] - used) + 2

    def _call_cost(self) -> int:
        return 1 + min(len(self.name_bytes[n]) + self._rest_cost(n, frozenset()) for n in self.names)

    # ---- states: ("think",), ("start",), ("free",) (optional: text before any call), ("name", typed),
    # ("key", tool, used, typed), ("wait", tool, used, key), ("val", tool, used, key, mode), ("between", tool, used),
    # ("after",), ("end",). A value's mode: ("text", tail) for free text (tail: raw_text.closer_tail's state, so that
    # free-text states are few and repeat), ("schema", state) / ("enum", typed) for the value's automaton, ("json",
    # state, first bytes, integer only) for a JSON value checked by its type alone.
    def start(self):
        return ("think",) if self.thinking else self._after_thinking()

    def _after_thinking(self):
        return ("free",) if self.optional else ("start",)

    def min_close(self, state) -> int:
        k = state[0]
        if k == "think":
            return 1 + (1 if self.optional else self._call_cost())
        if k == "free":
            return 1  # EOS
        if k == "start":
            return self._call_cost()
        if k == "name":
            typed = state[1]
            return min(len(b) - len(typed) + self._rest_cost(n, frozenset())
                       for n, b in self.name_bytes.items() if b.startswith(typed))
        if k == "key":
            _, tool, used, typed = state
            props = [p for p in self.props[tool] if p not in used and p.encode("utf-8").startswith(typed)]
            return min(self._pair_cost(tool, p) - 1 - len(typed) + self._rest_cost(tool, used | {p}) for p in props)
        if k == "wait":
            _, tool, used, key = state
            return 1 + self._min_value(tool, key) + 1 + self._rest_cost(tool, used)
        if k == "val":
            _, tool, used, key, mode = state
            return self._value_cost(tool, key, mode) + 1 + self._rest_cost(tool, used)
        if k == "between":
            return self._rest_cost(state[1], state[2])
        if k == "after":
            return 1
        return 0

    def slack(self, state) -> int:
        return self.min_close(state) + 2 * self.vocab.max_token_len + 4

    def advance(self, state, tok: int):
        T = self.T
        k = state[0]
        if k == "think":
            if tok == self.think_end:
                return self._after_thinking()
            return state if tok in self.vocab.token_bytes else None
        if k == "free":
            if tok == T[st.TOOL_CALL_START]:
                return ("name", b"")
            if tok in self.vocab.eos_ids:
                return ("end",)
            return state if tok in self.vocab.token_bytes else None
        if k == "start":
            return ("name", b"") if tok == T[st.TOOL_CALL_START] else None
        if k == "after":
            if tok == T[st.OBSERVATION]:
                return ("end",)
            if tok == T[st.TOOL_CALL_START] and self.parallel:
                return ("name", b"")
            return None
        if k == "name":
            typed = state[1]
            if tok in (T[st.ARG_KEY_START], T[st.TOOL_CALL_END]):
                name = typed.decode("utf-8", "replace")
                if name not in self.props:
                    return None
                if tok == T[st.TOOL_CALL_END]:
                    return ("after",) if not self.required[name] else None
                return ("key", name, frozenset(), b"") if self._free_keys(name, frozenset()) else None
            data = self.vocab.token_bytes.get(tok)
            if data is None:
                return None
            typed += data
            return ("name", typed) if any(b.startswith(typed) for b in self.name_bytes.values()) else None
        if k == "key":
            _, tool, used, typed = state
            if tok == T[st.ARG_KEY_END]:
                key = typed.decode("utf-8", "replace")
                return ("wait", tool, used, key) if key in self.props[tool] and key not in used else None
            data = self.vocab.token_bytes.get(tok)
            if data is None:
                return None
            typed += data
            ok = any(p.encode("utf-8").startswith(typed) for p in self._free_keys(tool, used))
            return ("key", tool, used, typed) if ok else None
        if k == "wait":
            _, tool, used, key = state
            return ("val", tool, used, key, self._value_mode(tool, key)) if tok == T[st.ARG_VALUE_START] else None
        if k == "val":
            _, tool, used, key, mode = state
            if tok == T[st.ARG_VALUE_END]:
                if mode[0] == "json":
                    done = json_complete(mode[1])
                elif mode[0] == "schema":
                    done = self._value_schema(tool, key).complete(mode[1])
                elif mode[0] == "enum":
                    done = mode[1] in self._value_schema(tool, key)
                else:  # free text
                    done = True
                return ("between", tool, used | {key}) if done else None
            data = self.vocab.token_bytes.get(tok)
            if data is None:
                return None
            if mode[0] in ("schema", "enum"):
                s = mode[1]
                step = self._value_step(tool, key, mode[0])
                for b in data:
                    s = step(s, b)
                    if s is None:
                        return None
                return ("val", tool, used, key, (mode[0], s))
            if mode[0] == "text":
                tail = mode[1]
                for b in data:
                    tail = closer_tail(tail, b)
                    if tail is None:
                        return None
                return ("val", tool, used, key, ("text", tail))
            s = mode[1]
            for b in data:
                if s[0] == VALUE and not s[1] and mode[2] is not None and b not in mode[2]:
                    return None
                s = json_step(s, b) if not (s[0] == VALUE and not s[1]) else value_start("", b, mode[3])
                if s is None:
                    return None
            return ("val", tool, used, key, ("json", s, mode[2], mode[3]))
        if k == "between":
            _, tool, used = state
            if tok == T[st.ARG_KEY_START] and self._free_keys(tool, used):
                return ("key", tool, used, b"")
            if tok == T[st.TOOL_CALL_END] and self.required[tool] <= used:
                return ("after",)
            return None
        return None

    def _value_step(self, tool: str, key: str, kind: str):
        vs = self._value_schema(tool, key)
        if kind == "schema":
            return vs.step

        def step(typed: bytes, b: int):
            t = typed + bytes([b])
            return t if any(v.startswith(t) for v in vs) else None
        return step

    def _free_keys(self, tool: str, used: frozenset[str]) -> list[str]:
        return [p for p in self.props[tool] if p not in used]

    def allowed(self, state, budget: int) -> list[int]:
        out: list[int] = []
        for part in self._allowed_parts(state, budget):
            out.extend(part.tolist() if isinstance(part, np.ndarray) else part)
        return out

    def allowed_index(self, state, budget: int, size: int, device) -> torch.Tensor:
        """``allowed_cached`` as a tensor of the ids below ``size``, made from the pieces ``allowed`` lists: in free
        text and inside strings those are arrays kept per vocabulary or per value state, so the whole vocabulary is
        never a Python list here (that conversion was most of a free-text state's cost). Cached per state like the
        base class's."""
        cacheable = budget >= self.slack(state)
        key = (state, size, str(device))
        hit = self._index_cache.get(key) if cacheable else None
        if hit is None:
            parts = [torch.from_numpy(p) if isinstance(p, np.ndarray) else torch.tensor(p, dtype=torch.long)
                     for p in self._allowed_parts(state, 1 << 30 if cacheable else budget)]
            hit = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            if hit.numel() and int(hit.max()) >= size:
                hit = hit[hit < size]
            hit = hit.to(device)
            if cacheable:
                if len(self._index_cache) > 1024:
                    self._index_cache.clear()
                self._index_cache[key] = hit
        return hit

    def _allowed_parts(self, state, budget: int) -> list:
        """``allowed(state, budget)`` as pieces (lists, or int64 arrays not to be written to) to concatenate."""
        T = self.T
        k = state[0]
        left = budget - 1
        if k == "end":
            return [list(self.vocab.eos_ids)]
        if k == "after":
            again = self.parallel and left >= self._call_cost()
            return [[T[st.OBSERVATION]] + ([T[st.TOOL_CALL_START]] if again else [])]
        everyone = self.vocab.trie.token_ids  # every ordinary token, in increasing id order
        if k == "think":
            return [[self.think_end], everyone] if left >= self.min_close(state) else [[self.think_end]]
        if k == "start":
            return [[T[st.TOOL_CALL_START]]]
        if k == "free":  # text, the end of the turn, or a call if one still fits
            call = [T[st.TOOL_CALL_START]] if self.min_close(("name", b"")) <= left else []
            return [list(self.vocab.eos_ids), everyone, call]
        # special-token moves
        specials = [T[t] for t in (st.TOOL_CALL_END, st.ARG_KEY_START, st.ARG_KEY_END, st.ARG_VALUE_START,
                                   st.ARG_VALUE_END)]
        out = []
        for tid in specials:
            s2 = self.advance(state, tid)
            if s2 is not None and self.min_close(s2) <= left:
                out.append(tid)
        parts = [out, *self._byte_moves(state, left)]
        if not any(len(p) for p in parts):  # nothing fits the budget: any legal move, shortest first
            legal = [tid for tid in specials if self.advance(state, tid) is not None]
            return [legal or self._first_move(state)]
        return parts

    def clear_caches(self) -> None:
        super().clear_caches()
        self._tables.clear()
        self._fast.clear()
        self._fast_held = 0

    def _walk(self, key: tuple, make_step, state, accept) -> list[int]:
        """``vocab.walk`` with the byte automaton ``make_step()``, whose transitions are kept per ``key`` (what the
        automaton depends on) across walks."""
        table = self._table(key, make_step)
        return self.vocab.walk(state, table.step, accept, table=table)

    def _table(self, key: tuple, make_step) -> ByteTable:
        """The transition table of the byte automaton ``make_step()``, kept per ``key`` (what it depends on)."""
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= 64:
                self._tables.clear()
            table = self._tables[key] = ByteTable(make_step())
        return table

    def _byte_moves(self, state, left: int) -> list:
        """The ordinary tokens ``state`` allows when ``left`` tokens may follow, as pieces: a value state with a
        plain-text fast path (:meth:`_fast_moves`) gives the lists that fit; other states walk the trie."""
        if state[0] == "val":
            _, tool, used, key, mode = state
            fast = self._fast_moves(tool, key, mode)
            if fast is not None:
                rest = 1 + self._rest_cost(tool, used | {key})
                groups, others = fast
                return [ids for cost, ids in groups if cost + rest <= left] + [others.array[: others.upto(left - rest)]]
        return [self._walked_moves(state, left)]

    def _first_move(self, state) -> list[int]:
        """The token a state falls back to when no move fits the budget: the first the walk lists, or in free text
        the smallest id (what the decoding loop it replaced listed first)."""
        if state[0] == "val" and state[4][0] == "text":
            return free_text_ids(self.vocab, state[4][1])[:1].tolist()
        return self._walked_moves(state, 1 << 30)[:1]

    def _fast_moves(self, tool: str, key: str, mode):
        """A value state's token moves without walking the whole trie, or None where there is no shortcut: ([(cost,
        ids)], others) with ``cost`` the value's bytes still needed after any of ``ids`` (int64 arrays) and ``others``
        a :class:`~glm5.structured.constrained._Moves` of the remaining tokens, by the same cost. The set of ids
        with cost <= c is what the trie walk accepts at that cost (tests/structured/test_tool_text.py).

        * Free text: :func:`~glm5.structured.raw_text.free_text_ids` of the tail, all at cost 0.
        * A raw ``pattern`` string that has found its match: the tokens of whole characters without ``>``
          (``vocab.raw_plain``) keep the regex where it is, only the others are walked.
        * Inside a JSON string (a typed value's schema, or an untyped JSON value), with no escape or UTF-8 sequence
          open: the plain-text tokens by character count, as JsonGrammar does
          (:meth:`~glm5.structured.vocab.TokenVocab.string_buckets`), and a walk of the others.
        * Inside an extra key of an object in a typed value (its text begins no declared name): the printable-ASCII
          tokens by length (:meth:`~glm5.structured.vocab.TokenVocab.key_buckets`), and the same walk."""
        if mode[0] == "text":
            return [(0, free_text_ids(self.vocab, mode[1]))], _NO_MOVES
        if mode[0] not in ("schema", "json"):
            return None
        s = mode[1]
        if mode[0] == "schema":
            vs = self._value_schema(tool, key)
            if isinstance(vs, _RawText):
                if not vs.free(s):
                    return None
                room, special = "raw", "raw"
            else:
                room, special = vs.string_room(s), True
            table_key, make_step, cost = ("val", tool, key, "schema"), lambda: vs.step, vs.min_close
        else:
            room, special = _JsonObjectAutomaton.string_room(s), True
            table_key, make_step, cost = ("json", mode[2], mode[3]), lambda: self._json_value_step(mode[2], mode[3]), \
                json_min_close
        if room is False:
            return None
        cache_key = (tool, key, mode)
        hit = self._fast.get(cache_key)
        if hit is None:
            table = self._table(table_key, make_step)
            if room == "raw":
                groups = [(cost(s), self.vocab.raw_plain)]  # each keeps the regex's state: the same cost
            elif isinstance(room, KeyRoom):  # an extra key of an object in a typed value: its ASCII tokens by length
                groups = [(c_cost, self.vocab.key_arrays[c])
                          for c_cost, c in self.vocab.key_buckets(s, table.step, cost, room)]
            else:
                groups = [(c_cost, self.vocab.plain_arrays[c])
                          for c_cost, c in self.vocab.string_buckets(s, table.step, cost, room)]
            others = _Moves(*self.vocab.walk_costs(s, table.step, cost, special=special, table=table))
            if self._fast_held + len(others) > _FAST_HELD or len(self._fast) >= 4096:
                self._fast.clear()
                self._fast_held = 0
            hit = self._fast[cache_key] = (groups, others)
            self._fast_held += len(others)
        return hit

    @staticmethod
    def _json_value_step(starts, int_only: bool):
        """The byte automaton of an untyped JSON value: its first byte one of ``starts`` (None: any)."""
        def step(s, b):
            if s[0] == VALUE and not s[1]:
                if starts is not None and b not in starts:
                    return None
                return value_start("", b, int_only)
            return json_step(s, b)
        return step

    def _walked_moves(self, state, left: int) -> list[int]:
        """The ordinary tokens ``state`` allows when ``left`` tokens may follow, by a walk of the whole trie, in the
        walk's order (free text aside: see :meth:`_fast_moves`)."""
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

            def fits(s):
                inner = json_min_close(s) if not (s[0] == VALUE and not s[1]) else 1
                return inner + rest <= left

            return self._walk(("json", mode[2], mode[3]), lambda: self._json_value_step(mode[2], mode[3]), mode[1],
                              fits)
        return []


_NO_MOVES = _Moves(np.zeros(0, dtype=np.int64), np.zeros(0))
_FAST_HELD = 4_000_000  # ids the value states' walked moves (not the shared plain-text lists) may hold
