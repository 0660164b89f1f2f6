"""Constrained decoding: logits processors that make the engine's output valid by construction.

Used for the engine's ``SamplingParams(structured_outputs=...)`` and the server's ``response_format``
``{"type": "json_object"}`` (the content is one JSON object) and ``{"type": "json_schema"}`` (a document the
schema accepts: :mod:`glm5.structured.json_schema`), for ``choice`` (one of given strings:
:mod:`glm5.structured.choice`), for ``structural_tag`` (free text with triggered, schema-checked parts:
:mod:`glm5.structured.structural_tag`), and for ``tool_choice: "required"`` / a named tool (the
output is one or more well-formed GLM-5 tool calls of the allowed tools, with known argument names, the required
ones present, and values checked against their schemas: :class:`glm5.structured.tool_grammar.ToolCallGrammar`,
built on this module).

How it works
------------
* :class:`~glm5.structured.vocab.TokenVocab` holds every token's bytes (byte-level BPE) in byte tries; GLM-5's added
  tokens (``<tool_call>``, ``<arg_key>``, ``<|observation|>`` ...) are single ids handled as symbols.
* A *grammar* is a deterministic automaton: ``start()`` state, ``advance(state, token_id)`` and
  ``allowed(state, budget)`` (the ids that keep the output completable). Byte-level parts (JSON values,
  names, keys) are checked by walking the trie with the byte automaton of
  :mod:`glm5.structured.json_automaton`, so one walk prunes whole subtrees. The walk goes level by level over
  arrays and calls the automaton once per distinct (state, byte) pair (:mod:`glm5.structured.trie_walk`).
* Budget: with ``budget`` tokens left, a token is allowed only if the shortest completion from the state
  it leads to still fits (each closing byte is one single-byte token, always in a byte-level vocab), so
  the output is valid even when ``max_tokens`` cuts it short - the grammar closes strings, containers
  and calls in time. When the value is complete only the end (EOS / ``<|observation|>``) is allowed.
* Reasoning: when the prompt opened ``<think>``, free text (no added tokens) is allowed first, then
  ``</think>``, then the grammar, as long as the budget still fits the shortest completion.
* :class:`ConstrainedLogitsProcessor` is the callable the engine applies per row:
  ``(output_token_ids, logits[V]) -> logits`` with disallowed ids at ``-inf``. It keeps the automaton
  state per output prefix, so per-token cost is one ``allowed()`` (cached per state when the budget is
  not binding).

Limits (documented): which JSON Schema keywords are enforced is listed in :mod:`glm5.structured.json_schema` (others
are refused). Tool argument values: a non-string value whose schema compiles there is checked against its whole
schema, otherwise only its top-level type (``integer``/``number`` -> a JSON number, ``boolean``, ``null``,
``object``, ``array``); string values are free text unless they have ``enum``/``const`` strings or a
``pattern`` / ``format``; union-typed
values (e.g. string or null) are free text. Cost: a state's first visit is one trie walk (a few ms at 32K ids, up to
~0.15 s at 150K ids for a GBNF string with multi-byte text; see ``benchmarks/serve.md``), later visits are cached.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from glm5.tokenizer import special_tokens as st

from .choice import ChoiceAutomaton
from .gbnf import GbnfAutomaton
from .json_automaton import _STR, START, json_accepts, json_complete, json_min_close, json_step
from .json_schema import SchemaAutomaton, compile_schema
from .regex import RegexAutomaton
from .structural_tag import compile_structural_tag, parse_structural_tag
from .trie_walk import ByteTable
from .vocab import KeyRoom, TokenVocab

__all__ = [
    "ConstrainedLogitsProcessor",
    "GrammarCache",
    "JsonGrammar",
    "TokenVocab",
    "json_accepts",
    "json_logits_processor",
]

NEG_INF = float("-inf")
_PREFIXES_KEPT = 256  # output prefixes whose grammar state a processor remembers
_MOVES_HELD = 4_000_000  # token ids the per-state move lists of one grammar may hold (~32 MB of lists)


class _Moves:
    """The ordinary tokens that keep one grammar state alive, sorted by their cost (tokens still needed after them,
    EOS included), so that the tokens a budget allows are a prefix: one trie walk per state serves every budget."""

    __slots__ = ("array", "costs", "_ids", "_index", "_top")

    def __init__(self, ids: np.ndarray, costs: np.ndarray):
        order = np.argsort(costs, kind="stable")  # ids come in increasing order: sorted by (cost, id)
        self.array = ids[order]
        self.costs = costs[order]
        self._ids: list[int] | None = None
        self._index: dict[tuple[int, str], torch.Tensor] = {}
        self._top = int(ids.max()) if len(ids) else -1  # once: in free text the list is the whole vocabulary

    @property
    def ids(self) -> list[int]:
        if self._ids is None:
            self._ids = self.array.tolist()
        return self._ids

    def __len__(self) -> int:
        return len(self.array)

    def upto(self, left: int) -> int:
        """How many tokens fit when ``left`` tokens may follow this one."""
        return int(np.searchsorted(self.costs, left, side="right"))

    def index(self, k: int, size: int, device) -> torch.Tensor:
        """The first ``k`` ids below ``size``, as a tensor on ``device`` (the sorted ids are converted once)."""
        key = (size, str(device))
        t = self._index.get(key)
        if t is None:
            t = self._index[key] = torch.from_numpy(self.array).to(device)
        t = t[:k]
        return t if self._top < size else t[t < size]


# ============================================================================================== grammars
class _Grammar:
    """Interface: ``start()``, ``advance(state, token_id)`` -> state or None, ``allowed(state, budget)``."""

    def __init__(self, vocab: TokenVocab):
        self.vocab = vocab
        self._cache: dict[Any, list[int]] = {}
        self._index_cache: dict[Any, torch.Tensor] = {}

    def clear_caches(self) -> None:
        """Forget every state's allowed tokens (the next visit of each is a first visit again)."""
        self._cache.clear()
        self._index_cache.clear()

    def allowed_cached(self, state, budget: int) -> list[int]:
        if budget >= self.slack(state):
            key = state
            hit = self._cache.get(key)
            if hit is None:
                hit = self.allowed(state, 1 << 30)
                if len(self._cache) > 4096:
                    self._cache.clear()
                self._cache[key] = hit
            return hit
        return self.allowed(state, budget)

    def allowed_index(self, state, budget: int, size: int, device) -> torch.Tensor:
        """``allowed_cached`` as a tensor of the ids below ``size`` on ``device``; cached alongside it, since turning
        tens of thousands of ids into a tensor costs more than the lookup (inside a string, every step)."""
        cacheable = budget >= self.slack(state)
        key = (state, size, str(device))
        hit = self._index_cache.get(key) if cacheable else None
        if hit is None:
            ids = [i for i in self.allowed_cached(state, budget) if i < size]
            hit = torch.tensor(ids, dtype=torch.long, device=device)
            if cacheable:
                if len(self._index_cache) > 1024:
                    self._index_cache.clear()
                self._index_cache[key] = hit
        return hit

    def slack(self, state) -> int:
        """A budget at and above which allowed() no longer depends on the budget."""
        return 1 << 30


