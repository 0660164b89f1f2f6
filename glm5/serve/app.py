"""``create_app(backend, settings)``: the FastAPI application.

Routes: ``GET /`` (web chat), ``GET /health``, ``GET /metrics``, ``GET /version``, ``GET /v1/models``,
``GET /v1/models/{model}``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``
(with ``GET`` / ``DELETE /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel`` and
``GET /v1/responses/{id}/input_items``: :mod:`glm5.serve.responses`), ``POST /tokenize``, ``POST /detokenize``;
the OpenAPI schema at ``/openapi.json`` (``/docs`` renders it). With ``AdminOptions`` (``--enable-sleep-mode``,
``--enable-weight-updates``; off by default) also the RL trainer's routes of :mod:`glm5.serve.admin`: ``/sleep``,
``/wake_up``, ``/is_sleeping``, ``/reset_prefix_cache``, ``/update_weights_from_disk``.

With ``settings.api_key`` the ``/v1/*`` and tokenizer routes need ``Authorization: Bearer KEY`` (or
``x-api-key: KEY``), compared in constant time (the admin routes too); health, metrics and the page stay open (the page asks for
the key and sends it). Bodies over ``settings.max_request_bytes`` get 413 before they are parsed.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from . import admin, beam, handlers, responses
from .backend import Backend
from .errors import APIError, install_error_handlers
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       ErrorResponse, HealthResponse, ModelCard, ModelList)
from .responses_protocol import ResponsesRequest
from .serving import Generation, ServerState, prepare_chat, prepare_completion
from .settings import ServeSettings

log = logging.getLogger("glm5.serve")

VERSION = "0.1.0"

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
_KNOWN_PATHS = {"/", "/health", "/metrics", "/version", "/v1/models", "/v1/chat/completions", "/v1/completions",
                "/v1/responses", "/tokenize", "/detokenize", "/openapi.json", "/docs"}


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes (by Content-Length, or counted while reading a chunked body),
    and per-route HTTP request counters."""

    def __init__(self, app, limit: int, state_getter):
        self.app = app
        self.limit = limit
        self.state_getter = state_getter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            length = None
            for k, v in scope.get("headers", []):
                if k == b"content-length":
                    try:
                        length = int(v)
                    except ValueError:
                        length = -1
            if length is not None and (length > self.limit or length < 0):
                return await self._reject(send_wrapper, length)
            if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
                body, more = bytearray(), True
                first_extra = None
                while more:
                    msg = await receive()
                    if msg["type"] != "http.request":
                        first_extra = msg
                        break
                    body += msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if len(body) > self.limit:
                        return await self._reject(send_wrapper, len(body))
                replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]
                if first_extra is not None:
                    replay.append(first_extra)

                async def receive_replay():
                    return replay.pop(0) if replay else await receive()

                return await self.app(scope, receive_replay, send_wrapper)
            return await self.app(scope, receive, send_wrapper)
        finally:
            state = self.state_getter()
            if state is not None:
                state.metrics.http_requests.inc(1, scope.get("method", ""), _path_label(scope),
                                                str(status_holder["status"]))

    async def _reject(self, send, length: int):
        err = APIError(413, f"Request body too large ({length} bytes; the limit is {self.limit}).",
                       code="request_too_large")
        resp = err.response()
        await resp({"type": "http"}, _empty_receive, send)


def _path_label(scope) -> str:
    """The ``path`` label of the request counter: the template of the route that handled the request (the router
    leaves it in the scope), never the raw path, whose ids would make one series per response. Requests no route
    took (a 413 here, before routing; an unknown path) keep a known fixed path or become ``other``, so the label's
    values are bounded by the routes."""
    template = getattr(scope.get("route"), "path_format", None)
    if isinstance(template, str) and template:
        return template
    path = scope.get("path", "")
    return path if path in _KNOWN_PATHS else "other"


async def _empty_receive():
    return {"type": "http.disconnect"}


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = Field(None, description="text to tokenize (or give messages)")
    messages: list[dict[str, Any]] | None = Field(None, max_length=4096)
    add_generation_prompt: bool = True
    enable_thinking: bool | None = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**63 - 1)]] = Field(max_length=1_000_000)


