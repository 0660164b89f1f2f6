"""GBNF grammars (glm5.structured.gbnf): acceptance against oracles (``re``, ``json``, a small expression checker,
Python's UTF-8 decoder), exact ``min_close``, the token-trie walk under tight and loose budgets, and the errors."""

from __future__ import annotations

import functools
import json
import random
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from glm5.structured.constrained import JsonGrammar
from glm5.structured.gbnf import MAX_STACKS, GbnfAutomaton

from .test_constrained import sampled_text, tok, vocab  # noqa: F401  (tok, vocab: the module-scoped fixtures)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed(auto: GbnfAutomaton, data: bytes):
    """The state after ``data``, or None once it is dead."""
    s = auto.start()
    for b in data:
        s = auto.step(s, b)
        if s is None:
            return None
    return s


def accepts(auto: GbnfAutomaton, text: str | bytes) -> bool:
    s = feed(auto, text.encode("utf-8") if isinstance(text, str) else text)
    if s is None:
        return False
    assert (auto.min_close(s) == 0) == auto.complete(s)
    return auto.complete(s)


@functools.lru_cache(maxsize=None)
def compiled(grammar: str, start: str = "root") -> GbnfAutomaton:
    return GbnfAutomaton(grammar, start)


def mutated(strategy, alphabet: str):
    """Strings near ``strategy``'s: one to three characters inserted, deleted or replaced."""
    @st.composite
    def build(draw):
        text = list(draw(strategy))
        for _ in range(draw(st.integers(1, 3))):
            op, at = draw(st.sampled_from("idr")), draw(st.integers(0, len(text)))
            ch = draw(st.sampled_from(alphabet))
            if op == "i":
                text.insert(at, ch)
            elif text and at < len(text):
                if op == "d":
                    del text[at]
                else:
                    text[at] = ch
        return "".join(text)
    return build()


# ================================================================================ regular grammars vs re
REGULAR = [
    ('root ::= [a-zA-Z_] [a-zA-Z0-9_]*', r"[a-zA-Z_][a-zA-Z0-9_]*", "aZ_09-é "),
    ('root ::= ("ab" | "a")* "c"?', r"(?:ab|a)*c?", "abcx"),
    # comments, continuation lines (a leading '|' and more elements), spaces inside bounds, names with - and _
    ('# comma-separated words\nroot ::= first-word ("," " "? word_2){ 0 , 3 }   # up to four\n'
     '    | "none"\n\nfirst-word ::= [a-zé]+\nword_2 ::=\n  [a-zé]\n  [a-zé]*\n',
     r"[a-zé]+(?:, ?[a-zé]+){0,3}|none", "abnoeé, "),
    (r'root ::= [α-ω]{2,4} ([^a-z\n] | "é")* "🙂"? .', r"(?s)[α-ω]{2,4}(?:[^a-z\n]|é)*🙂?.", "αβωςaz\né🙂€x1 "),
    (r'root ::= "\x41\u00e9\t" [\[\]\\\-]+ "\"" [^\x00-\x7f]? [a-]', r'Aé\t[\[\]\\-]+"[^\x00-\x7f]?[a-]',
     "Aé\t[]\\-\"a€x"),
    ('root ::= (("x" | "yz"){2,3} "-"){1,2} [0-9]{3}', r"(?:(?:x|yz){2,3}-){1,2}[0-9]{3}", "xyz-0123"),
    ('root ::= ("a"? "b"?)* "c"', r"(?:a?b?)*c", "abc"),  # a nullable body under * (llama.cpp refuses it)
    ('root ::= "x" (| "y") () "" "z"{0} [^\\U00010000-\\U0010FFFF]{0,2}',
     r"xy?[^\U00010000-\U0010FFFF]{0,2}", "xyz€🙂"),
    ('root ::= "" | [\\u0100-\\U0010FFFF]+ "\\U0001F642"', r"|[\u0100-\U0010FFFF]+\U0001F642", "aĀ€🙂\U0010FFFF"),
    # llama.cpp's conventions: a list of lines, and whitespace as right recursion
    ('root ::= item+\nitem ::= "- " [^\\r\\n\\u2028]+ "\\n"', r"(?:- [^\r\n\u2028]+\n)+", "- ab\r\n\u2028é"),
    ('root ::= "[" ws ("x" ws)* "]"\nws ::= ([ \\t] ws)?', r"\[[ \t]*(?:x[ \t]*)*\]", "[x] \t"),
]


