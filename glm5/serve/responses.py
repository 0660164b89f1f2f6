"""OpenAI's Responses API (``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``) over the chat machinery.

This is a translation layer, not a second server: :func:`translate` turns the request into a
:class:`~glm5.serve.protocol.ChatCompletionRequest` (instructions -> system message, input items -> chat
messages, flat function tools -> chat tools, ``text.format`` -> ``response_format``, ``reasoning.effort`` ->
``enable_thinking``), :func:`prepare` is :func:`~glm5.serve.serving.prepare_chat` (rendering, context checks,
sampling parameters, tool-call and JSON grammars), and :class:`~glm5.serve.serving.Generation` runs it with the
same metrics, usage and disconnect handling. Only the output's shape is new: the GLM-5 parser's deltas
(reasoning / content / tool-call fragments) become output items (``reasoning``, ``message``, ``function_call``)
and, when streaming, the ``response.*`` events. The non-streaming response is built by the same
:class:`OutputBuilder` from the same deltas, so streamed and non-streamed results cannot disagree.

``store`` (default true, as OpenAI's) keeps the finished response and its conversation in a bounded in-memory
LRU (:class:`ResponseStore`); ``previous_response_id`` continues that conversation: the new prompt is the
stored conversation (without the old ``instructions``, which OpenAI does not carry over), the stored output as
the assistant turn, then the new input: the prompt a chat client would send with the same history.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from . import handlers
from .errors import APIError, bad_request, validation_error
from .protocol import ChatCompletionRequest
from .responses_protocol import (PASSTHROUGH, THINKING_OFF_EFFORTS, ResponsesRequest, chat_tool_choice, chat_tools,
                                 items_to_messages, not_found, param_of_chat, response_format)
from .serving import Generation, Prepared, ServerState, prepare_chat

log = logging.getLogger("glm5.serve")

#: Characters (JSON) the store may hold in all; the oldest responses go first past this or the item limit. Each
#: record holds its whole conversation, so a long chain costs O(turns^2): the bound is what keeps that finite.
MAX_STORE_CHARS = 256 << 20


# ================================================================================================ store
@dataclass
class StoredResponse:
    response: dict  # the response object, as GET returns it
    history: list[dict]  # chat messages of the conversation, output included, without instructions
    size: int


class ResponseStore:
    """Finished responses by id, least recently used evicted first (by count and by total JSON size). Touched
    only from the event loop, so it needs no lock."""

    def __init__(self, max_items: int, max_chars: int = MAX_STORE_CHARS):
        self.max_items = max(0, max_items)
        self.max_chars = max_chars
        self.chars = 0
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, response: dict, history: list[dict]) -> None:
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(history, ensure_ascii=False))
        if self.max_items == 0 or size > self.max_chars:
            log.warning("response %s not stored (%d characters; store limit %d)", response_id, size, self.max_chars)
            return
        self.delete(response_id)
        self._items[response_id] = StoredResponse(response, history, size)
        self.chars += size
        while len(self._items) > self.max_items or self.chars > self.max_chars:
            _, old = self._items.popitem(last=False)
            self.chars -= old.size

    def get(self, response_id: str) -> StoredResponse | None:
        rec = self._items.get(response_id)
        if rec is not None:
            self._items.move_to_end(response_id)
        return rec

    def delete(self, response_id: str) -> bool:
        rec = self._items.pop(response_id, None)
        if rec is not None:
            self.chars -= rec.size
        return rec is not None


# ========================================================================================== translation
@dataclass
class ResponseCall:
    """One Responses request, translated."""

    req: ResponsesRequest
    chat: ChatCompletionRequest
    response_id: str
    history: list[dict]  # the conversation before this turn's output, without instructions
    tools_echo: list[dict]
    created_at: int


def translate(state: ServerState, req: ResponsesRequest) -> ResponseCall:
    """The chat request that renders the same conversation; 400 / 404 for what cannot be translated."""
    if req.background:
        raise bad_request("background responses are not supported", param="background", code="unsupported_value")
    if req.top_logprobs:
        raise bad_request("top_logprobs is not supported on /v1/responses; use /v1/chat/completions",
                          param="top_logprobs", code="unsupported_value")
    history: list[dict] = []
    if req.previous_response_id is not None:
        rec = state.response_store.get(req.previous_response_id)
        if rec is None:
            raise not_found(req.previous_response_id, param="previous_response_id")
        history = list(rec.history)
    if isinstance(req.input, str):
        history.append({"role": "user", "content": req.input})
    elif req.input is not None:
        history.extend(items_to_messages(req.input))
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history
    if not messages:
        raise bad_request("input must not be empty", param="input")
    tools, tools_echo = chat_tools(req.tools)
    response_id = f"resp_{uuid.uuid4().hex}"
    body = {"model": req.model, "messages": messages, "max_completion_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "tools": tools,
            "tool_choice": chat_tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
            "response_format": response_format(req.text_format), "user": req.user, "request_id": response_id}
    extra = req.model_extra or {}
    body.update({k: extra[k] for k in PASSTHROUGH if k in extra})
    if req.effort is not None:  # GLM-5 thinks or does not: "none" / "minimal" off, any other effort on
        kwargs = body.get("chat_template_kwargs")
        body["chat_template_kwargs"] = {**(kwargs if isinstance(kwargs, dict) else {}),
                                        "enable_thinking": req.effort not in THINKING_OFF_EFFORTS}
    try:
        chat = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:  # named as the Responses request names the fields
        errors = [{**err, "loc": ("body", *(param_of_chat(".".join(map(str, err.get("loc", ())))) or "").split("."))}
                  for err in e.errors(include_url=False, include_context=False)]
        raise validation_error(RequestValidationError(errors)) from None
    return ResponseCall(req=req, chat=chat, response_id=response_id, history=history, tools_echo=tools_echo,
                        created_at=int(time.time()))


def prepare(state: ServerState, call: ResponseCall) -> Prepared:
    """:func:`prepare_chat`, its errors naming the Responses request's fields."""
    try:
        return prepare_chat(state, call.chat)
    except APIError as e:
        e.param = param_of_chat(e.param)
        raise