class _JsonObjectAutomaton:
    """``json_object``: any one JSON object (the interface of :class:`glm5.structured.json_schema.SchemaAutomaton`)."""

    @staticmethod
    def start():
        return (START, "", None, False)

    step = staticmethod(json_step)
    min_close = staticmethod(json_min_close)
    complete = staticmethod(json_complete)

    @staticmethod
    def string_room(s) -> int | None | bool:
        """Inside a string with no escape or UTF-8 sequence open: None (any length; plain text leaves the state
        as it is); else False."""
        return None if s[0] == _STR and s[2][1] == 0 else False


class JsonGrammar(_Grammar):
    """One JSON document, then EOS: any object (``json_object``) or, given ``schema`` (a compiled
    :class:`~glm5.structured.json_schema.SchemaAutomaton`), a document that schema accepts. With ``thinking``, free
    reasoning text and ``</think>`` come first. ``schema`` may be any byte automaton with that interface: a
    :class:`~glm5.structured.choice.ChoiceAutomaton` makes it "one of these strings"."""

    def __init__(self, vocab: TokenVocab, thinking: bool = False, schema: SchemaAutomaton | None = None):
        super().__init__(vocab)
        self.doc = schema if schema is not None else _JsonObjectAutomaton()
        self.thinking = thinking
        self.think_end = vocab.id(st.THINK_END)
        if self.think_end is None:
            self.thinking = False
        self._moves_cache: dict[Any, Any] = {}  # per state: _Moves, or ("string", state) -> _string_moves
        self._moves_held = 0  # ids held by _moves_cache, bounded
        self._bucket_tensors: dict[tuple, torch.Tensor] = {}
        self._table = ByteTable(self.doc.step)  # the document automaton's states and transitions met in walks

    def _walk_table(self) -> ByteTable:
        """The table of ``self.doc``'s automaton (a new one if ``doc`` was replaced since)."""
        step = self.doc.step
        if self._table.step != step:
            self._table = ByteTable(step)
        return self._table

    def _cost(self, s) -> float:
        """Tokens still needed after a token that leads to document state ``s`` (EOS included)."""
        return self.doc.min_close(s) + 1

    def clear_caches(self) -> None:
        super().clear_caches()
        self._moves_cache.clear()
        self._moves_held = 0
        self._table.clear()

    def _moves(self, s) -> _Moves:
        """The document state's moves outside a string fast path (cached: with a binding budget, allowed() would
        otherwise walk the trie again at every step)."""
        hit = self._moves_cache.get(s)
        if hit is None:
            hit = _Moves(*self.vocab.walk_costs(s, self.doc.step, self._cost, table=self._walk_table()))
            self._remember(s, hit, len(hit))
        return hit

    def start(self):
        return ("think",) if self.thinking else ("json", self.doc.start())

    def advance(self, state, tok: int):
        if state[0] == "think":
            if tok == self.think_end:
                return ("json", self.doc.start())
            return state if tok in self.vocab.token_bytes else None
        if state[0] == "end":
            return None
        s = state[1]
        if self.doc.complete(s) and tok in self.vocab.eos_ids:
            return ("end",)
        data = self.vocab.token_bytes.get(tok)
        if data is None:
            return None
        for b in data:
            s = self.doc.step(s, b)
            if s is None:
                return None
        return ("json", s)

    def min_close(self, state) -> int:
        """Tokens to finish from ``state``, EOS included."""
        if state[0] == "think":
            return 1 + self.doc.min_close(self.doc.start()) + 1
        if state[0] == "end":
            return 0
        return self.doc.min_close(state[1]) + 1

    def slack(self, state) -> int:
        return self.min_close(state) + 2 * self.vocab.max_token_len + 2

    def _string_moves(self, s, room) -> tuple[list[tuple[int, int]], _Moves]:
        """Inside a string: (cost, characters) of each plain-text bucket that may come (a plain-text token of c
        characters leads to a state that depends on c alone, so one token decides for its whole bucket, within the
        string's room), and the walked moves of the few other tokens. Inside an extra object key (``room`` a
        :class:`~glm5.structured.vocab.KeyRoom`) the same with the printable-ASCII buckets (``vocab.key_by_len``); the
        other plain-text tokens die there, so the same walk of the non-plain ones completes them. Cached per state
        like ``_moves``."""
        key = ("string", s)
        hit = self._moves_cache.get(key)
        if hit is None:
            if isinstance(room, KeyRoom):
                buckets = self.vocab.key_buckets(s, self.doc.step, self._cost, room)
            else:
                buckets = self.vocab.string_buckets(s, self.doc.step, self._cost, room)
            others = _Moves(*self.vocab.walk_costs(s, self.doc.step, self._cost, special=True,
                                                   table=self._walk_table()))
            hit = self._remember(key, (buckets, others), len(others))
        return hit

    def _remember(self, key, value, n_ids: int):
        if self._moves_held + n_ids > _MOVES_HELD or len(self._moves_cache) >= 4096:
            self._moves_cache.clear()
            self._moves_held = 0
        self._moves_cache[key] = value
        self._moves_held += n_ids
        return value

    def allowed(self, state, budget: int) -> list[int]:
        if state[0] == "end":
            return list(self.vocab.eos_ids)
        if state[0] == "think":
            out = [self.think_end]
            if budget - 1 >= self.min_close(state):
                out.extend(self.vocab.token_bytes)
            return out
        s = state[1]
        left = budget - 1  # after this token
        room = self.doc.string_room(s)
        if room is not False:
            buckets, others = self._string_moves(s, room)
            lists = self.vocab.key_by_len if isinstance(room, KeyRoom) else self.vocab.plain_by_chars
            ids = [i for cost, c in buckets if cost <= left for i in lists[c]]
            ids += others.ids[: others.upto(left)]
        else:
            moves = self._moves(s)
            ids = moves.ids[: moves.upto(left)]
        if self.doc.complete(s):
            ids = list(self.vocab.eos_ids) + ids
        if not ids:  # the budget is gone: take the shortest way out, byte by byte
            ids = self._forced(s)
        return ids

    def allowed_index(self, state, budget: int, size: int, device) -> torch.Tensor:
        """``allowed`` as an index tensor, built from cached pieces whatever the budget: outside strings a prefix of
        the state's sorted moves; inside strings the fitting plain-text buckets (one cached tensor each) and a prefix
        of the other tokens' moves; plus EOS when the document is complete. Elsewhere as for any grammar."""
        if state[0] != "json":
            return super().allowed_index(state, budget, size, device)
        s, left = state[1], budget - 1
        room = self.doc.string_room(s)
        if room is not False:
            buckets, others = self._string_moves(s, room)
            key = isinstance(room, KeyRoom)
            parts = [self._bucket_index(c, key, size, device) for cost, c in buckets if cost <= left]
            parts.append(others.index(others.upto(left), size, device))
        else:
            moves = self._moves(s)
            parts = [moves.index(moves.upto(left), size, device)]
        if self.doc.complete(s):
            parts.insert(0, torch.tensor([i for i in self.vocab.eos_ids if i < size], dtype=torch.long, device=device))
        idx = torch.cat(parts) if len(parts) > 1 else parts[0]
        if not idx.numel():  # the budget is gone: the forced byte
            return super().allowed_index(state, budget, size, device)
        return idx

    def _bucket_index(self, c: int, in_key: bool, size: int, device) -> torch.Tensor:
        """Bucket c of the plain-text tokens (of the extra-key ones when ``in_key``) as a tensor, kept."""
        key = (c, in_key, size, str(device))
        t = self._bucket_tensors.get(key)
        if t is None:
            ids = (self.vocab.key_arrays if in_key else self.vocab.plain_arrays)[c]
            t = self._bucket_tensors[key] = torch.from_numpy(ids[ids < size]).to(device)
        return t

    def _forced(self, s) -> list[int]:
        here = self.doc.min_close(s)
        for b in range(256):
            tok = self.vocab.single_byte.get(b)
            s2 = self.doc.step(s, b) if tok is not None else None
            if s2 is not None and self.doc.min_close(s2) < here:
                return [tok]
        return list(self.vocab.eos_ids)


