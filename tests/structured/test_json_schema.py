"""Structured outputs: the JSON Schema automaton (glm5/structured/json_schema.py) and the grammar built on it.

Checked against the ``jsonschema`` validator: every document the automaton accepts is valid, the documents a
constrained walk with random logits produces are valid at every budget, and ``min_close`` is exactly the length
of the shortest completion (the budget logic relies on it)."""

from __future__ import annotations

import copy
import json
import random

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from glm5.structured.constrained import ConstrainedLogitsProcessor, JsonGrammar, TokenVocab
from glm5.structured.json_schema import SchemaError, compile_schema

from mixed_text import make_corpus


def strict(schema):
    """The schema as the automaton reads it: absent additionalProperties means false, and no items after
    prefixItems unless ``items`` says so (xgrammar's strict mode)."""
    s = copy.deepcopy(schema)

    def walk(x):
        if isinstance(x, dict):
            if ("properties" in x or x.get("type") == "object") and "additionalProperties" not in x:
                x["additionalProperties"] = False
            if "prefixItems" in x and "items" not in x:
                x["items"] = False
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(s)
    return s


def valid(schema, doc) -> bool:
    validator = jsonschema.Draft202012Validator
    return validator(strict(schema), format_checker=validator.FORMAT_CHECKER).is_valid(doc)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 5},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "x": {"anyOf": [{"type": "null"}, {"type": "number"}]},
    },
    "required": ["name", "age"],
}
TREE = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
    "type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}}, "$ref": "#/$defs/node"}


@pytest.mark.parametrize("schema,text,ok", [
    (PERSON, '{"name":"bob","age":42}', True),
    (PERSON, '{"name": "bob", "age": 42, "tags": ["a", "b"]}', True),
    (PERSON, '{"name":"bob","age":151}', False),  # maximum
    (PERSON, '{"name":"","age":1}', False),  # minLength
    (PERSON, '{"name":"abcdef","age":1}', False),  # maxLength
    (PERSON, '{"name":"\\u00e9\\n","age":1}', True),  # escapes count as one character each
    (PERSON, '{"age":1,"name":"x"}', False),  # schema order
    (PERSON, '{"name":"x"}', False),  # required
    (PERSON, '{"name":"x","age":1,"x":null}', True),
    (PERSON, '{"name":"x","age":1,"x":-1.5e3}', True),
    (PERSON, '{"name":"x","age":1,"tags":["a","b","a"]}', False),  # maxItems
    (PERSON, '{"name":"x","age":1,"tags":["c"]}', False),  # enum
    (PERSON, '{"name":"x","age":01}', False),
    (PERSON, '{"name":"x","age":1.5}', False),  # integer
    (PERSON, '{"name":"x","age":1,"zz":1}', False),  # additionalProperties absent = false
    (PERSON, ' {"name":"x","age":1}', False),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a":1,"b c":2}', True),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a":"1"}', False),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": True},
     '{"zz":[{}],"a":"x"}', False),  # extra keys come after the last required property
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True}, '{"zz":[{}],"a":"x"}',
     True),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True}, '{"a":"x","zz":[{}]}',
     True),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True}, '{"a":"x","a":"y"}',
     False),
    ({"type": "object", "properties": {'q"u\\o': {"type": "null"}}, "required": ['q"u\\o']},
     '{"q\\"u\\\\o":null}', True),
    ({"type": "integer", "minimum": -5, "exclusiveMaximum": 10}, "-5", True),
    ({"type": "integer", "minimum": -5, "exclusiveMaximum": 10}, "10", False),
    ({"type": "integer", "minimum": -5, "exclusiveMaximum": 10}, "-6", False),
    ({"type": "integer", "minimum": 100}, "99", False),
    ({"type": "integer", "minimum": 100}, "12345", True),
    ({"type": "integer", "minimum": 1}, "-0", False),
    ({"enum": [1, 10, "a", None, [1, 2], {"k": True}]}, "10", True),
    ({"enum": [1, 10, "a", None, [1, 2], {"k": True}]}, '{"k":true}', True),
    ({"enum": [1, 10, "a", None, [1, 2], {"k": True}]}, "100", False),
    ({"type": "string", "enum": ["a", 1]}, "1", False),  # enum values of other types are dropped
    ({"const": "héllo"}, '"héllo"', True),
    ({"type": ["string", "null"]}, "null", True),
    ({"type": ["string", "null"]}, "1", False),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}, '[1,"a"]', True),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}, '[1,"a",2]', False),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "boolean"}, "minItems": 2},
     "[1,true,false]", True),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "boolean"}, "minItems": 2},
     "[1]", False),
    ({"type": "array"}, '[1,"a",{"b":[null]}]', True),
    (TREE, '{"v":1,"kids":[{"v":2},{"v":3,"kids":[]}]}', True),
    (TREE, '{"v":1,"kids":[{"kids":[]}]}', False),
    (True, '{"anything":[1,2]}', True),
    ({"allOf": [{"type": "boolean"}], "description": "d"}, "false", True),
    # pattern: found anywhere unless anchored; the text is matched decoded, written with JSON's canonical escapes
    ({"type": "string", "pattern": "\\d{2}"}, '"ab12c"', True),
    ({"type": "string", "pattern": "\\d{2}"}, '"ab1c"', False),
    ({"type": "string", "pattern": "^\\d{2}"}, '"ab12"', False),
    ({"type": "string", "pattern": "^[a\"\\n]+$"}, '"a\\"\\n"', True),
    ({"type": "string", "pattern": "^[a\"\\n]+$"}, '"a\\u0022"', False),  # valid JSON, but not the canonical escape
    ({"type": "string", "pattern": "^[a\"\\n]+$"}, '"ab"', False),
    ({"type": "string", "format": "date"}, '"2024-02-29"', True),
    ({"type": "string", "format": "date"}, '"2023-02-29"', False),
    ({"type": "string", "format": "date"}, '"1900-02-29"', False),
    ({"type": "string", "format": "date"}, '"2000-02-29"', True),
    ({"type": "string", "format": "date"}, '"0000-01-01"', False),  # no year 0 in Python's datetime
    ({"type": "string", "format": "date-time"}, '"2026-11-24T09:30:00.25+01:00"', True),
    ({"type": "string", "format": "date-time"}, '"2026-11-24 09:30"', False),
    ({"type": "string", "format": "ipv4"}, '"192.168.0.255"', True),
    ({"type": "string", "format": "ipv4"}, '"192.168.0.256"', False),
    ({"type": "string", "format": "uuid"}, '"123e4567-e89b-12d3-a456-426614174000"', True),
    ({"type": "string", "format": "email"}, '"a.b+c@example.co"', True),
    ({"type": "string", "format": "email"}, '"a@b"', False),
])
def test_accepts_exactly_the_valid_documents(schema, text, ok):
    assert compile_schema(schema).accepts(text) is ok
    if ok:
        assert valid(schema, json.loads(text))


