"""The vectorised token-trie walk (:mod:`glm5.structured.trie_walk`) against the node-by-node walk it replaced: for
every constraint kind, at many states reached by random walks, the same tokens survive, each leads to an equal state,
and the costs / acceptances and the grammars' allowed lists (order included) are the same. The vocabulary is a
byte-level BPE trained on mixed text (CJK, accents, emoji) plus tokens with unusual bytes: partial and invalid UTF-8,
control bytes, quotes and backslashes, tag and trigger texts, and tokens whose bytes another token already has."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from glm5.structured import trie_walk
from glm5.structured.choice import ChoiceAutomaton
from glm5.structured.constrained import JsonGrammar, TokenVocab
from glm5.structured.gbnf import GbnfAutomaton
from glm5.structured.json_schema import compile_schema
from glm5.structured.regex import RegexAutomaton
from glm5.structured.structural_tag import compile_structural_tag
from glm5.structured.tool_grammar import ToolCallGrammar
from glm5.structured.trie_walk import ByteTable, FlatTrie, node_trie, reference_walk, walk_states
from glm5.tokenizer.detokenize import byte_level_char_to_byte

from mixed_text import make_corpus
from .test_constrained import TOOLS, BOOKING_TOOLS
from .test_gbnf import JSON_GBNF, UNICODE_GBNF
from .test_json_schema import PERSON, TREE

UNUSUAL = [
    b"\x00", b"\x7f", b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe4\xbd", b"\xbd\xa0",
    b"\xf0\x9f", b"\x98\x80", "🙂🚀".encode(), "你好世界".encode(), "é".encode(), "e\u0301".encode(), b'"', b"\\",
    b'\\"', b"\\u00e9", b"\\u", b"\\ud83d", b'":"', b'"}', b'"},{"', b"\t", b"\r\n", b"\n\n    ", b"  ", b"\x1f",
    b"\\n", b"</arg_value>", b"</tool_call>", b"<arg_key>", b"<fn=a>", b"<fn=", b"</fn>", b"n=1", b"@", b'{"x":1}',
    b"-0.5e+3", b"truefalse", b"null", b"get_weather", b"location", b"hello", b"the", b"a", b"{", b"}", b"[",
    b"]", b",", b":", b"1234567890", b"2024-02-29T12:00:00Z", b"\xe2\x80\xa8", b"\xef\xbb\xbf",
]


class _Added:
    def __init__(self, content: str):
        self.content = content


class WithExtraTokens:
    """A tokenizer backend: ``base``'s vocabulary and added tokens, then ``extra`` byte strings as ordinary tokens."""

    def __init__(self, base, extra: list[bytes]):
        self.base = getattr(base, "backend", base)
        self.n = self.base.get_vocab_size(with_added_tokens=True)
        chars = {b: c for c, b in byte_level_char_to_byte().items()}
        self.extra = ["".join(chars[b] for b in data) for data in extra]

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.n + len(self.extra)

    def get_added_tokens_decoder(self):
        return {i: _Added(t.content) for i, t in self.base.get_added_tokens_decoder().items()}

    def id_to_token(self, i: int):
        return self.base.id_to_token(i) if i < self.n else self.extra[i - self.n]


@pytest.fixture(scope="module")
def vocab():
    from glm5.tokenizer import train_bpe

    tok = train_bpe(make_corpus(n_docs=300, p_newline=0.1), vocab_size=2000)
    v = TokenVocab(WithExtraTokens(tok, UNUSUAL))
    multi = [d for d in v.token_bytes.values() if len(d) > 1 and any(b >= 0x80 for b in d)]
    assert len(multi) > 50  # multi-byte UTF-8 (whole and partial characters) is there
    return v


