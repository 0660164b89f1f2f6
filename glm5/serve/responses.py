"""OpenAI's Responses API (``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``,
``POST /v1/responses/{id}/cancel``, ``GET /v1/responses/{id}/input_items``) over the chat machinery.

This is a translation layer, not a second server: :func:`translate` turns the request into a
:class:`~glm5.serve.protocol.ChatCompletionRequest` (instructions -> system message, input items -> chat
messages, flat function tools -> chat tools, ``text.format`` -> ``response_format``, ``reasoning.effort`` ->
``enable_thinking``, ``include`` logprobs / ``top_logprobs`` -> ``logprobs``), :func:`prepare` is
:func:`~glm5.serve.serving.prepare_chat` (rendering, context checks, sampling parameters, tool-call and JSON
grammars; with ``truncation: "auto"`` it retries with the oldest turns dropped), and
:class:`~glm5.serve.serving.Generation` runs it with the same metrics, usage and disconnect handling. Only the
output's shape is new: the GLM-5 parser's deltas (reasoning / content / tool-call fragments) become output items
(``reasoning``, ``message``, ``function_call``) and, when streaming, the ``response.*`` events, both built by
:class:`~glm5.serve.responses_output.OutputBuilder`, so streamed and non-streamed results cannot disagree.

``store`` (default true, as OpenAI's) keeps the finished response and its conversation in a bounded in-memory
LRU (:class:`~glm5.serve.responses_store.ResponseStore`); ``previous_response_id`` continues that conversation:
the new prompt is the stored conversation (without the old ``instructions``, which OpenAI does not carry over),
the stored output as the assistant turn, then the new input: the prompt a chat client would send with the same
history.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from . import handlers
from .errors import APIError, bad_request, validation_error
from .protocol import ChatCompletionRequest
from .responses_output import OutputBuilder, TextTokens
from .responses_protocol import (LOGPROBS_INCLUDE, PASSTHROUGH, THINKING_OFF_EFFORTS, ResponsesRequest,
                                 chat_tool_choice, chat_tools, items_to_messages, not_found, param_of_chat,
                                 response_format)
from .responses_store import MAX_STORE_CHARS, ResponseStore, StoredResponse, conversation_items, list_page, shown
from .serving import Generation, Prepared, ServerState, prepare_chat

# the store is re-exported: app.py and callers built it from this module before it moved to responses_store
__all__ = ["MAX_STORE_CHARS", "ResponseStore", "StoredResponse", "translate", "prepare", "complete", "stream",
           "retrieve", "delete", "cancel", "input_items"]

log = logging.getLogger("glm5.serve")


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
    input_items: list[dict]  # the conversation as items with ids, for the input-items listing (when stored)


def translate(state: ServerState, req: ResponsesRequest) -> ResponseCall:
    """The chat request that renders the same conversation; 400 / 404 for what cannot be translated."""
    if req.background:
        raise bad_request("background responses are not supported", param="background", code="unsupported_value")
    history: list[dict] = []
    rec = None
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
            "tool_choice": chat_tool_choice(req.tool_choice),
            # one call allowed: a required / named tool grammar then ends the output after it, instead of the
            # model writing calls that would be dropped (the echo still shows the request's parallel_tool_calls)
            "parallel_tool_calls": req.parallel_tool_calls and req.max_tool_calls != 1,
            "response_format": response_format(req.text_format), "user": req.user, "request_id": response_id}
    if LOGPROBS_INCLUDE in (req.include or ()) or req.top_logprobs is not None:
        body.update(logprobs=True, top_logprobs=req.top_logprobs or 0)
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
                        created_at=int(time.time()),
                        input_items=conversation_items(rec, req.input) if req.store else [])


def _prepare(state: ServerState, chat: ChatCompletionRequest) -> Prepared:
    """:func:`prepare_chat`, its errors naming the Responses request's fields."""
    try:
        return prepare_chat(state, chat)
    except APIError as e:
        e.param = param_of_chat(e.param)
        raise


def prepare(state: ServerState, call: ResponseCall) -> Prepared:
    """The prepared request. When the conversation and ``max_output_tokens`` do not fit the context, prepare_chat's
    ``context_length_exceeded`` error stands with ``truncation: "disabled"`` (the default); with ``"auto"`` the
    oldest conversation messages are dropped until it fits (:func:`_truncated`)."""
    try:
        return _prepare(state, call.chat)
    except APIError as e:
        if e.code != "context_length_exceeded" or call.req.truncation != "auto":
            raise
        return _truncated(state, call, e)


def _truncated(state: ServerState, call: ResponseCall, error: APIError) -> Prepared:
    """``truncation: "auto"``: the prompt without the fewest oldest messages that makes it fit. System messages
    (instructions, system / developer items) and the newest user message with everything after it stay; the rest
    goes whole, oldest first, never leaving a tool result without the call before it. The fit test is
    prepare_chat itself (the only place that knows the rendered length and the limit), so it is searched by
    bisection on the number dropped: a few renders, not one per message. When even the kept part does not fit,
    the error is prepare_chat's for that prompt."""
    msgs = call.chat.messages
    keep_from = max((i for i, m in enumerate(msgs) if m.role == "user"), default=0)
    droppable = [i for i in range(keep_from) if msgs[i].role not in ("system", "developer")]
    cuts = [k for k in range(1, len(droppable) + 1) if k == len(droppable) or msgs[droppable[k]].role != "tool"]

    def attempt(k: int) -> Prepared | None:
        nonlocal error
        gone = set(droppable[:k])
        chat = call.chat.model_copy(update={"messages": [m for i, m in enumerate(msgs) if i not in gone]})
        try:
            return _prepare(state, chat)
        except APIError as e:
            if e.code != "context_length_exceeded":
                raise
            error = e
            return None

    best = attempt(cuts[-1]) if cuts else None
    if best is None:
        raise error
    lo, hi = -1, len(cuts) - 1  # dropping cuts[hi] messages fits; dropping cuts[lo] (or none, at -1) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        got = attempt(cuts[mid])
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    log.info("response %s: truncation dropped the %d oldest of %d messages", call.response_id, cuts[hi], len(msgs))
    return best


