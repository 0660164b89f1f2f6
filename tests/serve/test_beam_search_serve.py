"""vLLM's ``use_beam_search`` on both endpoints: the results equal ``LLM.beam_search`` on the same model (texts,
order, finish reasons, usage), n=1 is greedy, what cannot be combined is a clear 400, and a client that goes
away (or a cancelled search) leaves nothing running in the engine."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest

from glm5.engine import LLM, SamplingParams
from glm5.engine.beam_search import BeamSearchParams, BeamSearchState

from .conftest import MODEL_NAME, ServerThread, make_app

PROMPT = "The king"


@pytest.fixture(scope="module")
def beam_server(model_dir):
    app, backend = make_app(model_dir)
    with ServerThread(app) as srv:
        srv.backend = backend
        yield srv


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), max_model_len=1024)


def _post(srv, path, **body):
    return httpx.post(srv.url + path, timeout=120, json={"model": MODEL_NAME, **body})


def _complete(srv, **body):
    return _post(srv, "/v1/completions", use_beam_search=True, **body)


def _want(llm, prompt, n, max_tokens, ignore_eos=True, length_penalty=1.0):
    return llm.beam_search(prompt, BeamSearchParams(beam_width=n, max_tokens=max_tokens, ignore_eos=ignore_eos,
                                                    length_penalty=length_penalty))[0].sequences


@pytest.mark.parametrize("n,lp", [(3, 1.0), (2, 0.0)])
def test_completions_equal_llm_beam_search(beam_server, llm, n, lp):
    r = _complete(beam_server, prompt=PROMPT, n=n, max_tokens=6, ignore_eos=True, length_penalty=lp,
                  temperature=1.5, top_p=0.3)  # sampling fields are ignored: the steps are greedy
    assert r.status_code == 200, r.text
    body = r.json()
    want = _want(llm, PROMPT, n, 6, length_penalty=lp)
    assert [c["text"] for c in body["choices"]] == [s.text for s in want]
    assert [c["index"] for c in body["choices"]] == list(range(n))
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in body["choices"])
    n_prompt = len(llm.tokenizer.encode(PROMPT))
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["completion_tokens"] == sum(len(s.tokens) - n_prompt for s in want) == 6 * n


def test_token_prompts_batch_and_best_of(beam_server, llm):
    a, b = llm.tokenizer.encode("Once upon"), llm.tokenizer.encode("The queen said")
    r = _complete(beam_server, prompt=[a, b], n=2, best_of=2, max_tokens=4, ignore_eos=True)
    assert r.status_code == 200, r.text
    got = [c["text"] for c in r.json()["choices"]]
    assert got == [s.text for p in (a, b) for s in _want(llm, p, 2, 4)]
    assert r.json()["usage"]["prompt_tokens"] == len(a) + len(b)


def test_n1_is_greedy(beam_server, llm):
    r = _complete(beam_server, prompt=PROMPT, max_tokens=8, ignore_eos=True)
    assert r.status_code == 200, r.text
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    plain = _post(beam_server, "/v1/completions", prompt=PROMPT, max_tokens=8, ignore_eos=True, temperature=0)
    text = r.json()["choices"][0]["text"]
    assert text == greedy[0].outputs[0].text == plain.json()["choices"][0]["text"]


def test_eos_and_stop_token_ids_finish_beams(beam_server, model_dir, tmp_path):
    """A token the search meets at step 1 made an EOS of a copy of the model (LLM.beam_search) and sent as a
    stop_token_id to the server (same weights): the same beams finish, with finish_reason "stop"."""
    llm0 = LLM(str(model_dir), max_model_len=1024)
    tok = _want(llm0, PROMPT, 2, 1)[1].tokens[-1]
    copy = tmp_path / "eos_model"
    shutil.copytree(model_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["eos_token_id"] = list(cfg["eos_token_id"]) + [tok]
    (copy / "config.json").write_text(json.dumps(cfg))
    want = _want(LLM(str(copy), max_model_len=1024), PROMPT, 2, 4, ignore_eos=False, length_penalty=0.0)
    assert any(s.finished for s in want)
    r = _complete(beam_server, prompt=PROMPT, n=2, max_tokens=4, stop_token_ids=[tok], length_penalty=0.0)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["text"] for c in choices] == [s.text for s in want]
    assert [c["finish_reason"] for c in choices] == ["stop" if s.finished else "length" for s in want]
    assert [c["stop_reason"] for c in choices] == [tok if s.finished else None for s in want]
    n_prompt = len(llm0.tokenizer.encode(PROMPT))
    assert r.json()["usage"]["completion_tokens"] == sum(len(s.tokens) - n_prompt for s in want)


def test_chat_equals_llm_beam_search_on_the_rendered_prompt(beam_server, llm):
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = _post(beam_server, "/v1/chat/completions", messages=messages, n=2, max_tokens=5, ignore_eos=True,
              use_beam_search=True, chat_template_kwargs={"enable_thinking": False})
    assert r.status_code == 200, r.text
    ids = _post(beam_server, "/tokenize", messages=messages, enable_thinking=False).json()["tokens"]
    want = _want(llm, ids, 2, 5)
    body = r.json()
    got = [(c["message"]["reasoning_content"] or "") + (c["message"]["content"] or "") for c in body["choices"]]
    assert got == [s.text for s in want]
    assert body["object"] == "chat.completion" and all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 10
    # thinking on (the default): the prompt opens the reasoning, so a beam that never closes it is all reasoning
    r = _post(beam_server, "/v1/chat/completions", messages=messages, n=2, max_tokens=5, ignore_eos=True,
              use_beam_search=True)
    ids = _post(beam_server, "/tokenize", messages=messages).json()["tokens"]
    for c, s in zip(r.json()["choices"], _want(llm, ids, 2, 5)):
        if "</think>" not in llm.tokenizer.decode(s.tokens[len(ids):]):
            assert c["message"]["reasoning_content"] == s.text and not c["message"]["content"]
    assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


def test_openai_client_extra_body(beam_server, llm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=beam_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=2, max_tokens=3,
                                    extra_body={"use_beam_search": True, "ignore_eos": True})
    assert [c.text for c in out.choices] == [s.text for s in _want(llm, PROMPT, 2, 3)]


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/completions", {"prompt": PROMPT, "stream": True}, "stream", "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream", "stream"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 2}, "logprobs", "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True}, "echo", "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs",
     "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools", "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, "response_format", "response_format"),
    ("/v1/completions", {"prompt": PROMPT, "structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs",
     "structured_outputs"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["."]}, "stop", "stop_token_ids"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"5": 3.0}}, "logit_bias", "logit_bias"),
    ("/v1/completions", {"prompt": PROMPT, "presence_penalty": 0.5}, "presence_penalty", "presence_penalty"),
])
def test_what_cannot_be_combined_is_a_400(beam_server, path, body, param, words):
    r = _post(beam_server, path, use_beam_search=True, max_tokens=2, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and "beam" in err["message"], err


def test_best_of_and_length_penalty_are_checked(beam_server):
    r = _complete(beam_server, prompt=PROMPT, n=2, best_of=3, max_tokens=2)
    assert r.status_code == 400 and "best_of must equal n" in r.json()["error"]["message"]
    assert _complete(beam_server, prompt=PROMPT, max_tokens=2, length_penalty=1e9).status_code == 400
    assert _complete(beam_server, prompt=PROMPT, max_tokens=2000).status_code == 400  # the context check applies


def _wait_idle(backend, timeout=20.0):
    deadline = time.monotonic() + timeout
    while backend.engine.num_unfinished_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    return backend.engine.num_unfinished_requests


def test_client_disconnect_aborts_the_step_requests(beam_server):
    backend = beam_server.backend
    steps = backend.engine.stats.get("steps", 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(beam_server.url + "/v1/completions", timeout=1.0,
                   json={"prompt": PROMPT, "use_beam_search": True, "n": 4, "max_tokens": 900, "ignore_eos": True})
    assert backend.engine.stats.get("steps", 0) > steps  # the search was running
    assert _wait_idle(backend) == 0
    assert backend.engine.block_manager.usage == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = httpx.get(beam_server.url + "/metrics").text
        if "glm5_server_requests_in_flight 0" in m:
            break
        time.sleep(0.05)
    assert "glm5_server_requests_in_flight 0" in m
    assert 'glm5_requests_total{endpoint="completions",outcome="client_disconnected"} 1' in m
    assert _complete(beam_server, prompt=PROMPT, max_tokens=2).status_code == 200  # serving on


def test_cancelled_search_leaves_no_requests(model_dir):
    """What a server shutdown does to a request in flight: the search task is cancelled; its step requests are
    aborted (no leaked requests, no cache blocks held)."""
    from glm5.serve.backend import EngineBackend
    from glm5.serve.beam import search_async

    backend = EngineBackend.from_pretrained(str(model_dir), max_model_len=1024, seed=0)
    prompt = backend.tokenizer.encode(PROMPT)

    async def main():
        search = BeamSearchState(prompt, BeamSearchParams(beam_width=3, max_tokens=500, ignore_eos=True))
        task = asyncio.ensure_future(search_async(backend, "cancel-me", search))
        deadline = time.monotonic() + 30
        while search.steps < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert search.steps >= 2 and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):  # the aborts are applied at the engine loop's next step
            if not backend.engine.num_unfinished_requests:
                break
            await asyncio.sleep(0.01)
        return backend.engine.num_unfinished_requests

    try:
        assert asyncio.run(main()) == 0
        assert backend.engine.block_manager.usage == 0
    finally:
        backend.llm.shutdown()
