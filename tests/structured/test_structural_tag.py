"""``structural_tag``: the automaton against a small backtracking reference (``str.find`` for the earliest dispatch
string, the JSON Schema automaton's ``accepts`` for bodies) on generated strings, in vLLM's ``structures`` form and in
xgrammar's ``format`` form; exact ``min_close``; triggers split across tokens and tokens that carry a trigger and go
on; random walks through the token trie that must end in a valid output under tight and loose budgets; refusals."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from glm5.structured import GrammarCache
from glm5.structured.constrained import ConstrainedLogitsProcessor
from glm5.structured.json_schema import compile_schema
from glm5.structured.structural_tag import StructuralTagError, compile_structural_tag

from .automaton_checks import check_min_close_is_exact
from .test_constrained import tok, vocab  # noqa: F401  (the module-scoped fixtures)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

X_INT = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
LEGACY = {"type": "structural_tag", "triggers": ["<fn=", "n=", "@"], "structures": [
    {"begin": "<fn=a>", "schema": X_INT, "end": "</fn>"},
    {"begin": "<fn=b>", "schema": {"enum": [1, 22]}, "end": "</fn>"},
    {"begin": "n=1", "schema": {"type": "integer"}, "end": ";"},
    {"begin": "@", "schema": {"type": "string", "maxLength": 3}, "end": ""},
]}
FRAGMENTS = ["<fn=", "<fn=a>", "<fn=b>", "<f", "n=", "n=1", "@", '{"x":1}', '{"x":', "1", "2", "}", "</fn>", "</",
             ";", '"ab"', '"', "a", " ", "é", "<", "\n", "x"]


# ============================================================================================ reference
def json_body(schema, end: str):
    """A tag's content and end: JSON the schema accepts (the automaton of the schema is the JSON oracle here), then
    ``end``; returns the positions where the tag may finish."""
    auto = compile_schema(schema)

    def ends(text: str, i: int) -> set[int]:
        return {k + len(end) for k in range(i, len(text) + 1) if text.startswith(end, k) and auto.accepts(text[i:k])}
    return ends


class Ref:
    """Triggered tags by backtracking: the free text runs to the earliest end of a trigger or end string whose free
    text before it has no exclude; from a trigger on, a tag whose begin starts with it; then free text again."""

    def __init__(self, triggers=(), tags=(), ends=(), excludes=(), at_least_one=False, stop_after_first=False):
        self.triggers, self.tags, self.ends, self.excludes = list(triggers), list(tags), tuple(ends), list(excludes)
        self.at_least_one, self.stop_after_first = at_least_one, stop_after_first

    def __call__(self, text: str, i: int) -> set[int]:
        if not self.at_least_one:
            return self.free(text, i)
        return {e for begin, body in self.tags if text.startswith(begin, i)
                for k in body(text, i + len(begin)) for e in self.after(text, k)}

    def after(self, text: str, k: int) -> set[int]:
        if not self.stop_after_first:
            return self.free(text, k)
        return {k + len(e) for e in self.ends if text.startswith(e, k)} if self.ends else {k}

    def free(self, text: str, i: int) -> set[int]:
        out = set()
        patterns = self.triggers + list(self.ends)
        if not self.ends:  # the top level may stop wherever no dispatch string or exclude has appeared yet
            for k in range(i, len(text) + 1):
                if any(p in text[i:k] for p in patterns + self.excludes):
                    break
                out.add(k)
        found = []
        for p in patterns:
            j = text.find(p, i)
            if j >= 0 and not any(x in text[i:j] for x in self.excludes):
                found.append((j + len(p), j, p))
        first = min((e for e, _, _ in found), default=None)
        for e, j, p in found:
            if e != first:
                continue
            if p in self.ends:
                out.add(e)
            if p in self.triggers:
                for begin, body in self.tags:
                    if begin.startswith(p) and text.startswith(begin, j):
                        for k in body(text, j + len(begin)):
                            out |= self.after(text, k)
        return out


def legacy_ref(spec) -> Ref:
    return Ref(spec["triggers"], [(s["begin"], json_body(s["schema"], s["end"])) for s in spec["structures"]])


def feed(auto, text: str):
    s = auto.start()
    for b in text.encode():
        s = auto.step(s, b)
        if s is None:
            return None
    return s


def accepts(auto, text: str) -> bool:
    s = feed(auto, text)
    if s is None:
        return False
    assert (auto.min_close(s) == 0) == auto.complete(s)
    return auto.complete(s)


def texts(fragments):
    return hs.lists(hs.sampled_from(fragments), max_size=12).map("".join)


# ====================================================================================== against the reference
LEGACY_AUTO = compile_structural_tag(LEGACY)


@SETTINGS
@given(text=texts(FRAGMENTS))
def test_legacy_form_agrees_with_the_reference(text):
    assert accepts(LEGACY_AUTO, text) == (len(text) in legacy_ref(LEGACY)(text, 0)), text


@pytest.mark.parametrize("text,ok", [
    ("", True), ("plain text é", True), ("say <fn=a>{\"x\":12}</fn> then more", True),
    ("<fn=a>{\"x\":1}</fn><fn=b>22</fn>", True), ("<fn=c>{}</fn>", False), ("<fn=a>{\"x\":1}", False),
    ("<fn=a>{\"y\":1}</fn>", False), ("<fn", True), ("<fn=", False), ("a <f n= b", False),
    ("<fn=12;", True),  # "n=" ends where "<fn=" does: either may dispatch, and "n=1" then 2 fits
    ("n=12;x", True), ('@"ab"tail', True), ('@"abcd"', False), ("@x", False), ("<fn=a>{\"x\":1} </fn>", False),
])
def test_legacy_form_examples(text, ok):
    assert accepts(LEGACY_AUTO, text) == ok == (len(text) in legacy_ref(LEGACY)(text, 0)), text


FORMAT = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
    {"type": "tag", "begin": "<r>", "content": {"type": "any_text", "excludes": ["<fn=", "!!"]}, "end": "</r>"},
    {"type": "triggered_tags", "triggers": ["<fn="], "excludes": ["##"], "tags": [
        {"type": "tag", "begin": "<fn=a>", "content": {"type": "json_schema", "json_schema": X_INT}, "end": "</fn>"},
        {"type": "tag", "begin": "<fn=t>", "content": {"type": "any_text"}, "end": ["</fn>", "</t>"]}]}]}}
FORMAT_FRAGMENTS = ["<r>", "</r>", "</", "<", "r>", "!!", "!", "#", "##", "<fn=", "<fn=a>", "<fn=t>", "</fn>", "</t>",
                    '{"x":1}', "x", "é", " "]


def format_ref(text: str) -> bool:
    think = Ref(ends=["</r>"], excludes=["<fn=", "!!"])
    tags = Ref(["<fn="], [("<fn=a>", json_body(X_INT, "</fn>")), ("<fn=t>", Ref(ends=["</fn>", "</t>"]))],
               excludes=["##"])
    return text.startswith("<r>") and any(len(text) in tags(text, k) for k in think(text, 3))


FORMAT_AUTO = compile_structural_tag(FORMAT)


@SETTINGS
@given(text=texts(FORMAT_FRAGMENTS))
def test_format_form_agrees_with_the_reference(text):
    assert accepts(FORMAT_AUTO, text) == format_ref(text), text


def nested(at_least_one: bool, stop_after_first: bool) -> dict:
    inner = {"type": "triggered_tags", "triggers": ["<"], "at_least_one": at_least_one,
             "stop_after_first": stop_after_first,
             "tags": [{"type": "tag", "begin": "<a>", "content": {"type": "json_schema", "json_schema": {
                 "type": "integer", "minimum": 0, "maximum": 99}}, "end": "</a>"}]}
    return {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "tag", "begin": "[", "content": inner, "end": "]"}, {"type": "const_string", "value": "."}]}}


@pytest.mark.parametrize("at_least_one", [False, True])
@pytest.mark.parametrize("stop_after_first", [False, True])
@settings(max_examples=60, deadline=None)
@given(text=texts(["[", "]", ".", "<", "<a>", "</a>", "</", "7", "42", "x", "]."]))
def test_triggered_tags_inside_a_tag_agree_with_the_reference(at_least_one, stop_after_first, text):
    """The enclosing tag's end ends the free text at its first appearance; with both flags exactly one tag."""
    ref = Ref(["<"], [("<a>", json_body({"type": "integer", "minimum": 0, "maximum": 99}, "</a>"))], ends=["]"],
              at_least_one=at_least_one, stop_after_first=stop_after_first)
    want = text.startswith("[") and any(text[k:] == "." for k in ref(text, 1))
    assert accepts(compile_structural_tag(nested(at_least_one, stop_after_first)), text) == want, text


