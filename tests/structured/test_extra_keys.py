"""Object keys under schemas that allow extra keys (``additionalProperties`` true or a schema, no ``properties`` at
all, declared and extra keys mixed, inside ``anyOf``, nested, recursive, in tool-call arguments) against the
implementation before extra keys forgot their text (``schema_reference.py``: every key state holds the key typed so
far, and its allowed tokens come from a walk of the whole trie). The new automaton's key state is the old one with
the text of a key that begins no declared name replaced by its length (:func:`project`); at every state of random
walks the two give the same allowed ids at tight and loose budgets, the same index tensors, the same shortest
completion and the same verdict on tokens, and hypothesis checks every byte from random states of the automata.

Not here because the compiler refuses them (``SchemaError``, tested below): ``patternProperties``,
``propertyNames``, ``minProperties`` / ``maxProperties`` (extra keys are printable ASCII without escapes, at most
``MAX_EXTRA_KEY`` bytes, whatever the schema)."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from glm5.structured.constrained import JsonGrammar, TokenVocab
from glm5.structured.json_schema import MAX_EXTRA_KEY, SchemaAutomaton, SchemaError, compile_schema
from glm5.structured.vocab import KeyRoom

from mixed_text import make_corpus
from .schema_reference import ReferenceSchemaAutomaton
from .test_tool_text import drive, same_state
from .test_trie_walk import UNUSUAL, WithExtraTokens
from .tool_reference import ReferenceToolCallGrammar

# keys and pieces of keys: long ASCII runs (to reach MAX_EXTRA_KEY), declared names and their prefixes, escapes,
# non-ASCII text (refused in extra keys, allowed in a declared name), quotes with what follows a key
KEYISH = [b"abcdefghijklmnop", b"x" * 30, b"zz", b'"a', b'"ab', b'ab"', b'abc":', b'"abc":"', b'":', b'":1,"', b'"}',
          b'a\\"q', b'\\"', b'"\xc3\xa9":', "é".encode(), "naïve".encode(), b'{"', b'{"x', b'x":', b'"name":"',
          b"nam", b"nick", b"e", b'""', b'"":', b' "', b"\x7f", b"ab\\", b"\\u0041", b'y":{"', b'}}', b'},"', b'":[']
NAMES = {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "ab": {"type": "string", "maxLength": 2},
         "abc": {"type": "boolean"}, 'a"q': {"type": "null"}, "é": {"type": "integer"}, "": {"type": "null"}}
SCHEMAS = {
    "additionalProperties true": {"type": "object", "additionalProperties": True},
    "no properties": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 99}},
    "extra schema": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                                      "nick": {"type": "string"}},
                     "additionalProperties": {"type": "string", "maxLength": 3}},
    "mixed names": {"type": "object", "properties": NAMES, "additionalProperties": {"enum": [1, 22]}},
    "required": {"type": "object", "properties": {**NAMES, "z": {"type": "integer"}}, "required": ["a", "ab"],
                 "additionalProperties": True},
    "nested": {"type": "object", "properties": {"x": {"type": "object", "additionalProperties": {
        "type": "array", "items": {"type": "object", "properties": {"a": {"type": "integer"}},
                                   "additionalProperties": {"type": "object", "additionalProperties": True}},
        "maxItems": 2}}}, "additionalProperties": {"type": "object", "properties": {"y": {"type": "null"}},
                                                  "additionalProperties": True}},
    "anyOf": {"anyOf": [{"type": "object", "properties": {"abc": {"type": "null"}}, "additionalProperties": True},
                        {"type": "object", "properties": {"name": {"type": "integer"}},
                         "additionalProperties": {"type": "string"}},
                        {"type": "object", "additionalProperties": {"type": "integer"}}]},
    "recursive": {"$defs": {"t": {"type": "object", "properties": {"v": {"type": "integer"}},
                                  "additionalProperties": {"$ref": "#/$defs/t"}}}, "$ref": "#/$defs/t"},
}
TOOLS = [{"type": "function", "function": {"name": "tag", "parameters": {"type": "object", "properties": {
    "meta": {"type": "object", "additionalProperties": {"type": "string"}},
    "counts": {"type": "object", "properties": {"total": {"type": "integer"}, "to": {"type": "string"}},
               "required": ["total"], "additionalProperties": {"type": "integer", "minimum": 0}},
    "deep": {"type": "array", "items": {"type": "object", "additionalProperties": True}, "maxItems": 2}},
    "required": ["meta"]}}}]


@pytest.fixture(scope="module")
def vocab():
    from glm5.tokenizer import train_bpe

    tok = train_bpe(make_corpus(n_docs=300, p_newline=0.1), vocab_size=2000)
    return TokenVocab(WithExtraTokens(tok, UNUSUAL + KEYISH))


# ------------------------------------------------------------------------------------------ the two automata
def pair(schema) -> tuple[SchemaAutomaton, ReferenceSchemaAutomaton]:
    new = compile_schema(schema)
    return new, ReferenceSchemaAutomaton(new.nodes, new.root)


def project(auto: SchemaAutomaton, state):
    """The new automaton's state for the reference's ``state``: a key frame whose text begins no declared name
    becomes ("X", nid, its length). The new state must be exactly this."""
    if state is None:
        return None

    def frame(f):
        if f[0] == "K" and not any(enc.startswith(f[2]) for _, enc, _ in auto.nodes[f[1]].props):
            return ("X", f[1], len(f[2]))
        return f
    return frozenset(tuple(frame(f) for f in s) for s in state)


def assert_same_automaton_state(new, ref, s, r) -> None:
    assert s == project(new, r), (s, r)
    assert new.min_close(s) == ref.min_close(r)
    assert new.complete(s) == ref.complete(r)
    room, old_room = new.string_room(s), ref.string_room(r)
    if not isinstance(room, KeyRoom):
        assert room == old_room, (s, r)
    else:  # only extra keys, all with the room their texts leave
        assert old_room is False and all(f[-1][0] == "K" and len(f[-1][2]) == MAX_EXTRA_KEY - room.chars for f in r)


@settings(max_examples=60, deadline=None)
@given(name=hs.sampled_from(sorted(SCHEMAS)), seed=hs.integers(0, 1 << 30), length=hs.integers(1, 160))
def test_every_byte_from_random_states_agrees(name, seed, length):
    """From random states (each byte picked among those the reference accepts, keys' text favoured), all 256 bytes
    lead the two automata to corresponding states, with the same shortest completions."""
    new, ref = pair(SCHEMAS[name])
    s, r = new.start(), ref.start()
    rng = random.Random(seed)
    for _ in range(length):
        p = rng.randrange(1 << 16)
        assert_same_automaton_state(new, ref, s, r)
        alive = []
        for b in range(256):
            s2, r2 = new.step(s, b), ref.step(r, b)
            assert s2 == project(new, r2), (s, b)
            if r2 is not None:
                alive.append(b)
        if not alive:
            break
        texty = [b for b in alive if 0x61 <= b <= 0x7A]
        b = texty[p % len(texty)] if texty and p % 10 else alive[p % len(alive)]  # letters mostly: keys up to the limit
        s, r = new.step(s, b), ref.step(r, b)


def test_extra_key_states_repeat_and_take_the_fast_path():
    """Two extra keys of one length are one state, whatever their text; its string_room is a KeyRoom, up to
    MAX_EXTRA_KEY bytes; a key that still begins a declared name keeps its text."""
    auto = compile_schema(SCHEMAS["mixed names"])

    def after(text: bytes):
        s = auto.start()
        for b in text:
            s = auto.step(s, b)
        return s
    assert after(b'{"zzzz') == after(b'{"yxwv') == after(b'{"abcd')
    assert auto.string_room(after(b'{"zzzz')) == KeyRoom(MAX_EXTRA_KEY - 4)
    assert auto.string_room(after(b'{"ab')) is False and after(b'{"ab') != after(b'{"zz')
    full = after(b'{"' + b"k" * MAX_EXTRA_KEY)
    assert auto.string_room(full) == KeyRoom(0) and auto.step(full, ord("k")) is None
    assert auto.step(full, ord('"')) is not None
    assert auto.step(after(b'{"zz'), 0xC3) is None  # extra keys are ASCII; the declared "é" is not an extra key


@pytest.mark.parametrize("schema", [{"type": "object", "patternProperties": {"^a": {}}},
                                    {"type": "object", "propertyNames": {"maxLength": 3}},
                                    {"type": "object", "minProperties": 1}, {"type": "object", "maxProperties": 2}])
def test_key_keywords_the_compiler_refuses(schema):
    with pytest.raises(SchemaError, match="unsupported keyword"):
        compile_schema(schema)


# ------------------------------------------------------------------------------------------ the grammars
def grammars(vocab, schema) -> tuple[JsonGrammar, JsonGrammar]:
    new, ref = pair(schema)
    return JsonGrammar(vocab, schema=new), JsonGrammar(vocab, schema=ref)


def kind(grammar: JsonGrammar, state) -> str:
    room = grammar.doc.string_room(state[1]) if state[0] == "json" else False
    if isinstance(room, KeyRoom):
        return "extra key"
    if state[0] == "json" and any(s and s[-1][0] == "K" for s in state[1]):
        return "declared key"
    return "string" if room is not False else "walk"


def assert_grammars_agree(new: JsonGrammar, ref: JsonGrammar, s, r, budget: int, size: int) -> str:
    assert new.min_close(s) == ref.min_close(r)
    need = new.min_close(s)
    for b in {budget, 1, 2, max(1, need), need + 1, need + 2, need + 5, 1 << 20}:
        assert sorted(new.allowed(s, b)) == sorted(ref.allowed(r, b)), (s, b)
        idx, ref_idx = new.allowed_index(s, b, size, "cpu"), ref.allowed_index(r, b, size, "cpu")
        assert sorted(idx.tolist()) == sorted(ref_idx.tolist()), (s, b)
    return kind(new, s)


def same_grammar_state(new: JsonGrammar, s, r) -> bool:
    if s is None or r is None or s[0] != "json":
        return s == r
    return r[0] == "json" and s[1] == project(new.doc, r[1])


def walk_grammars(vocab, schema, seed: int, walks: int, length: int, size: int | None = None) -> collections.Counter:
    """Random walks through the new grammar and the reference side by side, checking every state; tokens that end a
    key or a value are favoured, so that walks write many keys of every length."""
    size = size or vocab.size
    new, ref = grammars(vocab, schema)
    rng = random.Random(seed)
    ids = sorted(vocab.token_bytes)
    seen: collections.Counter = collections.Counter()
    for _ in range(walks):
        s, r, budget = new.start(), ref.start(), length
        while budget > 0:
            seen[assert_grammars_agree(new, ref, s, r, budget, size)] += 1
            for t in rng.sample(ids, 12):
                assert same_grammar_state(new, new.advance(s, t), ref.advance(r, t)), (s, t)
            allowed = ref.allowed(r, budget)
            closing = [t for t in allowed if any(c in vocab.token_bytes.get(t, b"x") for c in b'"{}:,[]')]
            keyish = [t for t in allowed if vocab.token_bytes.get(t) in KEYISH]
            x = rng.random()
            tok = rng.choice(closing if closing and x < 0.3 else keyish if keyish and x < 0.5 else allowed)
            s, r = new.advance(s, tok), ref.advance(r, tok)
            assert same_grammar_state(new, s, r), (s, r, tok)
            if tok in vocab.eos_ids:
                break
            budget -= 1
    return seen


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_grammar_agrees_at_every_state(vocab, name):
    """Tight budgets (short walks: the grammar closes keys, values and objects in time) and loose ones."""
    seen = walk_grammars(vocab, SCHEMAS[name], seed=len(name), walks=6, length=25)
    # extra keys come after the last required property: the walks must write those first
    seen += walk_grammars(vocab, SCHEMAS[name], seed=len(name) + 1, walks=12 if name == "required" else 4, length=90)
    assert seen["extra key"] >= 10, seen


def test_logits_padding_and_a_smaller_logits_row(vocab):
    walk_grammars(vocab, SCHEMAS["mixed names"], seed=3, walks=3, length=40, size=vocab.size + 7)
    walk_grammars(vocab, SCHEMAS["mixed names"], seed=4, walks=3, length=40, size=max(vocab.token_bytes) - 50)


# ------------------------------------------------------------------------------------------ tool calls
class OldKeysToolCallGrammar(ReferenceToolCallGrammar):
    """The old tool grammar (every value state walked) with the old key handling in its JSON Schema values."""

    def _value_schema(self, tool, key):
        vs = super()._value_schema(tool, key)
        if isinstance(vs, SchemaAutomaton) and not isinstance(vs, ReferenceSchemaAutomaton):
            vs = self._value_schemas[(tool, key)] = ReferenceSchemaAutomaton(vs.nodes, vs.root)
        return vs


def same_tool_state(s, r) -> bool:
    if s is not None and r is not None and s[0] == r[0] == "val" and s[4][0] == r[4][0] == "schema" \
            and isinstance(r[4][1], frozenset):
        return s[:4] == r[:4] and s[4][1] == project(_SCHEMAS_BY_VALUE[s[3]], r[4][1])
    return same_state(s, r)


_SCHEMAS_BY_VALUE = {k: compile_schema(v) for k, v in TOOLS[0]["function"]["parameters"]["properties"].items()}


def test_tool_arguments_agree_at_every_state(vocab):
    """An argument that is an object with extra keys (no properties, declared and extra, in an array)."""
    seen = drive(vocab, TOOLS, seed=0, walks=5, length=30, reference=OldKeysToolCallGrammar, same=same_tool_state)
    assert seen["schema extra key"] >= 10, seen


@pytest.mark.slow
def test_tool_arguments_agree_along_long_walks(vocab):
    """The same along longer walks (30 s: kept out of the default suite)."""
    seen = drive(vocab, TOOLS, seed=1, walks=3, length=80, reference=OldKeysToolCallGrammar, same=same_tool_state)
    assert seen["schema extra key"] >= 10, seen


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=hs.sampled_from(sorted(SCHEMAS)), seed=hs.integers(0, 1 << 30), length=hs.integers(8, 60))
def test_random_walks_agree(vocab, name, seed, length):
    walk_grammars(vocab, SCHEMAS[name], seed=seed, walks=1, length=length)
