"""The output side of ``/v1/responses``: GLM-5 parser deltas -> output items and ``response.*`` stream events.

:class:`OutputBuilder` is fed the chat path's parser deltas; the non-streaming response is the same builder's
items with the events switched off, so streamed and non-streamed results cannot disagree (``max_tool_calls``
and logprobs included, since both are applied here). :class:`TextTokens` picks the generated tokens that are
answer text, for the logprobs of ``output_text`` parts.
"""

from __future__ import annotations

import uuid

from glm5.tokenizer import special_tokens as st
from glm5.tokenizer.parser import TERMINATORS

from .serving import ServerState


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _snapshot(item: dict) -> dict:
    """A copy for an event: the builder keeps changing the item it returns in the response."""
    return {**item, "content": list(item["content"])} if "content" in item else dict(item)


class TextTokens:
    """Which generated tokens are answer text. The parser works on text, not tokens, so this follows its grammar on
    token ids (tags are single tokens): reasoning runs to ``</think>`` (or a ``<tool_call>`` inside it), calls from
    ``<tool_call>`` to ``</tool_call>``, a role token ends the output except inside an argument value, special
    tokens are never text, and whitespace-only tokens before an answer's first text are skipped, as the parser
    strips them. A logprob then goes with an ``output_text`` exactly when its token is part of that text."""

    def __init__(self, state: ServerState, reasoning: bool):
        tid = state.tokenizer.token_to_id
        self._think = (tid(st.THINK_START), tid(st.THINK_END))
        self._call = (tid(st.TOOL_CALL_START), tid(st.TOOL_CALL_END))
        self._value = (tid(st.ARG_VALUE_START), tid(st.ARG_VALUE_END))
        self._stop = {tid(t) for t in TERMINATORS}
        self._special = state._added  # id -> text of every added token
        self.mode = "reasoning" if reasoning else "text"  # or "call", "value" (inside a call), "done"
        self.started = False  # the current answer has non-whitespace text

    def select(self, ids: list[int], entries: list[dict]) -> list[dict]:
        """The logprob entries (one per token of ``ids``) of the tokens that are answer text."""
        out = []
        for t, entry in zip(ids, entries):
            mode = self.mode
            if mode == "done" or (mode == "value" and t != self._value[1]):
                continue
            if t in self._stop:
                self.mode = "done"
            elif t == self._call[0]:
                self.mode = "call"
            elif mode == "call" and t in (self._value[0], self._call[1]):
                self.mode = "value" if t == self._value[0] else "text"
                self.started = False
            elif mode == "value":  # t is </arg_value>
                self.mode = "call"
            elif mode == "reasoning" and t == self._think[1]:
                self.mode, self.started = "text", False
            elif mode == "text" and t == self._think[0]:
                self.mode = "reasoning"
            elif mode == "text" and t not in self._special and (self.started or entry["token"].strip()):
                self.started = True
                out.append(entry)
        return out


class OutputBuilder:
    """Parser deltas -> output items, and (``emit``) the stream events that build them. Items open when their
    kind of delta first arrives and close when another kind starts or the output ends: reasoning becomes a
    ``reasoning`` item (its text as ``reasoning_text`` content, no summary), answer text a ``message`` with one
    ``output_text`` part, each tool call a ``function_call`` (``call_id`` is the parser's call id).

    ``max_calls`` is ``max_tool_calls``: OpenAI documents that further tool calls the model attempts are ignored,
    so calls past the first ``max_calls`` get no item and no events. Answer-text logprobs (``feed``'s ``lps``) wait
    until the text of their tokens arrives (the parser holds back text that could start a tag) and go with it:
    on that ``output_text.delta`` event, and in the part's ``logprobs``."""

    def __init__(self, emit: bool, max_calls: int | None = None):
        self.emit = emit
        self.max_calls = max_calls
        self.items: list[dict] = []
        self.events: list[dict] = []
        self._open: dict | None = None
        self._text: list[str] = []
        self._calls: dict[int, int] = {}  # parser call index -> output index
        self._dropped: set[int] = set()  # parser call indices past max_calls
        self._pending: list[dict] = []  # answer-text logprobs whose text has not arrived yet
        self._lps: list[dict] = []  # logprobs of the open message's text

    def feed(self, deltas, lps: list[dict] = ()) -> None:
        self._pending.extend(lps)
        for d in deltas:
            if d.reasoning_content is not None:
                self._add_text("reasoning", d.reasoning_content)
            elif d.content is not None:
                self._add_text("message", d.content)
            else:
                for tc in d.tool_calls or []:
                    if tc.index in self._dropped:
                        continue
                    if tc.index not in self._calls:
                        if self.max_calls is not None and len(self._calls) >= self.max_calls:
                            self._dropped.add(tc.index)
                            self._close("completed")  # the last kept call is whole: another one began
                            continue
                        self._open_call(tc)
                    if tc.arguments:
                        self._add_args(self._calls[tc.index], tc.arguments)

    def finish(self, status: str) -> None:
        """Close the open item (``incomplete`` when the output was cut off)."""
        self._close(status)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out

    # ---- items
    def _event(self, kind: str, **fields) -> None:
        if self.emit:
            self.events.append({"type": kind, **fields})

    def _start(self, item: dict, part: dict | None = None) -> int:
        self._close("completed")
        self.items.append(item)
        index = len(self.items) - 1
        self._event("response.output_item.added", output_index=index, item=_snapshot(item))
        if part is not None:
            self._open, self._text, self._lps = item, [], []
            self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part=dict(part))
        return index

    def _add_text(self, kind: str, text: str) -> None:
        if self._open is None or self._open["type"] != kind:
            if kind == "reasoning":
                self._start({"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                             "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
            else:
                self._start({"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                             "content": []}, {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        self._text.append(text)
        index = len(self.items) - 1
        if kind == "reasoning":
            self._event("response.reasoning_text.delta", item_id=self._open["id"], output_index=index,
                        content_index=0, delta=text)
        else:
            lps, self._pending = self._pending, []
            self._lps.extend(lps)
            self._event("response.output_text.delta", item_id=self._open["id"], output_index=index, content_index=0,
                        delta=text, logprobs=lps)

    def _open_call(self, tc) -> None:
        self._pending = []  # tokens before a call that wrote no text (whitespace)
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": tc.id or
                new_id("call"), "name": tc.name or "", "arguments": ""}
        self._calls[tc.index] = self._start(item)
        self._open = item

    def _add_args(self, index: int, fragment: str) -> None:
        item = self.items[index]
        item["arguments"] += fragment
        self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=fragment)

    def _close(self, status: str) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = self.items.index(item)
        item["status"] = status
        if item["type"] == "function_call":
            self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=item["name"], arguments=item["arguments"])
        else:
            text = "".join(self._text)
            if item["type"] == "message":
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": self._lps}
                self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=self._lps)
            else:
                part = {"type": "reasoning_text", "text": text}
                self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text)
            item["content"] = [part]
            self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=dict(part))
        self._event("response.output_item.done", output_index=index, item=_snapshot(item))
