"""The tool-call grammar's value states with the plain-text fast paths (free text, raw ``pattern`` strings that have
matched, strings inside JSON values) against the implementation they replaced (``tool_reference.py``: free text
decoded token by token, every other value state a walk of the whole trie): along random walks, at tight and loose
budgets, the same allowed ids (the same list, order included, wherever the fast paths keep the old order), the same
index tensors, the same shortest completions and the same verdict on tokens; the new free-text state is the closing-tag
watch's tail of the old decoded text. The vocabulary is a mixed-text BPE plus unusual tokens (partial UTF-8, control
bytes, quotes) and pieces of the closing tags."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from glm5.structured.constrained import TokenVocab
from glm5.structured.raw_text import CLOSERS, closer_tail, free_text_ids
from glm5.structured.tool_grammar import ToolCallGrammar
from glm5.structured.vocab import KeyRoom
from glm5.tokenizer import special_tokens as st
from glm5.tokenizer.detokenize import byte_level_char_to_byte

from mixed_text import make_corpus
from .test_constrained import BOOKING_TOOLS, TOOLS
from .test_trie_walk import MEASURE, UNUSUAL, WithExtraTokens
from .tool_reference import ReferenceToolCallGrammar

TAGGY = [
    b"<", b"</", b"/", b">", b">>", b"<<", b"</arg", b"_value>", b"value>", b"</arg_", b"</tool", b"_call>", b"call>",
    b"l>", b"e>", b"</arg_value", b"</tool_call", b"arg_value>", b"tool_call>", b"x</arg_value>", b"\xe4<", b"<\xe4",
    b"\xe4>", b"</\xbd", b"</tool_call>y", b"</arg_key>", b"</arg_v", b"alue>", b"</t", b"ool_call>", b"please",
    b"pl", b"ease", b"ab", b'["ab', b'"ab"]', b'{"k":"', b'"}', "<你>".encode(), b"</arg_value>\xff",
]
# every kind of value: free text (string, union, untyped), strings inside a typed JSON value (with a length bound,
# with a pattern), untyped JSON values (a schema the compiler refuses), raw pattern / format strings
TEXT_TOOLS = [{"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {
    "text": {"type": "string"}, "maybe": {"type": ["string", "null"]}, "any": {},
    "words": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "ab": {"type": "array", "items": {"type": "string", "pattern": "ab"}},
    "meta": {"type": "object", "minProperties": 1}, "list": {"type": "array", "uniqueItems": True},
    "must": {"type": "string", "pattern": "please"}, "day": {"type": "string", "format": "date"}},
    "required": ["text"]}}}]
HOT = (b"</arg_value>", b"</tool_call>", b"</arg_val", b"please", b'["ab"', b'{"k":"v"}', b'["x","y"]', b"2024-02-29")


@pytest.fixture(scope="module")
def vocab():
    from glm5.tokenizer import train_bpe

    tok = train_bpe(make_corpus(n_docs=300, p_newline=0.1), vocab_size=2000)
    return TokenVocab(WithExtraTokens(tok, UNUSUAL + TAGGY))


def closer_prefix(text: str) -> bytes:
    """The longest end of ``text`` that begins a closing tag (what the new free-text state holds)."""
    data = text.encode("utf-8", "replace")
    return next(data[k:] for k in range(len(data) + 1) if any(c.startswith(data[k:]) for c in CLOSERS))


def kind(grammar: ToolCallGrammar, state) -> str:
    if state[0] != "val":
        return state[0]
    mode = state[4]
    if mode[0] == "text":
        return "free text"
    if grammar._fast_moves(state[1], state[3], mode) is None:
        return f"{mode[0]} walk"
    vs = grammar._value_schema(state[1], state[3])
    if mode[0] == "schema" and hasattr(vs, "string_room") and isinstance(vs.string_room(mode[1]), KeyRoom):
        return "schema extra key"
    return "matched pattern" if mode[0] == "schema" and isinstance(mode[1], tuple) else f"{mode[0]} string"


def assert_agree(new, ref, s, r, budget: int, size: int) -> str:
    """At one state: the same shortest completion and the same allowed ids / index tensors at several budgets."""
    assert new.min_close(s) == ref.min_close(r)
    k = kind(new, s)
    same_order = k in ("free text", "name", "key", "wait", "between", "after", "start", "free", "think", "end") or \
        k.endswith("walk")
    need = new.min_close(s)
    for b in {budget, 1, 2, max(1, need), need + 1, need + 2, need + 5, new.slack(s), new.slack(s) + 3, 1 << 20}:
        got, want = new.allowed(s, b), ref.allowed(r, b)
        assert sorted(got) == sorted(want), (s, b)
        if same_order:
            assert got == want, (s, b)
        idx, ref_idx = new.allowed_index(s, b, size, "cpu"), ref.allowed_index(r, b, size, "cpu")
        assert sorted(idx.tolist()) == sorted(ref_idx.tolist()), (s, b)
        if same_order:
            assert idx.tolist() == ref_idx.tolist()
    return k


def same_state(s, r) -> bool:
    if s is None or r is None:
        return s is r
    if s[0] == "val" and s[4][0] == "text":
        return s[:4] == r[:4] and r[4][0] == "text" and s[4][1] == closer_prefix(r[4][1])
    return s == r


def hot_moves(vocab, allowed: list[int], text: bytes) -> list[int]:
    """The allowed tokens that go on with a ``HOT`` string furthest along at the end of ``text`` (one begun, else any
    start of one), so that walks finish the tags, matches and values they begin."""
    best, out = -1, []
    for h in HOT:
        k = max(k for k in range(len(h)) if text.endswith(h[:k]))
        here = [t for t in allowed if t in vocab.token_bytes and h[k:].startswith(vocab.token_bytes[t])]
        if here and k >= best:
            best, out = k, (out if k == best else []) + here
    return out


def drive(vocab, tools, seed: int, walks: int, length: int, size: int | None = None, reference=ReferenceToolCallGrammar,
          same=same_state, **kw) -> collections.Counter:
    """Random walks through the new grammar and the ``reference`` side by side (the same tokens), checking every
    state (``same``: the new state stands for the reference's); returns how many states of each kind were checked."""
    size = size or vocab.size
    new, ref = ToolCallGrammar(vocab, tools, **kw), reference(vocab, tools, **kw)
    rng = random.Random(seed)
    ids = sorted(vocab.token_bytes) + sorted(vocab.added.values())
    taggy = [i for i, d in vocab.token_bytes.items() if b"<" in d or b">" in d]
    seen: collections.Counter = collections.Counter()
    for _ in range(walks):
        s, r, budget, text = new.start(), ref.start(), length, b""
        while budget > 0:
            seen[assert_agree(new, ref, s, r, budget, size)] += 1
            for t in rng.sample(ids, 8) + rng.sample(taggy, min(8, len(taggy))):  # the verdict on any token
                assert same(new.advance(s, t), ref.advance(r, t)), (s, t)
            allowed = ref.allowed(r, budget)
            going_on = hot_moves(vocab, allowed, text)
            added = [t for t in allowed if t not in vocab.token_bytes]
            x = rng.random()
            tok = rng.choice(going_on if going_on and x < 0.5 else added if added and x < 0.7 else allowed)
            s, r = new.advance(s, tok), ref.advance(r, tok)
            assert same(s, r), (s, r, tok)
            if s is None or tok in vocab.eos_ids:
                break
            budget, text = budget - 1, text + vocab.token_bytes.get(tok, b"")
    return seen


@pytest.mark.slow  # ~22 s; the tool grammar's states are also compared state by state in the default suite
def test_value_states_allow_what_the_old_implementation_allowed(vocab):
    """Every value kind, at budgets that bind (short walks) and that do not."""
    seen = drive(vocab, TEXT_TOOLS, seed=0, walks=10, length=25) + drive(vocab, TEXT_TOOLS, seed=1, walks=12, length=70)
    seen += drive(vocab, BOOKING_TOOLS, seed=5, walks=4, length=80, parallel=False)  # a required "please" pattern
    for k in ("free text", "schema string", "json string", "matched pattern", "schema walk", "json walk"):
        assert seen[k] >= 5, seen


@pytest.mark.parametrize("name,tools,kw", [
    ("weather", TOOLS, {"thinking": True}), ("weather_optional", TOOLS, {"optional": True}),
    ("booking", BOOKING_TOOLS, {"parallel": False}), ("measure", MEASURE, {}),
    ("all", TOOLS + BOOKING_TOOLS + MEASURE + TEXT_TOOLS, {}),
])
def test_every_tool_grammar_state_agrees(vocab, name, tools, kw):
    seen = drive(vocab, tools, seed=len(name), walks=8, length=50, **kw)
    assert sum(n for k, n in seen.items() if k.endswith(("walk", "text", "string", "pattern"))) >= 20, seen


def test_logits_padding_and_a_smaller_logits_row(vocab):
    """Index tensors drop ids at or past the logits row's size, as the list-made ones did."""
    drive(vocab, TEXT_TOOLS, seed=3, walks=4, length=30, size=vocab.size + 7)
    drive(vocab, TEXT_TOOLS, seed=4, walks=4, length=30, size=max(vocab.token_bytes) - 50)


def test_free_text_states_are_few_and_shared_by_the_vocabulary(vocab):
    """Free text's state is the closing-tag watch's tail (about 20 values), so states repeat and their allowed ids
    are cached; the ids themselves are kept per vocabulary, for the next request's grammar."""
    grammar = ToolCallGrammar(vocab, TEXT_TOOLS)
    state = ("val", "note", frozenset(), "text", ("text", b""))
    plain = next(i for i, d in vocab.token_bytes.items() if d == b"hello")
    assert grammar.advance(state, plain) == state
    ids = free_text_ids(vocab, b"")
    assert free_text_ids(vocab, b"") is ids
    assert ToolCallGrammar(vocab, TEXT_TOOLS).allowed(state, 100) == [grammar.T[st.ARG_VALUE_END], *ids.tolist()]


# ============================================================================================ properties
ALPHABET = b"</arg_value>tool_cl \xe4\xbd\xa0\xff"


@settings(max_examples=300, deadline=None)
@given(tokens=hs.lists(hs.binary(min_size=1, max_size=7).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b))
                       | hs.binary(min_size=1, max_size=4), min_size=1, max_size=12))