@pytest.mark.parametrize("schema,words", [
    ({"type": "string", "pattern": "a(?=b)"}, "lookaround"),
    ({"type": "string", "pattern": "a+", "maxLength": 3}, "minLength / maxLength"),
    ({"type": "string", "pattern": 5}, "pattern must be a string"),
    ({"type": "string", "format": "uri-template"}, "'uri-template'"),
    ({"type": "integer", "format": "int32"}, "does not apply"),
    ({"type": "number", "minimum": 0}, "integers only"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "#/properties/a"),
    ({"$ref": "other.json#/x"}, "local $ref"),
    ({"$ref": "#/$defs/missing"}, "does not resolve"),
    ({"allOf": [{"type": "string"}, {"minLength": 2}]}, "allOf"),
    ({"anyOf": [{"type": "string"}], "minLength": 2}, "anyOf next to other keywords"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "'a'"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "no JSON value"),
    ({"type": "date"}, "type must be"),
    ({"$defs": {"loop": {"$ref": "#/$defs/loop"}}, "$ref": "#/$defs/loop"}, "no JSON value"),
    ({"enum": []}, "no JSON value"),
    ({"type": [["string"]]}, "type must be"),
    ({"enum": [float("inf")]}, "invalid schema"),
    ({"properties": {"a": []}}, "must be an object or a boolean"),
    ({"minLength": -1}, "non-negative integer"),
    (json.loads('{"items":' * 100 + "{}" + "}" * 100), "nested deeper"),
])
def test_unsupported_or_unsatisfiable_schemas_are_refused_with_their_place(schema, words):
    with pytest.raises(SchemaError) as e:
        compile_schema(schema)
    assert words in str(e.value)