def create_app(backend: Backend, settings: ServeSettings | None = None,
               admin_options: admin.AdminOptions | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    admin_options = admin_options or admin.AdminOptions()
    holder: dict[str, ServerState] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.shutdown()

    app = FastAPI(title="GLM-5 OpenAI-compatible server", version=VERSION, lifespan=lifespan,
                  description="OpenAI-compatible chat and text completions over the glm5 engine.")
    state = ServerState(backend, settings)
    state.response_store = responses.ResponseStore(settings.max_stored_responses)
    holder["state"] = state
    app.state.serve = state
    control = admin.Admin(state, admin_options) if admin_options.any else None
    app.state.admin = control
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes, state_getter=lambda: holder.get("state"))

    key = settings.api_key.encode("utf-8") if settings.api_key else None

    async def require_key(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), key):
            raise APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)]
    if control is not None:
        admin.install(app, control, auth)

    def gate() -> None:
        """503 while the engine cannot serve (asleep, loading weights): glm5/serve/admin.py. Called at the top of a
        generation route and again right before ``state.admit()``, with no await between it and the admission."""
        if control is not None:
            control.check_open()

    def admitted(gen: Generation) -> Generation:
        if control is not None:
            control.track(gen)  # counted as in flight from now, before a stream's body starts
        return gen

    # ------------------------------------------------------------------------------------- plain routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def webchat():
        if not settings.enable_webchat:
            raise APIError(404, "The web chat is disabled.", code="not_found")
        return HTMLResponse(_webchat_html(), headers={"Cache-Control": "no-cache"})

    @app.get("/health", response_model=HealthResponse, response_model_exclude_none=True,
             responses={503: {"model": ErrorResponse}})
    async def health():
        # asleep or loading weights is still 200, as in vLLM: the process is alive and a restart would not help;
        # "status" (and "is_sleeping") tell a load balancer that reads the body not to send generation requests
        if not backend.healthy:
            raise APIError(503, "The engine is not available.", code="engine_unavailable")
        if control is None:
            return {"status": "ok", "model": settings.model_name}
        sleeping = control.engine.is_sleeping() if admin_options.sleep_mode else None
        return {"status": control.status(), "model": settings.model_name, "is_sleeping": sleeping}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(state.metrics.render(backend.stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version():
        # weight_version: weights loaded by POST /update_weights_from_disk since the start (0: the --model ones)
        return {"version": VERSION, "weight_version": control.weight_version if control is not None else 0}

    def card(name: str) -> dict:
        return ModelCard(id=name, root=backend.model_path or name, max_model_len=backend.max_model_len).model_dump()

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses=_ERRORS)
    async def list_models():
        return {"object": "list", "data": [card(n) for n in settings.served_model_names]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard, dependencies=auth, responses=_ERRORS)
    async def get_model(model: str):
        state.check_model(model)
        return card(model)

    @app.post("/tokenize", dependencies=auth, responses=_ERRORS)
    async def tokenize(req: TokenizeRequest):
        state.check_model(req.model)
        tok = backend.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt", code="invalid_value")
        if req.prompt is not None:
            text = req.prompt
        else:
            try:
                text = tok.apply_chat_template(req.messages, add_generation_prompt=req.add_generation_prompt,
                                               enable_thinking=req.enable_thinking)
            except Exception as e:  # bad messages are the client's fault
                raise APIError(400, f"cannot render the conversation: {e}", param="messages",
                               code="invalid_value") from None
        ids = tok.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": backend.max_model_len, "prompt": text}

    @app.post("/detokenize", dependencies=auth, responses=_ERRORS)
    async def detokenize(req: DetokenizeRequest):
        state.check_model(req.model)
        if any(t >= backend.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be below {backend.vocab_size}", param="tokens", code="invalid_value")
        return {"prompt": backend.tokenizer.decode(req.tokens)}

    # -------------------------------------------------------------------------------- generation routes
    # one server-sent event: ``data`` is a JSON chunk (or ``[DONE]``)
    _sse_event = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                                   "id": {"type": "string"}, "retry": {"type": "integer"}}}
    _stream_doc = {200: {"description": "a JSON body, or with ``stream: true`` server-sent events",
                         "content": {"text/event-stream": {"schema": _sse_event}}}}

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=auth,
              responses={**_stream_doc, **_ERRORS})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        arrival = time.monotonic()
        gate()  # beam search admits with no await after this
        if req.use_beam_search:
            return await _run(beam.serve(state, request, req, arrival))
        # a grammar (the vocabulary trie once, then each new schema / regex / GBNF) can take a second to compile:
        # off the event loop, so that other requests keep streaming
        prep = await asyncio.to_thread(prepare_chat, state, req) if _needs_grammar(req) else prepare_chat(state, req)
        gate()
        state.admit()
        gen = admitted(Generation(state, prep, "chat", chat=True, arrival=arrival))
        if req.stream:
            return handlers.chat_stream(state, request, gen, req.include_usage, req.continuous_usage)
        return await _run(handlers.chat_completion(state, request, gen))

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=auth,
              responses={**_stream_doc, **_ERRORS})
    async def completions(req: CompletionRequest, request: Request):
        arrival = time.monotonic()
        gate()  # beam search admits with no await after this
        if req.use_beam_search:
            return await _run(beam.serve(state, request, req, arrival))
        prep = (await asyncio.to_thread(prepare_completion, state, req) if _needs_grammar(req)
                else prepare_completion(state, req))
        gate()
        state.admit()
        gen = admitted(Generation(state, prep, "completions", chat=False, arrival=arrival))
        if req.stream:
            return handlers.completion_stream(state, request, gen, req.include_usage, req.continuous_usage)
        return await _run(handlers.completion(state, request, gen))

    @app.post("/v1/responses", dependencies=auth, responses={**_stream_doc, **_ERRORS})
    async def create_response(req: ResponsesRequest, request: Request):
        """OpenAI's Responses API: the chat path above with Responses-shaped input and output."""
        arrival = time.monotonic()
        gate()
        call = responses.translate(state, req)
        # truncation "auto" may render the conversation a few times: off the event loop too
        prep = (await asyncio.to_thread(responses.prepare, state, call)
                if _needs_grammar(call.chat) or req.truncation == "auto" else responses.prepare(state, call))
        gate()
        state.admit()
        gen = admitted(Generation(state, prep, "responses", chat=True, arrival=arrival))
        if req.stream:
            return responses.stream(state, request, gen, call)
        return await _run(responses.complete(state, request, gen, call))

    @app.get("/v1/responses/{response_id}", dependencies=auth, responses=_ERRORS)
    async def get_response(response_id: str, request: Request, stream: bool = False,
                           starting_after: int | None = Query(None, ge=0), include_obfuscation: bool = True):
        # starting_after / include_obfuscation only shape a stream (refused here): typed so bad values are 400s
        return responses.retrieve(state, response_id, request.query_params, stream=stream)

    @app.get("/v1/responses/{response_id}/input_items", dependencies=auth, responses=_ERRORS)
    async def list_input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                               order: Literal["asc", "desc"] = "desc", after: str | None = None):
        return responses.input_items(state, response_id, request.query_params, limit=limit, order=order,
                                     after=after)

    @app.delete("/v1/responses/{response_id}", dependencies=auth, responses=_ERRORS)
    async def delete_response(response_id: str):
        return responses.delete(state, response_id)

    @app.post("/v1/responses/{response_id}/cancel", dependencies=auth, responses=_ERRORS)
    async def cancel_response(response_id: str):
        return responses.cancel(state, response_id)

    return app


def _needs_grammar(req: ChatCompletionRequest | CompletionRequest) -> bool:
    tc = getattr(req, "tool_choice", None)
    strict = any(t.function.strict for t in getattr(req, "tools", None) or []) and tc in (None, "auto")
    return (req.output_constraint is not None or tc == "required" or (tc is not None and not isinstance(tc, str))
            or strict)


async def _run(coro) -> JSONResponse:
    """Engine-side request errors are the request's (400); a dead engine is 503."""
    try:
        return await coro
    except APIError:
        raise
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    except RuntimeError as e:
        log.error("engine failure: %s", e)
        raise APIError(503, f"The engine failed: {e}", code="engine_unavailable") from None


_HTML_CACHE: dict[str, str] = {}


def _webchat_html() -> str:
    if "page" not in _HTML_CACHE:
        try:
            _HTML_CACHE["page"] = importlib.resources.files("glm5.serve").joinpath("webchat.html").read_text("utf-8")
        except (FileNotFoundError, ModuleNotFoundError):  # not packaged: read it next to this file
            _HTML_CACHE["page"] = (Path(__file__).parent / "webchat.html").read_text("utf-8")
    return _HTML_CACHE["page"]