# ============================================================================================== checking
class Checker:
    """A view of ``vocab`` whose walks also run node by node and must agree exactly; counts what it checked."""

    def __init__(self, vocab: TokenVocab):
        self.vocab = vocab
        self.checked = 0
        self.view = copy.copy(vocab)
        self.view.walk = self.walk
        self.view.walk_costs = self.walk_costs

    def same_states(self, state, step, special, table):
        ref = {i: s2 for ids, s2 in reference_walk(self.vocab.node_trie(special), state, step) for i in ids}
        for tab in (table, None):  # the grammar's table (kept across walks) and a fresh one
            ids, numbers, used = self.vocab.live(state, step, special, tab)
            assert ids.tolist() == sorted(ref)
            for i, k in zip(ids.tolist(), numbers.tolist()):
                s2 = used.states[k]
                assert s2 == ref[i] and type(s2) is type(ref[i]) and hash(s2) == hash(ref[i]), (i, s2, ref[i])
        self.checked += 1
        return ref

    def walk(self, state, step, accept, special=False, table=None):
        step = table.step if table is not None else step
        self.same_states(state, step, special, table)
        got = self.vocab.walk(state, step, accept, special, table)
        assert got == self.vocab.walk_reference(state, step, accept, special)  # the same order too
        return got

    def walk_costs(self, state, step, cost, special=False, table=None):
        ref = self.same_states(state, step, special, table)
        ids, costs = self.vocab.walk_costs(state, step, cost, special, table)
        pairs = self.vocab.walk_costs_reference(state, step, cost, special)
        assert sorted(pairs, key=lambda p: p[1]) == list(zip(costs.tolist(), ids.tolist()))
        assert all(cost(ref[i]) == c for c, i in pairs)
        return ids, costs


def random_states(grammar, rng: random.Random, walks: int, length: int, hot: tuple[bytes, ...] = ()):
    """States reached by random walks through ``grammar``: now and then an added token (``<tool_call>``, ``</think>``
    ...), a token that goes on writing one of the ``hot`` strings (triggers, tags) or the first allowed token, else
    any allowed token."""
    vocab, out = grammar.vocab, []
    for _ in range(walks):
        state, budget, text = grammar.start(), length, b""
        for _ in range(length):
            out.append((state, budget))
            allowed = grammar.allowed(state, budget)
            if not allowed:
                break
            r = rng.random()
            added = [t for t in allowed if t not in vocab.token_bytes and t not in vocab.eos_ids]
            going_on = [t for h in hot for k in [max(k for k in range(len(h)) if text.endswith(h[:k]))]
                        for t in allowed if t in vocab.token_bytes and h[k:].startswith(vocab.token_bytes[t])]
            if added and r < 0.3:
                tok = rng.choice(added)
            elif going_on and r < 0.6:
                tok = rng.choice(going_on)
            else:
                tok = allowed[0] if rng.random() < 0.2 else rng.choice(allowed)
            nxt = grammar.advance(state, tok)
            if nxt is None or tok in vocab.eos_ids:
                break
            state, budget, text = nxt, budget - 1, text + vocab.token_bytes.get(tok, b"")
    return out


def assert_kind_agrees(vocab, build, walks=6, length=30, seed=0, hot=()):
    """``build(vocab)`` -> a grammar. The grammar on the checking view and on the node-by-node view give the same
    allowed lists at tight and loose budgets, and every walk it makes agrees with the reference walk."""
    checker = Checker(vocab)
    new, old = build(checker.view), build(vocab.with_reference_walk())
    rng = random.Random(seed)
    states = random_states(build(vocab), rng, walks, length, hot)
    assert len(states) > walks
    for state, budget in states:
        for b in (budget, new.min_close(state) + 1, 1 << 20):
            assert new.allowed(state, b) == old.allowed(state, b), (state, b)
    assert checker.checked > 0
    return checker.checked


# ============================================================================================== the kinds
SCHEMAS = {
    "person": PERSON,
    "tree": TREE,
    "extra_keys": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
                   "additionalProperties": {"type": "string", "maxLength": 3}},
    "formats": {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"},
                                                 "note": {"type": "string", "pattern": "[a-z ]{2,9}"},
                                                 "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{2}$"}},
                "required": ["at", "note", "code"]},
    "unions": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer", "minimum": -5,
                                                                          "maximum": 500}, {"enum": ["é", "你好", 1.5]}]},
               "maxItems": 4},
}
STRUCTURAL = {
    "legacy": {"type": "structural_tag", "triggers": ["<fn="], "structures": [
        {"begin": "<fn=a>", "schema": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
         "end": "</fn>"}]},
    "format": {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<fn=", "@"],
                                                    "at_least_one": True, "excludes": ["</arg_value>"], "tags": [
        {"type": "tag", "begin": "<fn=a>", "end": "</fn>",
         "content": {"type": "json_schema", "json_schema": {"type": "string", "maxLength": 4}}},
        {"type": "tag", "begin": "@", "end": ";", "content": {"type": "any_text"}}]}},
    "sequence": {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "Answer: "}, {"type": "regex", "pattern": "[0-9]{1,3}|n/a"},
        {"type": "grammar", "grammar": 'root ::= " (" [a-zé]+ ")"'}]}},
}
# a typed argument whose schema the compiler refuses (bounds on a number) is checked as a JSON value of its type
MEASURE = [{"type": "function", "function": {"name": "measure", "parameters": {
    "type": "object", "properties": {"v": {"type": "number", "minimum": 0}}, "required": ["v"]}}}]