# ------------------------------------------------------------------------------------------ random schemas
_names = st.text(alphabet='ab_"\\é ', min_size=1, max_size=3)
_scalars = st.one_of(st.text(alphabet='xy"\\\né', max_size=3), st.integers(-20, 20), st.booleans(), st.none())
_leaves = st.one_of(
    st.just({"type": "string"}),
    st.tuples(st.integers(0, 3), st.integers(0, 3)).map(lambda t: {"type": "string", "minLength": t[0],
                                                                      "maxLength": t[0] + t[1]}),
    st.just({"type": "number"}),
    st.tuples(st.one_of(st.none(), st.integers(-120, 120)), st.one_of(st.none(), st.integers(0, 300))).map(
        lambda t: {"type": "integer", **({"minimum": t[0]} if t[0] is not None else {}),
                   **({"maximum": max(t[1], t[0] or 0)} if t[1] is not None else {})}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.sampled_from([{"type": "string", "pattern": p} for p in ("^[xy\"]+$", "y", "^x*\\d$", "\\\\|é")]),
    st.sampled_from([{"type": "string", "format": f} for f in ("date", "ipv4", "uuid")]),
    st.lists(_scalars, min_size=1, max_size=4, unique_by=lambda v: json.dumps(v)).map(lambda v: {"enum": v}),
    st.just({}),
)


@st.composite
def _objects(draw, children):
    props = draw(st.dictionaries(_names, children, max_size=3))
    req = [k for k in props if draw(st.booleans())]
    s = {"type": "object", "properties": props, "required": req}
    extra = draw(st.sampled_from([None, False, True, "int"]))
    if extra is not None:
        s["additionalProperties"] = {"type": "integer"} if extra == "int" else extra
    return s


@st.composite
def _arrays(draw, children):
    s = {"type": "array", "items": draw(children)}
    lo = draw(st.integers(0, 2))
    if lo:
        s["minItems"] = lo
    if draw(st.booleans()):
        s["maxItems"] = lo + draw(st.integers(0, 2))
    return s


schemas = st.recursive(_leaves, lambda c: st.one_of(_objects(c), _arrays(c),
                                                      st.lists(c, min_size=2, max_size=3).map(lambda a: {"anyOf": a})),
                       max_leaves=6)
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.text(alphabet='xy"é', max_size=3)),
                     lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(_names, c, max_size=3)), max_leaves=8)


def _compile_or_skip(schema):
    try:
        return compile_schema(schema)
    except SchemaError as e:
        assert "no JSON value" in str(e), e  # the generator only uses supported keywords
        return None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(schema=schemas, doc=_json)
def test_whatever_the_automaton_accepts_is_valid(schema, doc):
    auto = _compile_or_skip(schema)
    if auto is None:
        return
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    if auto.accepts(text):
        assert valid(schema, doc), text


def _shortest(auto, s) -> int:
    """Follow bytes that lower min_close until the document is complete; the number of bytes taken."""
    n = 0
    while not auto.complete(s) or auto.min_close(s) > 0:
        here = auto.min_close(s)
        for b in range(256):  # the grammar's forced path tries every single-byte token
            s2 = auto.step(s, b)
            if s2 is not None and auto.min_close(s2) == here - 1:
                s = s2
                break
        else:
            raise AssertionError(f"no byte lowers min_close={here}")
        n += 1
    return n


@settings(max_examples=150, deadline=None, derandomize=True)
@given(schema=schemas, seed=st.integers(0, 1000))
def test_min_close_is_the_shortest_completion(schema, seed):
    note(json.dumps(schema))
    auto = _compile_or_skip(schema)
    if auto is None:
        return
    rng = random.Random(seed)
    s, text = auto.start(), b""
    for _ in range(rng.randint(0, 30)):  # a random valid prefix
        moves = [(b, s2) for b in b'{}[]",:0123456789-.eatrufnlsxy_\\ ' + "é".encode() for s2 in [auto.step(s, b)]
                 if s2 is not None]
        if not moves:
            break
        b, s = rng.choice(moves)
        text += bytes([b])
    need = auto.min_close(s)
    assert _shortest(auto, s) == need, text


# ------------------------------------------------------------------------------------------ the grammar
@pytest.fixture(scope="module")
def vocab():
    from glm5.tokenizer import train_bpe

    return TokenVocab(train_bpe(make_corpus(), vocab_size=800), logits_size=832)


def _walk(grammar, vocab, budget, seed):
    proc = ConstrainedLogitsProcessor(grammar, budget)
    out: list[int] = []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(budget):
        masked = proc(out, torch.randn(vocab.size, generator=gen) * 3.0)
        tok = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
        out.append(tok)
        if tok in vocab.eos_ids:
            break
    return out


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, extra=st.integers(0, 25), seed=st.integers(0, 1 << 20))
def test_constrained_walks_are_valid_at_every_budget(vocab, schema, extra, seed):
    auto = _compile_or_skip(schema)
    if auto is None:
        return
    grammar = JsonGrammar(vocab, schema=auto)
    budget = grammar.min_close(grammar.start()) + extra
    ids = _walk(grammar, vocab, budget, seed)
    assert len(ids) <= budget and ids[-1] in vocab.eos_ids, "the output must end (EOS) within max_tokens"
    text = b"".join(vocab.token_bytes[i] for i in ids[:-1]).decode("utf-8")
    assert valid(schema, json.loads(text)), text