@pytest.mark.parametrize("fmt,good,bad", [
    ({"type": "or", "elements": [{"type": "const_string", "value": "yes"}, {"type": "regex", "pattern": r"\d{2}"}]},
     ["yes", "42"], ["", "ye", "4", "yes4"]),
    ({"type": "tags_with_separator", "separator": ",", "tags": [
        {"type": "tag", "begin": "<a>", "content": {"type": "grammar", "grammar": 'root ::= "x"+'}, "end": "</a>"}]},
     ["", "<a>x</a>", "<a>x</a>,<a>xx</a>"], ["<a></a>", "<a>x</a>,", ",<a>x</a>"]),
    ({"type": "sequence", "elements": [
        {"type": "repeat", "min": 2, "max": 3, "content": {"type": "const_string", "value": "ab"}},
        {"type": "optional", "content": {"type": "const_string", "value": "!"}}]},
     ["abab", "ababab!"], ["ab", "abababab", "abab!!"]),
    ({"type": "tag", "begin": "", "end": "E", "content": {"type": "or", "elements": [
        {"type": "any_text"}, {"type": "const_string", "value": "1"}]}}, ["E", "xyE", "1E"], ["", "EE", "E1"]),
    ({"type": "plus", "content": {"type": "tag", "begin": "(", "content": {"type": "star", "content": {
        "type": "const_string", "value": "."}}, "end": ")"}}, ["()", "(..)(.)"], ["", "(", "(x)"]),
])
def test_combinations(fmt, good, bad):
    auto = compile_structural_tag({"type": "structural_tag", "format": fmt})
    assert all(accepts(auto, t) for t in good), good
    assert not any(accepts(auto, t) for t in bad), bad


