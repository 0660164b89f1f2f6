"""Incremental detokenisation: deltas never split a character and add up to decode()."""

import random

from hypothesis import given, settings
from hypothesis import strategies as hs

from glm5.tokenizer import IncrementalDetokenizer

texts = hs.one_of(
    hs.text(max_size=80),
    hs.text(alphabet="aé你🙂👍🏽🇫🇷\n <think>", max_size=40),
)


def run(detok, ids, rng=None):
    deltas, i = [], 0
    while i < len(ids):
        step = rng.randint(1, 3) if rng else 1
        deltas.append(detok.add(ids[i : i + step]))
        i += step
    deltas.append(detok.finish())
    return deltas


@settings(max_examples=120, deadline=None)
@given(text=texts, seed=hs.integers(0, 1000))
def test_byte_level_deltas_add_up_and_never_split_characters(trained, text, seed):
    ids = trained.encode(text)
    detok = trained.incremental_detokenizer()
    assert detok.byte_level
    deltas = run(detok, ids, random.Random(seed))
    assert "".join(deltas) == trained.decode(ids) == text == detok.text
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=60, deadline=None)
@given(text=texts)
def test_generic_strategy_agrees(trained, text):
    ids = trained.encode(text)
    detok = IncrementalDetokenizer(trained, byte_level=False)
    deltas = run(detok, ids)
    assert "".join(deltas) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=80, deadline=None)
@given(data=hs.data())
def test_arbitrary_ids_match_one_shot_decode(trained, data):
    """Random ids may form invalid UTF-8; the stream still equals decode() (with U+FFFD)."""
    ids = data.draw(hs.lists(hs.integers(0, trained.vocab_size - 1), max_size=30))
    for skip in (False, True):
        detok = trained.incremental_detokenizer(skip_special_tokens=skip)
        assert "".join(run(detok, ids)) == trained.decode(ids, skip_special_tokens=skip)


def test_multibyte_character_is_held_until_complete(trained):
    # a rare 4-byte character is not in the small vocabulary: it becomes one token per byte
    char = "\U0001D518"
    ids = trained.encode(char)
    assert len(ids) == 4
    detok = trained.incremental_detokenizer()
    assert [detok.add(i) for i in ids] == ["", "", "", char]
    # cut short, the stream flushes the same replacement text as a one-shot decode
    detok = trained.incremental_detokenizer()
    assert detok.add(ids[:2]) == "" and detok.finish() == trained.decode(ids[:2])


def test_skip_special_tokens_keeps_reasoning_tags(trained):
    ids = trained.encode("[gMASK]<sop><|assistant|><think>r</think>answer<|user|>")
    detok = trained.incremental_detokenizer(skip_special_tokens=True)
    assert "".join(run(detok, ids)) == "<think>r</think>answer"
    detok = trained.incremental_detokenizer()
    assert "".join(run(detok, ids)) == "[gMASK]<sop><|assistant|><think>r</think>answer<|user|>"


def test_works_on_a_raw_tokenizers_object(trained):
    detok = IncrementalDetokenizer(trained.backend)
    ids = trained.encode("héllo 你好")
    assert "".join(run(detok, ids)) == "héllo 你好"
