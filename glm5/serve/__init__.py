"""OpenAI-compatible HTTP server for GLM-5 (``glm5 serve``).

    from glm5.serve import create_app, ServeSettings, EngineBackend
    app = create_app(EngineBackend.from_pretrained("ckpt"), ServeSettings(served_model_names=["glm-5"]))

Files: protocol (request/response models), errors (OpenAI error shape), backend (what the server needs from
the engine + the AsyncLLM adapter), serving (request -> prompt/params/processors; generation state and
metrics), handlers (JSON and SSE responses), metrics (Prometheus), app (routes, auth, body limit),
webchat.html (the page at /), cli (``glm5 serve``). The grammars behind structured outputs and tool_choice live in
:mod:`glm5.structured`.
"""

from .settings import ServeSettings


def __getattr__(name):  # lazy: importing glm5.serve must not import FastAPI or the engine
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("EngineBackend", "Backend", "QueueFullError"):
        from . import backend

        return getattr(backend, name)
    raise AttributeError(name)


__all__ = ["Backend", "EngineBackend", "QueueFullError", "ServeSettings", "create_app"]
