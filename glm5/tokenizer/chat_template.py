"""The GLM-5 chat format: a Python renderer and the equivalent Jinja template.

Provenance
----------
The byte-exact ``chat_template.jinja`` of Hugging Face ``zai-org/GLM-5`` is
*not* available to this project. Both the Python renderer and
:data:`GLM5_CHAT_TEMPLATE` below are a reconstruction that follows the prose
description in ``shared/reference/chat-format-and-serving.md`` §1.2 (GLM-4.7
lineage template, with GLM-5's ``<think>`` / ``</think>`` generation prompt and
the ``clear_thinking`` clause) and reproduce its rendered examples §1.3
byte-for-byte. Points the reference leaves open, and what we chose:

* ``content`` that is ``None`` or missing renders as the empty string (an
  assistant message that only carries ``tool_calls`` is common).
* When ``reasoning_content`` is not a string and ``content`` contains
  ``</think>``, reasoning = the text before the first ``</think>`` (after the
  last ``<think>`` in it, outer newlines trimmed) and content = the text after
  the last ``</think>`` (leading newlines trimmed), as the GLM-4.x templates do.
* Tool-call ``arguments`` must be a mapping when the template sees it;
  :func:`normalize_messages` parses OpenAI's JSON-string arguments first (as
  vLLM does). A missing or non-mapping ``arguments`` renders no pairs.
* A ``tool`` message whose ``content`` is a list renders ``<|observation|>``
  and then, per item, a newline + ``<tool_response>`` + (``item.output`` if
  present, else the item) + ``</tool_response>`` (GLM-4.x lineage).
* ``developer`` messages are turned into ``system`` by
  :func:`normalize_messages`; any other unknown role is an error.

Diff against the real HF file before freezing golden tests on real weights.

Semantics are those of Hugging Face's renderer: a sandboxed Jinja
environment with ``trim_blocks``/``lstrip_blocks`` and a ``tojson`` that is
``json.dumps(..., ensure_ascii=False)``; an undefined ``enable_thinking`` means
thinking on, an undefined ``clear_thinking`` means earlier turns' reasoning is
dropped. In the Python API ``None`` stands for "undefined".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from . import special_tokens as st

__all__ = [
    "GLM5_CHAT_TEMPLATE",
    "TOOLS_PREAMBLE",
    "TOOLS_POSTAMBLE",
    "normalize_messages",
    "render_chat",
    "render_tool_call",
    "split_reasoning",
    "tojson",
]

#: Text of the tools system block before the per-tool JSON lines.
TOOLS_PREAMBLE = (
    st.SYSTEM
    + "\n# Tools\n\n"
    + "You may call one or more functions to assist with the user query.\n\n"
    + "You are provided with function signatures within <tools></tools> XML tags:\n"
    + "<tools>\n"
)
#: Text of the tools system block after the per-tool JSON lines (no trailing newline).
TOOLS_POSTAMBLE = (
    "</tools>\n\n"
    "For each function call, output the function name and arguments within the "
    "following XML format:\n"
    "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}"
    "</arg_value><arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>..."
    "</tool_call>"
)

# The Jinja twin of ``render_chat``. Kept as a raw string so that Jinja, not
# Python, interprets the ``\n`` escapes inside its string literals.
GLM5_CHAT_TEMPLATE = r"""{#- GLM-5 chat template, reconstructed by glm5.tokenizer.chat_template (see its docstring). -#}
{%- macro visible_text(content) -%}
{%- if content is string -%}
{{- content -}}
{%- elif content is none or content is undefined -%}
{%- elif content is iterable and content is not mapping -%}
{%- for item in content -%}
{%- if item is mapping and item.type == 'text' -%}
{{- item.text -}}
{%- elif item is string -%}
{{- item -}}
{%- endif -%}
{%- endfor -%}
{%- else -%}
{{- content -}}
{%- endif -%}
{%- endmacro -%}
{{- '[gMASK]<sop>' -}}
{%- if tools -%}
{{- '<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' -}}
{%- for tool in tools -%}
{{- tool | tojson(ensure_ascii=False) -}}
{{- '\n' -}}
{%- endfor -%}
{{- '</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value><arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>' -}}
{%- endif -%}
{%- set ns = namespace(last_user_index=-1) -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}
{%- set ns.last_user_index = loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}
{{- '<|user|>' + visible_text(m.content) -}}
{%- elif m.role == 'system' -%}
{{- '<|system|>' + visible_text(m.content) -}}
{%- elif m.role == 'assistant' -%}
{{- '<|assistant|>' -}}
{%- set content = visible_text(m.content) -%}
{%- set reasoning = '' -%}
{%- if m.reasoning_content is string -%}
{%- set reasoning = m.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{%- if ((clear_thinking is defined and not clear_thinking) or loop.index0 > ns.last_user_index) and reasoning -%}
{{- '<think>' + reasoning.strip() + '</think>' -}}
{%- else -%}
{{- '</think>' -}}
{%- endif -%}
{%- if content.strip() -%}
{{- content.strip() -}}
{%- endif -%}
{%- if m.tool_calls -%}
{%- for tc in m.tool_calls -%}
{%- if tc.function is defined -%}
{%- set tc = tc.function -%}
{%- endif -%}
{{- '<tool_call>' + tc.name -}}
{%- if tc.arguments is mapping -%}
{%- for k, v in tc.arguments.items() -%}
{{- '<arg_key>' + k + '</arg_key><arg_value>' + (v if v is string else v | tojson(ensure_ascii=False)) + '</arg_value>' -}}
{%- endfor -%}
{%- endif -%}
{{- '</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{%- elif m.role == 'tool' -%}
{%- if m.content is defined and m.content is not none and m.content is iterable and m.content is not string and m.content is not mapping -%}
{{- '<|observation|>' -}}
{%- for tr in m.content -%}
{{- '\n<tool_response>' -}}
{{- tr.output if tr.output is defined else tr -}}
{{- '</tool_response>' -}}
{%- endfor -%}
{%- else -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
{{- '<|observation|>' -}}
{%- endif -%}
{{- '<tool_response>' + visible_text(m.content) + '</tool_response>' -}}
{%- endif -%}
{%- else -%}
{{- raise_exception('Unsupported message role: ' ~ m.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>' + ('</think>' if (enable_thinking is defined and not enable_thinking) else '<think>') -}}
{%- endif -%}"""

_REASONING_ALIASES = ("reasoning_content", "thinking", "reasoning")


def tojson(value: Any) -> str:
    """JSON exactly as Hugging Face's template ``tojson`` filter writes it."""
    return json.dumps(value, ensure_ascii=False)


def _is_list_content(content: Any) -> bool:
    return isinstance(content, (list, tuple))


def _visible_text(content: Any) -> str:
    """Text of a message ``content``: strings as is, text parts of a list."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if _is_list_content(content):
        parts = []
        for item in content:
            if isinstance(item, Mapping) and item.get("type") == "text":
                if "text" in item:
                    parts.append(str(item["text"]))
            elif isinstance(item, str):
                parts.append(item)
        return "".join(parts)
    return str(content)


def split_reasoning(message: Mapping[str, Any]) -> tuple[str, str]:
    """``(reasoning, content)`` of an assistant message, as the template sees them.

    ``reasoning_content`` wins when it is a string; otherwise reasoning embedded
    in ``content`` as ``<think>...</think>`` is split out. Neither is stripped.
    """
    content = _visible_text(message.get("content"))
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if st.THINK_END in content:
        head = content.split(st.THINK_END)[0].rstrip("\n")
        reasoning = head.split(st.THINK_START)[-1].lstrip("\n")
        content = content.split(st.THINK_END)[-1].lstrip("\n")
        return reasoning, content
    return "", content


def render_tool_call(name: str, arguments: Mapping[str, Any] | None) -> str:
    """One ``<tool_call>`` block in GLM-5's inline XML form."""
    parts = [st.TOOL_CALL_START, name]
    if isinstance(arguments, Mapping):
        for key, value in arguments.items():
            text = value if isinstance(value, str) else tojson(value)
            parts += [st.ARG_KEY_START, key, st.ARG_KEY_END, st.ARG_VALUE_START, text, st.ARG_VALUE_END]
    parts.append(st.TOOL_CALL_END)
    return "".join(parts)


def _normalize_tool_call(tc: Any) -> dict[str, Any]:
    if not isinstance(tc, Mapping):
        raise ValueError(f"tool call must be an object, got {type(tc).__name__}")
    tc = dict(tc)
    fn = tc.get("function")
    if isinstance(fn, Mapping):
        fn = dict(fn)
        fn["arguments"] = _parse_arguments(fn.get("arguments"))
        tc["function"] = fn
    elif "arguments" in tc:
        tc["arguments"] = _parse_arguments(tc.get("arguments"))
    return tc


def _parse_arguments(arguments: Any) -> Any:
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, Mapping):
        raise ValueError("tool call arguments must be a JSON object")
    return dict(arguments)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy OpenAI-style messages into the shape the template expects.

    * ``reasoning_content`` is filled from ``thinking`` or ``reasoning`` when
      absent (the same aliasing transformers 5 applies);
    * tool-call ``arguments`` given as JSON strings become dicts (empty or
      ``None`` becomes ``{}``); invalid JSON raises :class:`ValueError`;
    * ``developer`` messages become ``system`` messages;
    * keys whose value is ``None`` are dropped (``content: None`` -> no
      ``content``), as transformers' ``apply_chat_template`` does.

    The input is not modified. Already-normalized messages come back equal.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"message must be an object, got {type(message).__name__}")
        m = {k: v for k, v in message.items() if v is not None}
        if m.get("role") == "developer":
            m["role"] = "system"
        if m.get("reasoning_content") is None:
            alias = next((m[k] for k in _REASONING_ALIASES if m.get(k) is not None), None)
            if alias is not None:
                m["reasoning_content"] = alias
        if m.get("tool_calls"):
            m["tool_calls"] = [_normalize_tool_call(tc) for tc in m["tool_calls"]]
        out.append(m)
    return out


def _render_tool_message(messages: Sequence[Mapping[str, Any]], i: int) -> str:
    content = messages[i].get("content")
    if _is_list_content(content):
        parts = [st.OBSERVATION]
        for item in content:
            if isinstance(item, Mapping) and "output" in item:
                item = item["output"]
            parts += ["\n", st.TOOL_RESPONSE_START, item if isinstance(item, str) else str(item), st.TOOL_RESPONSE_END]
        return "".join(parts)
    prefix = st.OBSERVATION if i == 0 or messages[i - 1].get("role") != "tool" else ""
    return prefix + st.TOOL_RESPONSE_START + _visible_text(content) + st.TOOL_RESPONSE_END


def _render_assistant(message: Mapping[str, Any], keep_reasoning: bool) -> str:
    reasoning, content = split_reasoning(message)
    parts = [st.ASSISTANT]
    if keep_reasoning and reasoning:
        parts += [st.THINK_START, reasoning.strip(), st.THINK_END]
    else:
        parts.append(st.THINK_END)
    if content.strip():
        parts.append(content.strip())
    for tc in message.get("tool_calls") or ():
        if isinstance(tc, Mapping) and "function" in tc:
            tc = tc["function"]
        parts.append(render_tool_call(tc["name"], tc.get("arguments")))
    return "".join(parts)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = True,
    clear_thinking: bool | None = None,
    normalize: bool = True,
) -> str:
    """Render a conversation to the exact GLM-5 prompt string.

    Args:
        messages: OpenAI-style messages (``system``/``user``/``assistant``
            with optional ``reasoning_content`` and ``tool_calls``/``tool``).
        tools: OpenAI tool definitions, rendered as given (one JSON line each).
        add_generation_prompt: end with ``<|assistant|>`` + ``<think>`` (or
            ``</think>`` when ``enable_thinking`` is false).
        enable_thinking: ``None`` behaves like an undefined template variable (on).
        clear_thinking: ``None``/``True`` drop reasoning of assistant turns
            before the last user message; ``False`` keeps all of it.
        normalize: run :func:`normalize_messages` first.

    Byte-identical to rendering :data:`GLM5_CHAT_TEMPLATE` with Hugging Face's
    ``apply_chat_template`` on the normalized messages.
    """
    if normalize:
        messages = normalize_messages(messages)
    keep_all = clear_thinking is not None and not clear_thinking
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    parts = [st.GMASK, st.SOP]
    if tools:
        parts.append(TOOLS_PREAMBLE)
        for tool in tools:
            parts += [tojson(tool), "\n"]
        parts.append(TOOLS_POSTAMBLE)
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "user":
            parts += [st.USER, _visible_text(m.get("content"))]
        elif role == "system":
            parts += [st.SYSTEM, _visible_text(m.get("content"))]
        elif role == "assistant":
            parts.append(_render_assistant(m, keep_all or i > last_user))
        elif role == "tool":
            parts.append(_render_tool_message(messages, i))
        else:
            raise ValueError(f"Unsupported message role: {role}")
    if add_generation_prompt:
        thinking_off = enable_thinking is not None and not enable_thinking
        parts += [st.ASSISTANT, st.THINK_END if thinking_off else st.THINK_START]
    return "".join(parts)
