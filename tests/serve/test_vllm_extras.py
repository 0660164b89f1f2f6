"""vLLM's request extras on both endpoints: bad_words, truncate_prompt_tokens and priority."""

import httpx
import pytest

from glm5.engine import LLM, SamplingParams

from .conftest import API_KEY, MODEL_NAME, ServerThread, make_app


@pytest.fixture(scope="module")
def priority_server(model_dir):
    app, _ = make_app(model_dir, engine_kwargs={"scheduling_policy": "priority"})
    with ServerThread(app) as srv:
        yield srv


def _complete(srv, **body):
    return httpx.post(srv.url + "/v1/completions", timeout=60,
                      json={"model": MODEL_NAME, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **body})


def test_bad_words_reach_the_engine(priority_server, model_dir):
    llm = LLM(str(model_dir), max_model_len=1024)
    tok = llm.tokenizer
    # a word that is one token after a space; a bias makes the random model write it
    t, word = next((i, tok.decode([i]).strip()) for i in range(tok.vocab_size)
                   if tok.decode([i]).startswith(" ") and tok.decode([i]).strip().isalpha()
                   and tok.encode(tok.decode([i])) == [i])
    bias = {"logit_bias": {str(t): 8.0}}
    plain = _complete(priority_server, prompt="The king", **bias).json()["choices"][0]["text"]
    assert word in plain.split()
    r = _complete(priority_server, prompt="The king", bad_words=[word], **bias)
    assert r.status_code == 200, r.text
    want = llm.generate("The king", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, bad_words=[word],
                                                   logit_bias={t: 8.0}), use_tqdm=False)[0].outputs[0]
    assert t not in want.token_ids and r.json()["choices"][0]["text"] == want.text
    assert _complete(priority_server, prompt="x", bad_words=[" "]).status_code == 400  # blank words are refused


def test_truncate_prompt_tokens_keeps_the_end_before_the_context_check(priority_server):
    ids = [(7 * i) % 500 + 3 for i in range(1100)]  # longer than the server's 1,024-token context
    assert _complete(priority_server, prompt=ids).status_code == 400
    r = _complete(priority_server, prompt=ids, truncate_prompt_tokens=10)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 10
    assert r.json()["choices"][0]["text"] == _complete(priority_server, prompt=ids[-10:]).json()["choices"][0]["text"]
    r = _complete(priority_server, prompt=ids, truncate_prompt_tokens=-1, max_tokens=1)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1023
    chat = httpx.post(priority_server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "hello " * 50}], "max_tokens": 2,
        "truncate_prompt_tokens": 5})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 5
    assert _complete(priority_server, prompt="x", truncate_prompt_tokens=0).status_code == 400


def test_priority_needs_a_priority_server(priority_server, server):
    r = _complete(priority_server, prompt="The king", priority=-3)
    assert r.status_code == 200
    r = httpx.post(server.url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": MODEL_NAME, "prompt": "The king", "max_tokens": 2, "priority": 1})
    assert r.status_code == 400 and "priority" in r.json()["error"]["message"]
