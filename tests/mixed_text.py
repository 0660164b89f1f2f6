"""A small mixed corpus (English words, numbers, JSON punctuation, CJK, accents, emoji) for training test
tokenizers whose byte-level vocabulary exercises the server's parsers and the structured-output grammars."""

import random

_WORDS = ("the of and to in is that for it as with was on be by this are from at or weather city "
          "Beijing Paris location unit celsius get_weather get_time search query think answer sure "
          "model token attention expert router layer sparse latent cache hello world json value "
          "你好 世界 天气 北京 café naïve 🙂 🚀").split()
_PUNCT = list(".,!?:;(){}[]=+-*/\"'<>|_") + ["{\"", "\":", "\"}", "\": \"", "\", \""]


def make_corpus(n_docs: int = 150, seed: int = 0, words=_WORDS, punct=_PUNCT, p_word: float = 0.7,
                p_number: float = 0.15, max_number: int = 999, p_newline: float = 0.0) -> list[str]:
    """``n_docs`` documents of 20-60 parts: a word (``p_word``), a number up to ``max_number`` (``p_number``) or
    punctuation, with a line break and indent after a part at rate ``p_newline``. Deterministic in ``seed``."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(20, 60)):
            r = rng.random()
            if r < p_word:
                parts.append(rng.choice(words))
            elif r < p_word + p_number:
                parts.append(str(rng.randint(0, max_number)))
            else:
                parts.append(rng.choice(punct))
            if p_newline and rng.random() < p_newline:  # no draw when off: the stream stays the same
                parts.append("\n" * rng.randint(1, 2) + "    " * rng.randint(0, 2))
        docs.append(" ".join(parts))
    return docs
