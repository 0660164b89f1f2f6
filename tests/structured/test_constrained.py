"""The grammars behind json_object and required/named tool_choice, without a model: random logits pick
among the allowed tokens; whatever the budget, the result must be valid."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from glm5.structured.constrained import ConstrainedLogitsProcessor, JsonGrammar, TokenVocab, json_accepts
from glm5.structured.tool_grammar import ToolCallGrammar
from glm5.tokenizer import parse_output
from glm5.tokenizer import special_tokens as st

from mixed_text import make_corpus
from .test_json_schema import strict

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"},
                                         "unit": {"type": "string", "enum": ["c", "f"]}, "detailed": {"type": "boolean"},
                                         "tags": {"type": "array"},
                                         "range": {"$ref": "#/$defs/range"}},
        "required": ["location", "days"],
        "$defs": {"range": {"type": "object", "properties": {"lo": {"type": "integer", "minimum": 0, "maximum": 99},
                                                               "hi": {"type": "integer"}}, "required": ["lo"]}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture(scope="module")
def tok():
    from glm5.tokenizer import train_bpe

    return train_bpe(make_corpus(), vocab_size=800)


@pytest.fixture(scope="module")
def vocab(tok):
    return TokenVocab(tok, logits_size=832)  # the model's vocab may be padded past the tokenizer's


@pytest.mark.parametrize("text,ok", [
    ('{}', True), ('{"a": 1}', True), ('{"a":[1,2.5e-3,{"b":null}],"c":"x\\u00e9\\n"}', True),
    ('{"a": true, "b": false}', True), ('{"é": "ü🙂"}', True), ('[]', False), ('{', False), ('{"a"}', False),
    ('{"a":01}', False), ('{"a":1,}', False), ('{"a":"\x01"}', False), ('{"a":-}', False), ('{"a":1.}', False),
    ('  {}', False), ('{}  ', False), ('{"a":tru}', False), ('{"a":"\\x"}', False),
])
def test_json_automaton(text, ok):
    assert json_accepts(text) is ok
    if ok:
        json.loads(text)


def _run(grammar, vocab, budget, rng, temperature=3.0):
    proc = ConstrainedLogitsProcessor(grammar, budget)
    out: list[int] = []
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    for _ in range(budget):
        logits = torch.randn(vocab.size, generator=gen) * temperature
        masked = proc(out, logits)
        tok = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
        out.append(tok)
        if tok in vocab.eos_ids:
            break
    return out


def sampled_text(grammar, tok, budget: int, seed: int, scale: float = 1.0, thinking: bool = False) -> str:
    """One output sampled through ``grammar`` with seeded random logits (times ``scale``) within ``budget`` tokens:
    it must end with EOS (and, with ``thinking``, contain ``</think>``). Returns its text after the reasoning."""
    gen = torch.Generator().manual_seed(seed)
    proc = ConstrainedLogitsProcessor(grammar, budget)
    eos = grammar.vocab.eos_ids
    out: list[int] = []
    for _ in range(budget):
        logits = proc(out, torch.randn(832, generator=gen) * scale)
        out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
        if out[-1] in eos:
            break
    assert out[-1] in eos, out
    text = tok.decode(out[:-1], skip_special_tokens=False)
    if thinking:
        assert st.THINK_END in text
        text = text.split(st.THINK_END, 1)[1]
    return text


def _text(vocab, ids):
    inv = {i: c for c, i in vocab.added.items()}
    return b"".join(vocab.token_bytes[i] if i in vocab.token_bytes else inv[i].encode() for i in ids).decode("utf-8", "replace")


@pytest.mark.parametrize("budget", [3, 4, 5, 8, 13, 40, 120])
@pytest.mark.parametrize("thinking", [False, True])
def test_json_grammar_always_valid(vocab, budget, thinking):
    rng = random.Random(budget * 7 + thinking)
    grammar = JsonGrammar(vocab, thinking=thinking)
    if budget < grammar.min_close(grammar.start()):  # the server answers 400 for such a max_tokens
        return
    for _ in range(6):
        ids = _run(grammar, vocab, budget, rng)
        assert len(ids) <= budget
        text = _text(vocab, ids)
        if thinking:
            assert st.THINK_END in text
            text = text.split(st.THINK_END, 1)[1]
        assert ids[-1] in vocab.eos_ids, text
        body = text[: -len(st.ENDOFTEXT)] if text.endswith(st.ENDOFTEXT) else text
        for eos in st.EOS_TOKENS:
            body = body.removesuffix(eos)
        assert isinstance(json.loads(body), dict), body


@pytest.mark.parametrize("budget", [12, 20, 30, 60, 150])
@pytest.mark.parametrize("names", [None, ["get_weather"], ["get_time"]])
def test_tool_grammar_always_parses(tok, vocab, budget, names):
    grammar = ToolCallGrammar(vocab, TOOLS, names=names, parallel=names is None, thinking=True)
    need = grammar.min_close(grammar.start())
    rng = random.Random(budget)
    for _ in range(5):
        if budget < need:
            break
        ids = _run(grammar, vocab, budget, rng)
        text = tok.decode(ids)
        assert ids[-1] == vocab.id(st.OBSERVATION), text
        parsed = parse_output(text, TOOLS, thinking=True)
        assert parsed.tool_calls, (text, parsed.errors)
        for call in parsed.tool_calls:
            assert call.name in (names or ["get_weather", "get_time"])
            args = json.loads(call.arguments)
            if call.name == "get_weather":
                assert {"location", "days"} <= set(args), text
                assert isinstance(args["days"], int)
                if "detailed" in args:
                    assert isinstance(args["detailed"], bool)
                if "tags" in args:
                    assert isinstance(args["tags"], list)
                # nested values are checked against their whole schema, string enums included
                jsonschema.validate(args, strict(TOOLS[0]["function"]["parameters"]))
            else:
                assert args == {}
        assert not [e for e in parsed.errors if "unknown tool" in e or "malformed" in e], parsed.errors


def test_tool_grammar_too_small_budget_is_reported(vocab):
    g = ToolCallGrammar(vocab, TOOLS, names=["get_weather"])
    # <tool_call> get_weather (11 bytes) + two required pairs + </tool_call> + <|observation|>
    assert g.min_close(g.start()) > 20




@pytest.mark.parametrize("thinking", [False, True])
def test_choice_grammar_random_walks_end_in_a_choice(tok, vocab, thinking):
    from glm5.structured import GrammarCache

    choices = ["yes", "no", "yes, definitely", "maybe not", "天气", "🙂 fine"]
    cache = GrammarCache(tok, logits_size=832)
    grammar = cache.choice(choices, thinking=thinking)
    assert cache.choice(list(choices), thinking=thinking) is grammar  # compiled once
    seen = set()
    for seed in range(60):
        budget = 24 if seed % 2 else 6  # a tight budget must still end in a choice
        text = sampled_text(grammar, tok, budget, seed, thinking=thinking)
        assert text in choices, text
        seen.add(text)
    assert len(seen) >= (3 if thinking else 4), seen  # reasoning spends budgets; tight ones force the shortest


BOOKING_TOOLS = [{"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "properties": {"day": {"type": "string", "format": "date"},
                                     "code": {"type": "string", "pattern": "^[A-Z]{2}\\d{2}$"},
                                     "note": {"type": "string", "pattern": "please"}},
    "required": ["day", "code", "note"]}}}]


@pytest.mark.parametrize("budget", [0, 10, 60])
def test_tool_string_arguments_match_their_pattern_and_format(tok, vocab, budget):
    """String arguments are written raw; with ``pattern`` / ``format`` they must match it, under any budget."""
    import datetime
    import re

    grammar = ToolCallGrammar(vocab, BOOKING_TOOLS, names=["book"], parallel=False)
    budget += grammar.min_close(grammar.start())
    rng = random.Random(budget)
    for _ in range(4):
        ids = _run(grammar, vocab, budget, rng)
        text = tok.decode(ids)
        parsed = parse_output(text, BOOKING_TOOLS)
        assert len(parsed.tool_calls) == 1 and not parsed.errors, (text, parsed.errors)
        args = json.loads(parsed.tool_calls[0].arguments)
        datetime.date.fromisoformat(args["day"])
        assert re.fullmatch(r"[A-Z]{2}\d{2}", args["code"]) and "please" in args["note"], args


def test_raw_string_arguments_never_contain_the_closing_tags():
    from glm5.structured.regex import RegexAutomaton
    from glm5.structured.tool_grammar import _RawText

    raw = _RawText(RegexAutomaton("x", search=True))  # any text that contains an x
    for bad, good in ((st.ARG_VALUE_END, "</arg_valuex"), (st.TOOL_CALL_END, "<</tool_callx")):
        s = raw.start()
        for b in ("x" + bad).encode():
            s = raw.step(s, b) if s is not None else None
        assert s is None
        s = raw.start()
        for b in good.encode():
            s = raw.step(s, b)
        assert raw.complete(s) and s[1] == b""


@pytest.mark.parametrize("kind", ["json_object", "schema", "regex", "gbnf"])
def test_allowed_index_is_allowed_at_every_budget(vocab, kind):
    """The index tensor the processor masks with (a prefix of each state's cost-sorted moves) holds exactly the
    ids ``allowed`` lists, at every budget from binding to loose, along random walks."""
    from glm5.structured.gbnf import GbnfAutomaton
    from glm5.structured.json_schema import compile_schema
    from glm5.structured.regex import RegexAutomaton

    doc = {"json_object": None, "schema": compile_schema(TOOLS[0]["function"]["parameters"]),
           "regex": RegexAutomaton(r"[a-z]{1,6}( [a-z]{1,6}){0,3}\."),
           "gbnf": GbnfAutomaton('root ::= "(" root ")" | "[" [a-z ]* "]"')}[kind]
    grammar = JsonGrammar(vocab, schema=doc)
    rng = random.Random(kind)
    for _ in range(3):
        state, budget = grammar.start(), 40
        while state[0] != "end" and budget > 0:
            for b in range(max(1, grammar.min_close(state)), budget + 1):
                got = grammar.allowed_index(state, b, 832, "cpu").tolist()
                assert sorted(got) == sorted(i for i in grammar.allowed(state, b) if i < 832), (state, b)
            tok = rng.choice(grammar.allowed(state, budget))
            state, budget = grammar.advance(state, tok), budget - 1


@pytest.mark.parametrize("thinking", [False, True])
def test_optional_tool_grammar_text_or_valid_calls(tok, vocab, thinking):
    """``tool_choice: "auto"`` with strict tools: the turn is text that may end without a call, but every call
    written is a valid one of the tools, whatever the budget."""
    grammar = ToolCallGrammar(vocab, TOOLS, thinking=thinking, optional=True)
    assert grammar.min_close(grammar.start()) == (2 if thinking else 1)
    call = vocab.id(st.TOOL_CALL_START)
    kinds = set()
    for seed in range(16):
        gen = torch.Generator().manual_seed(seed)
        budget = 20 + 10 * (seed % 5)
        proc = ConstrainedLogitsProcessor(grammar, budget)
        out: list[int] = []
        for _ in range(budget):
            logits = torch.randn(vocab.size, generator=gen) * 3
            logits[call] += 4.0 if seed % 2 else -20.0  # calls on odd seeds, text on even ones
            logits[vocab.id(st.THINK_END)] += 3.0  # reasoning ends soon
            masked = proc(out, logits)
            out.append(int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen)))
            if out[-1] in vocab.eos_ids:
                break
        if call in out:  # text may run to the length limit like any text; a call must close within the budget
            assert out[-1] in vocab.eos_ids, "the call ends within the budget"
        parsed = parse_output(tok.decode(out), TOOLS, thinking=thinking)
        assert not parsed.errors, parsed.errors
        for c in parsed.tool_calls:
            jsonschema.validate(json.loads(c.arguments), strict(next(
                t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c.name)))
        kinds.add(bool(parsed.tool_calls))
    assert kinds == {True, False}
