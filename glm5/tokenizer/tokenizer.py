"""``GLM5Tokenizer``: a thin wrapper around a Hugging Face ``tokenizers.Tokenizer``.

It loads an HF tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``,
such as the official GLM-5 one) unchanged, saves in the same format (so
``transformers.AutoTokenizer`` loads it with identical ids and chat template),
and adds what the rest of the system needs: GLM-5's EOS/stop ids, chat
rendering, a stable fingerprint and incremental detokenisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer

from . import special_tokens as st
from .chat_template import GLM5_CHAT_TEMPLATE, normalize_messages, render_chat
from .detokenize import IncrementalDetokenizer
from .jinja_render import compile_template, render_template

__all__ = ["GLM5Tokenizer"]

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


def _token_content(value: Any) -> str | None:
    """``"<x>"`` or ``{"content": "<x>", ...}`` (HF AddedToken dict) -> ``"<x>"``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_tokenizer_file(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception that names only a JSON position
        with open(file, "rb") as f:
            lfs = f.read(23) == b"version https://git-lfs"
        what = "a Git LFS pointer file, not the tokenizer (fetch it: git lfs pull)" if lfs else f"not a valid tokenizer: {e}"
        raise ValueError(f"{file}: {what}") from e


def _check_template(template: Any, source: Path) -> None:
    """Compile the chat template at load time, so a broken one fails here, naming its file, and not on every
    request."""
    if not isinstance(template, str):
        raise ValueError(f"{source}: chat_template must be a string, got {type(template).__name__}")
    if not template.strip():
        raise ValueError(f"{source}: the chat template is empty")
    try:
        compile_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{source}: chat template syntax error at line {e.lineno}: {e.message}") from e


class GLM5Tokenizer:
    """GLM-5 tokenizer: encode/decode, chat rendering, EOS ids, fingerprint.

    Args:
        tokenizer: the ``tokenizers.Tokenizer`` doing the work.
        chat_template: Jinja chat template; ``None`` means GLM-5's
            (:data:`~glm5.tokenizer.chat_template.GLM5_CHAT_TEMPLATE`).
        eos_tokens: EOS strings; default GLM-5's ``<|endoftext|>``,
            ``<|user|>``, ``<|observation|>`` (those present in the vocabulary).
        pad_token: pad string (default ``<|endoftext|>``).
        config: extra ``tokenizer_config.json`` fields to keep on save.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        eos_tokens: Sequence[str] | None = None,
        pad_token: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.backend = tokenizer
        self.chat_template = chat_template if chat_template is not None else GLM5_CHAT_TEMPLATE
        self.config: dict[str, Any] = dict(config or {})
        if eos_tokens is None:
            eos_tokens = [t for t in st.EOS_TOKENS if tokenizer.token_to_id(t) is not None]
        self.eos_tokens: list[str] = list(eos_tokens)
        self.pad_token: str | None = pad_token if pad_token is not None else (
            st.PAD_TOKEN if tokenizer.token_to_id(st.PAD_TOKEN) is not None else None
        )
        for tok in [*self.eos_tokens, *([self.pad_token] if self.pad_token else [])]:
            if tokenizer.token_to_id(tok) is None:
                raise ValueError(f"token {tok!r} is not in the vocabulary")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> GLM5Tokenizer:
        """Load an HF tokenizer directory, leaving ``tokenizer.json`` untouched.

        The chat template comes from ``chat_template.jinja`` when present, else
        from ``tokenizer_config.json`` (a string, or the ``default`` entry of a
        list of named templates), else GLM-5's. EOS tokens are GLM-5's three
        when the vocabulary has them, plus the config's ``eos_token``.
        """
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {str(path)!r}")
        backend = _read_tokenizer_file(path / TOKENIZER_FILE)
        config: dict[str, Any] = {}
        if (path / CONFIG_FILE).exists():
            try:
                config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path / CONFIG_FILE}: invalid JSON: {e}") from e
            if not isinstance(config, dict):
                raise ValueError(f"{path / CONFIG_FILE}: must hold a JSON object, got {type(config).__name__}")
        template = config.pop("chat_template", None)
        source = path / CONFIG_FILE
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if (path / CHAT_TEMPLATE_FILE).exists():
            # utf-8-sig: a byte-order mark left by an editor would otherwise start every rendered prompt
            template = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8-sig")
            source = path / CHAT_TEMPLATE_FILE
        if template is not None:
            _check_template(template, source)
        eos = [t for t in st.EOS_TOKENS if backend.token_to_id(t) is not None]
        cfg_eos = _token_content(config.get("eos_token"))
        if cfg_eos is not None and cfg_eos not in eos and backend.token_to_id(cfg_eos) is not None:
            eos.insert(0, cfg_eos)
        if not eos:
            log.warning("%s: no EOS token (none of GLM-5's %s, no usable eos_token in %s): generation stops only at "
                        "max_tokens, stop strings and generation_config.json's eos ids", path / TOKENIZER_FILE,
                        ", ".join(st.EOS_TOKENS), CONFIG_FILE)
        pad = _token_content(config.get("pad_token"))
        if pad is not None and backend.token_to_id(pad) is None:
            pad = None
        return cls(backend, chat_template=template, eos_tokens=eos, pad_token=pad, config=config)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        ``tokenizer_config.json`` carries the chat template, ``eos_token``,
        ``pad_token``, ``added_tokens_decoder`` and ``tokenizer_class:
        TokenizersBackend`` (transformers 5's generic fast tokenizer). It does
        not write ``generation_config.json`` (a model file); see
        :meth:`generation_config` for its EOS/pad entries.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / TOKENIZER_FILE))
        decoder = self.backend.get_added_tokens_decoder()
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(decoder.items())
        }
        config = dict(self.config)
        for stale in ("added_tokens_decoder", "chat_template", "eos_token", "pad_token", "tokenizer_class"):
            config.pop(stale, None)
        config = {
            "backend": "tokenizers",
            "clean_up_tokenization_spaces": False,
            "do_lower_case": False,
            "padding_side": "left",
            "remove_space": False,
            "model_max_length": 202752,
            **config,
            "added_tokens_decoder": added,
            "eos_token": self.eos_tokens[0] if self.eos_tokens else None,
            "pad_token": self.pad_token,
            "extra_special_tokens": [t.content for _, t in sorted(decoder.items()) if t.special],
            "tokenizer_class": "TokenizersBackend",
            "chat_template": self.chat_template,
        }
        (path / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        special_map = {"eos_token": config["eos_token"], "pad_token": self.pad_token}
        (path / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
        stale_template = path / CHAT_TEMPLATE_FILE
        if stale_template.exists():  # would shadow the template we just wrote
            stale_template.unlink()

    # ----------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids in use (learned vocabulary + added tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _require_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids of the EOS tokens (GLM-5: ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``)."""
        return [self._require_id(t) for t in self.eos_tokens]

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (``<|endoftext|>``), as HF's scalar ``eos_token_id``."""
        ids = self.eos_token_ids
        return ids[0] if ids else None

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS ids plus ``<|assistant|>`` and ``<|system|>``: a conservative server stop set."""
        extra = [self.backend.token_to_id(t) for t in st.EXTRA_STOP_TOKENS]
        return self.eos_token_ids + [i for i in extra if i is not None and i not in self.eos_token_ids]

    @property
    def pad_token_id(self) -> int | None:
        return self._require_id(self.pad_token) if self.pad_token is not None else None

    @property
    def special_token_ids(self) -> dict[str, int]:
        """All added tokens (special or not) -> id."""
        return {t.content: i for i, t in sorted(self.backend.get_added_tokens_decoder().items())}

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the added tokens flagged ``special`` (dropped by ``skip_special_tokens``)."""
        return [i for i, t in sorted(self.backend.get_added_tokens_decoder().items()) if t.special]

    def generation_config(self) -> dict[str, Any]:
        """EOS/pad entries for a model's ``generation_config.json``."""
        return {"eos_token_id": self.eos_token_ids, "pad_token_id": self.pad_token_id}

    # ------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Added-token strings in it become their single ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """:meth:`encode` of many texts, in parallel inside ``tokenizers``."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. With ``skip_special_tokens`` only ``special`` added tokens drop."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A streaming decoder: feed growing ids, get text deltas with whole characters only."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # --------------------------------------------------------------- chat
    @property
    def uses_builtin_template(self) -> bool:
        """True when the chat template is our GLM-5 reconstruction."""
        return self.chat_template == GLM5_CHAT_TEMPLATE

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = True,
        tokenize: bool = False,
        clear_thinking: bool | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render (and optionally tokenize) a conversation.

        Messages are normalized first (JSON-string tool arguments -> dicts,
        ``reasoning``/``thinking`` -> ``reasoning_content``). With GLM-5's
        template the fast Python renderer is used; any other template (e.g. an
        official file loaded from disk) is rendered with HF Jinja semantics,
        receiving ``template_kwargs`` too. ``None`` kwargs stay undefined.
        The rendered prompt already starts with ``[gMASK]<sop>``; tokenizing
        adds nothing else.
        """
        messages = normalize_messages(messages)
        if self.uses_builtin_template and not template_kwargs:
            text = render_chat(
                messages,
                tools,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                clear_thinking=clear_thinking,
                normalize=False,
            )
        else:
            text = render_template(
                self.chat_template,
                messages,
                tools,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                clear_thinking=clear_thinking,
                **template_kwargs,
            )
        return self.encode(text) if tokenize else text

    # --------------------------------------------------------- fingerprint
    def fingerprint(self, include_chat_template: bool = True) -> str:
        """Stable SHA-256 hex digest of everything that decides token ids.

        Covers the canonical (key-sorted) ``tokenizer.json`` content, the EOS
        and pad ids and, by default, the chat template. It survives a
        save/load round trip and does not depend on file formatting.
        """
        payload = {
            "tokenizer": json.loads(self.backend.to_str()),
            "eos_token_ids": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
        }
        if include_chat_template:
            payload["chat_template"] = self.chat_template
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return (
            f"GLM5Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_tokens}, "
            f"builtin_template={self.uses_builtin_template})"
        )