# ============================================================================================ processors
class ConstrainedLogitsProcessor:
    """``(output_token_ids, logits[V]) -> logits``: everything the grammar forbids is set to ``-inf``.

    ``max_tokens`` is the request's generation budget (``ValueError`` if the shortest valid output does not fit).
    State is remembered per output prefix (several completions of one request can share the processor); an
    unknown prefix is replayed from the start.
    """

    def __init__(self, grammar: _Grammar, max_tokens: int):
        need = grammar.min_close(grammar.start())
        if need > max_tokens:
            raise ValueError(f"max_tokens={max_tokens} is too small for the constrained output (needs at least {need})")
        self.grammar = grammar
        self.max_tokens = max_tokens
        self._states: dict[tuple[int, ...], Any] = {(): grammar.start()}

    def state_for(self, ids: Sequence[int]):
        key = tuple(ids)
        s = self._states.get(key)
        if s is not None:
            return s
        parent = self._states.get(key[:-1]) if key else None
        if parent is None:
            s = self.grammar.start()
            for t in key:
                s = self.grammar.advance(s, t) if s is not None else None
        else:
            s = self.grammar.advance(parent, key[-1])
        # Recent prefixes, oldest dropped first: speculative verification asks for several prefixes per step,
        # and the next step continues from one of them (a dropped parent means a replay from the start).
        if len(self._states) >= _PREFIXES_KEPT:
            del self._states[next(iter(self._states))]
        self._states[key] = s
        return s

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        s = self.state_for(output_ids)
        size = logits.shape[-1]
        if s is None:  # left the grammar (should not happen); stop as soon as possible
            idx = torch.tensor([i for i in self.grammar.vocab.eos_ids if i < size], dtype=torch.long,
                               device=logits.device)
        else:
            idx = self.grammar.allowed_index(s, max(1, self.max_tokens - len(output_ids)), size, logits.device)
        if not idx.numel():
            return logits
        out = torch.full_like(logits, NEG_INF)
        out[..., idx] = logits[..., idx]
        return out


