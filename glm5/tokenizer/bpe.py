"""Train a byte-level BPE tokenizer with GLM-5's added tokens.

The learned vocabulary takes ids ``0 .. n-1`` (the 256 byte symbols first, then
merges); GLM-5's 36 added tokens follow at ``n .. n+35`` in the official order
(:data:`~glm5.tokenizer.special_tokens.SPECIAL_TOKENS`), like the official
tokenizer where ``n = 154820``. They are matched before BPE so they are never
split, and they are cut out of the training text so BPE never learns them.

Pre-tokenisation is GLM's split regex (letters, 1-3 digit groups,
punctuation runs, newlines, spaces) followed by ``ByteLevel`` without its own
regex; the ``ByteLevel`` decoder makes every string round-trip exactly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from . import special_tokens as st
from .tokenizer import GLM5Tokenizer

__all__ = ["GLM_SPLIT_PATTERN", "build_empty_tokenizer", "train_bpe", "add_glm5_special_tokens"]

#: GLM-4/5's pre-tokenizer split pattern (GPT-4 style with 1-3 digit groups).
GLM_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SPECIALS_RE = re.compile("|".join(re.escape(t) for t in sorted(st.SPECIAL_TOKEN_STRINGS, key=len, reverse=True)))


def build_empty_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE ``Tokenizer`` with GLM's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def add_glm5_special_tokens(tok: Tokenizer) -> int:
    """Append GLM-5's 36 added tokens after the current vocabulary; return the first id.

    Raises ``ValueError`` if one of them already exists (ids would not be contiguous).
    """
    first = tok.get_vocab_size(with_added_tokens=True)
    for offset, spec in enumerate(st.SPECIAL_TOKENS):
        if tok.token_to_id(spec.content) is not None:
            raise ValueError(f"{spec.content!r} is already in the vocabulary")
        token = AddedToken(spec.content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=spec.special)
        if spec.special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        if tok.token_to_id(spec.content) != first + offset:
            raise ValueError(f"{spec.content!r} did not get id {first + offset}")
    return first


def _iter_texts(texts_or_files: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> Iterator[str]:
    """Texts from strings (texts) and ``os.PathLike`` items (UTF-8 files, read in ~1 MiB pieces)."""
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            with open(item, encoding="utf-8", errors="replace") as f:
                buf: list[str] = []
                size = 0
                for line in f:
                    buf.append(line)
                    size += len(line)
                    if size >= 1 << 20:
                        yield "".join(buf)
                        buf, size = [], 0
                if buf:
                    yield "".join(buf)
        else:
            yield item


def _without_specials(texts: Iterable[str]) -> Iterator[str]:
    """Split texts around added-token strings so BPE never sees (or learns) them."""
    for text in texts:
        for piece in _SPECIALS_RE.split(text):
            if piece:
                yield piece


def train_bpe(
    texts_or_files: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    chat_template: str | None = None,
    show_progress: bool = False,
) -> GLM5Tokenizer:
    """Train a byte-level BPE tokenizer and append GLM-5's added tokens.

    Args:
        texts_or_files: an iterable (e.g. a generator) whose ``str`` items are
            texts and whose ``os.PathLike`` items (``pathlib.Path``) are UTF-8
            text files; or a single text or path. Plain strings are never
            taken for file names.
        vocab_size: the target *total* size, added tokens included; the BPE
            part is ``vocab_size - 36`` (fewer if the corpus runs out of pairs
            to merge). Must leave room for the 256 byte symbols.
        min_frequency: minimum pair count for a merge.
        chat_template: defaults to GLM-5's.

    Returns a :class:`GLM5Tokenizer` whose added tokens have ids
    ``n .. n+35`` right after the ``n`` learned tokens.
    """
    n_special = len(st.SPECIAL_TOKENS)
    learned = vocab_size - n_special
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if learned < len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + n_special}, got {vocab_size}")
    tok = build_empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    tok.train_from_iterator(_without_specials(_iter_texts(texts_or_files)), trainer=trainer)
    add_glm5_special_tokens(tok)
    return GLM5Tokenizer(tok, chat_template=chat_template)
