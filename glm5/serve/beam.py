"""Beam search on ``/v1/completions`` and ``/v1/chat/completions`` (vLLM's ``use_beam_search``).

The search is :class:`glm5.engine.beam_search.BeamSearchState`, the one ``LLM.beam_search`` runs; here it is
driven over the server's asyncio :class:`~glm5.serve.backend.Backend`, so the engine keeps serving other
requests between (and beside) the steps. Each step submits every live beam as its own one-token greedy request
with ``2 × n`` log-probabilities, all at once, and awaits them; the prefix cache serves what earlier steps
computed. A beam finishes on an EOS id (the engine's: config.json, generation_config.json, tokenizer; not with
``ignore_eos``) or on one of ``stop_token_ids`` (chat adds the role tokens that end the assistant's turn, as
normal chat does); the finishing token is counted in ``usage`` but not part of the text. The final ranking is by
cumulative log-probability / length^``length_penalty``.

Request semantics (vLLM's): ``n`` is the beam width and the number of choices returned per prompt, best first;
``best_of`` may only equal ``n``; ``temperature`` / ``top_p`` / ``top_k`` / ``min_p`` / ``seed`` are ignored
(the steps are greedy). ``finish_reason`` is ``"stop"`` for a beam that ended on an EOS / stop token (whose id is
``stop_reason``), ``"length"`` otherwise. ``usage``: the prompt tokens once, completion tokens summed over the
returned choices. Chat: the beam's text goes through the same reasoning parser as a normal chat response
(``reasoning_content`` / ``content``; no tool-call parsing, since tools are refused). Refused with a 400:
``stream``, ``logprobs`` / ``top_logprobs`` / ``echo`` / ``prompt_logprobs``, output constraints
(``response_format`` / ``structured_outputs`` / ``guided_*``), ``tools``, stop strings (``stop``; use
``stop_token_ids``), and the logits-shaping fields that would change which beams win (``logit_bias``,
``bad_words``, the penalties, ``min_tokens``). A client that disconnects (or a server shutdown that cancels the
request) cancels the search, which aborts the step requests in flight.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from glm5.engine.beam_search import BeamSearchParams, BeamSearchState, step_params

from .backend import Backend
from .errors import APIError, bad_request
from .protocol import ChatCompletionRequest, CompletionRequest
from .serving import Generation, ServerState, prepare_chat, prepare_completion

log = logging.getLogger("glm5.serve")


def check_request(req: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for what cannot be combined with ``use_beam_search``."""
    chat = isinstance(req, ChatCompletionRequest)

    def refuse(what: str, param: str):
        raise bad_request(f"{what} cannot be combined with use_beam_search", param=param)

    if req.stream:
        raise bad_request("use_beam_search does not support stream: true (the beams are only known at the end); "
                          "send stream: false", param="stream")
    if chat and (req.logprobs or req.top_logprobs):
        refuse("logprobs / top_logprobs", "logprobs")
    if not chat and req.logprobs is not None:
        refuse("logprobs", "logprobs")
    if not chat and req.echo:
        refuse("echo", "echo")
    if req.prompt_logprobs is not None:
        refuse("prompt_logprobs", "prompt_logprobs")
    if req.output_constraint is not None:
        rf = req.response_format is not None and req.response_format.type != "text"
        refuse("response_format / structured_outputs (constrained decoding)",
               "response_format" if rf else "structured_outputs")
    if chat and (req.tools or req.tool_choice not in (None, "none")):
        refuse("tools / tool_choice", "tools")
    if req.stop_list:
        raise bad_request("stop strings are not supported with use_beam_search; use stop_token_ids", param="stop")
    shaping = {"logit_bias": bool(req.logit_bias), "bad_words": bool(req.bad_words),
               "presence_penalty": req.presence_penalty != 0.0, "frequency_penalty": req.frequency_penalty != 0.0,
               "repetition_penalty": req.repetition_penalty != 1.0, "min_tokens": req.min_tokens > 0}
    for name, given in shaping.items():
        if given:
            refuse(name, name)


async def serve(state: ServerState, request: Request, req: ChatCompletionRequest | CompletionRequest,
                arrival: float) -> Response:
    """The whole beam-search request: checks, prompt preparation (as for normal requests), search, response."""
    chat = isinstance(req, ChatCompletionRequest)
    check_request(req)
    prep = prepare_chat(state, req) if chat else prepare_completion(state, req)
    state.admit()
    gen = Generation(state, prep, "chat" if chat else "completions", chat=chat, arrival=arrival)
    params = BeamSearchParams(beam_width=req.n, max_tokens=prep.params.max_tokens, ignore_eos=req.ignore_eos,
                              length_penalty=req.length_penalty)
    eos = state.backend.eos_ids
    searches = [BeamSearchState(ids, params, eos, prep.params.stop_token_ids) for ids in prep.prompts]
    with gen.tracked():
        cached = await _watched(request, gen, gather_or_cancel(
            [search_async(state.backend, rid, s, prep.priority) for rid, s in zip(gen.engine_ids, searches)]))
        if cached is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        gen.cached_tokens = sum(cached)
        texts = _fill_choices(gen, searches, req.skip_special_tokens)
        gen.finished = True
    return JSONResponse(_chat_body(gen, texts) if chat else _completion_body(gen, texts))


