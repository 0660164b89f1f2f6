"""``/v1/responses`` (OpenAI's Responses API) through the official ``openai`` client.

The endpoint is a translation layer over the chat path, so most tests compare with ``/v1/chat/completions``:
the same text at temperature 0, and the same rendered prompt (token ids seen by the engine, through a spy on
the backend) for multi-turn input given as items, via ``previous_response_id``, or as chat messages. The
scripted backend (forced model text, see conftest) checks the output items and stream events of a turn with
reasoning, text and two tool calls.
"""

from __future__ import annotations

import json
import time

import pytest

from glm5.serve.responses import ResponseStore

from .conftest import MODEL_NAME

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["location", "days"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER},
         {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
OFF = {"effort": "none"}
GREEDY = dict(model=MODEL_NAME, temperature=0, extra_body={"ignore_eos": True})


def chat_prompt(client, prompts, messages, **kw) -> list[int]:
    client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1, **kw)
    return prompts[-1]


def items(response) -> list[dict]:
    """A response's output as input items, as a client sends them back."""
    return [o.model_dump(exclude_none=True) for o in response.output]


# ------------------------------------------------------------------------------------------- plain text
def test_text_matches_chat_completions(client):
    r = client.responses.create(input="Hello there", max_output_tokens=12, reasoning=OFF,
                                metadata={"k": "v"}, **GREEDY)
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hello there"}], max_tokens=12,
                                          **{**GREEDY, "extra_body": {"ignore_eos": True,
                                                                      "thinking": {"type": "disabled"}}})
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL_NAME
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert [o.type for o in r.output] == ["message"]
    msg = r.output[0]
    assert msg.role == "assistant" and msg.id.startswith("msg_") and msg.content[0].type == "output_text"
    assert msg.content[0].annotations == []
    # max_output_tokens reached: incomplete, as OpenAI reports it
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert msg.status == "incomplete"
    u = r.usage
    assert (u.input_tokens, u.output_tokens) == (chat.usage.prompt_tokens, 12)
    assert u.total_tokens == u.input_tokens + 12 and u.output_tokens_details.reasoning_tokens == 0
    assert u.input_tokens_details.cached_tokens >= 0
    # the request's settings are echoed
    assert (r.temperature, r.max_output_tokens, r.metadata, r.tool_choice, r.tools) == (0, 12, {"k": "v"}, "auto", [])
    assert r.reasoning.effort == "none" and r.text.format.type == "text" and r.store is True


def test_reasoning_on_and_off(client):
    """Thinking is on by default (a reasoning item with the text, no summary); effort none / minimal turns it off,
    any other effort leaves it on."""
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, **GREEDY)
    for reasoning in (None, {"effort": "high"}):
        kw = {"reasoning": reasoning} if reasoning else {}
        r = client.responses.create(input="Hi", max_output_tokens=8, **kw, **GREEDY)
        assert [o.type for o in r.output] == ["reasoning"]
        item = r.output[0]
        assert item.id.startswith("rs_") and item.summary == []
        assert [c.type for c in item.content] == ["reasoning_text"]
        assert item.content[0].text == chat.choices[0].message.reasoning_content
        assert r.usage.output_tokens_details.reasoning_tokens == 8 and r.output_text == ""
    for effort in ("none", "minimal"):
        r = client.responses.create(input="Hi", max_output_tokens=8, reasoning={"effort": effort}, **GREEDY)
        assert "reasoning" not in [o.type for o in r.output]
        assert r.usage.output_tokens_details.reasoning_tokens == 0