# =============================================================================================== output
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


def _output(state: ServerState, gen: Generation, call: ResponseCall, emit: bool):
    """(the builder, the function that feeds it one engine output). Each output goes through the chat path's own
    parser feeding (same parser, same finish); with logprobs asked for, the entries of answer-text tokens go along."""
    builder = OutputBuilder(emit, max_calls=call.req.max_tool_calls)
    tokens = TextTokens(state, gen.prep.opens_reasoning) if gen.prep.top_logprobs is not None else None

    def feed(p: int, out) -> None:
        per_choice = handlers._chat_choice_delta(gen, p, out)
        lps = []
        if tokens is not None:
            for comp in out.outputs:
                lps += tokens.select(comp.token_ids, per_choice[p * gen.n + comp.index][1])
        builder.feed([d for deltas, _ in per_choice.values() for d in deltas], lps)

    return builder, feed


def _finish(state: ServerState, call: ResponseCall, gen: Generation, builder: OutputBuilder) -> dict:
    status = _status(gen)
    builder.finish("incomplete" if status == "incomplete" else "completed")
    body = response_body(call, gen, builder.items, status)
    if call.req.store and gen.outcome == "ok":
        # an empty output is still a turn: a chat client would send back {"role": "assistant", "content": ""}
        turn = items_to_messages(builder.items, "output") or [{"role": "assistant", "content": ""}]
        state.response_store.put(call.response_id, body, call.history + turn, call.input_items)
    return body


async def complete(state: ServerState, request: Request, gen: Generation, call: ResponseCall) -> JSONResponse:
    builder, feed = _output(state, gen, call, emit=False)
    await handlers._collect(request, gen, feed)
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
        builder, feed = _output(state, gen, call, emit=True)
        async for p, out in gen.events():
            feed(p, out)
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
def read_include(query) -> set[str]:
    """A read's ``include`` (``GET /v1/responses/{id}`` and its ``input_items``), checked by the create request's
    own field validation, so a read accepts exactly what a create accepts (the documented values, at most as many)
    and refuses the rest with the create's 400 (``param: "include"``). The openai client sends the list as
    ``include[]=...``; a plain ``include=...`` (curl) counts too."""
    values = query.getlist("include") + query.getlist("include[]")
    try:
        ResponsesRequest.__pydantic_validator__.validate_assignment(ResponsesRequest.model_construct(), "include",
                                                                   values)
    except ValidationError as e:
        errors = [{**err, "loc": ("query", *err["loc"])} for err in e.errors(include_url=False, include_context=False)]
        raise validation_error(RequestValidationError(errors)) from None
    return set(values)


def _stored(state: ServerState, response_id: str) -> StoredResponse:
    rec = state.response_store.get(response_id)
    if rec is None:
        raise not_found(response_id)
    return rec


def retrieve(state: ServerState, response_id: str, query, *, stream: bool = False) -> dict:
    """``GET /v1/responses/{id}``. ``include`` is honoured as on create: ``output_text`` parts carry logprobs only
    when it asks for them. When it asks but the create did not (nothing stored), the lists stay empty: logprobs are
    a by-product of sampling and cannot be made afterwards, OpenAI documents no error for the case, and the empty
    list is the schema's "none"; the other documented values name data this server never writes, as on create.

    ``stream=true`` (with ``starting_after``) replays a response's events; OpenAI allows it only for background
    responses created with ``stream: true``. This server runs none in the background (create refuses
    ``background: true``), keeps no event log, and so refuses it with a 400 naming ``stream``, rather than a JSON
    body that a client expecting events would misread."""
    logprobs = LOGPROBS_INCLUDE in read_include(query)
    rec = _stored(state, response_id)
    if stream:
        raise bad_request("Only responses created with background=true and stream=true can be streamed on "
                          "retrieval; this server does not run background responses.", param="stream",
                          code="unsupported_value")
    return {**rec.response, "output": shown(rec.response.get("output", []), logprobs)}


def delete(state: ServerState, response_id: str) -> dict:
    if not state.response_store.delete(response_id):
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def cancel(state: ServerState, response_id: str) -> dict:
    """``POST /v1/responses/{id}/cancel``. OpenAI cancels only background responses; a foreground one is stopped
    by its client disconnecting (which aborts the generation here too). Every response this server knows is a
    finished foreground one, so a known id gets a 400 and stays as it was; an unknown one the 404 of the other
    routes."""
    _stored(state, response_id)
    raise bad_request(f"Response '{response_id}' was not created with background=true; only background responses "
                      "can be cancelled.", code=None)


def input_items(state: ServerState, response_id: str, query, *, limit: int, order: str, after: str | None) -> dict:
    """``GET /v1/responses/{id}/input_items``: a page of the stored response's input items (the whole
    ``previous_response_id`` chain's: :mod:`~glm5.serve.responses_store` says why). ``include`` as on
    :func:`retrieve`: the logprobs of earlier turns' output text only when it asks for them."""
    logprobs = LOGPROBS_INCLUDE in read_include(query)
    return list_page(_stored(state, response_id), limit=limit, order=order, after=after, logprobs=logprobs)
