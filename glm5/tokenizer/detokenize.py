"""Incremental detokenisation for streaming generation.

``IncrementalDetokenizer.add(new_ids)`` turns a growing list of token ids into
text deltas. A delta never ends inside a multi-byte UTF-8 character: bytes of
an unfinished character are held until the token that completes it arrives,
and :meth:`IncrementalDetokenizer.finish` flushes whatever is left (broken
bytes become U+FFFD, exactly as a one-shot ``decode`` would write them).

Two strategies:

* byte-level tokenizers (``ByteLevel`` decoder, as GLM-5's): every id maps to a
  fixed byte string, fed to an incremental UTF-8 decoder. O(1) per token and
  the concatenated deltas equal ``decode(all_ids)`` exactly;
* anything else: the prefix/read-offset re-decode scheme used by vLLM and TGI,
  which holds text back while the newest decode ends in U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from tokenizers import Tokenizer, decoders

__all__ = ["IncrementalDetokenizer", "byte_level_char_to_byte"]


@lru_cache(maxsize=1)
def byte_level_char_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-character table used by ``ByteLevel``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    byte_to_char: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in byte_to_char.items()}


def _backend(tokenizer: Any) -> Tokenizer:
    return getattr(tokenizer, "backend", tokenizer)


class IncrementalDetokenizer:
    """Streams text out of token ids without splitting UTF-8 characters.

    Args:
        tokenizer: a :class:`~glm5.tokenizer.GLM5Tokenizer` or a
            ``tokenizers.Tokenizer``.
        skip_special_tokens: drop added tokens flagged ``special`` (GLM-5's
            ``<think>``/``<tool_call>`` tags are not special and stay).
        byte_level: force (True) or forbid (False) the byte-level fast path;
            ``None`` picks it when the tokenizer's decoder is ``ByteLevel``.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = False, byte_level: bool | None = None) -> None:
        self._tok = _backend(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        if byte_level is None:
            byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        self.byte_level = byte_level
        self.ids: list[int] = []
        self.text = ""
        added = self._tok.get_added_tokens_decoder()
        self._special_ids = {i for i, t in added.items() if t.special}
        # byte-level state
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bytes_cache: dict[int, bytes] = {}
        # generic state
        self._prefix_offset = 0
        self._read_offset = 0

    # ----------------------------------------------------------- byte path
    def _token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if self.skip_special_tokens and token_id in self._special_ids:
            data = b""
        else:
            token = self._tok.id_to_token(token_id)
            if token is None:
                data = b""
            else:
                table = byte_level_char_to_byte()
                try:
                    data = bytes(table[c] for c in token)
                except KeyError:  # not byte-level encoded (e.g. an added token with a space)
                    data = token.encode("utf-8")
        self._bytes_cache[token_id] = data
        return data

    # -------------------------------------------------------- generic path
    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _generic_add(self) -> str:
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return delta
        return ""

    # ------------------------------------------------------------- public
    def add(self, new_ids: int | Iterable[int]) -> str:
        """Append token id(s); return the newly completed text (maybe empty)."""
        if isinstance(new_ids, int):
            new_ids = [new_ids]
        new_ids = list(new_ids)
        if not new_ids:
            return ""
        self.ids.extend(new_ids)
        if self.byte_level:
            delta = self._utf8.decode(b"".join(self._token_bytes(i) for i in new_ids))
        else:
            delta = self._generic_add()
        self.text += delta
        return delta

    def finish(self) -> str:
        """Flush held-back bytes/text at the end of the stream."""
        if self.byte_level:
            delta = self._utf8.decode(b"", final=True)
        else:
            prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
            full = self._decode(self.ids[self._prefix_offset :])
            delta = full[len(prefix_text) :] if full.startswith(prefix_text) else ""
            self._prefix_offset = self._read_offset = len(self.ids)
        self.text += delta
        return delta
