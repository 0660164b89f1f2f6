"""The chat parsing path (reasoning, content, tool calls; streamed and not) on known model output.

Uses ScriptedBackend (TEST-ONLY, see conftest): the real engine forced to emit a scripted token
sequence, because a random-init model cannot be steered to write tool calls or ``</think>``."""

from __future__ import annotations

import json


from .conftest import MODEL_NAME, SCRIPTS

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["location"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def user(script: str) -> list[dict]:
    return [{"role": "user", "content": f"SCRIPT:{script}"}]


def collect_stream(stream):
    reasoning, content, calls, finish, usage, chunks = [], [], {}, None, None, 0
    for ch in stream:
        chunks += 1
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            d = c.delta
            if getattr(d, "reasoning_content", None):
                reasoning.append(d.reasoning_content)
            if d.content:
                content.append(d.content)
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
                if tc.id:
                    assert entry["id"] is None, "id sent twice"
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    assert entry["name"] is None, "name sent twice"
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["args"] += tc.function.arguments
            if c.finish_reason:
                finish = c.finish_reason
    return "".join(reasoning) or None, "".join(content) or None, calls, finish, usage, chunks


def test_reasoning_and_content(scripted_client, scripted_server):
    tok = scripted_server.backend.tokenizer
    r = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("reason"), max_tokens=64)
    m = r.choices[0].message
    assert m.reasoning_content == "The user greets me. I should greet back."
    assert m.content == "Hello! How can I help?"
    assert not m.tool_calls
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(tok.encode(SCRIPTS["reason"]))
    thinking_part = SCRIPTS["reason"].split("</think>")[0] + "</think>"
    assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode(thinking_part))


def test_reasoning_streamed_equals_non_streamed(scripted_client):
    stream = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("reason"), max_tokens=64,
                                                     stream=True, stream_options={"include_usage": True})
    reasoning, content, calls, finish, usage, chunks = collect_stream(stream)
    assert reasoning == "The user greets me. I should greet back."
    assert content == "Hello! How can I help?"
    assert not calls and finish == "stop"
    assert usage.completion_tokens_details.reasoning_tokens > 0
    assert chunks > 5  # streamed, not one blob


def test_include_reasoning_false(scripted_client):
    r = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("reason"), max_tokens=64,
                                                extra_body={"include_reasoning": False})
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
    assert r.choices[0].message.content == "Hello! How can I help?"


def test_thinking_disabled_output_is_content(scripted_client):
    for extra in ({"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"enable_thinking": False}}):
        r = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("plain"), max_tokens=64,
                                                    extra_body=extra)
        assert r.choices[0].message.content == "Just an answer, no thinking."
        assert getattr(r.choices[0].message, "reasoning_content", None) is None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_tool_call_non_streaming(scripted_client):
    r = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("tool"), tools=TOOLS, max_tokens=96)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.reasoning_content == "I need the weather, so I call get_weather."
    assert c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Beijing", "days": 3}


def test_tool_call_streamed_incrementally(scripted_client):
    stream = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("tool"), tools=TOOLS,
                                                     max_tokens=96, stream=True)
    reasoning, content, calls, finish, _, _ = collect_stream(stream)
    assert finish == "tool_calls"
    assert reasoning == "I need the weather, so I call get_weather."
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["args"]) == {"location": "Beijing", "days": 3}


def test_parallel_calls_and_zero_argument_call(scripted_client):
    r = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("two_tools"), tools=TOOLS,
                                                max_tokens=128)
    m = r.choices[0].message
    assert m.content == "Checking both."
    assert [t.function.name for t in m.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(m.tool_calls[0].function.arguments) == {"location": "Paris", "days": 1}
    assert json.loads(m.tool_calls[1].function.arguments) == {}
    stream = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("two_tools"), tools=TOOLS,
                                                     max_tokens=128, stream=True)
    _, content, calls, finish, _, _ = collect_stream(stream)
    assert content == "Checking both." and finish == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert json.loads(calls[1]["args"]) == {}


def test_tool_round_trip(scripted_client):
    """Call -> run the tool -> send the result back (with the reasoning) -> final answer."""
    first = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("tool"), tools=TOOLS, max_tokens=96)
    msg = first.choices[0].message
    call = msg.tool_calls[0]
    args = json.loads(call.function.arguments)
    result = {"city": args["location"], "temp_c": 18, "note": "SCRIPT:answer"}
    messages = user("tool") + [
        {"role": "assistant", "content": msg.content, "reasoning_content": msg.reasoning_content,
         "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    second = scripted_client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=96)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "It is sunny in Beijing, 18 degrees."
    assert second.choices[0].message.reasoning_content == "The tool said sunny."
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_tool_choice_none_does_not_parse(scripted_client):
    r = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("tool"), tools=TOOLS,
                                                tool_choice="none", max_tokens=96)
    c = r.choices[0]
    assert c.finish_reason == "stop" and not c.message.tool_calls
    assert "<tool_call>get_weather" in c.message.content


def test_logprobs_follow_tokens(scripted_client, scripted_server):
    tok = scripted_server.backend.tokenizer
    r = scripted_client.chat.completions.create(model=MODEL_NAME, messages=user("plain"), max_tokens=64,
                                                logprobs=True, top_logprobs=3,
                                                extra_body={"thinking": {"type": "disabled"}})
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens == len(tok.encode(SCRIPTS["plain"]))
    assert "".join(e.token for e in lp).startswith("Just an answer, no thinking.")
    for e in lp:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