KINDS = {
    "json_object": lambda v: JsonGrammar(v),
    "json_object_thinking": lambda v: JsonGrammar(v, thinking=True),
    **{f"schema_{k}": (lambda s: lambda v: JsonGrammar(v, schema=compile_schema(s)))(s) for k, s in SCHEMAS.items()},
    "regex_address": lambda v: JsonGrammar(v, schema=RegexAutomaton(r"[A-Z][a-z]{1,9}( [A-Z][a-z]{1,9})?, \d{1,4}")),
    "regex_unicode": lambda v: JsonGrammar(v, schema=RegexAutomaton(r"(\w+@\w+\.com|[éü你好🙂]+|[^\"\\]{0,12})")),
    "regex_any": lambda v: JsonGrammar(v, schema=RegexAutomaton(r"[\s\S]{0,40}")),
    "choice": lambda v: JsonGrammar(v, schema=ChoiceAutomaton(["yes", "no", "maybe", "café", "你好", "🙂 ok", "the"])),
    "gbnf_json": lambda v: JsonGrammar(v, schema=GbnfAutomaton(JSON_GBNF)),
    "gbnf_unicode": lambda v: JsonGrammar(v, schema=GbnfAutomaton(UNICODE_GBNF)),
    "gbnf_any": lambda v: JsonGrammar(v, schema=GbnfAutomaton("root ::= .*")),
    **{f"structural_{k}": (lambda s: lambda v: JsonGrammar(v, schema=compile_structural_tag(s)))(s)
       for k, s in STRUCTURAL.items()},
    "tools": lambda v: ToolCallGrammar(v, TOOLS, thinking=True),
    "tools_named": lambda v: ToolCallGrammar(v, TOOLS, names=["get_weather"], parallel=False),
    "tools_optional": lambda v: ToolCallGrammar(v, TOOLS, optional=True),
    "tools_formats": lambda v: ToolCallGrammar(v, BOOKING_TOOLS, names=["book"]),
    "tools_json_values": lambda v: ToolCallGrammar(v, MEASURE, names=["measure"]),
}