@pytest.mark.parametrize("grammar,pattern,alphabet", REGULAR, ids=[p for _, p, _ in REGULAR])
@SETTINGS
@given(data=st.data())
def test_regular_grammars_agree_with_re(grammar, pattern, alphabet, data):
    auto = compiled(grammar)
    positive = st.from_regex(pattern, fullmatch=True, alphabet=alphabet)  # a whole-Unicode class is slow
    text = data.draw(st.one_of(positive, mutated(positive, alphabet), st.text(alphabet, max_size=12)))
    assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in text))
    assert accepts(auto, text) == bool(re.fullmatch(pattern, text)), text


ANY_TEXT = "root ::= .*"


@SETTINGS
@given(data=st.one_of(st.binary(max_size=12), st.text(max_size=6).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_invalid_utf8_is_dead_valid_utf8_is_accepted(data):
    try:
        data.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert accepts(compiled(ANY_TEXT), data) == valid, data


@pytest.mark.parametrize("data,bad", [(b"\xc0\x80", 0), (b"\xc1\xbf", 0), (b"\xe0\x80\x80", 1), (b"\xe0\x9f\xbf", 1),
                                      (b"\xed\xa0\x80", 1), (b"\xf0\x8f\xbf\xbf", 1), (b"\xf4\x90\x80\x80", 1),
                                      (b"\xf5\x80\x80\x80", 0), (b"\x80", 0), (b"\xff", 0), (b"a\xe2\x82\x41", 3)])
def test_invalid_utf8_dies_at_the_first_bad_byte(data, bad):
    """Overlongs, surrogates, code points past U+10FFFF and stray bytes die as soon as they are certain."""
    auto = compiled(ANY_TEXT)
    assert feed(auto, data[:bad]) is not None
    assert feed(auto, data[: bad + 1]) is None


# ======================================================================================== JSON vs json.loads
JSON_GBNF = r'''
# JSON (RFC 8259) with whitespace around and between tokens
root    ::= ws value ws
value   ::= object | array | string | number | "true" | "false" | "null"
object  ::= "{" ws ( member ( "," ws member )* )? "}"
member  ::= string ws ":" ws value ws
array   ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string  ::= "\"" char* "\""
char    ::= [^"\\\x00-\x1f]
          | "\\" ( ["\\/bfnrt] | "u" hex{4} )
hex     ::= [0-9a-fA-F]
number  ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws      ::= [ \t\n\r]*
'''


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def json_ok(text: str) -> bool:
    try:
        json.loads(text, parse_constant=_no_constants)
    except ValueError:
        return False
    return True


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10)


@st.composite
def json_texts(draw):
    value = draw(json_values)
    return json.dumps(value, indent=draw(st.sampled_from([None, 0, 2, "\t"])), ensure_ascii=draw(st.booleans()))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(json_texts(), mutated(json_texts(), '{}[],:" \\0123456789.eE-+truefalsn\x01\x7fé/u'),
                      st.text('{}[]":,0123 .-e\\tu', max_size=10)))
def test_json_grammar_agrees_with_json_loads(text):
    assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in text))
    assert accepts(compiled(JSON_GBNF), text) == json_ok(text), text


def test_json_states_merge_and_hash():
    auto = compiled(JSON_GBNF)
    a, b = feed(auto, b'{"key": "ab'), feed(auto, b'{"key": "\\n\xc3\xa9')
    assert a == b and hash(a) == hash(b)  # string contents do not matter to the parser
    assert {a: 1}[b] == 1 and auto.string_room(a) is False
    deep = feed(auto, b"[" * 200)
    assert auto.min_close(deep) == 200 and accepts(auto, "[" * 200 + "]" * 200)


# ===================================================================================== expressions vs a checker
EXPR_GBNF = '''
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")" | "-" factor
'''


def expr_ok(text: str) -> bool:
    pos = 0

    def peek():
        return text[pos] if pos < len(text) else ""

    def expr():
        nonlocal pos
        term()
        while peek() in ("+", "-") and peek():
            pos += 1
            term()

    def term():
        nonlocal pos
        factor()
        while peek() in ("*", "/") and peek():
            pos += 1
            factor()

    def factor():
        nonlocal pos
        if peek().isdigit():
            while peek().isdigit():
                pos += 1
        elif peek() == "(":
            pos += 1
            expr()
            if peek() != ")":
                raise SyntaxError
            pos += 1
        elif peek() == "-":
            pos += 1
            factor()
        else:
            raise SyntaxError

    try:
        expr()
    except SyntaxError:
        return False
    return pos == len(text)


expressions = st.recursive(
    st.integers(0, 999).map(str),
    lambda e: st.one_of(e.map(lambda x: f"({x})"), e.map(lambda x: "-" + x),
                        st.tuples(e, st.sampled_from("+-*/"), e).map("".join)),
    max_leaves=8)


