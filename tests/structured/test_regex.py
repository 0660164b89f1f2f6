"""The ``regex`` structured output: :class:`RegexAutomaton` against Python's ``re.fullmatch`` (ASCII classes) as
the oracle, on fixed and on randomly generated patterns; exactness of ``min_close``; the UTF-8 range compiler; the
refusals; and random walks through the token trie that must always end in a match."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from glm5.structured import GrammarCache
from glm5.structured.regex import RegexAutomaton, _utf8_sequences

from .automaton_checks import check_min_close_is_exact
from .test_constrained import sampled_text, tok  # noqa: F401  (tok: the module-scoped tokenizer fixture)


def accepts(auto: RegexAutomaton, data: str | bytes) -> bool:
    s = auto.start()
    for b in data.encode() if isinstance(data, str) else data:
        s = auto.step(s, b)
        if s is None:
            return False
    return auto.complete(s)


PATTERNS = [
    r"\d{3}-\d{4}", r"(ab|a)*b?", r'[^"\\]*', r"(?P<user>[a-c]+)@[a-z]{1,3}\.(com|org)", r"é+ü?.", r"[\w.-]+",
    r"a{2,4}|b{,2}", r"^(yes|no)$", r"[^a-zé]{2}", r".*", r"(a|b)*a(a|b){6}", r"\s+\S*", r"[\]a-]+", r"x{}y",
    r"\x41\u00e9\U0001F642", r"(?:\+|-)?\d+(\.\d+)?([eE][+-]?\d+)?", r"[A-Z][a-z]*( [A-Z][a-z]*)*", r"()|a",
    r"[^\x00-\x7f]+", r"\W\D\S", r"a*?b+?c??", r"(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", r"🙂{2,3}|€",
]
ALPHABET = "ab\"\\-@.comrgéü€🙂 \n\t019xy{}]AZe+E"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_agrees_with_re_fullmatch(pattern):
    auto, oracle = RegexAutomaton(pattern), re.compile(pattern, re.ASCII)
    rng = random.Random(pattern)
    for _ in range(1500):  # random strings: mostly rejections
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 9)))
        assert accepts(auto, text) == (oracle.fullmatch(text) is not None), text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hs.data())
def test_generated_matches_are_accepted(data):
    pattern = data.draw(hs.sampled_from(PATTERNS))
    # drawn with Unicode classes (hypothesis mishandles some ASCII-flag classes), judged with ASCII ones
    text = data.draw(hs.from_regex(pattern, fullmatch=True))
    assert accepts(RegexAutomaton(pattern), text) == bool(re.fullmatch(pattern, text, re.ASCII)), (pattern, text)


# Random patterns: a tiny regex grammar rendered to text, checked against re on strings over its alphabet.
_atoms = hs.sampled_from(["a", "b", "é", ".", r"\d", r"\w", r"\s", r"\W", "[ab]", "[^a]", "[a-c1]", r"\.", "🙂", "0"])


def _extend(children):
    quant = hs.sampled_from(["*", "+", "?", "{2}", "{0,2}", "{1,}", "{,2}", "*?", "+?"])
    return hs.one_of(
        hs.lists(children, min_size=2, max_size=3).map("".join),
        hs.lists(children, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
        hs.tuples(children, quant).map(lambda t: f"(?:{t[0]}){t[1]}"),
    )


@settings(max_examples=150, deadline=None)
@given(pattern=hs.recursive(_atoms, _extend, max_leaves=8), seed=hs.integers(0, 2**16))
def test_random_patterns_agree_with_re(pattern, seed):
    auto, oracle = RegexAutomaton(pattern), re.compile(pattern, re.ASCII)
    rng = random.Random(seed)
    alphabet = "abé.0123 _\n🙂c!"
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7)))
        assert accepts(auto, text) == (oracle.fullmatch(text) is not None), (pattern, text)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_min_close_is_the_shortest_completion(pattern):
    """``min_close`` is exact (see check_min_close_is_exact)."""
    check_min_close_is_exact(RegexAutomaton(pattern), seed=1, max_states=60)


@settings(max_examples=200, deadline=None)
@given(lo=hs.integers(0, 0x10FFFF), span=hs.integers(0, 70000), probes=hs.lists(hs.integers(0, 0x10FFFF), max_size=30))
def test_utf8_sequences_encode_exactly_the_range(lo, span, probes):
    hi = min(lo + span, 0x10FFFF)
    seqs = _utf8_sequences(lo, hi)

    def covered(cp):
        data = chr(cp).encode("utf-8", "surrogatepass")
        return any(len(seq) == len(data) and all(a <= x <= b for x, (a, b) in zip(data, seq)) for seq in seqs)

    for cp in [lo, hi, lo - 1, hi + 1, (lo + hi) // 2, *probes]:
        if 0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF:
            assert covered(cp) == (lo <= cp <= hi), hex(cp)


def test_invalid_utf8_is_never_accepted():
    auto = RegexAutomaton(".*")
    for bad in (b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82", b"\xff"):
        assert not accepts(auto, bad), bad
    assert accepts(auto, "€🙂é".encode())


@pytest.mark.parametrize("pattern,message", [
    (r"(a)\1", "backreferences"), (r"a(?=b)", "lookaround"), (r"(?<!a)b", "lookaround"), (r"\bword\b", "not supported"),
    (r"(?i)abc", "inline flags"), (r"a*+", "possessive"), (r"a**", "multiple repeat"), (r"*a", "nothing to repeat"),
    (r"(ab", "missing"), (r"ab)", "unbalanced"), (r"[ab", "unterminated"), (r"[z-a]", "bad character range"),
    (r"a{3,2}", "min > max"), (r"a{5000}", "bounds"), (r"(a{1000}){1000}", "too large"), (r"a^b", "start"),
    (r"a$b", "end"), (r"\q", "bad escape"), (r"\N{DIGIT ONE}", "named characters"), (r"[^\x00-\U0010ffff]", "nothing"),
    (r"\x4", "bad escape"), (r"[[:alpha:]]", "POSIX"), (r"[\d-z]", "bad character range"),
])
def test_refusals_are_clear(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RegexAutomaton(pattern)


def test_deep_nesting_is_a_value_error_not_a_recursion_error():
    RegexAutomaton("(" * 100 + "a" + ")" * 100)
    for pattern in ("(" * 101 + "a" + ")" * 101, "(?:" * 2000 + "a" + ")*" * 2000):  # RecursionError (a 500) before
        with pytest.raises(ValueError, match="nested deeper than 100 levels"):
            RegexAutomaton(pattern)


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("pattern", [r"(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", r"[a-z]+( [a-z]+)*\.",
                                     r"(yes|no|天气)!?", r"[^\n]{1,12}"])
def test_random_walks_through_the_vocabulary_end_in_a_match(tok, pattern, thinking):
    cache = GrammarCache(tok, logits_size=832)
    grammar = cache.regex(pattern, thinking=thinking)
    assert cache.regex(pattern, thinking=thinking) is grammar  # compiled once
    oracle = re.compile(pattern, re.ASCII)
    for seed in range(12):
        budget = 40 if seed % 2 else grammar.min_close(grammar.start()) + 1  # a tight budget must still match
        text = sampled_text(grammar, tok, budget, seed, scale=3, thinking=thinking)
        assert oracle.fullmatch(text), (pattern, text)


def test_error_messages_quote_a_long_pattern_shortly():
    with pytest.raises(ValueError) as e:
        RegexAutomaton("(" + "a" * 10_000)
    assert "missing ')'" in str(e.value) and len(str(e.value)) < 200
    assert RegexAutomaton(r"[\d-]").min_close(RegexAutomaton(r"[\d-]").start()) == 1  # '-' last is a literal