def test_the_tag_watch_on_bytes_is_the_decoded_text_search(tokens):
    """The old rule: decode each token ("replace"), refuse the value once its text contains a closing tag, keep 16
    characters. The new one: :func:`closer_tail` over the bytes. They refuse the same token, and the tail is the old
    text's longest end that begins a tag."""
    text, tail = "", b""
    for data in tokens:
        text += data.decode("utf-8", "replace")
        old_dead = st.ARG_VALUE_END in text or st.TOOL_CALL_END in text
        for b in data:
            tail = closer_tail(tail, b) if tail is not None else None
        assert old_dead == (tail is None), (tokens, text)
        if old_dead:
            return
        text = text[-16:]
        assert tail == closer_prefix(text)


class _Added:
    def __init__(self, content: str):
        self.content = content


class TinyBackend:
    """A tokenizer backend: ``tokens`` (byte strings) as ordinary ids, then GLM-5's special tokens as added ones."""

    def __init__(self, tokens: list[bytes]):
        chars = {b: c for c, b in byte_level_char_to_byte().items()}
        self.tokens = ["".join(chars[b] for b in d) for d in tokens]
        self.added = {len(tokens) + k: _Added(t) for k, t in enumerate(st.SPECIAL_TOKEN_STRINGS)}

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self.tokens) + len(self.added)

    def get_added_tokens_decoder(self):
        return self.added

    def id_to_token(self, i: int):
        return self.tokens[i] if i < len(self.tokens) else self.added[i].content


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=hs.lists(hs.binary(min_size=1, max_size=6).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)),
                       min_size=1, max_size=40),
       seed=hs.integers(0, 1 << 30), length=hs.integers(20, 40))
def test_random_vocabularies_agree(tokens, seed, length):
    """Random vocabularies made of tag pieces, partial UTF-8 and duplicates (every byte of the alphabet a token
    too): free text, matched patterns and JSON strings agree with the old implementation at every state."""
    singles = sorted(set(ALPHABET) | set(range(0x20, 0x7F)))  # every printable ASCII byte: names, keys, JSON
    vocab = TokenVocab(TinyBackend([bytes([b]) for b in singles] + tokens))
    drive(vocab, TEXT_TOOLS, seed=seed, walks=2, length=length)