# =============================================================================================== output
def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _snapshot(item: dict) -> dict:
    """A copy for an event: the builder keeps changing the item it returns in the response."""
    return {**item, "content": list(item["content"])} if "content" in item else dict(item)


class OutputBuilder:
    """Parser deltas -> output items, and (``emit``) the stream events that build them. Items open when their
    kind of delta first arrives and close when another kind starts or the output ends: reasoning becomes a
    ``reasoning`` item (its text as ``reasoning_text`` content, no summary), answer text a ``message`` with one
    ``output_text`` part, each tool call a ``function_call`` (``call_id`` is the parser's call id)."""

    def __init__(self, emit: bool):
        self.emit = emit
        self.items: list[dict] = []
        self.events: list[dict] = []
        self._open: dict | None = None
        self._text: list[str] = []
        self._calls: dict[int, int] = {}  # parser call index -> output index

    def feed(self, deltas) -> None:
        for d in deltas:
            if d.reasoning_content is not None:
                self._add_text("reasoning", d.reasoning_content)
            elif d.content is not None:
                self._add_text("message", d.content)
            else:
                for tc in d.tool_calls or []:
                    if tc.index not in self._calls:
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
            self._open, self._text = item, []
            self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part=dict(part))
        return index

    def _add_text(self, kind: str, text: str) -> None:
        if self._open is None or self._open["type"] != kind:
            if kind == "reasoning":
                self._start({"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                             "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
            else:
                self._start({"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                             "content": []}, {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        self._text.append(text)
        index = len(self.items) - 1
        if kind == "reasoning":
            self._event("response.reasoning_text.delta", item_id=self._open["id"], output_index=index,
                        content_index=0, delta=text)
        else:
            self._event("response.output_text.delta", item_id=self._open["id"], output_index=index, content_index=0,
                        delta=text, logprobs=[])

    def _open_call(self, tc) -> None:
        item = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": tc.id or
                _new_id("call"), "name": tc.name or "", "arguments": ""}
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
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=[])
            else:
                part = {"type": "reasoning_text", "text": text}
                self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text)
            item["content"] = [part]
            self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=dict(part))
        self._event("response.output_item.done", output_index=index, item=_snapshot(item))


def _usage(gen: Generation) -> dict:
    u = gen.usage()
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": u["total_tokens"]}


def _status(gen: Generation) -> str:
    return "incomplete" if any(c.finish_reason == "length" for c in gen.choices.values()) else "completed"