@SETTINGS
@given(text=st.one_of(expressions, mutated(expressions, "0123()+-*/"), st.text("0123()+-*/", max_size=10)))
def test_expression_grammar_agrees_with_a_checker(text):
    assert accepts(compiled(EXPR_GBNF), text) == expr_ok(text), text


def test_deep_nesting():
    auto = compiled(EXPR_GBNF)
    assert accepts(auto, "(" * 300 + "1" + ")" * 300)
    assert not accepts(auto, "(" * 300 + "1" + ")" * 299)
    assert auto.min_close(feed(auto, b"(" * 300)) == 301


# ============================================================================================= min_close
UNICODE_GBNF = r'''
root ::= "é" "xyz" | "ê" | word+ ("🙂" | "€€")
word ::= [α-ω] | [\U0001F600-\U0001F64F] "!"
'''


def live_bytes(auto, s):
    return [(b, s2) for b in range(256) if (s2 := auto.step(s, b)) is not None]


def test_min_close_inside_a_character():
    auto = compiled(UNICODE_GBNF)
    start = auto.start()
    assert auto.min_close(start) == 2  # "ê"
    assert auto.min_close(auto.step(start, 0xC3)) == 1  # é or ê: the ê branch finishes with one more byte
    assert auto.min_close(feed(auto, "é".encode())) == 3
    assert auto.min_close(auto.step(start, 0xCE)) == 1 + 4  # a Greek letter, then "🙂"
    assert auto.min_close(auto.step(start, 0xF0)) == 3 + 1 + 4  # an emoji word needs "!" and then "🙂"
    assert auto.step(auto.step(start, 0xF0), 0x90) is None  # U+10xxx: no class holds it


@pytest.mark.parametrize("grammar", [JSON_GBNF, EXPR_GBNF, UNICODE_GBNF, REGULAR[3][0], REGULAR[6][0]])
def test_min_close_is_exact(grammar):
    auto = compiled(grammar)
    rng = random.Random(len(grammar))
    for walk in range(12):
        s = auto.start()
        for _ in range(rng.randrange(0, 25)):
            # Bellman: 0 when complete, else one more than the best next byte (so min_close is the true distance)
            options = live_bytes(auto, s)
            best = min((auto.min_close(s2) for _, s2 in options), default=None)
            assert auto.min_close(s) == (0 if auto.complete(s) else 1 + best)
            printable = [o for o in options if 0x20 <= o[0] < 0x7F or o[0] >= 0x80] or options
            if not printable:
                break
            s = rng.choice(printable)[1]
        # following bytes that lower min_close reaches a complete state in exactly min_close bytes
        need, here = auto.min_close(s), s
        for k in range(need):
            here = next(s2 for _, s2 in live_bytes(auto, here) if auto.min_close(s2) == need - k - 1)
        assert auto.complete(here)
        if need <= 4:  # and no shorter way exists (breadth-first over all bytes)
            frontier = {s}
            for _ in range(need):
                assert not any(auto.complete(x) for x in frontier)
                frontier = {s2 for x in frontier for _, s2 in live_bytes(auto, x)}
            assert any(auto.complete(x) for x in frontier)


# ================================================================================= through the token trie
@pytest.mark.parametrize("grammar,oracle", [(JSON_GBNF, json_ok), (EXPR_GBNF, expr_ok),
                                            (REGULAR[3][0], lambda t: bool(re.fullmatch(REGULAR[3][1], t)))],
                         ids=["json", "expr", "unicode"])
@pytest.mark.parametrize("thinking", [False, True])
def test_random_walks_through_the_token_trie_end_in_a_sentence(tok, vocab, grammar, oracle, thinking):  # noqa: F811
    auto = GbnfAutomaton(grammar)
    grammar_ = JsonGrammar(vocab, thinking=thinking, schema=auto)
    need = grammar_.min_close(grammar_.start())
    lengths = []
    for seed in range(16):
        budget = need + (seed % 3) if seed % 2 else 40  # tight budgets must still close the sentence
        text = sampled_text(grammar_, tok, budget, seed, scale=3, thinking=thinking)
        assert accepts(auto, text) and oracle(text), text
        lengths.append(len(text))
    assert len(set(lengths)) >= 3, lengths  # the walks differ


