"""A small mixed corpus (English words, numbers, JSON punctuation, CJK, accents, emoji) for training test
tokenizers whose byte-level vocabulary exercises the server's parsers and the structured-output grammars."""

import random

_WORDS = ("the of and to in is that for it as with was on be by this are from at or weather city "
          "Beijing Paris location unit celsius get_weather get_time search query think answer sure "
          "model token attention expert router layer sparse latent cache hello world json value "
          "你好 世界 天气 北京 café naïve 🙂 🚀").split()
_PUNCT = list(".,!?:;(){}[]=+-*/\"'<>|_") + ["{\"", "\":", "\"}", "\": \"", "\", \""]


def make_corpus(n_docs: int = 150, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(20, 60)):
            r = rng.random()
            parts.append(rng.choice(_WORDS) if r < 0.7 else str(rng.randint(0, 999)) if r < 0.85 else rng.choice(_PUNCT))
        docs.append(" ".join(parts))
    return docs