def response_body(call: ResponseCall, gen: Generation, output: list[dict], status: str) -> dict:
    """The response object; the request's settings echoed as OpenAI echoes them (sampling values as used)."""
    req, params = call.req, gen.prep.params
    done = status in ("completed", "incomplete")
    text = {"format": req.text_format.echo()}
    if req.text is not None and req.text.verbosity is not None:
        text["verbosity"] = req.text.verbosity
    return {
        "id": call.response_id, "object": "response", "created_at": call.created_at, "status": status,
        "completed_at": int(time.time()) if done else None, "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls, "model": gen.prep.model, "output": output,
        "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.effort, "summary": req.reasoning.summary if req.reasoning else None},
        "service_tier": "default", "store": req.store, "temperature": params.temperature, "text": text,
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": call.tools_echo,
        "top_logprobs": req.top_logprobs, "top_p": params.top_p, "truncation": req.truncation or "disabled",
        "usage": _usage(gen) if done else None, "user": req.user, "metadata": req.metadata or {},
    }


def _deltas(gen: Generation, p: int, out) -> list:
    """The parser deltas of one engine output (the chat path's own feeding: same parser, same finish)."""
    return [d for deltas, _ in handlers._chat_choice_delta(gen, p, out).values() for d in deltas]


def _finish(state: ServerState, call: ResponseCall, gen: Generation, builder: OutputBuilder) -> dict:
    status = _status(gen)
    builder.finish("incomplete" if status == "incomplete" else "completed")
    body = response_body(call, gen, builder.items, status)
    if call.req.store and gen.outcome == "ok":
        # an empty output is still a turn: a chat client would send back {"role": "assistant", "content": ""}
        turn = items_to_messages(builder.items, "output") or [{"role": "assistant", "content": ""}]
        state.response_store.put(call.response_id, body, call.history + turn)
    return body


async def complete(state: ServerState, request: Request, gen: Generation, call: ResponseCall) -> JSONResponse:
    builder = OutputBuilder(emit=False)
    await handlers._collect(request, gen, lambda p, out: builder.feed(_deltas(gen, p, out)))
    return JSONResponse(_finish(state, call, gen, builder))


def _event_bytes(obj: dict) -> bytes:
    return (b"event: " + obj["type"].encode() + b"\ndata: "
            + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n")


async def _stream(state: ServerState, request: Request, gen: Generation, call: ResponseCall) -> AsyncIterator[bytes]:
    seq = 0

    def event(obj: dict) -> bytes:
        nonlocal seq
        obj["sequence_number"] = seq
        seq += 1
        return _event_bytes(obj)

    watcher = asyncio.create_task(handlers._watch_disconnect(request, gen))
    try:
        start = response_body(call, gen, [], "in_progress")
        yield event({"type": "response.created", "response": start})
        yield event({"type": "response.in_progress", "response": start})
        builder = OutputBuilder(emit=True)
        async for p, out in gen.events():
            builder.feed(_deltas(gen, p, out))
            for e in builder.drain():
                yield event(e)
        body = _finish(state, call, gen, builder)
        for e in builder.drain():
            yield event(e)
        yield event({"type": f"response.{body['status']}", "response": body})
    except (APIError, ValueError, RuntimeError) as e:
        if isinstance(e, APIError):
            err = e
        else:
            log.warning("stream %s failed: %s", call.response_id, e)
            err = APIError(500, str(e), code="engine_error") if isinstance(e, RuntimeError) \
                else bad_request(str(e))
        yield event({"type": "error", "code": err.code, "message": err.message, "param": err.param})
        failed = response_body(call, gen, [], "failed")
        failed["error"] = {"code": err.code, "message": err.message}
        yield event({"type": "response.failed", "response": failed})
    finally:
        watcher.cancel()
        if not gen.finished:
            await gen.abort()


def stream(state: ServerState, request: Request, gen: Generation, call: ResponseCall) -> StreamingResponse:
    return StreamingResponse(_stream(state, request, gen, call), media_type="text/event-stream",
                             headers=handlers.SSE_HEADERS)


# ============================================================================================ retrieval
def retrieve(state: ServerState, response_id: str) -> dict:
    rec = state.response_store.get(response_id)
    if rec is None:
        raise not_found(response_id)
    return rec.response


def delete(state: ServerState, response_id: str) -> dict:
    if not state.response_store.delete(response_id):
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
