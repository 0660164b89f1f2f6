"""The token-trie walk: which tokens a byte automaton survives from a state, and the state each one leads to.

A grammar state visited for the first time needs the tokens whose bytes its byte automaton (``step(state, byte)`` ->
state, or None when the byte cannot come) takes through alive. Walking a trie of the tokens node by node in Python
called ``step`` once per live trie node (67K nodes at a 31K vocabulary, 660K at 150K): 0.1 s to seconds on the engine
thread, stalling every stream in the batch. Here:

* :class:`FlatTrie` stores the trie as arrays, nodes numbered level by level and, within a level, by (parent, byte),
  so the children of a node are one contiguous range.
* :class:`ByteTable` numbers the automaton states it meets and keeps the transitions looked up so far in a
  ``[states, 256]`` array. The automaton is deterministic, so what a node leads to depends only on its parent's state
  and its byte, and a walk meets few distinct states: inside free text most bytes lead to the same state, a regex walk
  meets the few DFA states of its pattern. A grammar keeps its table across walks.
* :func:`walk_states` goes down the trie one level at a time over all live nodes of the level at once (numpy
  gathers) and calls ``step`` in Python only for (state, byte) pairs the table does not hold yet. Dead bytes prune
  their subtrees as before: a level holds only the children of the previous level's live nodes. Small levels (the
  deep ones, pruned walks) go node by node from Python, where numpy's cost per call would dominate.

Exactness: every token gets the state its bytes lead to through ``step``, as the node-by-node walk computed it, and
``step`` runs on the same (state, byte) pairs (each once, or not again when the table knows it), so it must be a pure
function of them, which all automata here are (their own caches aside). The state the table hands back is the first
*equal* one it met, so states must be hashable values whose meaning depends on their value only. They are, for every
kind: JSON automaton tuples, JSON Schema frozensets of frame tuples, regex and GBNF frozensets (GBNF with ints),
structural-tag and combinator frozensets, choice ints, tool names and keys as bytes, raw-text (regex state, bytes).
The one identity test, ``RegexAutomaton.absorbing`` (``is``), is safe: every state equal to the absorbing one is that
object (its closure returns it for any set holding the accept state). :func:`reference_walk` is the node-by-node walk,
kept for the tests (``tests/structured/test_trie_walk.py`` compares both on states of every constraint kind) and
``benchmarks/bench_grammar.py --first-visit``.

States that keep their history (a tool name or a JSON key typed so far, while it may still be a declared name) are
all distinct: then the walk steps every live node as the old one did. (An extra key that begins no declared name keeps
only its length: ``SchemaAutomaton``'s X frame.) Such states beyond :data:`DENSE_STATES` get no row in the array (each would cost 1 KB);
their transitions are kept in a dictionary instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

__all__ = ["ByteTable", "FlatTrie", "Node", "node_trie", "reference_walk", "walk_states"]

_UNKNOWN = -2  # a transition not looked up yet (-1 = dead, >= 0 = the state's number)
_DEAD = -1
DENSE_STATES = 4096  # states with a row of 256 transitions (int32: 4 MB at most)
TABLE_STATES = 2048  # a table holding more states than this at the start of a walk is cleared first
SMALL_NODES = 16  # a level of at most this many live nodes with children ...
SMALL_LEVEL = 64  # ... and at most this many children in all is walked node by node


# ================================================================================================ the trie
class FlatTrie:
    """A byte trie of tokens as arrays. Node 0 is the root; nodes are numbered level by level and, within a level, by
    (parent, byte), so node ``v``'s children are ``child_lo[v]:child_hi[v]``, reached by byte ``byte[child]``.
    ``token_ids`` are the tokens in increasing id order, ``token_node[k]`` the node where token k's bytes end."""

    def __init__(self, items: Iterable[tuple[int, bytes]]):
        items = sorted(items)
        n = len(items)
        self.token_ids = np.fromiter((i for i, _ in items), dtype=np.int64, count=n)
        lengths = np.fromiter((len(d) for _, d in items), dtype=np.int64, count=n)
        if n and lengths.min() == 0:
            raise ValueError("FlatTrie: tokens must have at least one byte")
        data = np.frombuffer(b"".join(d for _, d in items), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if n else lengths
        node = np.zeros(n, dtype=np.int64)  # each token's node at the current depth
        parents, edge_bytes, self.level_start = [np.full(1, -1, np.int64)], [np.zeros(1, np.int64)], [0, 1]
        size, longer = 1, np.arange(n)
        for depth in range(int(lengths.max()) if n else 0):
            longer = longer[lengths[longer] > depth]
            keys = node[longer] * 256 + data[offsets[longer] + depth]
            uniq, inverse = np.unique(keys, return_inverse=True)  # sorted by (parent, byte)
            parents.append(uniq >> 8)
            edge_bytes.append(uniq & 255)
            node[longer] = size + inverse.reshape(-1)
            size += len(uniq)
            self.level_start.append(size)
        self.size = size
        self.token_node = node
        self.byte = np.concatenate(edge_bytes)
        self.parent = np.concatenate(parents)
        # parents are non-decreasing from node 1 on (a level's parents are the previous level's nodes, in order)
        everyone = np.arange(size)
        self.child_lo = np.searchsorted(self.parent[1:], everyone, "left") + 1
        self.child_hi = np.searchsorted(self.parent[1:], everyone, "right") + 1
        # the tokens of node v are token_order[token_lo[v]:token_lo[v + 1]] (positions in token_ids, increasing)
        self.token_order = np.argsort(node, kind="stable")
        self.token_lo = np.searchsorted(node[self.token_order], np.arange(size + 1))
        # the same, read one at a time from Python (small levels of a walk): a memoryview gives plain ints
        self.views = (memoryview(self.child_lo), memoryview(self.child_hi), memoryview(self.byte))
        self.small_views = (memoryview(self.token_lo), memoryview(self.token_order))
        self.root_kids = np.arange(self.child_lo[0], self.child_hi[0])  # every walk's first level
        self.root_bytes = self.byte[self.root_kids]
        self.root_bytes_list = self.root_bytes.tolist()
        self._dfs_rank: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def dfs_rank(self) -> np.ndarray:
        """Each token's place in the order :func:`reference_walk` lists tokens in, so that a walk returns its ids in
        the order it always did (a caller may take the first). That walk keeps a stack of nodes; children are in the
        order of the smallest token id below each (the order tokens inserted them); a node taken off the stack lists
        its children's tokens, then pushes the children, so the last child's subtree comes first. Hence, for a node
        ``v`` with children ``c1..cm``: ``L(v) = tokens(c1) .. tokens(cm), L(cm), .., L(c1)``. Computed once per
        trie, level by level."""
        if self._dfs_rank is not None:
            return self._dfs_rank
        size, parent, levels = self.size, self.parent, self.level_start
        here = np.bincount(self.token_node, minlength=size)  # tokens ending at each node
        first = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, self.token_node, self.token_ids)
        below = np.zeros(size, dtype=np.int64)  # |L(v)|: tokens strictly below v
        for d in range(len(levels) - 2, 0, -1):  # deepest level first: children before parents
            lvl = slice(levels[d], levels[d + 1])
            np.minimum.at(first, parent[lvl], first[lvl])
            np.add.at(below, parent[lvl], here[lvl] + below[lvl])
        start = np.zeros(size, dtype=np.int64)  # where L(v) begins
        at = np.zeros(size, dtype=np.int64)  # where node v's own tokens are listed
        for d in range(1, len(levels) - 1):
            nodes = np.arange(levels[d], levels[d + 1])
            nodes = nodes[np.lexsort((first[nodes], parent[nodes]))]  # siblings together, in insertion order
            p = parent[nodes]
            group = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])  # where each parent's children begin
            sizes = np.diff(np.r_[group, len(nodes)])
            own = here[nodes]
            before = np.cumsum(own) - own  # own tokens of earlier siblings (exclusive, within the group below)
            before -= np.repeat(before[group], sizes)
            total_own = np.add.reduceat(own, group) if len(nodes) else own
            sub = below[nodes]
            suffix = np.r_[np.cumsum(sub[::-1])[::-1], 0]  # suffix[i]: subtrees of nodes i.. to the level's end
            after = suffix[1:] - np.repeat(suffix[np.r_[group[1:], len(nodes)]], sizes)  # of later siblings
            at[nodes] = start[p] + before
            start[nodes] = start[p] + np.repeat(total_own, sizes) + after
        order = np.lexsort((self.token_ids, self.token_node))  # tokens of one node in increasing id order
        nodes = self.token_node[order]
        same = np.flatnonzero(np.r_[True, nodes[1:] != nodes[:-1]]) if len(order) else order
        offset = np.arange(len(order)) - np.repeat(same, np.diff(np.r_[same, len(order)]))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = at[nodes] + offset
        self._dfs_rank = rank
        return rank


