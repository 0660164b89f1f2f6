"""Parse GLM-5 model output into reasoning, content and OpenAI tool calls.

Output grammar (GLM-4.7/5 inline form, reference §1.3 and §2)::

    [reasoning] </think> content* ( <tool_call> name
        ( <arg_key> key </arg_key> <arg_value> value </arg_value> )* </tool_call> content* )*

The prompt normally ends with ``<think>``, so the output starts *inside*
reasoning (``thinking=True``); with thinking off it ends with ``</think>`` and
the output starts in content (``thinking=False``).

:class:`StreamingParser` is one incremental state machine over text;
:func:`parse_output` feeds it the whole text at once and concatenates the
deltas, so streaming and one-shot results agree by construction, whatever the
split points. Rules:

* reasoning ends at ``</think>`` **or** at ``<tool_call>`` (a call started
  inside ``<think>``); a later stray ``</think>`` is dropped, a ``<think>`` in
  content reopens reasoning;
* reasoning and content are streamed with outer whitespace trimmed (trailing
  whitespace is held until more text follows), matching the template's
  ``strip()`` so render -> parse round-trips;
* a suffix that could be the start of a tag is held back until the next
  piece shows whether it is one, so no delta ever contains a partial tag.
  Tags are single tokens, so text still held when the output *ends* is
  literal text (``"a < b"``, or a tag the model spelled with ordinary tokens)
  and is flushed as such; a partial tag there is noted in ``errors``;
* the role tokens ``<|user|>``, ``<|observation|>``, ``<|endoftext|>``,
  ``<|assistant|>``, ``<|system|>`` end the output (they are EOS/stop tokens;
  whatever follows is ignored) - except inside an argument value, where they
  are literal text;
* a tool call is emitted once its name is closed (by ``<arg_key>`` or
  ``</tool_call>``), whole, with ``id`` and ``type``; then its ``arguments``
  JSON streams as fragments: string-typed values escaped as they arrive,
  other values once ``</arg_value>`` closes them; the call's fragments
  concatenate to ``json.dumps(arguments, ensure_ascii=False)``;
* robustness: zero-argument calls; several calls; an unknown tool name
  (emitted, reported in ``errors``); ``<tool_call>nameKEY</arg_key>`` with
  the ``<arg_key>`` missing (recovered when ``name`` is a declared tool); a
  missing ``</arg_key>`` or ``</arg_value>``; keys without values (dropped);
  stray text between pairs (ignored); an unterminated call at the end
  (closed to valid JSON, reported; a call whose name never closed is dropped
  unless the name is a declared tool). Nothing raises.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from enum import Enum, auto
from typing import Any

from . import special_tokens as st
from .deltas import Delta, ParsedOutput, ToolCallDelta, merge_deltas
from .tool_schema import ToolSchemas, ValueKind, convert_value

__all__ = ["StreamingParser", "parse_output", "prompt_opens_reasoning", "TERMINATORS"]

#: Tokens that end the assistant's output when they appear in the text.
TERMINATORS: tuple[str, ...] = (st.USER, st.OBSERVATION, st.ENDOFTEXT, st.ASSISTANT, st.SYSTEM)
_THINK_TAGS = (st.THINK_START, st.THINK_END)
_CALL_TAGS = (
    st.TOOL_CALL_START,
    st.TOOL_CALL_END,
    st.ARG_KEY_START,
    st.ARG_KEY_END,
    st.ARG_VALUE_START,
    st.ARG_VALUE_END,
)


class _S(Enum):
    REASONING = auto()
    CONTENT = auto()
    NAME = auto()  # after <tool_call>, reading the function name
    KEY = auto()  # after <arg_key>
    WAIT_VALUE = auto()  # after </arg_key>, expecting <arg_value>
    VALUE = auto()  # after <arg_value>
    BETWEEN = auto()  # after </arg_value>, expecting <arg_key> or </tool_call>
    SKIP = auto()  # inside a malformed call, up to </tool_call>
    DONE = auto()  # a terminator was seen


_TEXT_TAGS = TERMINATORS + _THINK_TAGS + _CALL_TAGS
_TEXT_TAGS_NO_TOOLS = TERMINATORS + _THINK_TAGS
_CALL_STATE_TAGS = TERMINATORS + _THINK_TAGS + _CALL_TAGS
_VALUE_TAGS = (st.ARG_VALUE_END, st.TOOL_CALL_END)
_MAX_TAG_LEN = max(len(t) for t in _TEXT_TAGS)


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when a rendered prompt ends inside ``<think>`` (the output starts in reasoning)."""
    return prompt.endswith(st.THINK_START)


