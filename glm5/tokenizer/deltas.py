"""Result types of the GLM-5 output parser, in OpenAI chat-completions shape.

* :class:`Delta` / :class:`ToolCallDelta`: one streaming event; ``to_openai()``
  gives the ``choices[0].delta`` dict of a ``chat.completion.chunk``.
* :class:`ToolCall` / :class:`ParsedOutput`: the whole turn; ``to_openai()`` /
  ``to_message()`` give the non-streaming ``message`` dict.

Deltas of a stream concatenate into a :class:`ParsedOutput` with
:meth:`ParsedOutput.from_deltas`; the one-shot parser is built that way, so
streaming and non-streaming results cannot diverge.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Delta", "ParsedOutput", "ToolCall", "ToolCallDelta", "merge_deltas"]


@dataclass
class ToolCallDelta:
    """A fragment of tool call ``index``.

    The first fragment of a call carries ``id``, ``type`` ("function") and the
    whole ``name``; later ones only ``arguments`` text. The ``arguments``
    fragments of one call concatenate to its JSON arguments.
    """

    index: int
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
        if self.type is not None:
            out["type"] = self.type
        fn: dict[str, Any] = {}
        if self.name is not None:
            fn["name"] = self.name
        fn["arguments"] = self.arguments
        out["function"] = fn
        return out


@dataclass
class Delta:
    """One streaming event: exactly one of the three fields is set."""

    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @property
    def kind(self) -> str:
        if self.reasoning_content is not None:
            return "reasoning_content"
        if self.content is not None:
            return "content"
        return "tool_calls"

    def to_openai(self) -> dict[str, Any]:
        """The ``choices[0].delta`` dict of an OpenAI streaming chunk."""
        if self.reasoning_content is not None:
            return {"reasoning_content": self.reasoning_content}
        if self.content is not None:
            return {"content": self.content}
        return {"tool_calls": [tc.to_openai() for tc in self.tool_calls or []]}


def merge_deltas(deltas: Iterable[Delta]) -> list[Delta]:
    """Coalesce consecutive deltas of the same kind (and same tool-call index)."""
    out: list[Delta] = []
    for d in deltas:
        last = out[-1] if out else None
        if last is not None and last.kind == d.kind:
            if d.reasoning_content is not None:
                last.reasoning_content += d.reasoning_content
                continue
            if d.content is not None:
                last.content += d.content
                continue
            prev, cur = last.tool_calls[-1], d.tool_calls[0]
            if len(d.tool_calls) == 1 and prev.index == cur.index and cur.id is None:
                prev.arguments += cur.arguments
                continue
        out.append(
            Delta(
                reasoning_content=d.reasoning_content,
                content=d.content,
                tool_calls=[ToolCallDelta(**vars(tc)) for tc in d.tool_calls] if d.tool_calls is not None else None,
            )
        )
    return out


@dataclass
class ToolCall:
    """A complete tool call; ``arguments`` is JSON text (an object)."""

    id: str
    name: str
    arguments: str
    type: str = "function"

    @property
    def parsed_arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    """A parsed assistant turn.

    Attributes:
        reasoning_content: the reasoning, outer whitespace trimmed; ``None`` if empty.
        content: the visible answer (text outside reasoning and tool calls,
            outer whitespace trimmed); ``None`` if empty.
        tool_calls: the calls in order (OpenAI shape via ``to_openai()``).
        errors: human-readable notes on malformed or truncated output
            (unknown tool, bad argument block, unterminated call, ...).
        unterminated_reasoning: the output ended inside reasoning (no
            ``</think>`` and no tool call closed it).
    """

    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unterminated_reasoning: bool = False

    @property
    def finish_reason(self) -> str:
        """``"tool_calls"`` when there are calls, else ``"stop"`` (the engine decides ``"length"``)."""
        return "tool_calls" if self.tool_calls else "stop"

    def to_message(self) -> dict[str, Any]:
        """The OpenAI ``choices[0].message`` dict."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [tc.to_openai() for tc in self.tool_calls]
        return msg

    @classmethod
    def from_deltas(
        cls, deltas: Iterable[Delta], errors: Iterable[str] = (), unterminated_reasoning: bool = False
    ) -> ParsedOutput:
        """Concatenate streamed deltas (as an OpenAI client would)."""
        reasoning: list[str] = []
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        for d in deltas:
            if d.reasoning_content is not None:
                reasoning.append(d.reasoning_content)
            elif d.content is not None:
                content.append(d.content)
            else:
                for tc in d.tool_calls or []:
                    call = calls.setdefault(tc.index, {"id": None, "name": None, "type": "function", "args": []})
                    if tc.id is not None:
                        call["id"] = tc.id
                    if tc.type is not None:
                        call["type"] = tc.type
                    if tc.name is not None:
                        call["name"] = tc.name
                    call["args"].append(tc.arguments)
        tool_calls = [
            ToolCall(id=c["id"], name=c["name"], arguments="".join(c["args"]), type=c["type"])
            for _, c in sorted(calls.items())
        ]
        return cls(
            reasoning_content="".join(reasoning) or None,
            content="".join(content) or None,
            tool_calls=tool_calls,
            errors=list(errors),
            unterminated_reasoning=unterminated_reasoning,
        )