# ========================================================================================= the automaton
class ByteTable:
    """The states one byte automaton (``step(state, byte)`` -> state or None) has reached in walks, numbered, and the
    transitions between them looked up so far: ``next[state, byte]`` (rows for the first :data:`DENSE_STATES` states,
    a dictionary for later ones). A grammar keeps one per automaton across walks, so that later walks find most
    transitions known; numbers are meaningful until the next :meth:`clear` (a walk may begin with one)."""

    def __init__(self, step: Callable[[Any, int], Any]):
        self.step = step
        self.clear()

    def clear(self) -> None:
        self.number: dict[Any, int] = {}
        self.states: list[Any] = []
        self.next = np.full((min(64, DENSE_STATES), 256), _UNKNOWN, dtype=np.int32)
        self.view = memoryview(self.next)  # next[s, b] as plain ints, for lookups one at a time
        self.extra: dict[int, int] = {}  # state * 256 + byte -> number, for states past the rows

    def intern(self, state) -> int:
        k = self.number.get(state)
        if k is None:
            k = self.number[state] = len(self.states)
            self.states.append(state)
            rows = len(self.next)
            if k == rows and rows < DENSE_STATES:  # double the rows
                self.next = np.concatenate([self.next, np.full((min(rows, DENSE_STATES - rows), 256), _UNKNOWN,
                                                               dtype=np.int32)])
                self.view = memoryview(self.next)
        return k

    def move(self, s: int, b: int) -> int:
        """The number of the state byte ``b`` takes state number ``s`` to (-1: dead), one at a time."""
        if s < len(self.next):
            v = self.view[s, b]
            if v == _UNKNOWN:
                s2 = self.step(self.states[s], b)
                v = _DEAD if s2 is None else self.intern(s2)
                self.view[s, b] = v  # after intern, which may have grown (replaced) the array
            return v
        key = s * 256 + b
        v = self.extra.get(key)
        if v is None:
            s2 = self.step(self.states[s], b)
            v = self.extra[key] = _DEAD if s2 is None else self.intern(s2)
        return v

    def row(self, s: int, data: np.ndarray, data_list: list[int]) -> np.ndarray:
        """The numbers (or -1) the bytes ``data`` (also as a list) take state number ``s`` to: a walk's first level,
        where a new state's row is unknown, filled from Python without numpy's overhead per call."""
        if s >= len(self.next):
            return np.array([self.move(s, b) for b in data_list], dtype=np.int32)
        out = self.next[s, data]
        unknown = np.flatnonzero(out == _UNKNOWN)
        if not len(unknown):
            return out
        step, state, number, intern = self.step, self.states[s], self.number, self.intern
        got = []
        append = got.append
        for b in (data_list if len(unknown) == len(data_list) else data[unknown].tolist()):
            s2 = step(state, b)
            if s2 is None:
                append(_DEAD)
            else:
                v = number.get(s2)
                append(v if v is not None else intern(s2))
        out[unknown] = got
        self.next[s, data] = out  # after intern, which may have grown (replaced) the array
        return out

    def moves(self, keys: np.ndarray) -> np.ndarray:
        """The state numbers (or -1) that ``keys`` = state * 256 + byte lead to; ``step`` runs for unknown ones."""
        limit = len(self.next) * 256  # states with a row: all below DENSE_STATES (rows grow as states come)
        if len(keys) and int(keys.max()) < limit:
            out = self.next.reshape(-1)[keys]
        else:
            out = np.full(len(keys), _UNKNOWN, dtype=np.int32)
            dense = keys < limit
            out[dense] = self.next.reshape(-1)[keys[dense]]
        unknown = np.flatnonzero(out == _UNKNOWN)
        if not len(unknown):
            return out
        todo, inverse = np.unique(keys[unknown], return_inverse=True)
        todo_list = todo.tolist()
        if todo_list[-1] < limit:  # the common case, kept lean: sorted keys come grouped by state
            step, states, number, got = self.step, self.states, self.number, []
            append, here, state = got.append, -1, None
            for key in todo_list:
                if key >> 8 != here:
                    here = key >> 8
                    state = states[here]
                s2 = step(state, key & 255)
                if s2 is None:
                    append(_DEAD)
                else:
                    v = number.get(s2)
                    append(v if v is not None else self.intern(s2))
        else:
            got = [self.move(key >> 8, key & 255) for key in todo_list]  # some states past the rows
        got = np.array(got, dtype=np.int32)
        rows = todo < limit
        self.next.reshape(-1)[todo[rows]] = got[rows]  # the rows as grown by intern; known ones were kept
        out[unknown] = got[inverse.reshape(-1)]
        return out

    def values(self, numbers: np.ndarray, fn: Callable[[Any], Any], dtype=np.float64) -> np.ndarray:
        """``fn`` of the state of each number in ``numbers`` (which may repeat), called once per distinct state."""
        present = np.zeros(len(self.states), dtype=bool)
        present[numbers] = True
        distinct = np.flatnonzero(present)
        table = np.zeros(len(self.states), dtype=dtype)
        states = self.states
        table[distinct] = [fn(states[k]) for k in distinct.tolist()]
        return table[numbers]