# ============================================================================================= min_close
@pytest.mark.parametrize("spec", [LEGACY, FORMAT, nested(False, False), nested(True, True),
                                  {"format": {"type": "tag", "begin": "<", "content": {
                                      "type": "any_text", "excludes": ["c<"]}, "end": "</c>"}},
                                  {"triggers": ["ab", "b"], "structures": [  # a trigger inside another one
                                      {"begin": "abc", "schema": {"type": "null"}, "end": "!"},
                                      {"begin": "bb", "schema": {"type": "integer"}, "end": "."}]}])
def test_min_close_is_the_shortest_completion(spec):
    """``min_close`` is exact (see check_min_close_is_exact), which the budget rule relies on."""
    check_min_close_is_exact(compile_structural_tag(spec), seed=0, max_states=80, only_closable=True)
    assert compile_structural_tag(nested(True, True)).min_close(compile_structural_tag(nested(True, True)).start()) \
        == len("[<a>0</a>].")


# ========================================================================================= token boundaries
WEATHER = {"type": "structural_tag", "triggers": ["<fn="], "structures": [
    {"begin": "<fn=get_weather>", "schema": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}}, "required": ["city"]}, "end": "</fn>"},
    {"begin": "<fn=get_time>", "schema": {"type": "object", "properties": {
        "tz": {"type": "integer", "minimum": -12, "maximum": 14}}, "required": ["tz"]}, "end": "</fn>"}]}


def ids_of(vocab, data: bytes) -> list[int]:
    return [i for i, b in vocab.token_bytes.items() if b == data]


