from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from glm5.tokenizer import SPECIAL_TOKEN_STRINGS, train_bpe
from glm5.tokenizer.special_tokens import SPECIAL_TOKENS


def test_specials_appended_after_learned_vocab(trained):
    learned = trained.backend.get_vocab_size(with_added_tokens=False)
    assert learned == 800 - 36
    assert trained.vocab_size == 800
    for i, token in enumerate(SPECIAL_TOKEN_STRINGS):
        assert trained.token_to_id(token) == learned + i
        assert trained.id_to_token(learned + i) == token
    assert trained.eos_token_ids == [learned, learned + 7, learned + 9]
    assert trained.pad_token_id == learned
    assert trained.stop_token_ids == [learned, learned + 7, learned + 9, learned + 8, learned + 6]
    special_ids = set(trained.all_special_ids)
    for i, spec in enumerate(SPECIAL_TOKENS):
        assert ((learned + i) in special_ids) == spec.special


def test_specials_never_split(trained):
    for token in SPECIAL_TOKEN_STRINGS:
        assert trained.encode(token) == [trained.token_to_id(token)]
        ids = trained.encode(f"abc{token}def")
        assert trained.token_to_id(token) in ids
        assert trained.decode(ids) == f"abc{token}def"


def test_byte_level_pieces(trained):
    # every byte is in the vocabulary, so there is no unknown token
    ids = trained.encode("\x00\x7f\u00e9\U0001F600")
    assert all(i < trained.backend.get_vocab_size(with_added_tokens=False) for i in ids)


@settings(max_examples=150, deadline=None)
@given(hs.text(max_size=200) | hs.lists(hs.sampled_from(list(SPECIAL_TOKEN_STRINGS) + ["a", " ", "你", "\n", "🙂"])).map("".join))
def test_any_text_round_trips(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_special_strings_in_corpus_are_not_learned(corpus):
    noisy = [doc.replace(" ", " /nothink <think> ", 3) + "<|user|>[gMASK]" for doc in corpus]
    tok = train_bpe(noisy, vocab_size=700)
    learned = tok.backend.get_vocab_size(with_added_tokens=False)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKEN_STRINGS] == list(range(learned, learned + 36))
    vocab = tok.backend.get_vocab(with_added_tokens=False)
    assert "/nothink" not in vocab and "Ġ/nothink" not in vocab


def test_train_from_files_equals_train_from_text(corpus, tmp_path):
    text = "\n".join(corpus)
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    from_file = train_bpe([Path(f)], vocab_size=600)
    from_text = train_bpe([text], vocab_size=600)
    assert from_file.fingerprint() == from_text.fingerprint()
    assert from_file.vocab_size == 600
    # a generator is accepted too, and training is deterministic
    again = train_bpe((t for t in [text]), vocab_size=600)
    assert again.fingerprint() == from_text.fingerprint()


def test_small_corpus_gives_fewer_ids_but_contiguous_specials():
    tok = train_bpe(["tiny corpus"], vocab_size=2000)
    learned = tok.backend.get_vocab_size(with_added_tokens=False)
    assert learned < 2000 - 36
    assert tok.token_to_id("<|endoftext|>") == learned
    assert tok.vocab_size == learned + 36


def test_vocab_size_must_fit_bytes_and_specials():
    with pytest.raises(ValueError):
        train_bpe(["x"], vocab_size=256 + 35)
