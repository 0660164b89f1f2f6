"""The two generation endpoints: non-streaming JSON and streaming SSE, for chat and text completions.

Streaming follows OpenAI's chunk format: a first chunk per choice with ``role``, then deltas
(``reasoning_content`` / ``content`` / ``tool_calls`` fragments, each with the logprobs of its step),
a last chunk per choice with ``finish_reason``, an optional usage chunk (``choices: []``) when
``stream_options.include_usage`` is set, and ``data: [DONE]``. An error after the stream started is sent
as ``data: {"error": ...}`` before ``[DONE]``. A client that goes away aborts its engine request(s).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from .errors import APIError
from .serving import Generation, ServerState, finite_logprob

log = logging.getLogger("glm5.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _stream_failure(rid: str, e: Exception) -> bytes:
    """The last event of a stream that failed after its 200 went out: the engine's error (500) or a bad value (400),
    in OpenAI's error object."""
    log.warning("stream %s failed: %s", rid, e)
    if isinstance(e, RuntimeError):
        return sse(APIError(500, str(e), code="engine_error").body())
    return sse(APIError(400, str(e), code="invalid_value").body())


async def _watch_disconnect(request: Request, gen: Generation) -> None:
    """Abort the generation when the client disconnects (works while the engine is silent too)."""
    try:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                if not gen.finished:
                    log.info("client disconnected; aborting %s", gen.prep.request_id)
                    gen.outcome = "client_disconnected"
                    await gen.abort()
                return
    except (asyncio.CancelledError, RuntimeError):
        return


async def _collect(request: Request, gen: Generation, on_output) -> None:
    watcher = asyncio.create_task(_watch_disconnect(request, gen))
    try:
        async for p, out in gen.events():
            on_output(p, out)
    finally:
        watcher.cancel()


# ================================================================================================ chat
def _chat_choice_delta(gen: Generation, p: int, out) -> dict[int, tuple[list, list]]:
    """Feed a delta output to the parsers; per choice (new parser deltas, new logprob entries)."""
    res = {}
    for comp in out.outputs:
        c = gen.choices[p * gen.n + comp.index]
        deltas = c.parser.feed(comp.text) if comp.text else []
        if comp.finish_reason is not None:
            deltas = deltas + c.parser.finish()
        lps = gen.chat_logprobs(comp.token_ids, comp.logprobs)
        c.logprobs.extend(lps)
        res[c.index] = (deltas, lps)
    return res


async def chat_completion(state: ServerState, request: Request, gen: Generation) -> JSONResponse:
    await _collect(request, gen, lambda p, out: _chat_choice_delta(gen, p, out))
    choices = []
    for c in gen.choices.values():
        r = c.parser.result()
        msg = {"role": "assistant", "content": r.content}
        if gen.prep.include_reasoning:
            msg["reasoning_content"] = r.reasoning_content
        if r.tool_calls:
            msg["tool_calls"] = [tc.to_openai() for tc in r.tool_calls]
        choices.append({
            "index": c.index, "message": msg,
            "logprobs": {"content": c.logprobs} if gen.prep.top_logprobs is not None else None,
            "finish_reason": gen.final_reason(c), "stop_reason": c.stop_reason,
        })
    body = {"id": gen.prep.request_id, "object": "chat.completion", "created": gen.created, "model": gen.prep.model,
            "choices": choices, "usage": gen.usage()}
    if gen.prep.extra.get("prompt_logprobs") is not None:  # vLLM extension: scores of the rendered prompt
        body["prompt_logprobs"] = gen.vllm_prompt_logprobs(0)
    return JSONResponse(body)


async def _chat_stream(state: ServerState, request: Request, gen: Generation, include_usage: bool,
                       continuous_usage: bool) -> AsyncIterator[bytes]:
    rid, model, created = gen.prep.request_id, gen.prep.model, gen.created

    def chunk(choices, usage=None):
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        elif continuous_usage:
            obj["usage"] = gen.usage()
        return sse(obj)

    watcher = asyncio.create_task(_watch_disconnect(request, gen))
    try:
        for c in gen.choices.values():
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for p, out in gen.events():
            for idx, (deltas, lps) in _chat_choice_delta(gen, p, out).items():
                c = gen.choices[idx]
                pending_lps = lps if lps else None
                for d in deltas:
                    if d.reasoning_content is not None and not gen.prep.include_reasoning:
                        continue
                    yield chunk([{"index": idx, "delta": d.to_openai(),
                                  "logprobs": {"content": pending_lps} if pending_lps else None,
                                  "finish_reason": None}])
                    pending_lps = None
                if pending_lps:
                    yield chunk([{"index": idx, "delta": {}, "logprobs": {"content": pending_lps},
                                  "finish_reason": None}])
                if c.finish_reason is not None and not c.finish_sent:
                    c.finish_sent = True
                    yield chunk([{"index": idx, "delta": {}, "logprobs": None,
                                  "finish_reason": gen.final_reason(c), "stop_reason": c.stop_reason}])
        if include_usage:
            yield chunk([], usage=gen.usage())
        yield SSE_DONE
    except APIError as e:
        yield sse(e.body())
        yield SSE_DONE
    except (ValueError, RuntimeError) as e:
        yield _stream_failure(rid, e)
        yield SSE_DONE
    finally:
        watcher.cancel()
        if not gen.finished:
            await gen.abort()


def chat_stream(state: ServerState, request: Request, gen: Generation, include_usage: bool,
                continuous_usage: bool) -> StreamingResponse:
    return StreamingResponse(_chat_stream(state, request, gen, include_usage, continuous_usage),
                             media_type="text/event-stream", headers=SSE_HEADERS)