def test_a_trigger_split_across_tokens_is_caught(tok, vocab):
    grammar = GrammarCache(tok, logits_size=832).structural_tag(WEATHER)
    state = grammar.start()
    eos = set(vocab.eos_ids)
    for ch in b"<fn":  # one byte per token: the trigger is not whole yet, so anything may follow, EOS too
        allowed = set(grammar.allowed(state, 100))
        assert eos <= allowed and len(allowed) > len(vocab.token_bytes) // 2
        state = grammar.advance(state, ids_of(vocab, bytes([ch]))[0])
    state = grammar.advance(state, ids_of(vocab, b"=")[0])  # now it is
    allowed = set(grammar.allowed(state, 100))
    rests = (b"get_weather>{", b"get_time>{")
    assert not allowed & eos
    assert {i for i, b in vocab.token_bytes.items() if any(r.startswith(b) for r in rests)} <= allowed
    assert all(any(r.startswith(vocab.token_bytes[i]) or vocab.token_bytes[i].startswith(r) for r in rests)
               for i in allowed)
    assert grammar.min_close(state) == len('get_time>{"tz":0}</fn>') + 1  # the cheaper tag, then EOS


def test_a_token_that_carries_a_trigger_and_goes_on_is_checked(tok, vocab):
    spec = {"triggers": [" wea", " wo", "ath"], "structures": [
        {"begin": " weather(", "schema": {"type": "integer"}, "end": ")"},
        {"begin": " wow(", "schema": {"type": "integer"}, "end": ")"},
        {"begin": "ather!", "schema": {"type": "null"}, "end": ""}]}
    grammar = GrammarCache(tok, logits_size=832).structural_tag(spec)
    allowed = set(grammar.allowed(grammar.start(), 100))
    (weather,), (world,), (bare,) = ids_of(vocab, b" weather"), ids_of(vocab, b" world"), ids_of(vocab, b"weather")
    assert weather in allowed  # " wea" ends inside it and "ther" goes on as " weather(" does
    assert world not in allowed  # " wo" ends inside it and "rld" is not "w("
    assert bare in allowed  # "ath" ends inside "weather", whose "er" goes on as "ather!" does
    state = grammar.advance(grammar.start(), bare)
    after = grammar.allowed(state, 100)
    assert after and all(vocab.token_bytes[i].startswith(b"!") for i in after)  # "!" must come next, not EOS
    state = grammar.advance(grammar.start(), weather)
    assert state is not None and set(grammar.allowed(state, 100)) == set(ids_of(vocab, b"("))


# ========================================================================================= random walks
def biased_sample(grammar, vocab, budget: int, seed: int, hot: list[bytes]) -> bytes:
    """One output through the logits processor, with random logits pushed toward tokens that continue one of the
    ``hot`` strings from the text's end (so triggers and tags get written); ends with EOS."""
    gen = torch.Generator().manual_seed(seed)
    proc = ConstrainedLogitsProcessor(grammar, budget)
    out, text = [], b""
    for _ in range(budget):
        bias = torch.zeros(832)
        for h in hot:
            k = next(k for k in range(len(h), -1, -1) if text.endswith(h[:k]))
            for i, b in vocab.token_bytes.items():
                if h[k:].startswith(b):
                    bias[i] += 5.0
        logits = proc(out, torch.randn(832, generator=gen) * 2 + bias)
        out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
        if out[-1] in vocab.eos_ids:
            return text
        text += vocab.token_bytes[out[-1]]
    raise AssertionError(f"no EOS within {budget} tokens: {text!r}")


@pytest.mark.parametrize("budget", [6, 14, 30, 60])
def test_random_walks_end_in_valid_outputs(tok, vocab, budget):
    grammar = GrammarCache(tok, logits_size=832).structural_tag(json.dumps(WEATHER))  # vLLM sends the JSON text
    ref = legacy_ref(WEATHER)
    calls = 0
    for seed in range(6):
        text = biased_sample(grammar, vocab, budget, seed, [b"<fn=get_weather>", b"<fn=get_time>"]).decode()
        assert len(text) in ref(text, 0), text
        at = text.find("<fn=")
        while at >= 0:  # each call: its name, a JSON body (whose strings may hold "<fn=" or "</fn>"), "</fn>"
            name_end = text.index(">", at) + 1
            body, end = json.JSONDecoder().raw_decode(text, name_end)
            assert text.startswith("</fn>", end), text
            schema = next(s["schema"] for s in WEATHER["structures"] if s["begin"] == text[at:name_end])
            jsonschema.validate(body, schema)
            calls += 1
            at = text.find("<fn=", end)
    if budget >= 30:
        assert calls, "the walks never wrote a tag"


