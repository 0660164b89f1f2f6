"""Errors in OpenAI's shape, with the right status, and never a 500 for bad input."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from .conftest import API_KEY, MODEL_NAME, ServerThread, make_app

openai = pytest.importorskip("openai")

HI = [{"role": "user", "content": "hi"}]


def assert_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_missing_or_wrong_key_is_401(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + API_KEY},
                    {"Authorization": "Bearer " + API_KEY + "x"}):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI}, headers=headers)
        assert_error(r, 401, "invalid_api_key")
        assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": API_KEY}).status_code == 200
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=1)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    # open routes stay open
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=HI, max_tokens=1)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    assert_error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model_not_found", "model")
    assert_error(http.get("/v1/models/nope"), 404, "model_not_found")


@pytest.mark.parametrize("body,param", [
    ({"messages": HI, "temperature": 5}, "temperature"),
    ({"messages": HI, "temperature": "hot"}, "temperature"),
    ({"messages": HI, "n": 0}, "n"),
    ({"messages": HI, "n": 1000}, "n"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "max_tokens": 10**30}, "max_tokens"),
    ({"messages": HI, "seed": 2**70}, "seed"),
    ({"messages": HI, "top_logprobs": 3}, None),
    ({"messages": HI, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None),
    ({"messages": [{"role": "user"}]}, None),
    ({"messages": HI, "tools": []}, None),
    ({"messages": HI, "tool_choice": "required"}, None),
    ({"messages": HI, "tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]}, None),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, None),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ({"messages": HI, "stream_options": {"include_usage": True}}, None),
    ({"messages": HI, "stop": [""]}, "stop"),
    ({"messages": HI, "response_format": {"type": "xml"}}, None),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"messages": HI, "response_format": {"type": "json_object", "json_schema": {"schema": {}}}}, "response_format"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "^(a)\\1$"}}}}, "response_format.json_schema.schema"),  # a backreference
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "https://example.com/s.json"}}}}, "response_format.json_schema.schema"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format.json_schema.schema"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"]}}},
      "max_tokens": 5}, "max_tokens"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, None),
    ({"messages": HI, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": HI, "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"messages": HI, "stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"messages": HI, "repetition_penalty": 5e-324}, "repetition_penalty"),  # fp32 zero: NaN probabilities
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content"),
    ({"messages": HI + [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                             "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"messages": HI, "chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, None),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]}}}], "tool_choice": "required",
      "max_tokens": 2}, "max_tokens"),
    # vLLM's structured_outputs / guided_*: what the grammar cannot enforce is refused, never silently ignored
    ({"messages": HI, "structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs.structural_tag"),
    ({"messages": HI, "structured_outputs": {"structural_tag": "{oops"}}, "structured_outputs"),
    ({"messages": HI, "structured_outputs": {"structural_tag": {"triggers": [], "structures": [
        {"begin": "<a>", "schema": {}, "end": "</a>"}]}}}, "structured_outputs.structural_tag"),
    ({"messages": HI, "response_format": {"type": "structural_tag"}}, "response_format"),
    ({"messages": HI, "response_format": {"type": "json_object", "triggers": ["<"]}}, "response_format"),
    ({"messages": HI, "response_format": {"type": "structural_tag", "triggers": ["<a"], "structures": [
        {"begin": "<b>", "schema": {}, "end": "</b>"}]}}, "response_format"),  # a begin no trigger starts
    ({"messages": HI, "response_format": {"type": "structural_tag", "triggers": ["<a"], "structures": [
        {"begin": "<a>", "schema": {"type": "strin"}, "end": "</a>"}]}}, "response_format"),  # a bad schema
    ({"messages": HI, "response_format": {"type": "structural_tag", "format": {"type": "token", "token": "<x>"}}},
     "response_format"),
    ({"messages": HI, "structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs.grammar"),  # GBNF: "a"
    ({"messages": HI, "structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),  # undefined
    ({"messages": HI, "structured_outputs": {"grammar": "root ::= \"a\"", "regex": "a"}}, "structured_outputs"),
    ({"messages": HI, "structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
    ({"messages": HI, "structured_outputs": {"regex": "a(?=b)"}}, "structured_outputs.regex"),
    ({"messages": HI, "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"messages": HI, "structured_outputs": {"regex": "abcdef"}, "max_tokens": 3}, "max_tokens"),
    ({"messages": HI, "structured_outputs": {}}, "structured_outputs"),
    ({"messages": HI, "structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"messages": HI, "structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice.1"),
    ({"messages": HI, "structured_outputs": {"json": "{nope"}}, "structured_outputs"),
    ({"messages": HI, "structured_outputs": {"json": {"type": "string", "format": "uri"}}},
     "structured_outputs.json"),
    ({"messages": HI, "guided_regex": "(a"}, "structured_outputs.regex"),
    ({"messages": HI, "guided_regex": 5}, "guided_regex"),
    ({"messages": HI, "guided_regex": "a", "guided_choice": ["a"]}, None),
    ({"messages": HI, "guided_grammar": "root ::= root \"a\" | \"a\""}, "structured_outputs.grammar"),  # left rec.
    ({"messages": HI, "guided_grammar": ["root ::= \"a\""]}, "guided_grammar"),
    ({"messages": HI, "guided_choice": ["a"], "response_format": {"type": "json_object"}}, None),
    ({"messages": HI, "structured_outputs": {"choice": ["abcdef"]}, "max_tokens": 3}, "max_tokens"),
])
def test_invalid_chat_parameters_are_400(http, body, param):
    err = assert_error(http.post("/v1/chat/completions", json={"model": MODEL_NAME, **body}), 400, param=param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [
    {"messages": HI, "temperature": 0.7, "top_p": 5e-324},  # underflows to 0.0 in fp32: keeps the top token
    {"messages": HI, "temperature": 1e-5, "top_p": 1e-45},
    {"messages": HI, "temperature": 2.0, "top_k": 1},
])
def test_extreme_but_valid_sampling_parameters_are_served(http, body):
    # found by the schema fuzz test: a valid top_p of 5e-324 used to drop every token and answer 500
    r = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("body", [
    {"prompt": ""}, {"prompt": []}, {"prompt": [[]]}, {"prompt": [1, 10**6]}, {"prompt": "x", "suffix": "y"},
    {"prompt": "x", "best_of": 3}, {"prompt": "x", "echo": True, "logprobs": 21}, {"prompt": "x", "logprobs": 99},
    {"prompt": {"a": 1}}, {"prompt": [-1]},
])
def test_invalid_completion_parameters_are_400(http, body):
    assert_error(http.post("/v1/completions", json=body), 400)


def test_context_overflow_is_400(client, http):
    long = "the weather " * 600
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": long}], max_tokens=5)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "messages"
    err = assert_error(http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1020}), 400,
                       "context_length_exceeded", "max_tokens")
    assert "1024" in err["message"]
    assert_error(http.post("/v1/completions", json={"prompt": [5] * 1100, "max_tokens": 1}), 400,
                 "context_length_exceeded", "prompt")


def test_malformed_bodies_are_400(server, http):
    for data, ctype in ((b"{not json", "application/json"), (b"[1,2]", "application/json"), (b"null", "application/json"),
                        (b"\xff\xfe", "application/json"), (b"messages=x", "application/x-www-form-urlencoded"),
                        (b"", "application/json")):
        r = http.post("/v1/chat/completions", content=data, headers={"Content-Type": ctype})
        assert_error(r, 400)


def test_oversized_body_is_413(model_dir):
    app, _ = make_app(model_dir, max_request_bytes=2000)
    with ServerThread(app) as srv:
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        assert_error(httpx.post(srv.url + "/v1/chat/completions", json=big), 413, "request_too_large")

        def chunks():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b" " * 500
        r = httpx.post(srv.url + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert_error(r, 413, "request_too_large")
        ok = httpx.post(srv.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 1})
        assert ok.status_code == 200


def test_unknown_route_and_method(server, http):
    assert_error(http.get("/v1/nothing"), 404, "not_found")
    assert_error(http.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_queue_full_is_429(model_dir):
    """The server admits at most max_pending_requests generations; the next one gets 429 + Retry-After."""
    app, _ = make_app(model_dir, max_pending_requests=1)
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as h:
            long = {"messages": HI, "max_tokens": 400, "ignore_eos": True, "stream": True}
            with h.stream("POST", "/v1/chat/completions", json=long) as resp:
                lines = resp.iter_lines()
                next(lines)  # the first chunk: the request is in flight
                r = h.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1})
                err = assert_error(r, 429, "queue_full")
                assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
                c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    c.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1)
            # the stream closed early: its request is aborted and the slot comes back
            deadline = time.monotonic() + 20
            while True:
                r = h.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1})
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert r.status_code == 200


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_disconnect_aborts_and_frees_cache(model_dir):
    app, backend = make_app(model_dir)
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as h:
            body = {"messages": HI, "max_tokens": 900, "ignore_eos": True, "stream": True}
            with h.stream("POST", "/v1/chat/completions", json=body) as resp:
                lines = resp.iter_lines()
                for _ in range(8):
                    next(lines)
                m = h.get("/metrics").text
                assert _metric(m, "glm5_num_requests_running") == 1
                assert _metric(m, "glm5_kv_cache_usage_perc") > 0
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                m = h.get("/metrics").text
                if _metric(m, "glm5_num_requests_running") == 0 and _metric(m, "glm5_kv_cache_usage_perc") == 0:
                    break
                time.sleep(0.05)
            assert _metric(m, "glm5_num_requests_running") == 0
            assert _metric(m, "glm5_kv_cache_usage_perc") == 0
            assert _metric(m, "glm5_server_requests_in_flight") == 0
            assert backend.engine.num_unfinished_requests == 0
            assert _metric(m, "glm5_generation_tokens_total") < 900  # stopped early


def test_disconnect_of_non_streaming_request_aborts(model_dir):
    app, backend = make_app(model_dir)
    with ServerThread(app) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", timeout=0.5,
                       json={"messages": HI, "max_tokens": 900, "ignore_eos": True})
        deadline = time.monotonic() + 20
        while backend.engine.num_unfinished_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.engine.num_unfinished_requests == 0
        assert backend.engine.block_manager.usage == 0


# ------------------------------------------------------------------------------------------ fault injection
class _DeadBackend:
    """FAULT INJECTION: wraps the real backend and reports the engine as dead."""

    def __init__(self, inner):
        self.__dict__["inner"] = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    healthy = False


def test_dead_engine_is_503(model_dir):
    from glm5.serve.app import create_app
    from glm5.serve.backend import EngineBackend
    from glm5.serve.settings import ServeSettings

    backend = EngineBackend.from_pretrained(str(model_dir), max_model_len=256)
    app = create_app(_DeadBackend(backend), ServeSettings(served_model_names=[MODEL_NAME]))
    with ServerThread(app) as srv:
        assert_error(httpx.get(srv.url + "/health"), 503, "engine_unavailable")
        assert_error(httpx.post(srv.url + "/v1/chat/completions", json={"messages": HI}), 503, "engine_unavailable")


@pytest.mark.parametrize("route,body", [("chat/completions", {"messages": HI}), ("completions", {"prompt": "Hi"})])
def test_engine_failure_mid_stream_is_reported_in_stream(model_dir, route, body):
    """FAULT INJECTION: the engine raises after two outputs; the stream carries an error event (500,
    "engine_error", the same on both routes), then [DONE]."""
    from glm5.serve.backend import EngineBackend

    class Failing(EngineBackend):
        async def generate(self, *a, **k):
            n = 0
            async for out in super().generate(*a, **k):
                yield out
                n += 1
                if n == 2:
                    raise RuntimeError("injected engine failure")

    app, backend = make_app(model_dir, backend_cls=Failing)
    with ServerThread(app) as srv:
        r = httpx.post(f"{srv.url}/v1/{route}", timeout=30,
                       json={**body, "max_tokens": 50, "ignore_eos": True, "stream": True})
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert "injected engine failure" in err["message"] and err["code"] == "engine_error"
        r = httpx.post(f"{srv.url}/v1/{route}", timeout=30, json={**body, "max_tokens": 50, "ignore_eos": True})
        assert_error(r, 503, "engine_unavailable")
        deadline = time.monotonic() + 10
        while backend.engine.num_unfinished_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.engine.num_unfinished_requests == 0


def test_a_request_that_cannot_be_sampled_fails_alone(scripted_server, scripted_client):
    """Logits that turn to NaN mid-generation (forced here by a test processor on "SCRIPT:fail") end that
    request with a 500 "generation_failed" (an SSE error event when streaming); requests before, beside and
    after it are served: one bad request must not stop the engine (it used to: every later request got 503)."""
    import httpx

    fail = [{"role": "user", "content": "SCRIPT:fail"}]
    url = scripted_server.url + "/v1/chat/completions"
    r = httpx.post(url, json={"messages": fail, "max_tokens": 8}, timeout=60)
    err = assert_error(r, 500, "generation_failed")
    assert "non-finite" in err["message"] or "no usable logits" in err["message"]
    with httpx.stream("POST", url, json={"messages": fail, "max_tokens": 8, "stream": True}, timeout=60) as s:
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "generation_failed"
    from concurrent.futures import ThreadPoolExecutor

    body = {"messages": HI, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(4) as pool:  # failing requests batched with a good one
        futs = [pool.submit(httpx.post, url, json=b, timeout=60)
                for b in ({"messages": fail, "max_tokens": 8}, body, {"messages": fail, "max_tokens": 8})]
        rs = [f.result() for f in futs]
    assert [r.status_code for r in rs] == [500, 200, 500]
    assert rs[1].json()["choices"][0]["finish_reason"] == "length"
    ok = scripted_client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(scripted_server.url + "/health").status_code == 200


def test_deeply_nested_patterns_and_grammars_are_400s(http):
    """Nesting past Python's recursion limit was a RecursionError: a 500 for the regex, a reset connection for GBNF."""
    for field, value in (("guided_regex", "(" * 600 + "a" + ")" * 600),
                         ("guided_grammar", "root ::= " + "(" * 2000 + '"a"' + ")" * 2000)):
        resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", field: value, "max_tokens": 4})
        err = assert_error(resp, 400, param="structured_outputs." + field.split("_")[1])
        assert "nested deeper than 100" in err["message"]


def test_contradictory_constraints_are_the_requests_error(http):
    """A grammar that must end now and min_tokens that forbids ending leave nothing to sample: a 400 naming the
    conflict (found by the schema fuzz test, which used to get a 500), also as the stream's error event."""
    body = {"model": MODEL_NAME, "messages": HI, "max_tokens": 8, "min_tokens": 4,
            "structured_outputs": {"choice": ["a", "b"]}, "chat_template_kwargs": {"enable_thinking": False}}
    err = assert_error(http.post("/v1/chat/completions", json=body), 400, "conflicting_constraints")
    assert "min_tokens" in err["message"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "conflicting_constraints"
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 8,
                                           "guided_regex": "", "min_tokens": 1})
    assert_error(r, 400, "conflicting_constraints")
    ok = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 8,
                                            "guided_regex": "[ab]{2,12}", "min_tokens": 2, "seed": 0})
    assert ok.status_code == 200, ok.text  # no conflict: the grammar can honour min_tokens
