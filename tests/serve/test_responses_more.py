"""``/v1/responses``: ``max_tool_calls``, ``truncation``, the input-items listing and ``include``, through the
official ``openai`` client.

The oracle is again the chat path: a truncated conversation must render exactly the prompt that
``/v1/chat/completions`` renders for the messages that were kept (token ids seen by the engine, through a spy on
the backend), and keeping one more message must be what chat rejects with ``context_length_exceeded``. The test
server's context is 1,024 tokens (conftest). Tool calls and logprobs on known text use the scripted backend.
"""

from __future__ import annotations

import json
import random

import pytest

from glm5.serve.responses_protocol import INCLUDABLE, LOGPROBS_INCLUDE, items_to_messages

from .conftest import MODEL_NAME
from .test_responses import TOOLS

openai = pytest.importorskip("openai")

OFF = {"effort": "none"}
GREEDY = dict(model=MODEL_NAME, temperature=0, extra_body={"ignore_eos": True})
NO_THINK = {"thinking": {"type": "disabled"}}
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()


def filler(tag: str, words: int, seed: int = 0) -> str:
    rng = random.Random(f"{tag}-{seed}")
    return tag + ": " + " ".join(rng.choice(WORDS) for _ in range(words))


def strip_ids(output) -> list[dict]:
    return [{k: v for k, v in o.model_dump(exclude_none=True).items() if k not in ("id", "call_id")}
            for o in output]


# ------------------------------------------------------------------------------------------ max_tool_calls
@pytest.mark.parametrize("limit", [1, 2])
def test_max_tool_calls_keeps_the_first_calls_streamed_or_not(scripted_client, limit):
    """The script writes two calls: max_tool_calls=1 keeps the first (no item, no event for the second), and the
    streamed response, its events and the non-streamed one agree; the stored turn holds only the kept call."""
    kw = dict(model=MODEL_NAME, input="SCRIPT:two_tools", tools=TOOLS, max_output_tokens=200, max_tool_calls=limit)
    r = scripted_client.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather", "get_time"][:limit]
    assert r.status == "completed" and r.max_tool_calls == limit and calls[-1].status == "completed"
    assert json.loads(calls[0].arguments) == {"location": "Paris", "days": 1}
    with scripted_client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert strip_ids(final.output) == strip_ids(r.output)
    assert {e.output_index for e in events if hasattr(e, "output_index")} == set(range(len(r.output)))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.name for e in done] == [c.name for c in calls]
    listed = scripted_client.responses.input_items.list(r.id)  # the stored conversation: input only
    assert [i.type for i in listed.data] == ["message"]
    follow = scripted_client.responses.create(
        model=MODEL_NAME, previous_response_id=r.id, tools=TOOLS, max_output_tokens=1,
        input=[{"type": "function_call_output", "call_id": c.call_id, "output": "ok"} for c in calls])
    items = list(scripted_client.responses.input_items.list(follow.id, order="asc"))
    assert [i.type for i in items] == (["message", "reasoning", "message"] + ["function_call"] * limit
                                       + ["function_call_output"] * limit)


def test_max_tool_calls_one_with_required_tool_choice(client):
    """A required tool with max_tool_calls=1: the grammar ends the output after one call (parallel stays on in
    the echo, as requested)."""
    for seed in range(3):
        r = client.responses.create(model=MODEL_NAME, input="Weather?", tools=TOOLS, tool_choice="required",
                                    max_output_tokens=80, reasoning=OFF, max_tool_calls=1, extra_body={"seed": seed})
        assert [o.type for o in r.output] == ["function_call"]
        assert r.status == "completed" and r.parallel_tool_calls is True and r.max_tool_calls == 1


# ------------------------------------------------------------------------------------------- truncation
def _chat_prompt(client, prompts, messages, max_tokens, **kw) -> list[int]:
    client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                   extra_body={"ignore_eos": True, **NO_THINK}, **kw)
    return prompts[-1]