def test_person_schema_with_thinking_first(vocab):
    grammar = JsonGrammar(vocab, thinking=True, schema=compile_schema(PERSON))
    think_end = vocab.id("</think>")
    for seed in range(5):
        ids = _walk(grammar, vocab, 60, seed)
        assert think_end in ids and ids[-1] in vocab.eos_ids
        body = ids[ids.index(think_end) + 1:-1]
        doc = json.loads(b"".join(vocab.token_bytes[i] for i in body).decode("utf-8"))
        assert valid(PERSON, doc) and set(doc) >= {"name", "age"}


FORMATTED = {"type": "object", "properties": {
    "day": {"type": "string", "format": "date"},
    "at": {"type": "string", "format": "date-time"},
    "host": {"type": "string", "format": "ipv4"},
    "id": {"type": "string", "format": "uuid"},
    "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
    "note": {"type": "string", "pattern": "ok|\"q\""},
}, "required": ["day", "at", "host", "id", "code", "note"]}


def test_formats_and_patterns_in_constrained_walks(vocab):
    import datetime
    import ipaddress
    import re
    import uuid

    grammar = JsonGrammar(vocab, schema=compile_schema(FORMATTED))
    need = grammar.min_close(grammar.start())
    for seed in range(6):
        ids = _walk(grammar, vocab, need + (0 if seed % 2 else 40), seed)
        assert ids[-1] in vocab.eos_ids
        doc = json.loads(b"".join(vocab.token_bytes[i] for i in ids[:-1]).decode("utf-8"))
        assert valid(FORMATTED, doc), doc
        datetime.date.fromisoformat(doc["day"])
        datetime.datetime.fromisoformat(doc["at"])
        ipaddress.IPv4Address(doc["host"])
        uuid.UUID(doc["id"])
        assert re.fullmatch(r"[A-Z]{2}-\d{3}", doc["code"]) and re.search(r'ok|"q"', doc["note"])


STRINGS = {"type": "object", "properties": {
    "s": {"type": "string", "minLength": 3},
    "t": {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "string"}]}}}


SEARCHED = {"type": "object", "properties": {"p": {"type": "string", "pattern": "[aeiou]"}, "q": {"type": "string"}},
            "required": ["p", "q"]}  # once "p" holds a vowel it takes the plain-string fast path too


@pytest.mark.parametrize("schema", [None, PERSON, STRINGS, SEARCHED])
def test_string_fast_path_allows_exactly_what_the_trie_walk_allows(vocab, schema):
    """Inside a string, plain-text tokens are listed by character count instead of walked: the allowed set must
    be the one the full walk gives, at every state of some random walks and with a binding budget too."""
    grammar = JsonGrammar(vocab, schema=compile_schema(schema) if schema is not None else None)
    slow = JsonGrammar(vocab, schema=grammar.doc if schema is not None else None)
    slow.doc = type("NoFastPath", (), {k: staticmethod(getattr(grammar.doc, k))
                                       for k in ("start", "step", "min_close", "complete")})()
    slow.doc.string_room = staticmethod(lambda s: False)
    seen_string = 0
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        state, budget = grammar.start(), 40
        for _ in range(budget):
            if state[0] == "json" and grammar.doc.string_room(state[1]) is not False:
                seen_string += 1
            for b in (budget, grammar.min_close(state) + 1):
                assert sorted(grammar.allowed(state, b)) == sorted(slow.allowed(state, b))
            allowed = grammar.allowed(state, budget)
            tok = allowed[int(torch.randint(len(allowed), (1,), generator=gen))]
            if tok in vocab.eos_ids:
                break
            state, budget = grammar.advance(state, tok), budget - 1
    assert seen_string > 5


def test_offline_engine_with_the_json_logits_processor():
    """vLLM-style offline structured output: LLM.generate with the processor in SamplingParams.logits_processors,
    n > 1 sharing one processor, on a random-init model whose vocabulary is the tokenizer's."""
    from glm5 import GLM5ForCausalLM, preset
    from glm5.engine import LLM, SamplingParams
    from glm5.structured.constrained import json_logits_processor
    from glm5.tokenizer import train_bpe

    tok = train_bpe(make_corpus(), vocab_size=800)
    cfg = preset("glm5-nano", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_ids)
    model = GLM5ForCausalLM(cfg).init_weights(0)
    llm = LLM(model, tokenizer=tok, max_model_len=256)
    proc = json_logits_processor(tok, max_tokens=60, schema=PERSON)
    out = llm.generate(["Describe a person:"], SamplingParams(n=3, max_tokens=60, temperature=1.0, seed=5,
                                                                 logits_processors=[proc]))[0]
    for c in out.outputs:
        assert c.finish_reason == "stop", c
        assert valid(PERSON, json.loads(c.text)), c.text
    with pytest.raises(ValueError, match="too small"):
        json_logits_processor(tok, max_tokens=5, schema=PERSON)