def test_allowed_index_is_allowed_at_every_budget(vocab):
    from glm5.structured.constrained import JsonGrammar

    grammar = JsonGrammar(vocab, schema=compile_structural_tag(FORMAT))
    rng = random.Random(3)
    hot = ["<r>", "</r>", "<fn=a>", '{"x":', "1}", "</fn>"]
    state, budget = grammar.start(), 30
    while state[0] != "end" and budget > 0:
        for b in range(max(1, grammar.min_close(state)), budget + 1, 3):
            got = grammar.allowed_index(state, b, 832, "cpu").tolist()
            assert sorted(got) == sorted(i for i in grammar.allowed(state, b) if i < 832), (state, b)
        allowed = grammar.allowed(state, budget)
        pick = [i for i in allowed if any(vocab.token_bytes.get(i, b"\0") == h.encode() for h in hot)]
        state, budget = grammar.advance(state, rng.choice(pick or allowed)), budget - 1


# ============================================================================================== refusals
@pytest.mark.parametrize("spec,message", [
    ("{oops", "not valid JSON"), ([1], "JSON object"), ({"x": 1}, "structures and triggers"),
    ({"type": "json_schema", "format": {}}, "type must be 'structural_tag'"),
    ({"triggers": [], "structures": [{"begin": "<a>", "schema": {}, "end": "</a>"}]}, "non-empty list"),
    ({"triggers": [""], "structures": [{"begin": "<a>", "schema": {}, "end": "</a>"}]}, "must not be empty"),
    ({"triggers": ["<a"], "structures": []}, "non-empty list"),
    ({"triggers": ["<a"], "structures": [{"begin": "<b>", "schema": {}, "end": "</b>"}]}, "does not start with any"),
    ({"triggers": ["<a", "<ab"], "structures": [{"begin": "<a>", "schema": {}, "end": ""}]}, "is a prefix of"),
    ({"triggers": ["<a"], "structures": [{"begin": "<a>", "schema": {"type": "array", "uniqueItems": True},
                                          "end": ""}]}, "uniqueItems"),
    ({"triggers": ["<a"], "structures": [{"begin": "<a>", "end": ""}]}, "missing 'schema'"),
    ({"triggers": ["<a"], "structures": [{"begin": "<a>", "schema": {}, "end": ""}], "format": {}}, "not both"),
    ({"format": {"type": "token", "token": "<x>"}}, "not supported"),
    ({"format": {"type": "qwen"}}, "unknown format type"),
    ({"format": {"type": "json_schema", "json_schema": {}, "style": "qwen_xml"}}, "style"),
    ({"format": {"type": "sequence", "elements": [{"type": "any_text"}, {"type": "const_string", "value": "."}]}},
     "must end the output"),
    ({"format": {"type": "tag", "begin": {"type": "token", "token": "<x>"}, "content": {"type": "any_text"},
                 "end": "e"}}, "token begin/end"),
    ({"format": {"type": "tag", "begin": "a", "content": {"type": "any_text"}, "end": ""}}, "must end the output"),
    ({"format": {"type": "any_text", "max_tokens": 5}}, "max_tokens is not supported"),
    ({"format": {"type": "regex", "pattern": "(a"}}, "missing"),
    ({"format": {"type": "repeat", "min": 3, "max": 2, "content": {"type": "const_string", "value": "a"}}}, "min"),
    ({"triggers": ["a" * 257], "structures": [{"begin": "a" * 257, "schema": {}, "end": ""}]}, "256 bytes each"),
    ({"format": {"type": "tag", "begin": "<", "end": "</>", "content": {  # the trigger "/" always beats the end
        "type": "triggered_tags", "triggers": ["/"], "tags": [
            {"type": "tag", "begin": "/x", "content": {"type": "const_string", "value": ""}, "end": ""}]}}},
     "no output can finish"),
])
def test_refusals_are_clear(spec, message):
    with pytest.raises(StructuralTagError, match=message):
        compile_structural_tag(spec)


def test_deep_nesting_is_refused_not_a_recursion_error():
    fmt: dict = {"type": "const_string", "value": "x"}
    for _ in range(200):
        fmt = {"type": "optional", "content": fmt}
    with pytest.raises(StructuralTagError, match="nested deeper"):
        compile_structural_tag({"format": fmt})