# ========================================================================================= completions
def _lp_entry(gen: Generation, t: int, d: dict | None, k: int) -> tuple[str, float | None, dict | None]:
    """(token text, its logprob, top alternatives) in the legacy completions format; None where not scored."""
    s, _ = gen.state.token_text(t)
    if d is None:
        return s, None, None
    top = sorted(d.items(), key=lambda kv: -kv[1])[:k]
    return (s, finite_logprob(d.get(t, -math.inf)),
            {gen.state.token_text(j)[0]: finite_logprob(v) for j, v in top})


def _completion_logprobs(gen: Generation, ids: list[int], lps: list | None, offset: int) -> tuple[dict, int]:
    """Legacy ``logprobs`` object for ``ids``; ``lps`` entries may be None (the first prompt token with echo)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if lps is None:
        return out, offset
    k = gen.prep.top_logprobs or 0
    for t, d in zip(ids, lps):
        s, lp, top = _lp_entry(gen, t, d, k)
        out["tokens"].append(s)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(s)
    return out, offset


def _echo_prefix(gen: Generation, p: int) -> str:
    text = gen.prep.prompt_texts[p]
    return text if text is not None else gen.state.tokenizer.decode(gen.prep.prompts[p])


def _echo_logprobs(gen: Generation, p: int, prompt_logprobs: list) -> dict:
    """With echo and logprobs the choice's logprobs open with the prompt's tokens (the first one unscored)."""
    part, _ = _completion_logprobs(gen, gen.prep.prompts[p], prompt_logprobs, 0)
    return part


async def completion(state: ServerState, request: Request, gen: Generation) -> JSONResponse:
    echo = gen.prep.extra.get("echo")
    offsets: dict[int, int] = {}  # text_offset of the next token: the completion follows the echoed prompt
    lp_acc: dict[int, dict] = {}

    def on_output(p, out):
        for comp in out.outputs:
            c = gen.choices[p * gen.n + comp.index]
            c.text.append(comp.text)
            if gen.prep.top_logprobs is not None:
                acc = lp_acc.get(c.index)
                if acc is None:
                    acc = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                    if echo and out.prompt_logprobs is not None:
                        acc = _echo_logprobs(gen, p, out.prompt_logprobs)
                    lp_acc[c.index] = acc
                start = offsets[c.index] if c.index in offsets else len(_echo_prefix(gen, p)) if echo else 0
                part, offsets[c.index] = _completion_logprobs(gen, comp.token_ids, comp.logprobs, start)
                for key in acc:
                    acc[key].extend(part[key])

    await _collect(request, gen, on_output)
    choices = []
    for c in gen.choices.values():
        p = c.index // gen.n
        text = "".join(c.text)
        if echo:
            text = _echo_prefix(gen, p) + text
        choices.append({"index": c.index, "text": text, "logprobs": lp_acc.get(c.index) if gen.prep.top_logprobs
                        is not None else None, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        if gen.prep.extra.get("prompt_logprobs") is not None:  # vLLM extension
            choices[-1]["prompt_logprobs"] = gen.vllm_prompt_logprobs(p)
    body = {"id": gen.prep.request_id, "object": "text_completion", "created": gen.created, "model": gen.prep.model,
            "choices": choices, "usage": gen.usage()}
    return JSONResponse(body)


async def _completion_stream(state: ServerState, request: Request, gen: Generation, include_usage: bool,
                             continuous_usage: bool) -> AsyncIterator[bytes]:
    rid, model, created = gen.prep.request_id, gen.prep.model, gen.created
    offsets: dict[int, int] = {}

    def chunk(choices, usage=None):
        obj = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        elif continuous_usage:
            obj["usage"] = gen.usage()
        return sse(obj)

    watcher = asyncio.create_task(_watch_disconnect(request, gen))
    try:
        echo = gen.prep.extra.get("echo")
        scored = echo and gen.prep.top_logprobs is not None  # the echo chunk waits for the prompt's logprobs
        if echo and not scored:
            for c in gen.choices.values():
                yield chunk([{"index": c.index, "text": _echo_prefix(gen, c.index // gen.n), "logprobs": None,
                              "finish_reason": None}])
        async for p, out in gen.events():
            if scored and out.prompt_logprobs is not None:
                for c in gen.choices.values():
                    if c.index // gen.n == p:
                        yield chunk([{"index": c.index, "text": _echo_prefix(gen, p),
                                      "logprobs": _echo_logprobs(gen, p, out.prompt_logprobs), "finish_reason": None}])
                        offsets[c.index] = len(_echo_prefix(gen, p))
            for comp in out.outputs:
                c = gen.choices[p * gen.n + comp.index]
                lps = None
                if gen.prep.top_logprobs is not None and comp.token_ids:
                    lps, offsets[c.index] = _completion_logprobs(gen, comp.token_ids, comp.logprobs,
                                                                 offsets.get(c.index, 0))
                if comp.text or lps or comp.finish_reason is not None:
                    yield chunk([{"index": c.index, "text": comp.text, "logprobs": lps,
                                  "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}])
        if include_usage:
            yield chunk([], usage=gen.usage())
        yield SSE_DONE
    except APIError as e:
        yield sse(e.body())
        yield SSE_DONE
    except (ValueError, RuntimeError) as e:
        yield _stream_failure(rid, e)
        yield SSE_DONE
    finally:
        watcher.cancel()
        if not gen.finished:
            await gen.abort()


def completion_stream(state: ServerState, request: Request, gen: Generation, include_usage: bool,
                      continuous_usage: bool) -> StreamingResponse:
    return StreamingResponse(_completion_stream(state, request, gen, include_usage, continuous_usage),
                             media_type="text/event-stream", headers=SSE_HEADERS)
