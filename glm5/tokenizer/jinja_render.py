"""Render any chat template with Hugging Face's Jinja semantics, without transformers.

Used when a loaded tokenizer directory carries its own ``chat_template`` (for
example the official GLM-5 file) that differs from our reconstruction: we then
render that template exactly as ``transformers``' ``apply_chat_template`` would
(sandboxed environment, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``,
``tojson`` = ``json.dumps(ensure_ascii=False)``, ``raise_exception``,
``strftime_now``), so serving never depends on transformers being installed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["compile_template", "render_template"]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile ``source`` in an HF-compatible sandboxed environment (cached)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> str:
    """Render ``source`` as transformers' ``apply_chat_template(tokenize=False)`` would.

    Keyword arguments whose value is ``None`` are left undefined, so that
    templates testing ``x is defined`` see the template default.
    """
    template_kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return compile_template(source).render(
        messages=list(messages),
        tools=list(tools) if tools is not None else None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
