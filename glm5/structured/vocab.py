"""The vocabulary the grammars walk: every ordinary token's bytes, byte tries of them, and the added tokens.

:class:`TokenVocab` keeps the tokens as :class:`~glm5.structured.trie_walk.FlatTrie` arrays (all ordinary tokens,
those that are not plain JSON-string text, those that are not plain raw text) and answers, for a byte automaton and a
state, which tokens survive and where each leads (:meth:`TokenVocab.walk`, :meth:`TokenVocab.walk_costs`: level by
level, see :mod:`glm5.structured.trie_walk`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from glm5.tokenizer import special_tokens as st
from glm5.tokenizer.detokenize import byte_level_char_to_byte

from .trie_walk import ByteTable, FlatTrie, Node, node_trie, reference_walk, walk_states

__all__ = ["KeyRoom", "TokenVocab"]


@dataclass(frozen=True)
class KeyRoom:
    """What ``string_room`` answers inside an object key that can only be an extra key
    (:mod:`glm5.structured.schema_automaton`): its text is printable ASCII without quote or backslash and may grow by
    ``chars`` more bytes. Not an int, so that it never equals a string's room when an automaton compares the rooms
    of its alternatives, and so that the grammars list :attr:`TokenVocab.key_by_len` rather than the plain-text
    buckets (which hold non-ASCII text an extra key refuses)."""

    chars: int


class TokenVocab:
    """Token bytes and byte tries of the ordinary tokens (:class:`~glm5.structured.trie_walk.FlatTrie`: all of them,
    those that are not plain JSON-string text, those that are not plain raw text: ``special`` False, True, "raw"
    in the walks); added tokens by content.

    :meth:`walk` / :meth:`walk_costs` give the tokens a byte automaton survives from a state, walking a trie level by
    level (:mod:`glm5.structured.trie_walk`). The node-by-node walk they replace is kept as :meth:`walk_reference` /
    :meth:`walk_costs_reference` (its linked tries are built on first use); :meth:`with_reference_walk` gives a view
    of this vocabulary whose walks are those, for tests and benchmarks."""

    use_reference_walk = False

    def __init__(self, tokenizer: Any, logits_size: int | None = None) -> None:
        backend = getattr(tokenizer, "backend", tokenizer)
        n = backend.get_vocab_size(with_added_tokens=True)
        self.size = max(n, logits_size or 0)
        added = backend.get_added_tokens_decoder()
        self.added: dict[str, int] = {t.content: i for i, t in added.items()}
        table = byte_level_char_to_byte()
        self.token_bytes: dict[int, bytes] = {}
        self.single_byte: dict[int, int] = {}
        for i in range(n):
            if i in added:
                continue
            tok = backend.id_to_token(i)
            if tok is None:
                continue
            try:
                data = bytes(table[c] for c in tok)
            except KeyError:
                data = tok.encode("utf-8")
            if not data:
                continue
            self.token_bytes[i] = data
            if len(data) == 1:
                self.single_byte.setdefault(data[0], i)
        self.max_token_len = max((len(b) for b in self.token_bytes.values()), default=1)
        # Inside a JSON string most tokens are plain text that only lengthens it; they are listed by character count
        # (the special trie holds the rest), so that a string state is not a walk over the whole trie.
        # Raw text (a tool call's free-text argument) is the same idea: a token of whole UTF-8 characters with no
        # ">" can neither end a closing tag (each ends with ">") nor leave a character open; the raw trie holds the
        # others.
        by_chars: dict[int, list[int]] = {}
        special: list[tuple[int, bytes]] = []
        raw_plain: list[int] = []
        raw_special: list[tuple[int, bytes]] = []
        # An extra object key's text is printable ASCII without quote or backslash; such tokens are a subset of the
        # plain-text ones (the others, whatever their kind, die in that key or are in the special trie), listed by
        # length: see KeyRoom.
        by_len: dict[int, list[int]] = {}
        for i, data in self.token_bytes.items():
            c = _string_chars(data)
            if c is not None:
                by_chars.setdefault(c, []).append(i)
                if max(data) < 0x80:  # ASCII; plain text holds no control byte, DEL, quote or backslash
                    by_len.setdefault(c, []).append(i)
            else:
                special.append((i, data))
            if 0x3E not in data and (c is not None or _utf8(data)):
                raw_plain.append(i)
            else:
                raw_special.append((i, data))
        self.plain_by_chars = [by_chars.get(c, []) for c in range(max(by_chars, default=0) + 1)]
        self.plain_arrays = [np.array(b, dtype=np.int64) for b in self.plain_by_chars]  # the same, for tensors
        self.key_by_len = [by_len.get(c, []) for c in range(max(by_len, default=0) + 1)]
        self.key_arrays = [np.array(b, dtype=np.int64) for b in self.key_by_len]
        self.raw_plain = np.array(raw_plain, dtype=np.int64)  # increasing ids (token_bytes is in id order)
        self.trie = FlatTrie(self.token_bytes.items())
        self.trie.dfs_rank()  # the order walk() lists ids in: computed here, off the engine thread
        self.special_trie = FlatTrie(special)
        self.raw_special_trie = FlatTrie(raw_special)
        self._items: dict[bool | str, list[tuple[int, bytes]]] = {True: special, "raw": raw_special}
        self._node_tries: dict[bool | str, Node] = {}
        self.eos_ids = [self.added[t] for t in st.EOS_TOKENS if t in self.added]
        # Results that depend on this vocabulary alone (which tokens free text allows after a given tail), kept for
        # every grammar on it: the server builds a tool-call grammar per request.
        self.shared: dict[Any, Any] = {}

    def id(self, content: str) -> int | None:
        return self.added.get(content)

    def with_reference_walk(self) -> TokenVocab:
        """This vocabulary (shared data) with :meth:`walk` / :meth:`walk_costs` done by the node-by-node walk."""
        view = copy.copy(self)
        view.use_reference_walk = True
        view.shared = {}  # what the fast walks found is not reused by the reference
        return view

    def _trie(self, special: bool | str) -> FlatTrie:
        """The trie ``special`` names: False all ordinary tokens, True those that are not plain JSON-string text,
        "raw" those that are not plain raw text (see ``raw_plain``)."""
        return self.raw_special_trie if special == "raw" else self.special_trie if special else self.trie

    def string_buckets(self, state: Any, step: Callable[[Any, int], Any], cost: Callable[[Any], float],
                       room: int | None) -> list[tuple[float, int]]:
        """Inside a JSON string with no escape or UTF-8 sequence open, which may grow by ``room`` more characters
        (None: any number): (``cost`` of the state it leads to, c) for each character count c whose plain-text tokens
        (``plain_by_chars[c]``) ``step`` survives from ``state``. Such a token leads to a state that depends on c
        alone, so one token decides for its whole bucket."""
        return self._buckets(self.plain_by_chars, state, step, cost, room)

    def key_buckets(self, state: Any, step: Callable[[Any, int], Any], cost: Callable[[Any], float],
                    room: KeyRoom) -> list[tuple[float, int]]:
        """:meth:`string_buckets` inside an extra object key (see :class:`KeyRoom`), for the tokens of
        ``key_by_len``: (``cost`` of the state it leads to, n) for each length n up to ``room.chars`` whose tokens
        ``step`` survives. The plain-text tokens that are not in ``key_by_len`` (non-ASCII text) all die there."""
        return self._buckets(self.key_by_len, state, step, cost, room.chars)

    def _buckets(self, lists, state, step, cost, room) -> list[tuple[float, int]]:
        buckets = []
        for c, bucket in enumerate(lists[: None if room is None else room + 1]):
            if bucket:
                s2 = state
                for b in self.token_bytes[bucket[0]]:
                    s2 = step(s2, b)
                if s2 is not None:
                    buckets.append((cost(s2), c))
        return buckets

    # ---- the walk
    def live(self, state: Any, step: Callable[[Any, int], Any], special: bool | str = False,
             table: ByteTable | None = None) -> tuple[np.ndarray, np.ndarray, ByteTable]:
        """(ids, numbers, table): the ordinary tokens (the non-plain-text ones with ``special``) whose bytes take
        ``state`` through ``step`` (None = dead) without dying, in increasing id order, and the number in ``table``
        (a :class:`ByteTable` of ``step``; a new one when None) of the state each leads to."""
        trie = self._trie(special)
        if table is None:
            table = ByteTable(step)
        positions, numbers = walk_states(trie, table, state)
        return trie.token_ids[positions], numbers, table

    def walk(self, state: Any, step: Callable[[Any, int], Any], accept: Callable[[Any], bool],
             special: bool | str = False, table: ByteTable | None = None) -> list[int]:
        """Ids of ordinary tokens (the non-plain-text ones with ``special``) whose bytes take ``state`` through
        ``step`` (None = dead) to a state that ``accept`` admits, in the order the node-by-node walk lists them."""
        if self.use_reference_walk:
            return self.walk_reference(state, step, accept, special)
        trie = self._trie(special)
        if table is None:
            table = ByteTable(step)
        positions, numbers = walk_states(trie, table, state)
        if not len(positions):
            return []
        keep = positions[table.values(numbers, lambda s: bool(accept(s)), dtype=bool)]
        return trie.token_ids[keep[np.argsort(trie.dfs_rank()[keep])]].tolist()

    def walk_costs(self, state: Any, step: Callable[[Any, int], Any], cost: Callable[[Any], float],
                   special: bool | str = False, table: ByteTable | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, costs): every ordinary token (the non-plain-text ones with ``special``) whose bytes take ``state``
        through ``step`` without dying, in increasing id order, and ``cost`` of the state it leads to (float64)."""
        if self.use_reference_walk:
            pairs = self.walk_costs_reference(state, step, cost, special)
            pairs.sort(key=lambda p: p[1])
            return (np.array([i for _, i in pairs], dtype=np.int64),
                    np.array([c for c, _ in pairs], dtype=np.float64))
        ids, numbers, table = self.live(state, step, special, table)
        return ids, table.values(numbers, cost)

    # ---- the node-by-node walk (reference)
    def node_trie(self, special: bool | str = False) -> Node:
        root = self._node_tries.get(special)
        if root is None:
            root = self._node_tries[special] = node_trie(self._items[special] if special else self.token_bytes.items())
        return root

    def walk_reference(self, state: Any, step: Callable[[Any, int], Any], accept: Callable[[Any], bool],
                       special: bool | str = False) -> list[int]:
        """:meth:`walk`, node by node."""
        return [i for ids, s2 in reference_walk(self.node_trie(special), state, step) if accept(s2) for i in ids]

    def walk_costs_reference(self, state: Any, step: Callable[[Any, int], Any], cost: Callable[[Any], float],
                             special: bool | str = False) -> list[tuple]:
        """(``cost`` of the state it leads to, id) for every token :meth:`walk_costs` lists, node by node."""
        out: list[tuple] = []
        for ids, s2 in reference_walk(self.node_trie(special), state, step):
            c = cost(s2)
            out.extend((c, i) for i in ids)
        return out


def _string_chars(data: bytes) -> int | None:
    """Characters ``data`` adds inside a JSON string when it neither ends it nor leaves an escape or a UTF-8
    sequence open; None for any other token (quote, backslash, control byte, partial or invalid UTF-8)."""
    if b'"' in data or b"\\" in data or any(b < 0x20 or b == 0x7F for b in data):
        return None
    try:
        return len(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