def _overflows(client, messages, max_tokens, **kw) -> bool:
    try:
        client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                       extra_body=NO_THINK, **kw)
    except openai.BadRequestError as e:
        assert e.body["code"] == "context_length_exceeded"
        return True
    return False


def _fewest_dropped(client, prompts, head, messages, tail, max_tokens) -> list[int]:
    """The chat prompt of head + messages[k:] + tail for the smallest k that chat accepts."""
    k = next(k for k in range(len(messages) + 1) if not _overflows(client, head + messages[k:] + tail, max_tokens))
    assert k > 0
    return _chat_prompt(client, prompts, head + messages[k:] + tail, max_tokens)


LONG = [m for i in range(8) for m in ({"role": "user", "content": filler(f"question {i}", 30)},
                                      {"role": "assistant", "content": filler(f"answer {i}", 30)})]
LAST = {"role": "user", "content": "and the last question?"}


def test_truncation_auto_drops_the_fewest_oldest_messages(client, prompts, http):
    system = {"role": "system", "content": "Be brief."}
    kw = dict(instructions="Be brief.", input=LONG + [LAST], max_output_tokens=100, reasoning=OFF, **GREEDY)
    for truncation in (None, "disabled"):  # the default is "disabled": the chat path's error
        extra = {"truncation": truncation} if truncation else {}
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**kw, **extra)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"
    r = client.responses.create(**kw, truncation="auto")
    assert r.truncation == "auto" and r.usage.output_tokens == 100
    seen = prompts[-1]
    assert seen == _fewest_dropped(client, prompts, [system], LONG, [LAST], 100)
    assert r.usage.input_tokens == len(seen) and len(seen) + 100 <= 1024
    # a larger max_output_tokens leaves room for fewer messages; the instructions always stay
    client.responses.create(**{**kw, "max_output_tokens": 600}, truncation="auto")
    assert prompts[-1] == _fewest_dropped(client, prompts, [system], LONG, [LAST], 600) and len(prompts[-1]) < len(seen)
    assert http.post("/detokenize", json={"tokens": prompts[-1]}).json()["prompt"].count("Be brief.") == 1


def test_truncation_newest_turn_too_long_is_400_in_both_modes(client):
    for truncation in ("auto", "disabled"):
        with pytest.raises(openai.BadRequestError) as e:  # the newest turn with its output cannot fit
            client.responses.create(input=LONG[-2:] + [LAST], max_output_tokens=1020, truncation=truncation,
                                    reasoning=OFF, **GREEDY)
        assert e.value.body["param"] == "max_output_tokens"
        with pytest.raises(openai.BadRequestError) as e:  # the newest turn alone is over the context
            client.responses.create(input=[LAST, {"role": "user", "content": filler("huge", 300)}],
                                    truncation=truncation, reasoning=OFF, **GREEDY)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"


def test_truncation_auto_over_a_previous_response_chain(client, prompts):
    first_input, second_input = filler("first", 110), filler("second", 110)
    first = client.responses.create(input=first_input, max_output_tokens=100, reasoning=OFF, **GREEDY)
    kw = dict(previous_response_id=first.id, input=second_input, max_output_tokens=100, reasoning=OFF, **GREEDY)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(**kw)
    second = client.responses.create(**kw, truncation="auto")
    assert second.usage.input_tokens == len(prompts[-1])
    # the stored turn as chat messages (a random model's text may reopen <think>: then it is two assistant messages)
    history = [{"role": "user", "content": first_input}] + items_to_messages(
        [o.model_dump(exclude_none=True) for o in first.output])
    assert prompts[-1] == _fewest_dropped(client, prompts, [], history, [{"role": "user", "content": second_input}],
                                          100)
    # the stored conversation is still whole: the listing shows both turns
    listed = list(client.responses.input_items.list(second.id, order="asc"))
    assert [i.id for i in listed[1:-1]] == [o.id for o in first.output] and listed[-1].content[0].text == second_input