HOT = {"structural_legacy": (b"<fn=a>", b'{"x":12}', b"</fn>"),
       "structural_format": (b"<fn=a>", b'"ab"', b"</fn>", b"@", b";"),
       "schema_extra_keys": (b'{"id":1,"key":"v"}',)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_walks_exactly_as_node_by_node(vocab, kind):
    walks = assert_kind_agrees(vocab, KINDS[kind], seed=len(kind), hot=HOT.get(kind, ()))
    assert walks >= (1 if kind == "gbnf_any" else 3), walks  # ".*" has one state between characters


def test_tool_walks_cover_names_keys_and_values(vocab):
    """The tool grammar's byte walks (name, key, JSON / schema / enum / pattern values) are all exercised."""
    seen = set()
    checker = Checker(vocab)
    tools = TOOLS + BOOKING_TOOLS + MEASURE
    grammar = ToolCallGrammar(checker.view, tools)
    rng = random.Random(1)
    for state, budget in random_states(ToolCallGrammar(vocab, tools), rng, 20, 40):
        grammar.allowed(state, budget)
        seen.add(state[0] if state[0] != "val" else ("val", state[4][0]))
    assert {"name", "key", ("val", "json"), ("val", "schema"), ("val", "enum")} <= seen, seen


def test_string_states_walk_the_special_trie(vocab):
    """Inside strings JsonGrammar walks only the tokens that are not plain text: that trie agrees too."""
    checker = Checker(vocab)
    grammar = JsonGrammar(checker.view, schema=compile_schema(PERSON))
    state = grammar.start()
    for b in b'{"name":"':
        state = grammar.advance(state, vocab.single_byte[b])
    assert grammar.doc.string_room(state[1]) is not False
    grammar.allowed(state, 40)
    assert checker.checked == 1


@pytest.mark.parametrize("small", [0, 1 << 30], ids=["numpy_levels", "python_levels"])
def test_tables_kept_across_walks_and_cleared_stay_exact(vocab, monkeypatch, small):
    """A grammar's table holds states from earlier walks; when full it is cleared at a walk's start, and states past
    the dense rows keep their transitions in a dictionary. With tiny limits all of that happens in one walk; every
    level is walked by numpy, then every level node by node."""
    monkeypatch.setattr(trie_walk, "DENSE_STATES", 8)
    monkeypatch.setattr(trie_walk, "TABLE_STATES", 16)
    monkeypatch.setattr(trie_walk, "SMALL_NODES", small)
    monkeypatch.setattr(trie_walk, "SMALL_LEVEL", small)
    for kind in ("schema_extra_keys", "structural_format", "gbnf_json", "tools"):
        assert_kind_agrees(vocab, KINDS[kind], walks=3, length=20, seed=7, hot=HOT.get(kind, ()))


def test_flat_trie_matches_the_node_trie(vocab):
    items = sorted(vocab.token_bytes.items())
    trie, root = FlatTrie(items), node_trie(items)
    order = [i for ids, _ in reference_walk(root, 0, lambda s, b: 0) for i in ids]
    assert sorted(order) == trie.token_ids.tolist()
    rank = {i: k for k, i in enumerate(order)}
    assert trie.dfs_rank().tolist() == [rank[i] for i in trie.token_ids.tolist()]
    for k, i in enumerate(trie.token_ids.tolist()):  # the path to each token's node spells its bytes
        v, path = int(trie.token_node[k]), []
        while v:
            path.append(int(trie.byte[v]))
            v = int(trie.parent[v])
        assert bytes(reversed(path)) == vocab.token_bytes[i]


# ======================================================================================= property: any DFA
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=hs.lists(hs.binary(min_size=1, max_size=6).map(lambda b: bytes(x % 7 * 37 for x in b)) | hs.binary(
           min_size=1, max_size=4), min_size=0, max_size=60),
       n_states=hs.integers(1, 6), seed=hs.integers(0, 1 << 30), dense=hs.sampled_from([1, 2, 4096]),
       small=hs.sampled_from([0, 2, 16]))
def test_any_automaton_walks_exactly_as_node_by_node(tokens, n_states, seed, dense, small):
    """A random deterministic automaton (some transitions dead, states of mixed hashable types) over a random token
    list (duplicates included): the walk's states, the surviving ids and their order are the reference's, with the
    levels walked by numpy, node by node or both, and states past the dense rows."""
    rng = random.Random(seed)
    names = [("s", k) if k % 2 else frozenset({k, -k}) for k in range(n_states)]
    delta = {(s, b): (None if rng.random() < 0.3 else rng.choice(names)) for s in names for b in range(256)}
    items = list(enumerate(tokens))
    trie, root = FlatTrie(items), node_trie(items)
    old = trie_walk.DENSE_STATES, trie_walk.SMALL_NODES, trie_walk.SMALL_LEVEL
    trie_walk.DENSE_STATES, trie_walk.SMALL_NODES, trie_walk.SMALL_LEVEL = dense, small, 4 * small
    try:
        for start in names:
            table = ByteTable(lambda s, b: delta[(s, b)])
            positions, numbers = walk_states(trie, table, start)
            ref = [(ids, s2) for ids, s2 in reference_walk(root, start, table.step)]
            by_id = {i: s2 for ids, s2 in ref for i in ids}
            assert positions.tolist() == sorted(positions.tolist())
            got = {int(trie.token_ids[p]): table.states[k] for p, k in zip(positions.tolist(), numbers.tolist())}
            assert got == by_id
            order = positions[np.argsort(trie.dfs_rank()[positions])]
            assert trie.token_ids[order].tolist() == [i for ids, _ in ref for i in ids]
    finally:
        trie_walk.DENSE_STATES, trie_walk.SMALL_NODES, trie_walk.SMALL_LEVEL = old