# ================================================================================================ errors
@pytest.mark.parametrize("grammar,message", [
    ('root ::= "a', r"line 1:10 in rule 'root': unterminated string literal"),
    ('root ::= ("a" | "b"\nnext ::= "c"', r"line 2:1 in rule 'root': expected '\)' to close the '\(' at line 1:10"),
    ('root ::= [a-', r"line 1:10 .*unterminated character class"),
    ('root = "a"', r"line 1:6: expected '::=' after the rule name 'root'"),
    ('root ::= "a" )', r"line 1:14 in rule 'root': unmatched '\)'"),
    ('root ::= "\\q"', r"unknown escape '\\q'"),
    ('root ::= "\\x4"', r"expected 2 hex digits after '\\x'"),
    ('root ::= "\\uD800"', r"not a Unicode scalar value"),
    ('root ::= [z-a]', r"character range 'z'-'a' is reversed"),
    ('root ::= "a" ::= "b"', r"line 1:14 .*unexpected ':'"),
    ('root ::= <[12]>', r"token references"),
    ('root ::= TagDispatch(("a", b))', r"xgrammar's TagDispatch\(...\) is not supported"),
    ('root ::= (= "a") "b"', r"lookahead"),
    ('root ::= "a"{,3}', r"expected an integer"),
    ('root ::= "a"{3,2}', r"line 1:13 .*minimum above its maximum"),
    ('root ::= "a"{0,1000000}', r"expands to more than 100000 elements"),
    ('root ::= x y\nx ::= "ab"{60000}\ny ::= "ab"{60000}', r"in rule 'y': the grammar expands to more than 100000"),
    ('root ::= "a"\n\n  item ::= "b" |\n  "c" "d" ]', r"line 4:11 in rule 'item': unexpected '\]'"),
    ('root ::= "a"\nroot ::= "b"', r"rule 'root' is defined twice"),
    ('root ::= foo "x"', r"undefined rule 'foo' \(used at line 1:10 in rule 'root'\)"),
    ('main ::= "a"', r"no rule 'root' \(the start rule\)"),
    ('', r"the grammar is empty"),
    ('root ::= root "a" | "b"', r"rule 'root' is left-recursive"),
    ('root ::= a\na ::= b "x" | "y"\nb ::= "w" | root "z"', r"rule '(root|a|b)' is left-recursive"),
    ('root ::= ws root "x" | "y"\nws ::= " "*', r"rule 'root' is left-recursive"),
    ('root ::= ("a" | list)\nlist ::= list? "," "a"', r"rule 'list' is left-recursive"),
    ('root ::= "a" loop | "b"\nloop ::= "b" loop', r"rule 'loop' can never finish"),
    ('root ::= "a" root', r"language is empty: 'root' can never finish"),
    ('root ::= [^\\x00-\\U0010FFFF]', r"language is empty"),
])
def test_errors(grammar, message):
    with pytest.raises(ValueError, match=message):
        GbnfAutomaton(grammar)


def test_deep_nesting_is_a_value_error_not_a_recursion_error():
    assert accepts(GbnfAutomaton("root ::= " + "(" * 100 + '"a"' + ")" * 100), "a")
    with pytest.raises(ValueError, match=r"line 1:110 .*nested deeper than 100 levels"):
        GbnfAutomaton("root ::= " + "(" * 101 + '"a"' + ")" * 101)
    with pytest.raises(ValueError, match="nested deeper than 100 levels"):  # RecursionError (a server 500) before
        GbnfAutomaton("root ::= " + "(" * 3000 + '"a"' + ")*" * 3000)


def test_start_rule_and_unreachable_rules():
    auto = GbnfAutomaton('main ::= "a" | other\nother ::= "b"+\nunused ::= "z" unused', start="main")
    assert accepts(auto, "a") and accepts(auto, "bbb") and not accepts(auto, "z")
    with pytest.raises(ValueError, match="no rule 'root'"):
        GbnfAutomaton('main ::= "a"')


def test_an_empty_alternative_in_a_finishable_rule_and_dead_alternatives():
    auto = GbnfAutomaton('root ::= "a" [] | "b" []* | "c"\n')  # [] matches nothing: "a" [] can never finish
    assert auto.step(auto.start(), ord("a")) is None  # dropped, so no live state is a dead end
    assert accepts(auto, "b") and accepts(auto, "c")


def test_state_explosion_keeps_the_cheapest_parses():
    """2^n pending suffixes after n "a"s: past MAX_STACKS a state keeps the stacks closest to finishing, so the text
    is still a prefix of a sentence, min_close stays exact and the shortest completion is a sentence."""
    auto = GbnfAutomaton('root ::= x\nx ::= "a" x "b" | "a" x "c" | ""')
    assert accepts(auto, "aab" + "c")
    s = feed(auto, b"a" * 20)
    assert s is not None and len(s[0]) <= MAX_STACKS and auto.min_close(s) == 20
    text = b"a" * 20
    while not auto.complete(s):  # follow the bytes that lower min_close: 20 closers
        b = next(b for b in b"bc" if auto.step(s, b) is not None and auto.min_close(auto.step(s, b)) < auto.min_close(s))
        s, text = auto.step(s, b), text + bytes([b])
    assert len(text) == 40 and accepts(auto, text.decode())