def test_truncation_never_keeps_a_tool_result_without_its_call(client, prompts):
    """[user A, call, result, user B]: dropping A alone is not enough, and dropping A and the call would fit but
    orphan the result, so all three go."""
    chat_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
    args = json.dumps({"q": filler("args", 60)})
    call = {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": args}
    result = {"type": "function_call_output", "call_id": "call_1", "output": filler("result", 60)}
    b = {"role": "user", "content": "so what time is it?"}
    chat_call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": args}}]}
    chat_result = {"role": "tool", "tool_call_id": "call_1", "content": result["output"]}
    room = 1024 - len(_chat_prompt(client, prompts, [chat_result, b], 1, tools=chat_tools))
    assert _overflows(client, [chat_call, chat_result, b], room, tools=chat_tools)
    r = client.responses.create(input=[{"role": "user", "content": filler("a", 20)}, call, result, b], tools=TOOLS,
                                max_output_tokens=room, truncation="auto", reasoning=OFF, **GREEDY)
    _chat_prompt(client, prompts, [b], room, tools=chat_tools)
    assert prompts[-2] == prompts[-1] and r.usage.input_tokens == len(prompts[-1])


# ------------------------------------------------------------------------------------------- input items
def test_input_items_of_one_response(client, http):
    r = client.responses.create(input="Hi", instructions="Be brief.", max_output_tokens=2, reasoning=OFF, **GREEDY)
    page = client.responses.input_items.list(r.id)
    assert page.has_more is False and len(page.data) == 1
    item = page.data[0]
    assert item.type == "message" and item.role == "user" and item.id.startswith("msg_")
    assert [(c.type, c.text) for c in item.content] == [("input_text", "Hi")]  # instructions are not an item
    raw = http.get(f"/v1/responses/{r.id}/input_items").json()
    assert raw["object"] == "list" and raw["first_id"] == raw["last_id"] == item.id


def test_input_items_of_a_chain_with_pagination(client):
    given = [{"type": "message", "role": "developer", "content": "Be brief.", "id": "msg_client_1"},
             {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]
    first = client.responses.create(input=given, max_output_tokens=3, reasoning=OFF, **GREEDY)
    call = {"type": "function_call", "call_id": "call_9", "name": "get_time", "arguments": "{}", "id": "msg_client_1"}
    second = client.responses.create(previous_response_id=first.id, max_output_tokens=3, reasoning=OFF, tools=TOOLS,
                                     input=[call, {"type": "function_call_output", "call_id": "call_9", "output": "9"}],
                                     **GREEDY)
    third = client.responses.create(previous_response_id=second.id, input="Bye", max_output_tokens=2, reasoning=OFF,
                                    **GREEDY)
    asc = list(client.responses.input_items.list(third.id, order="asc", limit=2))  # the SDK follows the pages
    assert [i.type for i in asc] == ["message", "message", "message", "function_call", "function_call_output",
                                     "message", "message"]
    assert asc[0].id == "msg_client_1" and asc[0].role == "developer"  # a client's id is kept ...
    assert asc[3].id != "msg_client_1" and asc[3].id.startswith("fc_")  # ... unless the conversation has it
    assert len({i.id for i in asc}) == len(asc)
    assert asc[2].id == first.output[0].id and asc[5].id == second.output[0].id  # outputs keep their ids
    assert asc[2].content[0].text == first.output_text and asc[-1].content[0].text == "Bye"
    assert (asc[4].call_id, asc[4].output) == ("call_9", "9")
    desc = client.responses.input_items.list(third.id)  # newest first, 20 per page
    assert [i.id for i in desc.data] == [i.id for i in reversed(asc)] and desc.has_more is False
    page = client.responses.input_items.list(third.id, limit=3, order="asc")
    assert [i.id for i in page.data] == [i.id for i in asc[:3]] and page.has_more is True
    rest = client.responses.input_items.list(third.id, limit=3, order="asc", after=page.data[-1].id)
    assert [i.id for i in rest.data] == [i.id for i in asc[3:6]]
    last = client.responses.input_items.list(third.id, limit=3, order="desc", after=asc[1].id)
    assert [i.id for i in last.data] == [asc[0].id] and last.has_more is False


def test_input_items_errors(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.input_items.list("resp_unknown")
    assert e.value.body["code"] == "not_found" and e.value.body["type"] == "invalid_request_error"
    assert e.value.body == http.get("/v1/responses/resp_unknown").json()["error"]
    unstored = client.responses.create(input="Hi", max_output_tokens=1, store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(unstored.id)
    r = client.responses.create(input="Hi", max_output_tokens=1, **GREEDY)
    url = f"/v1/responses/{r.id}/input_items"
    for query, param in [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "sideways"}, "order"),
                         ({"after": "msg_nope"}, "after"), ({"include[]": "everything"}, "include")]:
        got = http.get(url, params=query)
        assert got.status_code == 400 and got.json()["error"]["param"] == param, (query, got.text)
    assert len(client.responses.input_items.list(r.id, include=list(INCLUDABLE), limit=100).data) == 1
    assert http.get(url, params={"limit": 1, "include": LOGPROBS_INCLUDE}).status_code == 200


# ---------------------------------------------------------------------------------------------- include
def test_include_unknown_value_is_400_and_documented_ones_are_accepted(client, http):
    got = http.post("/v1/responses", json={"input": "x", "include": ["message.output_text.logprobs", "nonsense"]})
    assert got.status_code == 400 and got.json()["error"]["param"] == "include", got.text
    others = [x for x in INCLUDABLE if x != LOGPROBS_INCLUDE]
    r = client.responses.create(input="Hi", max_output_tokens=4, reasoning=OFF, include=others, **GREEDY)
    assert r.output[0].content[0].logprobs == []  # nothing asked for that this server has


@pytest.mark.parametrize("script,reasoning", [("plain", OFF), ("reason", None)])
def test_include_logprobs_on_known_text(scripted_client, script, reasoning):
    """Forced text: the logprob tokens of the output_text are exactly its text (reasoning, </think> and the stop
    token are not part of it), in the response, the streamed deltas and the done events alike."""
    kw = dict(model=MODEL_NAME, input=f"SCRIPT:{script}", max_output_tokens=60, include=[LOGPROBS_INCLUDE],
              top_logprobs=2, **({"reasoning": reasoning} if reasoning else {}))
    r = scripted_client.responses.create(**kw)
    part = r.output[-1].content[0]
    assert part.type == "output_text" and part.text in ("Just an answer, no thinking.", "Hello! How can I help?")
    assert "".join(lp.token for lp in part.logprobs) == part.text
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in part.logprobs)
    events = list(scripted_client.responses.create(**kw, stream=True))
    deltas = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response.output[-1].content[0]
    assert [lp.token for lp in deltas] == [lp.token for lp in done.logprobs] == [lp.token for lp in final.logprobs] \
        == [lp.token for lp in part.logprobs]


def test_logprobs_match_chat_completions(client):
    """Greedy, thinking off: the output_text's logprobs are chat's for the same tokens (top_logprobs alone asks
    for them too); without either, output_text parts keep an empty list."""
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=10, logprobs=True, top_logprobs=3, temperature=0,
                                          extra_body={**NO_THINK, "ignore_eos": True})
    by_token = [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in chat.choices[0].logprobs.content]
    for kw in ({"include": [LOGPROBS_INCLUDE], "top_logprobs": 3}, {"top_logprobs": 3}):
        r = client.responses.create(input="Hello there", max_output_tokens=10, reasoning=OFF, **kw, **GREEDY)
        assert r.output_text == chat.choices[0].message.content and r.top_logprobs == 3
        lps = r.output[0].content[0].logprobs
        assert "".join(lp.token for lp in lps) == r.output_text
        got = [(lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in lps]
        it = iter(by_token)  # the text's tokens are chat's, in order (chat also scores special tokens)
        assert all(any(g[0] == c[0] and g[2] == c[2] and abs(g[1] - c[1]) < 1e-4 for c in it) for g in got)
    r = client.responses.create(input="Hello there", max_output_tokens=4, reasoning=OFF, **GREEDY)
    assert r.output[0].content[0].logprobs == []