class GrammarCache:
    """Compiled JSON grammars by schema, for one tokenizer. A grammar caches the allowed tokens per state, so a
    schema sent again (clients repeat theirs) costs nothing to set up; the ``capacity`` most recent are kept.
    The vocabulary trie is built on first use. Keys keep the schema's key order: properties are generated in
    schema order, so two schemas differing only in order are different grammars."""

    def __init__(self, tokenizer: Any, logits_size: int | None = None, capacity: int = 32):
        self.tokenizer, self.logits_size, self.capacity = tokenizer, logits_size, capacity
        self._vocab: TokenVocab | None = None
        self._grammars: dict[tuple[str, str, bool], JsonGrammar] = {}

    @property
    def vocab(self) -> TokenVocab:
        if self._vocab is None:
            self._vocab = TokenVocab(self.tokenizer, self.logits_size)
        return self._vocab

    def json(self, schema: Any = None, thinking: bool = False) -> JsonGrammar:
        """The grammar of one JSON object (``schema`` None) or of the documents ``schema`` accepts; reasoning
        first when ``thinking``. Raises :class:`~glm5.structured.json_schema.SchemaError` (a ValueError) for
        a schema it cannot enforce."""
        return self._get(("json", json.dumps(schema), thinking),
                         lambda: JsonGrammar(self.vocab, thinking=thinking,
                                             schema=compile_schema(schema) if schema is not None else None))

    def choice(self, choices: Sequence[str], thinking: bool = False) -> JsonGrammar:
        """The grammar of "exactly one of ``choices``" (ValueError for an empty list or a non-string)."""
        return self._get(("choice", json.dumps(list(choices)), thinking),
                         lambda: JsonGrammar(self.vocab, thinking=thinking, schema=ChoiceAutomaton(choices)))

    def regex(self, pattern: str, thinking: bool = False) -> JsonGrammar:
        """The grammar of "the text fully matches ``pattern``" (ValueError for what :mod:`glm5.structured.regex`
        does not support)."""
        return self._get(("regex", pattern, thinking),
                         lambda: JsonGrammar(self.vocab, thinking=thinking, schema=RegexAutomaton(pattern)))

    def grammar(self, text: str, thinking: bool = False) -> JsonGrammar:
        """The grammar of "the text is one sentence of this GBNF grammar" (ValueError for what
        :mod:`glm5.structured.gbnf` does not support)."""
        return self._get(("grammar", text, thinking),
                         lambda: JsonGrammar(self.vocab, thinking=thinking, schema=GbnfAutomaton(text)))

    def structural_tag(self, spec: Any, thinking: bool = False) -> JsonGrammar:
        """The grammar of a structural tag (a dict or its JSON text; see :mod:`glm5.structured.structural_tag`):
        free text with triggered, schema-checked parts. StructuralTagError (a ValueError) for a malformed one."""
        spec = parse_structural_tag(spec)
        try:
            key = json.dumps(spec)
        except (TypeError, ValueError) as e:  # a dict built in Python may hold what JSON cannot
            raise ValueError(f"structural_tag must be JSON data: {e}") from None
        return self._get(("structural_tag", key, thinking),
                         lambda: JsonGrammar(self.vocab, thinking=thinking, schema=compile_structural_tag(spec)))

    def get(self, kind: str, value: Any, thinking: bool = False) -> JsonGrammar:
        """The grammar of a constraint given as (kind, value): ("json", schema or None for any object), ("choice",
        strings), ("regex", pattern), ("grammar", GBNF text) or ("structural_tag", spec)."""
        build = {"json": self.json, "choice": self.choice, "regex": self.regex, "grammar": self.grammar,
                 "structural_tag": self.structural_tag}.get(kind)
        if build is None:
            raise ValueError(f"unknown structured output kind {kind!r}")
        return build(value, thinking)

    def _get(self, key: tuple[str, str, bool], build: Callable[[], JsonGrammar]) -> JsonGrammar:
        grammar = self._grammars.pop(key, None)
        if grammar is None:
            grammar = build()
        self._grammars[key] = grammar  # most recent last
        while len(self._grammars) > self.capacity:
            self._grammars.pop(next(iter(self._grammars)))
        return grammar


def json_logits_processor(tokenizer: Any, max_tokens: int, schema: Any = None, thinking: bool = False,
                          logits_size: int | None = None) -> ConstrainedLogitsProcessor:
    """A logits processor for one JSON object (``schema`` None) or a document ``schema`` accepts, then EOS,
    within ``max_tokens`` (pass the request's). ``thinking``: the prompt opened ``<think>``, so reasoning comes
    first. The engine builds these itself for ``SamplingParams(structured_outputs=...)``; this is for callers
    who manage processors directly.
    Raises :class:`~glm5.structured.json_schema.SchemaError` for a schema it cannot enforce, ``ValueError`` when
    ``max_tokens`` cannot fit the shortest valid output."""
    grammar = GrammarCache(tokenizer, logits_size, capacity=1).json(schema, thinking)
    return ConstrainedLogitsProcessor(grammar, max_tokens)