def test_instructions_render_as_system(client, prompts):
    r = client.responses.create(input="Hi", instructions="Answer briefly.", max_output_tokens=1, **GREEDY)
    assert r.instructions == "Answer briefly."
    assert prompts[-1] == chat_prompt(client, prompts, [{"role": "system", "content": "Answer briefly."},
                                                        {"role": "user", "content": "Hi"}])
    # developer / system messages as input items render the same way
    client.responses.create(input=[{"role": "developer", "content": "Answer briefly."},
                                   {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                            max_output_tokens=1, **GREEDY)
    assert prompts[-1] == prompts[-2]


# ------------------------------------------------------------------------------------------ multi-turn
def test_multi_turn_items_previous_response_id_and_chat_agree(client, prompts):
    first = client.responses.create(input="Hi", max_output_tokens=6, reasoning=OFF, **GREEDY)
    follow = {"role": "user", "content": "And then?"}
    client.responses.create(previous_response_id=first.id, input="And then?", max_output_tokens=1,
                            reasoning=OFF, **GREEDY)
    by_id = prompts[-1]
    client.responses.create(input=[{"role": "user", "content": "Hi"}] + items(first) + [follow],
                            max_output_tokens=1, reasoning=OFF, **GREEDY)
    by_items = prompts[-1]
    chat = chat_prompt(client, prompts, [{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": first.output_text}, follow],
                       extra_body={"thinking": {"type": "disabled"}})
    assert by_id == by_items == chat
    # a chain: the third turn continues the second, whose conversation holds the first
    second = client.responses.create(previous_response_id=first.id, input="And then?", max_output_tokens=4,
                                     reasoning=OFF, **GREEDY)
    third = client.responses.create(previous_response_id=second.id, input="Bye", max_output_tokens=1,
                                    reasoning=OFF, **GREEDY)
    assert third.previous_response_id == second.id
    assert prompts[-1] == chat_prompt(client, prompts, [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.output_text}, follow,
        {"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Bye"}],
        extra_body={"thinking": {"type": "disabled"}})


# ---------------------------------------------------------------------------------------------- tools
@pytest.mark.parametrize("seed,parallel", [(0, True), (1, True), (2, False)])
def test_tool_choice_required(client, seed, parallel):
    r = client.responses.create(model=MODEL_NAME, input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                max_output_tokens=80, reasoning=OFF, parallel_tool_calls=parallel,
                                extra_body={"seed": seed})
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and r.status == "completed" and r.parallel_tool_calls is parallel
    if not parallel:
        assert len(calls) == 1
    for call in calls:
        assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.status == "completed"
        args = json.loads(call.arguments)
        if call.name == "get_weather":
            jsonschema.validate(args, WEATHER)
        else:
            assert call.name == "get_time" and args == {}
    assert [t.name for t in r.tools] == ["get_weather", "get_time"] and r.tool_choice == "required"


def test_named_tool_then_function_call_output(client, prompts, http):
    """A named call (thinking on: the reasoning item comes first), then its output: the second turn renders
    like chat's [user, assistant(reasoning, tool_calls), tool], reasoning kept (it follows the last user turn)."""
    first = client.responses.create(model=MODEL_NAME, input="Weather?", tools=TOOLS, max_output_tokens=60,
                                    extra_body={"seed": 5}, tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp_c": 18}'}
    second = client.responses.create(previous_response_id=first.id, input=[result], tools=TOOLS,
                                     max_output_tokens=2, **GREEDY)
    by_id = prompts[-1]
    assert second.usage.input_tokens == len(by_id) > first.usage.input_tokens
    client.responses.create(input=[{"role": "user", "content": "Weather?"}] + items(first) + [result], tools=TOOLS,
                            max_output_tokens=1, **GREEDY)
    reasoning = "".join(c.text for o in first.output if o.type == "reasoning" for c in o.content)
    assert first.output[0].type == "reasoning" and reasoning
    assistant = {"role": "assistant", "content": first.output_text or None, "reasoning_content": reasoning,
                 "tool_calls": [{"id": calls[0].call_id, "type": "function",
                                 "function": {"name": "get_weather", "arguments": calls[0].arguments}}]}
    tool = {"role": "tool", "tool_call_id": calls[0].call_id, "content": '{"temp_c": 18}'}
    chat = chat_prompt(client, prompts, [{"role": "user", "content": "Weather?"}, assistant, tool], tools=CHAT_TOOLS)
    assert by_id == prompts[-2] == chat
    # interleaved thinking: the call's reasoning is rendered back (the call follows the last user message)
    rendered = http.post("/detokenize", json={"tokens": by_id}).json()["prompt"]
    assert "<think>" + reasoning.strip() + "</think>" in rendered


# ------------------------------------------------------------------------------------ structured output
def test_text_format_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                                               "tag": {"enum": ["x", "y"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "t", "schema": schema, "strict": True}
    r = client.responses.create(model=MODEL_NAME, input="JSON please", text={"format": fmt}, max_output_tokens=40,
                                reasoning=OFF, extra_body={"seed": 3})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.status == "completed" and r.text.format.type == "json_schema" and r.text.format.name == "t"
    r = client.responses.create(model=MODEL_NAME, input="JSON please", text={"format": {"type": "json_object"}},
                                max_output_tokens=40, reasoning=OFF, extra_body={"seed": 4})
    assert isinstance(json.loads(r.output_text), dict)


def test_sdk_parse_with_pydantic_model(client):
    import pydantic

    class Answer(pydantic.BaseModel):
        n: int
        ok: bool

    r = client.responses.parse(model=MODEL_NAME, input="Answer", text_format=Answer, max_output_tokens=40,
                               reasoning=OFF, extra_body={"seed": 2})
    assert isinstance(r.output_parsed, Answer)


# ---------------------------------------------------------------------------------------------- streaming
def _collect(stream) -> list:
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    return events


@pytest.mark.parametrize("reasoning", [None, OFF])
def test_stream_deltas_equal_non_streamed(client, reasoning):
    kw = dict(input="Hello there", max_output_tokens=10, **GREEDY)
    if reasoning:
        kw["reasoning"] = reasoning
    whole = client.responses.create(**kw)
    events = _collect(client.responses.create(stream=True, **kw))
    final = events[-1]
    assert final.type == "response.incomplete" and final.response.incomplete_details.reason == "max_output_tokens"
    kind = "output_text" if reasoning else "reasoning_text"
    deltas = "".join(e.delta for e in events if e.type == f"response.{kind}.delta")
    done = [e.text for e in events if e.type == f"response.{kind}.done"]
    expected = whole.output_text if reasoning else whole.output[0].content[0].text
    assert deltas == done[0] == expected and expected
    assert final.response.output[0].model_dump() == {**whole.output[0].model_dump(), "id": final.response.output[0].id}
    assert final.response.usage.output_tokens == whole.usage.output_tokens == 10
    assert final.response.id == events[0].response.id != whole.id


def test_stream_items_with_reasoning_text_and_tool_calls(scripted_client):
    """Reasoning, text and two calls (scripted model output): items in order, each added -> deltas -> done, and the
    SDK's stream helper assembles the same response the server reports."""
    with scripted_client.responses.stream(model=MODEL_NAME, input="SCRIPT:two_tools", tools=TOOLS,
                                          max_output_tokens=200) as stream:
        events = _collect(stream)
        final = stream.get_final_response()
    assert events[-1].type == "response.completed" and final.status == "completed"
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call", "function_call"]
    assert final.output[0].content[0].text == "Two calls."
    assert final.output_text == "Checking both."
    weather, time_call = final.output[2], final.output[3]
    assert (weather.name, json.loads(weather.arguments)) == ("get_weather", {"location": "Paris", "days": 1})
    assert (time_call.name, time_call.arguments) == ("get_time", "{}")
    per_item: dict[int, list[str]] = {}
    for e in events[2:-1]:
        per_item.setdefault(e.output_index, []).append(e.type.removeprefix("response."))
    assert per_item[0][:2] == ["output_item.added", "content_part.added"]
    assert per_item[0][-3:] == ["reasoning_text.done", "content_part.done", "output_item.done"]
    assert per_item[1][-3:] == ["output_text.done", "content_part.done", "output_item.done"]
    assert per_item[2][0] == "output_item.added" and per_item[2][-2:] == ["function_call_arguments.done",
                                                                          "output_item.done"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                   and e.output_index == 2)
    assert args == weather.arguments
    # the non-streamed response has the same items
    r = scripted_client.responses.create(model=MODEL_NAME, input="SCRIPT:two_tools", tools=TOOLS,
                                         max_output_tokens=200)
    def strip(output):  # ids differ per response; the SDK's stream helper adds `parsed: None` to text parts
        return [{k: v for k, v in o.model_dump(exclude_none=True).items() if k not in ("id", "call_id")}
                for o in output]

    assert strip(r.output) == strip(final.output)


def test_stream_error_is_an_error_event(scripted_client, scripted_server, http):
    events = list(scripted_client.responses.create(model=MODEL_NAME, input="SCRIPT:fail", max_output_tokens=20,
                                                   stream=True))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].code == "generation_failed" and events[-1].response.status == "failed"
    import httpx

    assert httpx.get(scripted_server.url + "/health").status_code == 200


def test_stream_disconnect_aborts_and_is_not_stored(server, http):
    body = {"model": MODEL_NAME, "input": "Hi", "max_output_tokens": 900, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/responses", json=body) as resp:
        lines = resp.iter_lines()
        created = next(line for line in lines if line.startswith("data: "))
        response_id = json.loads(created[6:])["response"]["id"]
        for _ in range(8):
            next(lines)
    engine = server.backend.engine
    deadline = time.monotonic() + 20
    while engine.num_unfinished_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_unfinished_requests == 0
    assert http.get(f"/v1/responses/{response_id}").status_code == 404
    assert 'glm5_requests_total{endpoint="responses",outcome="client_disconnected"}' in http.get("/metrics").text


# ------------------------------------------------------------------------------------------- the store
def test_retrieve_delete_and_404(client):
    r = client.responses.create(input="Hi", max_output_tokens=3, reasoning=OFF, **GREEDY)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage == r.usage
    unstored = client.responses.create(input="Hi", max_output_tokens=1, store=False, **GREEDY)
    for rid in (unstored.id, "resp_unknown"):
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.retrieve(rid)
        assert e.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(previous_response_id="resp_unknown", input="x", max_output_tokens=1, **GREEDY)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["type"] == "invalid_request_error"
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_store_is_a_bounded_lru():
    store = ResponseStore(max_items=2)
    for i in range(3):
        store.put(f"r{i}", {"id": f"r{i}"}, [])
    assert store.get("r0") is None and len(store) == 2
    store.get("r1")  # used: now r2 is the oldest
    store.put("r3", {"id": "r3"}, [])
    assert store.get("r2") is None and store.get("r1") is not None
    small = ResponseStore(max_items=10, max_chars=100)
    small.put("a", {"t": "x" * 40}, [])
    small.put("b", {"t": "y" * 40}, [])
    assert small.get("a") is None and small.get("b") is not None and small.chars <= 100
    small.put("huge", {"t": "z" * 500}, [])  # larger than the whole store: not kept, nothing evicted
    assert small.get("huge") is None and small.get("b") is not None
    assert ResponseStore(max_items=0).put("x", {}, []) is None and len(ResponseStore(0)) == 0


# ---------------------------------------------------------------------------------------- bad requests
BAD = [
    ({"input": [{"type": "web_search_call", "id": "x"}]}, "input.0.type"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input.0.content.0.type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input.0.output"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, "tools.0.name"),
    ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": "x", "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "t"}}}, "text.format.schema"),
    ({"input": "x", "temperature": 5}, "temperature"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10**7}, "max_output_tokens"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "x", "background": True}, "background"),
    ({}, "input"),
    ({"input": []}, "input"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_bad_requests_are_400(http, body, param):
    r = http.post("/v1/responses", json={"model": MODEL_NAME, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_tool_choice_naming_a_missing_tool_and_auth(http, server):
    r = http.post("/v1/responses", json={"input": "x", "tools": TOOLS,
                                         "tool_choice": {"type": "function", "name": "nope"}})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    import httpx

    assert httpx.post(server.url + "/v1/responses", json={"input": "x"}).status_code == 401
    assert httpx.get(server.url + "/v1/responses/resp_x").status_code == 401
    r = http.post("/v1/responses", json={"model": "other-model", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    metrics = http.get("/metrics").text
    assert 'endpoint="responses"' in metrics and 'path="/v1/responses"' in metrics