_ID_RNG = random.Random()  # seeded from os.urandom; ids need uniqueness, not secrecy
# A forked child (a server's worker, an RL rollout process) would otherwise continue its parent's sequence and hand
# out the same tool-call ids as its siblings.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ID_RNG.seed)


def _default_id() -> str:
    return f"call_{_ID_RNG.getrandbits(96):024x}"


def _matcher(tags: Sequence[str]) -> tuple[re.Pattern[str], tuple[str, ...]]:
    # every tag starts with "<" and none is a prefix of another, so the leftmost
    # match of the alternation is the earliest tag, whatever the order
    assert all(t.startswith("<") for t in tags)
    return re.compile("|".join(re.escape(t) for t in tags)), tuple(tags)


def _partial_tag_len(text: str, tags: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a tag."""
    i = text.find("<", max(0, len(text) - _MAX_TAG_LEN + 1))
    while i != -1:
        tail = text[i:]
        if any(t.startswith(tail) for t in tags):
            return len(text) - i
        i = text.find("<", i + 1)
    return 0


_M_TEXT = _matcher(_TEXT_TAGS)
_M_TEXT_NO_TOOLS = _matcher(_TEXT_TAGS_NO_TOOLS)
_M_CALL = _matcher(_CALL_STATE_TAGS)
_M_VALUE = _matcher(_VALUE_TAGS)


class _Trimmer:
    """Streams a text with its leading and trailing whitespace removed."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.pending += text
            return ""
        out = self.pending + body
        self.pending = text[len(body) :]
        return out

    def cut(self) -> None:
        """The text ended here: forget the held trailing whitespace."""
        self.pending = ""


class _Call:
    """State of the tool call being parsed."""

    def __init__(self) -> None:
        self.name_buf = ""
        self.index: int | None = None  # set once emitted
        self.name: str | None = None
        self.opened = False  # "{" sent
        self.key_buf = ""
        self.key: str | None = None
        self.keys: set[str] = set()
        self.value_kind = ValueKind.INFER
        self.value_types: frozenset[str] | None = None
        self.value_buf = ""
        self.noted_junk = False


class StreamingParser:
    """Incremental GLM-5 output parser.

    Args:
        tools: the request's OpenAI tool definitions (for argument typing and
            name validation); ``None`` parses calls without schemas.
        thinking: the output starts inside reasoning (the prompt ended with
            ``<think>``); see :func:`prompt_opens_reasoning`.
        parse_tool_calls: ``False`` (``tool_choice="none"``) leaves
            ``<tool_call>`` text in content.
        id_factory: makes tool-call ids (default ``call_<24 hex>``).

    ``feed(text)`` returns the new :class:`~glm5.tokenizer.deltas.Delta` list
    (consecutive ones of the same kind merged); ``finish()`` flushes and
    closes. ``errors`` accumulates notes; ``result()`` is everything so far.
    """

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        thinking: bool = True,
        parse_tool_calls: bool = True,
        id_factory: Callable[[], str] | None = None,
    ) -> None:
        self.schemas = ToolSchemas(tools)
        self.parse_tool_calls = parse_tool_calls
        self._id_factory = id_factory or _default_id
        self._state = _S.REASONING if thinking else _S.CONTENT
        self._buf = ""
        self._reasoning = _Trimmer()
        self._content = _Trimmer()
        self._call: _Call | None = None
        self._n_calls = 0
        self._out: list[Delta] = []
        self._all: list[Delta] = []
        self.errors: list[str] = []
        self.finished = False
        self.unterminated_reasoning = False

    # ------------------------------------------------------------ public
    @property
    def in_reasoning(self) -> bool:
        return self._state is _S.REASONING

    def feed(self, text: str) -> list[Delta]:
        """Consume the next piece of model output; return the new deltas."""
        if self.finished:
            raise RuntimeError("feed() after finish()")
        if text and self._state is not _S.DONE:
            self._buf += text
            self._run(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        """End of output: flush held text, close an open call, return the last deltas."""
        if not self.finished:
            self.finished = True
            self._run(final=True)
            self._end_of_output("the output ended")
        return self._take()

    def result(self) -> ParsedOutput:
        """Everything emitted so far, concatenated."""
        return ParsedOutput.from_deltas(self._all, self.errors, self.unterminated_reasoning)

    # ---------------------------------------------------------- machinery
    def _take(self) -> list[Delta]:
        out, self._out = merge_deltas(self._out), []
        self._all.extend(out)
        return out

    def _matcher(self) -> tuple[re.Pattern[str], tuple[str, ...]]:
        s = self._state
        if s in (_S.REASONING, _S.CONTENT):
            return _M_TEXT if self.parse_tool_calls else _M_TEXT_NO_TOOLS
        if s is _S.VALUE:
            return _M_VALUE
        return _M_CALL

    def _run(self, final: bool) -> None:
        buf, pos, n = self._buf, 0, len(self._buf)
        while pos < n and self._state is not _S.DONE:
            pattern, tags = self._matcher()
            m = pattern.search(buf, pos)
            if m is None:
                hold = 0 if final else _partial_tag_len(buf[max(pos, n - _MAX_TAG_LEN) :], tags)
                text = buf[pos : n - hold]
                partial = _partial_tag_len(text[-_MAX_TAG_LEN:], tags) if final else 0
                if partial > 1:
                    self.errors.append(f"output ends with a partial tag {text[-partial:]!r}")
                if text:
                    self._on_text(text)
                pos = n - hold
                break
            if m.start() > pos:
                self._on_text(buf[pos : m.start()])
            pos = m.end()
            self._on_tag(m.group())
        self._buf = "" if self._state is _S.DONE else buf[pos:]

    # ------------------------------------------------------------ emitting
    def _emit_reasoning(self, text: str) -> None:
        text = self._reasoning.push(text)
        if text:
            self._out.append(Delta(reasoning_content=text))

    def _emit_content(self, text: str) -> None:
        text = self._content.push(text)
        if text:
            self._out.append(Delta(content=text))

    def _emit_args(self, fragment: str) -> None:
        assert self._call is not None and self._call.index is not None
        self._out.append(Delta(tool_calls=[ToolCallDelta(index=self._call.index, arguments=fragment)]))

    # ---------------------------------------------------------------- text
    def _on_text(self, text: str) -> None:
        s = self._state
        call = self._call
        if s is _S.REASONING:
            self._emit_reasoning(text)
        elif s is _S.CONTENT:
            self._emit_content(text)
        elif s is _S.NAME:
            call.name_buf += text
        elif s is _S.KEY:
            call.key_buf += text
        elif s is _S.VALUE:
            if call.index is not None and call.value_kind is ValueKind.STRING:
                self._emit_args(json.dumps(text, ensure_ascii=False)[1:-1])
            else:
                call.value_buf += text
        elif s in (_S.WAIT_VALUE, _S.BETWEEN):
            if text.strip() and not call.noted_junk:
                call.noted_junk = True
                self.errors.append(f"tool call {call.name!r}: unexpected text between arguments ignored")

    # ----------------------------------------------------------------- tags
    def _on_tag(self, tag: str) -> None:
        s = self._state
        if tag in TERMINATORS:
            self._end_of_output(f"output stopped at {tag}")
            self._state = _S.DONE
            return
        if s in (_S.REASONING, _S.CONTENT):
            self._on_text_state_tag(tag)
        else:
            self._on_call_tag(tag)

    def _on_text_state_tag(self, tag: str) -> None:
        if tag == st.THINK_END:
            if self._state is _S.REASONING:
                self._reasoning.cut()
                self._state = _S.CONTENT
        elif tag == st.THINK_START:
            if self._state is _S.CONTENT:
                self._state = _S.REASONING
        elif tag == st.TOOL_CALL_START:
            if self._state is _S.REASONING:
                self._reasoning.cut()
            self._start_call()
        else:
            self.errors.append(f"stray {tag} dropped")

    def _start_call(self) -> None:
        self._call = _Call()
        self._state = _S.NAME

    def _on_call_tag(self, tag: str) -> None:
        s = self._state
        call = self._call
        if tag in _THINK_TAGS:
            return  # not meaningful inside a call
        if tag == st.TOOL_CALL_START:
            if s is not _S.SKIP:
                self._close_call(complete=False, why="a new <tool_call> started")
            self._start_call()
            return
        if tag == st.TOOL_CALL_END:
            if s is _S.NAME:
                self._open_call(call.name_buf.strip())
                self._close_call(complete=True)
            elif s is _S.SKIP:
                self._call = None
            else:
                if s in (_S.KEY, _S.WAIT_VALUE):
                    self.errors.append(f"tool call {call.name!r}: argument {self._pending_key()!r} has no value")
                elif s is _S.VALUE:
                    self.errors.append(f"tool call {call.name!r}: missing </arg_value>")
                    self._end_value()
                self._close_call(complete=True)
            self._state = _S.CONTENT
            return
        if s is _S.SKIP:
            return
        if s is _S.NAME:
            self._on_name_tag(tag)
        elif s is _S.KEY:
            if tag == st.ARG_KEY_END:
                self._set_key(call.key_buf)
                self._state = _S.WAIT_VALUE
            elif tag == st.ARG_VALUE_START:
                self.errors.append(f"tool call {call.name!r}: missing </arg_key>")
                self._set_key(call.key_buf)
                self._start_value()
            else:
                self._junk_tag(tag)
        elif s is _S.WAIT_VALUE:
            if tag == st.ARG_VALUE_START:
                self._start_value()
            elif tag == st.ARG_KEY_START:
                self.errors.append(f"tool call {call.name!r}: argument {call.key!r} has no value")
                call.key_buf = ""
                self._state = _S.KEY
            else:
                self._junk_tag(tag)
        elif s is _S.VALUE:  # only </arg_value> reaches here
            self._end_value()
            self._state = _S.BETWEEN
        elif s is _S.BETWEEN:
            if tag == st.ARG_KEY_START:
                call.key_buf = ""
                self._state = _S.KEY
            else:
                self._junk_tag(tag)

    def _junk_tag(self, tag: str) -> None:
        self.errors.append(f"tool call {self._call.name!r}: unexpected {tag} ignored")

    def _pending_key(self) -> str:
        call = self._call
        return call.key if self._state is _S.WAIT_VALUE else call.key_buf.strip()

    def _on_name_tag(self, tag: str) -> None:
        call = self._call
        name = call.name_buf.strip()
        if tag == st.ARG_KEY_START:
            if self._open_call(name):
                call.key_buf = ""
                self._state = _S.KEY
            else:
                self._state = _S.SKIP
        elif tag == st.ARG_KEY_END:
            # "<tool_call>nameKEY</arg_key>": the <arg_key> is missing
            prefix = self.schemas.longest_name_prefix(name)
            if prefix is not None and self._open_call(prefix):
                self.errors.append(f"tool call {prefix!r}: missing <arg_key> recovered")
                self._set_key(name[len(prefix) :])
                self._state = _S.WAIT_VALUE
            else:
                self.errors.append(f"malformed tool call {name[:60]!r} skipped (no <arg_key>)")
                self._state = _S.SKIP
        else:  # <arg_value> or </arg_value> right after the name
            self.errors.append(f"malformed tool call {name[:60]!r} skipped (unexpected {tag})")
            self._state = _S.SKIP

    # ------------------------------------------------------- call pieces
    def _open_call(self, name: str) -> bool:
        """Emit the call's header; False (and noted) if the name is unusable."""
        call = self._call
        if not name:
            self.errors.append("tool call without a name skipped")
            return False
        if self.schemas.declared and name not in self.schemas:
            self.errors.append(f"unknown tool {name!r} called")
        call.name = name
        call.index = self._n_calls
        self._n_calls += 1
        self._out.append(
            Delta(tool_calls=[ToolCallDelta(index=call.index, id=self._id_factory(), type="function", name=name)])
        )
        return True

    def _set_key(self, raw: str) -> None:
        call = self._call
        call.key = raw.strip()
        call.value_kind = self.schemas.kind_of(call.name, call.key)
        call.value_types = self.schemas.types_of(call.name, call.key)

    def _key_prefix(self) -> str:
        call = self._call
        if call.key in call.keys:
            self.errors.append(f"tool call {call.name!r}: duplicate argument {call.key!r}")
        call.keys.add(call.key)
        sep = ", " if call.opened else "{"
        call.opened = True
        return sep + json.dumps(call.key, ensure_ascii=False) + ": "

    def _start_value(self) -> None:
        call = self._call
        call.value_buf = ""
        self._state = _S.VALUE
        if call.value_kind is ValueKind.STRING:
            self._emit_args(self._key_prefix() + '"')

    def _end_value(self) -> None:
        call = self._call
        if call.value_kind is ValueKind.STRING:
            self._emit_args('"')
        else:
            value = convert_value(call.value_buf, call.value_kind, call.value_types)
            self._emit_args(self._key_prefix() + json.dumps(value, ensure_ascii=False))
        call.value_buf = ""
        call.key = None

    def _close_call(self, complete: bool, why: str = "") -> None:
        call = self._call
        self._call = None
        if call is None:
            return
        if call.index is None:
            # the name never closed: keep it only if it names a declared tool
            name = call.name_buf.strip()
            if name and name in self.schemas:
                self._call = call
                self._open_call(name)
                self._emit_args("{}")
                self._call = None
                self.errors.append(f"tool call {name!r}: unterminated ({why})")
            elif name or not complete:
                self.errors.append(f"incomplete tool call {name[:60]!r} dropped ({why})")
            return
        if not complete:
            self.errors.append(f"tool call {call.name!r}: unterminated ({why})")
        self._call = call
        self._emit_args("}" if call.opened else "{}")
        self._call = None

    def _end_of_output(self, why: str) -> None:
        """A terminator or the end: close what is open."""
        s = self._state
        if s is _S.REASONING:
            self.unterminated_reasoning = True
        if s in (_S.REASONING, _S.CONTENT, _S.DONE):
            return
        if s is _S.SKIP:
            self._call = None
            self.errors.append(f"malformed tool call unterminated ({why})")
            return
        if s is _S.VALUE:
            self._end_value()
        elif s in (_S.KEY, _S.WAIT_VALUE) and self._call.index is not None:
            self.errors.append(f"tool call {self._call.name!r}: argument {self._pending_key()!r} has no value")
        self._close_call(complete=False, why=why)
        self._state = _S.CONTENT


def parse_output(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    thinking: bool = True,
    parse_tool_calls: bool = True,
    id_factory: Callable[[], str] | None = None,
    unterminated_reasoning: str = "reasoning",
) -> ParsedOutput:
    """Parse a whole model output (decoded with special tokens kept).

    ``unterminated_reasoning`` picks the policy for an output that never left
    reasoning (no ``</think>``, no tool call): ``"reasoning"`` (default, what
    a stream has already sent) or ``"content"`` (move it to ``content``; the
    model skipped thinking although the prompt opened ``<think>``). Only the
    default agrees with the streaming parser.
    """
    if unterminated_reasoning not in ("reasoning", "content"):
        raise ValueError("unterminated_reasoning must be 'reasoning' or 'content'")
    parser = StreamingParser(tools, thinking=thinking, parse_tool_calls=parse_tool_calls, id_factory=id_factory)
    parser.feed(text)
    parser.finish()
    result = parser.result()
    if unterminated_reasoning == "content" and result.unterminated_reasoning and not result.tool_calls:
        if result.content is None:
            result.content, result.reasoning_content = result.reasoning_content, None
    return result
