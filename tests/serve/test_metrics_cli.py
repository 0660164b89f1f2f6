"""/metrics (Prometheus text format), /health, OpenAPI, and the ``glm5 serve`` command."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import MODEL_NAME

_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? -?[0-9.e+\-]+|[+-]Inf$')


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")) or not line, line
            continue
        assert _LINE.match(line), line
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def test_metrics_after_traffic(server, http, client):
    before = parse_metrics(http.get("/metrics").text)
    client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                   extra_body={"ignore_eos": True})
    list(client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                        stream=True, extra_body={"ignore_eos": True}))
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m = parse_metrics(r.text)
    gen = "glm5_generation_tokens_total"
    assert m[gen] - before.get(gen, 0) == 12
    assert m["glm5_prompt_tokens_total"] > before.get("glm5_prompt_tokens_total", 0)
    assert m["glm5_time_to_first_token_seconds_count"] >= before.get("glm5_time_to_first_token_seconds_count", 0) + 2
    assert m["glm5_inter_token_latency_seconds_count"] >= before.get("glm5_inter_token_latency_seconds_count", 0) + 10
    assert m['glm5_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["glm5_time_to_first_token_seconds_count"]
    assert m['glm5_requests_total{endpoint="chat",outcome="ok"}'] >= 2
    assert m['glm5_request_success_total{finished_reason="length"}'] >= 2
    out_cost = m['glm5_cost_usd_total{kind="output"}'] - before.get('glm5_cost_usd_total{kind="output"}', 0)
    assert out_cost == pytest.approx(12 * 3.2 / 1e6)
    for name in ("glm5_num_requests_running", "glm5_num_requests_waiting", "glm5_kv_cache_usage_perc",
                 "glm5_spec_decode_acceptance_rate", "glm5_spec_decode_num_draft_tokens_total",
                 "glm5_server_requests_in_flight", "glm5_e2e_request_latency_seconds_sum"):
        assert name in m
    assert m["glm5_num_requests_running"] == 0 and m["glm5_server_requests_in_flight"] == 0
    assert any(k.startswith('glm5_http_requests_total{method="POST",path="/v1/chat/completions",status="200"}')
               for k in m)


def test_health_version_openapi(server, http):
    assert http.get("/health").json() == {"status": "ok", "model": MODEL_NAME}
    assert "version" in http.get("/version").json()
    schema = http.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"):
        assert path in schema["paths"]
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert http.get("/docs").status_code == 200


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "hello world"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "hello world"


def test_cli_parser_registered():
    from glm5.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "--model", "/x", "--api-key", "k", "--served-model-name", "a",
                                             "b", "--price-output", "4"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.served_model_name == ["a", "b"]
    from glm5.serve.cli import settings_from_args

    s = settings_from_args(args)
    assert s.api_key == "k" and s.served_model_names == ["a", "b"] and s.price_output_per_million == 4.0
    unnamed = build_parser("serve").parse_args(["serve", "--model", "runs/x/hf"])
    assert settings_from_args(unnamed).served_model_names == ["runs/x/hf"]  # as vLLM: the --model argument
    # generate, chat and serve take the same spelling of the draft count (vLLM's long name or the short one)
    for flag in ("--spec-tokens", "--num-speculative-tokens"):
        assert build_parser("serve").parse_args(["serve", "--model", "/x", flag, "3"]).num_speculative_tokens == 3
        for cmd in ("generate", "chat"):
            extra = ["--prompt", "p"] if cmd == "generate" else []
            assert build_parser(cmd).parse_args([cmd, "--model", "/x", flag, "3", *extra]).spec_tokens == 3
    for cmd, extra in (("serve", []), ("generate", ["--prompt", "p"]), ("chat", [])):
        assert build_parser(cmd).parse_args([cmd, "--model", "/x", "--spec-stop-gap", "0.1", *extra]).spec_stop_gap == 0.1


def test_glm5_serve_command_end_to_end(model_dir):
    """``glm5 serve`` in a subprocess (with an FP8 KV cache): starts, answers with the key, shuts down on SIGINT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLM5_API_KEY": "cli-key", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "glm5.cli", "serve", "--model", str(model_dir), "--port", str(port),
                             "--served-model-name", "cli-model", "--max-model-len", "512", "--log-level", "warning",
                             "--kv-cache-dtype", "fp8"],  # the FP8 cache through the CLI's engine arguments
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("server did not start: " + proc.stdout.read().decode(errors="replace")[-2000:])
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer cli-key"}, timeout=30,
                       json={"model": "cli-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == "cli-model"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_speculative_decoding_metrics_and_constrained_requests(model_dir):
    """With MTP speculation on, chat works and the draft counters move; requests that need logits processors
    (json_object, tool_choice none) still work: their sequences decode without drafts."""
    import json

    from .conftest import ServerThread, make_app

    openai = pytest.importorskip("openai")
    app, _ = make_app(model_dir, engine_kwargs={"num_speculative_tokens": 2}, served_model_names=["zai-org/GLM-5"])
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert c.models.retrieve("zai-org/GLM-5").id == "zai-org/GLM-5"  # names with a slash
        r = c.chat.completions.create(model="zai-org/GLM-5", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 20
        m = parse_metrics(httpx.get(srv.url + "/metrics").text)
        assert m["glm5_spec_decode_num_draft_tokens_total"] > 0 and m["glm5_spec_decode_num_verify_steps_total"] > 0
        assert 0 <= m["glm5_spec_decode_acceptance_rate"] <= 1 and m["glm5_spec_decode_mean_acceptance_length"] >= 1
        r = c.chat.completions.create(model="zai-org/GLM-5", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=20, temperature=0, tools=[{"type": "function", "function": {
                                          "name": "f"}}], tool_choice="none", extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 20 and not r.choices[0].message.tool_calls
        r = c.chat.completions.create(model="zai-org/GLM-5", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=60, response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_processed_logprobs_mode_reports_the_sampled_distribution(model_dir):
    """``glm5 serve --logprobs-mode processed_logprobs``: completion logprobs at temperature 0.5 are those of
    softmax(logits / 0.5), what an RL trainer recomputes (slime reads rollout log-probs from its server)."""
    import torch

    from glm5.cli import build_parser
    from glm5.model.transformer import GLM5ForCausalLM

    from .conftest import ServerThread, make_app

    assert build_parser("serve").parse_args(["serve", "--model", "/x"]).logprobs_mode == "raw_logprobs"
    model = GLM5ForCausalLM.from_pretrained(model_dir).eval()
    for mode, temperature in (("processed_logprobs", 0.5), ("raw_logprobs", 1.0)):
        app, _ = make_app(model_dir, engine_kwargs={"logprobs_mode": mode})
        with ServerThread(app) as srv:
            r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 1,
                                                              "temperature": 0.5, "top_p": 1.0, "seed": 3,
                                                              "logprobs": 5},  # (the server's default top_p is 0.95)
                           timeout=60).json()
        top = sorted(r["choices"][0]["logprobs"]["top_logprobs"][0].values(), reverse=True)
        with torch.no_grad():
            ref = (model(torch.tensor([[5, 6, 7]])).logits[0, -1] / temperature).log_softmax(-1)
        assert top == pytest.approx(ref.topk(len(top)).values.tolist(), abs=1e-4), mode
