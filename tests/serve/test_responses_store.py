"""Reading the Responses store: ``include`` on ``GET /v1/responses/{id}`` and its input items, ``stream`` on
retrieval, ``cancel``, ``delete``, and the metrics path labels of these routes. Through the official ``openai``
client where it has the call, raw httpx where it does not (bad query values the client would not send).

Every bad read is checked to leave the stored response as it was: the same response is read back afterwards.
"""

from __future__ import annotations

import pytest

from glm5.serve.responses_protocol import INCLUDABLE, LOGPROBS_INCLUDE
from glm5.serve.responses_store import StoredResponse, list_page, shown

from .conftest import MODEL_NAME

openai = pytest.importorskip("openai")

OFF = {"effort": "none"}
GREEDY = dict(model=MODEL_NAME, temperature=0, extra_body={"ignore_eos": True})


def _create(client, **kw):
    return client.responses.create(input="Hello there", max_output_tokens=4, reasoning=OFF, **{**GREEDY, **kw})


def _lps(response) -> list:
    return response.output[0].content[0].logprobs


# ------------------------------------------------------------------------------------------- include on GET
def test_retrieve_include_is_checked_as_on_create(client, http):
    r = _create(client)
    create_err = http.post("/v1/responses", json={"input": "x", "include": ["nonsense"]})
    for query in ({"include[]": "nonsense"}, {"include": "nonsense"},
                  {"include[]": [LOGPROBS_INCLUDE] + ["nonsense"]}, {"include[]": [LOGPROBS_INCLUDE] * 33}):
        got = http.get(f"/v1/responses/{r.id}", params=query)
        assert got.status_code == create_err.status_code == 400, (query, got.text)
        err = got.json()["error"]
        assert {k: err[k] for k in ("type", "param", "code")} == \
            {k: create_err.json()["error"][k] for k in ("type", "param", "code")}, (query, err)
        assert "include" in err["message"]
    assert "nonsense" in http.get(f"/v1/responses/{r.id}", params={"include[]": "nonsense"}).json()["error"]["message"]
    # an unknown value is checked before the id: the same 400 for an id that does not exist
    assert http.get("/v1/responses/resp_unknown", params={"include[]": "nonsense"}).status_code == 400
    got = client.responses.retrieve(r.id, include=list(INCLUDABLE))  # every documented value is accepted
    assert got.id == r.id and got.output_text == r.output_text


def test_retrieve_include_logprobs_when_stored(client, http):
    """Logprobs stored by a create that asked for them come back on a read that asks for them; a read that does
    not ask gets the empty list a create without include gets, and the store keeps them for the next read."""
    r = _create(client, include=[LOGPROBS_INCLUDE], top_logprobs=2)
    assert _lps(r) and "".join(lp.token for lp in _lps(r)) == r.output_text
    asked = client.responses.retrieve(r.id, include=[LOGPROBS_INCLUDE])
    assert [(lp.token, lp.logprob) for lp in _lps(asked)] == [(lp.token, lp.logprob) for lp in _lps(r)]
    assert [len(lp.top_logprobs) for lp in _lps(asked)] == [2] * len(_lps(r))
    plain = client.responses.retrieve(r.id)
    assert _lps(plain) == [] and plain.output_text == r.output_text
    raw = http.get(f"/v1/responses/{r.id}", params={"include": LOGPROBS_INCLUDE}).json()  # curl-style key
    assert len(raw["output"][0]["content"][0]["logprobs"]) == len(_lps(r))
    assert _lps(client.responses.retrieve(r.id, include=[LOGPROBS_INCLUDE])) == _lps(asked)  # nothing was lost


def test_retrieve_include_logprobs_when_not_stored(client):
    """Logprobs cannot be made after sampling: asking for them on a read of a response created without them is
    no error, and the lists stay empty."""
    r = _create(client)
    got = client.responses.retrieve(r.id, include=[LOGPROBS_INCLUDE])
    assert got.output_text == r.output_text and _lps(got) == [] and got.status == r.status


def test_input_items_include_logprobs_of_earlier_outputs(client, http):
    first = _create(client, include=[LOGPROBS_INCLUDE], top_logprobs=1)
    second = client.responses.create(previous_response_id=first.id, input="More", max_output_tokens=2,
                                     reasoning=OFF, **GREEDY)
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [i.type for i in items] == ["message", "message", "message"] and items[1].id == first.output[0].id
    assert items[1].content[0].logprobs == []  # not asked for
    asked = client.responses.input_items.list(second.id, order="asc", include=[LOGPROBS_INCLUDE]).data
    assert [lp.token for lp in asked[1].content[0].logprobs] == [lp.token for lp in _lps(first)]
    got = http.get(f"/v1/responses/{second.id}/input_items", params={"include[]": "bogus"})
    assert got.status_code == 400 and got.json()["error"]["param"] == "include"
    assert http.get(f"/v1/responses/{second.id}/input_items", params={"include[]": [LOGPROBS_INCLUDE] * 33}) \
        .status_code == 400


