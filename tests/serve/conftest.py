"""Fixtures for the server tests: a real (tiny, random-init) GLM-5 checkpoint with a tokenizer trained
here, served by the real engine through uvicorn on a loopback port.

Everything runs the real ``glm5.engine`` except the tests that say they inject faults, and the
parsing-path tests, which use :class:`ScriptedBackend`: the real engine too, with a test-only logits
processor that forces a known token sequence (a random model writes random text; the parser path needs
known text).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from glm5.config import preset
from glm5.model.transformer import GLM5ForCausalLM
from glm5.tokenizer import train_bpe
from mixed_text import make_corpus  # tests/mixed_text.py (tests/ is on sys.path: tests/conftest.py)

API_KEY = "test-key-0123456789"
MODEL_NAME = "glm5-nano-test"

def build_model_dir(path: Path, seed: int = 0) -> Path:
    tok = train_bpe(make_corpus(), vocab_size=800)
    cfg = preset("glm5-nano", vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                 eos_token_id=tok.eos_token_ids)
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(cfg).init_weights(seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("glm5_serve_model"))


class ServerThread:
    """uvicorn running ``app`` in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def make_app(model_dir, backend_cls=None, engine_kwargs=None, **settings_kwargs):
    from glm5.serve.app import create_app
    from glm5.serve.backend import EngineBackend
    from glm5.serve.settings import ServeSettings

    kw = dict(max_model_len=1024, max_num_seqs=16, seed=0)
    kw.update(engine_kwargs or {})
    backend = (backend_cls or EngineBackend).from_pretrained(str(model_dir), **kw)
    settings = ServeSettings(**{"served_model_names": [MODEL_NAME], **settings_kwargs})
    return create_app(backend, settings), backend


@pytest.fixture(scope="session")
def server(model_dir):
    """The shared server: real engine, API key required."""
    app, backend = make_app(model_dir, api_key=API_KEY)
    with ServerThread(app) as srv:
        srv.backend = backend
        yield srv


@pytest.fixture
def prompts(server, monkeypatch):
    """The prompt token ids of every engine request while the test runs."""
    seen: list[list[int]] = []
    original = server.backend.generate

    async def spy(request_id, prompt_token_ids, *args, **kwargs):
        seen.append(list(prompt_token_ids))
        async for out in original(request_id, prompt_token_ids, *args, **kwargs):
            yield out

    monkeypatch.setattr(server.backend, "generate", spy)
    return seen


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


# ------------------------------------------------------------------------------ test-only backend hook
from glm5.serve.backend import EngineBackend  # noqa: E402

#: Known model outputs for the parsing-path tests, selected by "SCRIPT:<name>" in the last user message.
SCRIPTS = {
    "reason": "The user greets me. I should greet back.</think>Hello! How can I help?<|user|>",
    "tool": ("I need the weather, so I call get_weather.</think><tool_call>get_weather<arg_key>location</arg_key>"
             "<arg_value>Beijing</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call><|observation|>"),
    "two_tools": ("Two calls.</think>Checking both.<tool_call>get_weather<arg_key>location</arg_key><arg_value>Paris"
                  "</arg_value><arg_key>days</arg_key><arg_value>1</arg_value></tool_call><tool_call>get_time"
                  "</tool_call><|observation|>"),
    "answer": "The tool said sunny.</think>It is sunny in Beijing, 18 degrees.<|user|>",
    "plain": "Just an answer, no thinking.<|user|>",
}


class ScriptedBackend(EngineBackend):
    """TEST-ONLY: the real engine (scheduler, cache, sampler, detokenizer, streaming) with one extra logits
    processor that forces the token sequence of ``SCRIPTS[name]`` when the prompt contains
    ``SCRIPT:name``. Used only by the parsing-path tests, because a random-init model writes random text."""

    async def generate(self, request_id, prompt_token_ids, params, logits_processors=None, **kw):
        prompt = self.tokenizer.decode(prompt_token_ids)
        found = re.findall(r"SCRIPT:(\w+)", prompt)
        name = found[-1] if found else None
        if name == "fail":  # a request whose logits turn to NaN: it must fail alone, the engine serving on
            def poison(out_ids, logits):
                return logits if len(out_ids) < 2 else torch.full_like(logits, float("nan"))

            logits_processors = list(logits_processors or []) + [poison]
        elif name in SCRIPTS:
            script = self.tokenizer.encode(SCRIPTS[name])

            def force(out_ids, logits, script=script):
                forced = script[len(out_ids)] if len(out_ids) < len(script) else script[-1]
                out = torch.full_like(logits, float("-inf"))
                out[forced] = 0.0
                return out

            logits_processors = list(logits_processors or []) + [force]
        async for out in super().generate(request_id, prompt_token_ids, params, logits_processors, **kw):
            yield out


@pytest.fixture(scope="session")
def scripted_server(model_dir):
    app, backend = make_app(model_dir, backend_cls=ScriptedBackend)
    with ServerThread(app) as srv:
        srv.backend = backend
        yield srv


@pytest.fixture(scope="session")
def scripted_client(scripted_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=scripted_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