def walk_states(trie: FlatTrie, table: ByteTable, state) -> tuple[np.ndarray, np.ndarray]:
    """(positions, numbers): the tokens of ``trie`` (positions in ``trie.token_ids``, increasing) whose bytes take
    ``state`` through the automaton of ``table`` without dying, and the number in ``table`` of the state each leads
    to. Level by level over the live nodes only: a level with many nodes at once (numpy), a small one (the deep
    levels, pruned walks) node by node from Python, which costs less than numpy's per-call overhead there."""
    if len(table.states) > TABLE_STATES:
        table.clear()
    lo_of, hi_of, byte_of = trie.views
    child_lo, child_hi, byte = trie.child_lo, trie.child_hi, trie.byte
    got = table.row(table.intern(state), trie.root_bytes, trie.root_bytes_list)  # the first level
    live = got >= 0
    kids, got = trie.root_kids[live], got[live]
    found_nodes: list = [kids]  # per level: the live nodes (array or list) and their states
    found_states: list = [got]
    inner = child_hi[kids] > child_lo[kids]
    nodes: Any = kids[inner]  # the live nodes that have children: a list in the small mode, else an array
    states: Any = got[inner].astype(np.int64)
    small = len(nodes) <= SMALL_NODES
    if small:
        nodes, states = nodes.tolist(), states.tolist()
    while len(nodes):
        if small:
            if len(nodes) <= SMALL_NODES and sum(hi_of[v] - lo_of[v] for v in nodes) <= SMALL_LEVEL:
                kids, got, inner_kids, inner_got = [], [], [], []
                move = table.move
                for v, s in zip(nodes, states):
                    for c in range(lo_of[v], hi_of[v]):
                        s2 = move(s, byte_of[c])
                        if s2 >= 0:
                            kids.append(c)
                            got.append(s2)
                            if hi_of[c] > lo_of[c]:
                                inner_kids.append(c)
                                inner_got.append(s2)
                found_nodes.append(kids)
                found_states.append(got)
                nodes, states = inner_kids, inner_got
                continue
            nodes, states, small = np.array(nodes, dtype=np.int64), np.array(states, dtype=np.int64), False
        lo = child_lo[nodes]
        count = child_hi[nodes] - lo
        ends = np.cumsum(count)
        kids = np.arange(int(ends[-1])) + np.repeat(lo - (ends - count), count)  # node lo[i] + j for j < count[i]
        got = table.moves(np.repeat(states, count) * 256 + byte[kids])
        live = got >= 0
        kids, got = kids[live], got[live]
        found_nodes.append(kids)
        found_states.append(got)
        inner = child_hi[kids] > child_lo[kids]
        nodes, states = kids[inner], got[inner].astype(np.int64)
        if len(nodes) <= SMALL_NODES:
            nodes, states, small = nodes.tolist(), states.tolist(), True
    if sum(map(len, found_nodes)) <= SMALL_LEVEL:
        token_lo, order = trie.small_views  # a pruned walk: its few tokens from Python
        pairs = sorted((p, s) for level, got in zip(found_nodes, found_states)
                       for v, s in zip(*(x.tolist() if isinstance(x, np.ndarray) else x for x in (level, got)))
                       for p in order[token_lo[v]:token_lo[v + 1]])
        return np.array([p for p, _ in pairs], dtype=np.int64), np.array([s for _, s in pairs], dtype=np.int32)
    kids = np.concatenate([np.asarray(k, dtype=np.int64) for k in found_nodes])
    got = np.concatenate([np.asarray(g, dtype=np.int32) for g in found_states])
    if len(kids) * 8 < trie.size:  # few live nodes: their tokens, sorted
        lo = trie.token_lo[kids]
        count = trie.token_lo[kids + 1] - lo
        ends = np.cumsum(count)
        total = int(ends[-1]) if len(ends) else 0
        positions = trie.token_order[np.arange(total) + np.repeat(lo - (ends - count), count)]
        numbers = np.repeat(got, count)
        order = np.argsort(positions)
        return positions[order], numbers[order]
    reached = np.full(trie.size, _DEAD, dtype=np.int32)
    reached[kids] = got
    per_token = reached[trie.token_node]
    positions = np.flatnonzero(per_token >= 0)
    return positions, per_token[positions]


# ============================================================================ the node-by-node reference
class Node:
    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[int, Node] = {}
        self.ids: list[int] = []


def node_trie(items: Iterable[tuple[int, bytes]]) -> Node:
    """The trie of ``items`` (id, bytes) as linked nodes, inserted in the order given (increasing ids)."""
    root = Node()
    for i, data in items:
        node = root
        for b in data:
            node = node.children.setdefault(b, Node())
        node.ids.append(i)
    return root


def reference_walk(root: Node, state, step: Callable[[Any, int], Any]) -> Iterator[tuple[list[int], Any]]:
    """The node-by-node walk: (ids, state) for every node under ``root`` that holds token ids and that ``step`` takes
    ``state`` to without dying (None = dead); dead bytes prune their whole subtree."""
    stack = [(root, state)]
    while stack:
        node, s = stack.pop()
        for b, child in node.children.items():
            s2 = step(s, b)
            if s2 is None:
                continue
            if child.ids:
                yield child.ids, s2
            if child.children:
                stack.append((child, s2))