def test_shown_copies_and_leaves_the_store_alone():
    part = {"type": "output_text", "text": "hi", "annotations": [], "logprobs": [{"token": "hi", "logprob": -1.0}]}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "content": [part]}
    other = {"id": "fc_1", "type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    rec = StoredResponse({"output": [item]}, [], 0, [item, other])
    page = list_page(rec, limit=10, order="asc", after=None, logprobs=False)
    assert page["data"][0]["content"][0]["logprobs"] == [] and page["data"][1] is other
    assert part["logprobs"] == [{"token": "hi", "logprob": -1.0}]  # the stored part is unchanged
    assert shown([item], True)[0] is item
    assert list_page(rec, limit=10, order="asc", after=None)["data"][0]["content"][0]["logprobs"] == part["logprobs"]


# ---------------------------------------------------------------------------------------- stream on GET
def test_retrieve_stream_is_400_and_bad_stream_params_are_400(client, http):
    r = _create(client)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.retrieve(r.id, stream=True, starting_after=0)
    assert e.value.body["param"] == "stream" and "background" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):  # an unknown id is still a 404
        client.responses.retrieve("resp_unknown", stream=True)
    for query, param in [({"stream": "maybe"}, "stream"), ({"starting_after": -1}, "starting_after"),
                         ({"starting_after": "x"}, "starting_after"), ({"include_obfuscation": "perhaps"},
                                                                        "include_obfuscation")]:
        got = http.get(f"/v1/responses/{r.id}", params=query)
        assert got.status_code == 400 and got.json()["error"]["param"] == param, (query, got.text)
    got = client.responses.retrieve(r.id, stream=False, starting_after=3, include_obfuscation=False)
    assert got.id == r.id and got.output_text == r.output_text  # no stream asked: the parameters change nothing


# ----------------------------------------------------------------------------------------- cancel, delete
def test_cancel_unknown_is_404_and_foreground_is_400(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.cancel("resp_unknown")
    assert e.value.body == http.get("/v1/responses/resp_unknown").json()["error"]  # the other routes' 404
    assert e.value.body["code"] == "not_found" and e.value.body["type"] == "invalid_request_error"
    r = _create(client)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(r.id)
    assert "background" in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"
    got = client.responses.retrieve(r.id)  # refused: still there, unchanged
    assert got.status == r.status and got.output_text == r.output_text
    assert http.get(f"/v1/responses/{r.id}/cancel").status_code == 405  # cancel is a POST


def test_delete_unknown_is_404_and_deleted_is_gone_everywhere(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.delete("resp_unknown")
    assert e.value.body["code"] == "not_found"
    r = _create(client)
    got = http.delete(f"/v1/responses/{r.id}")
    assert got.status_code == 200 and got.json() == {"id": r.id, "object": "response.deleted", "deleted": True}
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.input_items.list(r.id),
                 lambda: client.responses.cancel(r.id), lambda: client.responses.delete(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()


# ------------------------------------------------------------------------------------------ metrics labels
def _count(http, method: str, path: str, status: str) -> float:
    want = f'glm5_http_requests_total{{method="{method}",path="{path}",status="{status}"}} '
    lines = [ln for ln in http.get("/metrics").text.splitlines() if ln.startswith(want)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_metrics_label_each_responses_route_by_its_template(client, http):
    r = _create(client)
    routes = [("GET", f"/v1/responses/{r.id}", "/v1/responses/{response_id}", "200"),
              ("GET", f"/v1/responses/{r.id}/input_items", "/v1/responses/{response_id}/input_items", "200"),
              ("POST", f"/v1/responses/{r.id}/cancel", "/v1/responses/{response_id}/cancel", "400"),
              ("DELETE", "/v1/responses/resp_unknown", "/v1/responses/{response_id}", "404")]
    before = {(m, label, s): _count(http, m, label, s) for m, _, label, s in routes}
    for method, url, _, _ in routes:
        http.request(method, url)
    for method, _, label, status in routes:
        assert _count(http, method, label, status) == before[(method, label, status)] + 1, (method, label)
    http.get("/v1/responses/resp_unknown/nowhere")  # no route: "other", not a series per id
    text = http.get("/metrics").text
    assert r.id not in text and "resp_unknown" not in text
    assert 'path="other",status="404"' in text
    before = _count(http, "GET", "/v1/models/{model}", "200")  # the model route keeps its template label
    http.get(f"/v1/models/{MODEL_NAME}")
    assert _count(http, "GET", "/v1/models/{model}", "200") == before + 1
