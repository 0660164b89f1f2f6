"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports goes through :class:`APIError` or one of the exception handlers
installed by :func:`install_error_handlers`, so clients (the ``openai`` SDK included) always get a body
they can parse. Status codes: 400 invalid input (schema failures too, not FastAPI's 422), 401 bad key,
404 unknown model or route, 405, 413 body too large, 429 queue full, 503 not ready, 500 only for a bug.
Validation messages are capped so a huge bad request cannot produce a huge error body.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("glm5.serve")

MAX_MESSAGE_CHARS = 2000

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error with its HTTP status and OpenAI fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message[:MAX_MESSAGE_CHARS]
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _loc_to_param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # drop pydantic's union-branch tags ("str", "list[...]", "function-after[...]") for readability
    parts = [p for p in parts if not (p.endswith("]") or p in ("str", "int", "float", "bool", "list"))]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    pieces, total = [], 0
    for e in errors[:5]:
        where = _loc_to_param(e.get("loc", ())) or "body"
        msg = str(e.get("msg", "invalid"))
        piece = f"{where}: {msg}"
        total += len(piece)
        pieces.append(piece[:400])
        if total > MAX_MESSAGE_CHARS:
            break
    more = f" (and {len(errors) - len(pieces)} more)" if len(errors) > len(pieces) else ""
    param = _loc_to_param(errors[0].get("loc", ())) if errors else None
    return APIError(400, "Invalid request: " + "; ".join(pieces) + more, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug: log it, answer in OpenAI shape
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"Internal server error: {type(exc).__name__}", code="internal_error").response()