# ============================================================================================= searching
async def search_async(backend: Backend, request_id: str, search: BeamSearchState, priority: int = 0) -> int:
    """Runs ``search`` to the end over ``backend``; returns the prompt tokens the first step found cached."""
    sp = step_params(search.params.beam_width)
    cached = 0
    while search.running:
        step = search.steps
        got = await gather_or_cancel([_one_token(backend, f"{request_id}-beam{step}.{i}", b.tokens, sp, priority)
                                      for i, b in enumerate(search.live)])
        if step == 0:
            cached = got[0][1]
        search.advance([top for top, _ in got])
    return cached


async def _one_token(backend: Backend, rid: str, tokens: list[int], sp, priority: int) -> tuple[dict[int, float], int]:
    """({token: logprob} of the top continuations of ``tokens``, prompt tokens served from the cache)."""
    agen = backend.generate(rid, tokens, sp, None, priority=priority)
    top, cached = None, 0
    try:
        async for out in agen:
            cached = max(cached, getattr(out, "num_cached_tokens", 0) or 0)
            c = out.outputs[0]
            if c.logprobs:
                top = dict(c.logprobs[0])
            if c.finish_reason == "error":
                raise APIError(500, f"Generation failed: {c.stop_reason}", code="generation_failed")
            if c.finish_reason == "abort":
                raise APIError(503, "a beam search step was aborted by the engine", code="aborted")
    finally:
        await agen.aclose()  # aborts the step request if it did not finish
    if not top:
        raise RuntimeError(f"beam search step {rid} returned no log-probabilities")
    return top, cached


async def gather_or_cancel(coros: list) -> list:
    """``asyncio.gather`` that, when one fails or the caller is cancelled, cancels the others and waits for them
    (so their engine requests are aborted before this returns)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _until_disconnect(request: Request) -> bool:
    """True once the client disconnects; False if the connection cannot tell."""
    try:
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return True
    except RuntimeError:
        return False


async def _watched(request: Request, gen: Generation, coro):
    """The result of ``coro``, or None when the client disconnected first (``coro`` is then cancelled)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.result():
            log.info("client disconnected; cancelling beam search %s", gen.prep.request_id)
            gen.outcome = "client_disconnected"
            return None
        return await task
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# ============================================================================================= responses
def _fill_choices(gen: Generation, searches: list[BeamSearchState], skip_special: bool) -> dict[int, str]:
    """Each prompt's ranked beams become its choices (best first); returns each choice's text."""
    tok = gen.state.tokenizer
    texts: dict[int, str] = {}
    for p, s in enumerate(searches):
        ranked = s.ranked()
        for i in range(gen.n):
            idx = p * gen.n + i
            if i >= len(ranked):  # fewer beams than n (a vocabulary smaller than 2n)
                gen.choices.pop(idx, None)
                continue
            b, c = ranked[i], gen.choices[idx]
            c.token_ids = b.tokens[s.prompt_len:]
            gen._count_reasoning(c, c.token_ids)
            c.finish_reason = "stop" if b.finished else "length"
            c.stop_reason = b.tokens[-1] if b.finished else None
            texts[idx] = tok.decode(s.output_ids(b), skip_special_tokens=skip_special)
    return texts


def _chat_body(gen: Generation, texts: dict[int, str]) -> dict:
    choices = []
    for idx, c in gen.choices.items():
        c.parser.feed(texts[idx])
        c.parser.finish()
        r = c.parser.result()
        msg = {"role": "assistant", "content": r.content}
        if gen.prep.include_reasoning:
            msg["reasoning_content"] = r.reasoning_content
        choices.append({"index": idx, "message": msg, "logprobs": None, "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
    return {"id": gen.prep.request_id, "object": "chat.completion", "created": gen.created, "model": gen.prep.model,
            "choices": choices, "usage": gen.usage()}


def _completion_body(gen: Generation, texts: dict[int, str]) -> dict:
    choices = [{"index": idx, "text": texts[idx], "logprobs": None, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason} for idx, c in gen.choices.items()]
    return {"id": gen.prep.request_id, "object": "text_completion", "created": gen.created, "model": gen.prep.model,
            "choices": choices, "usage": gen.usage()}
