"""The grammar of GLM-5 tool calls, for ``tool_choice: "required"`` or a named tool: the output is one or more
well-formed calls of the allowed tools, with known argument names, the required ones present, and values checked
against their schemas (:class:`ToolCallGrammar`; the machinery it shares with the JSON grammars is
:mod:`glm5.structured.constrained`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from glm5.tokenizer import special_tokens as st
from glm5.tokenizer.tool_schema import ToolSchemas, ValueKind

from .constrained import TokenVocab, _Grammar
from .json_automaton import TYPE_MIN, TYPE_STARTS, VALUE, json_complete, json_min_close, json_step, value_start
from .json_schema import SchemaAutomaton, SchemaError, compile_schema, raw_string_regex
from .regex import RegexAutomaton
from .trie_walk import ByteTable

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
            return ("text", "")
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

    # ---- states: ("think",), ("start",), ("free",) (optional: text before any call), ("name", typed), ("key", tool, used, typed),
    # ("wait", tool, used, key), ("val", tool, used, key, mode), ("between", tool, used), ("after",), ("end",)
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
                text = mode[1] + data.decode("utf-8", "replace")
                if st.ARG_VALUE_END in text or st.TOOL_CALL_END in text:
                    return None
                return ("val", tool, used, key, ("text", text[-16:]))
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
        out.extend(self._byte_moves(state, left))
        if not out:  # nothing fits the budget: any legal move, shortest first
            legal = [tid for tid in specials if self.advance(state, tid) is not None]
            out = legal or self._byte_moves(state, 1 << 30)[:1]
        return out

    def clear_caches(self) -> None:
        super().clear_caches()
        self._tables.clear()

    def _walk(self, key: tuple, make_step, state, accept) -> list[int]:
        """``vocab.walk`` with the byte automaton ``make_step()``, whose transitions are kept per ``key`` (what the
        automaton depends on) across walks."""
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= 64:
                self._tables.clear()
            table = self._tables[key] = ByteTable(make_step())
        return self.vocab.walk(state, table.step, accept, table=table)

    def _byte_moves(self, state, left: int) -> list[int]:
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

            def json_value_step():
                def step(s, b):
                    if s[0] == VALUE and not s[1]:
                        if starts is not None and b not in starts:
                            return None
                        return value_start("", b, int_only)
                    return json_step(s, b)
                return step

            def fits(s):
                inner = json_min_close(s) if not (s[0] == VALUE and not s[1]) else 1
                return inner + rest <= left

            return self._walk(("json", starts, int_only), json_value_step, mode[1], fits)
        return []


_CLOSERS = (st.ARG_VALUE_END.encode(), st.TOOL_CALL_END.encode())


class _RawText:
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
        tail = state[1] + bytes([b])
        if any(tail.endswith(c) for c in _CLOSERS):
            return None
        while tail and not any(c.startswith(tail) for c in _CLOSERS):
            tail = tail[1:]
        return (r, tail)

    def complete(self, state) -> bool:
        return self.regex.complete(state[0])

    def min_close(self, state) -> int:
        return self.regex.min_close(state[0])

