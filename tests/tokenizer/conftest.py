"""Shared fixtures for the tokenizer tests: a small corpus and a trained tokenizer."""

import sys
from pathlib import Path

import pytest

# pytest runs in importlib mode: make the helper modules next to this file importable
# (glm5_chat_strategies, glm5_parser_tools).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mixed_text  # tests/mixed_text.py (tests/ is on sys.path: tests/conftest.py)

from glm5.tokenizer import train_bpe

_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not which "
    "model token attention expert router layer sparse latent cache weight gradient loss batch "
    "def return class import self None True False print range len for while if else elif "
    "你好 世界 模型 推理 工具 天气 北京 上海 数据 训练 "
    "café naïve résumé über straße jalapeño "
    "🙂 🚀 ✨ 👍🏽 🇫🇷"
).split()
_PUNCT = [".", ",", "!", "?", ":", ";", "(", ")", "{", "}", "[", "]", "=", "+", "-", "*", "/", "\"", "'", "<", ">", "|"]


def make_corpus(n_docs: int = 120, seed: int = 0) -> list[str]:
    """A few KB of mixed-script, code-like and numeric text."""
    return mixed_text.make_corpus(n_docs, seed, words=_WORDS, punct=_PUNCT, p_word=0.75, p_number=0.15,
                                  max_number=99999, p_newline=0.05)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def trained(corpus):
    """A byte-level BPE tokenizer with an 800-id vocabulary (764 learned + 36 added)."""
    return train_bpe(corpus, vocab_size=800)


@pytest.fixture(scope="session")
def saved_dir(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("glm5_tok")
    trained.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_tokenizer(saved_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved_dir))
