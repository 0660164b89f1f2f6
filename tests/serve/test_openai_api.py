"""The API through the official ``openai`` client against the real engine (random-init model)."""

from __future__ import annotations

import datetime
import json
import re
import uuid
from typing import Annotated, Literal

import pydantic
import pytest

from .conftest import API_KEY, MODEL_NAME

openai = pytest.importorskip("openai")

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"},
                                         "metric": {"type": "boolean"}},
        "required": ["location", "days"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
HI = [{"role": "user", "content": "Hello there"}]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].max_model_len == 1024
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=12, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL_NAME
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.role == "assistant"
    u = r.usage
    assert u.completion_tokens == 12 and u.total_tokens == u.prompt_tokens + 12
    # thinking is on by default: the output starts inside reasoning, and no </think> came
    assert u.completion_tokens_details.reasoning_tokens == 12
    assert c.message.reasoning_content
    expected = u.prompt_tokens * 1.0 / 1e6 + 12 * 3.2 / 1e6
    assert u.cost == pytest.approx(expected)
    assert u.cost_details["input_price_per_million"] == 1.0 and u.cost_details["output_price_per_million"] == 3.2


def test_chat_streaming_matches_usage(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join((getattr(c.choices[0].delta, "reasoning_content", None) or "") + (c.choices[0].delta.content or "")
                   for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert text  # something streamed
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_seed_n_and_sampling_params(client):
    kw = dict(model=MODEL_NAME, messages=HI, max_tokens=8, seed=1234, temperature=0.9, top_p=0.9,
              extra_body={"top_k": 50, "ignore_eos": True, "thinking": {"type": "disabled"}})
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 16
    g1 = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
    g2 = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert g1.choices[0].message.reasoning_content == g2.choices[0].message.reasoning_content


def test_max_completion_tokens_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_completion_tokens=5, logprobs=True,
                                       top_logprobs=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    lp = r.choices[0].logprobs.content
    assert len(lp) == 5
    for e in lp:
        assert len(e.top_logprobs) == 4
        assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert e.logprob <= 0


def test_stop_string_cuts_output(client):
    base = client.completions.create(model=MODEL_NAME, prompt="the weather in", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    assert len(text) > 4
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model=MODEL_NAME, prompt="the weather in", max_tokens=12, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].stop_reason == stop


def test_completions_endpoint(client):
    r = client.completions.create(model=MODEL_NAME, prompt=["hello world", "the city"], max_tokens=4, n=2, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 4
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    for c in r.choices:
        assert len(c.logprobs.tokens) == 4 and len(c.logprobs.top_logprobs[0]) == 2
    ids = client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7, 8], max_tokens=3, echo=True,
                                    extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 3
    stream = client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@pytest.mark.parametrize("thinking", ["enabled", "disabled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_is_valid_json(client, thinking, seed):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Give JSON"}],
                                       max_tokens=40, seed=seed, temperature=1.0,
                                       response_format={"type": "json_object"},
                                       extra_body={"thinking": {"type": thinking}})
    content = r.choices[0].message.content
    assert isinstance(json.loads(content), dict), content
    assert r.usage.completion_tokens <= 40


def test_json_object_streamed(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=30, seed=7, stream=True,
                                            response_format={"type": "json_object"},
                                            extra_body={"thinking": {"type": "disabled"}})
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(content), dict)


class Weather(pydantic.BaseModel):
    city: str
    days: int
    unit: Literal["c", "f"]
    alerts: list[str]


@pytest.mark.parametrize("thinking", ["enabled", "disabled"])
def test_structured_output_with_the_clients_parse_helper(client, thinking):
    """``client.chat.completions.parse`` turns a pydantic model into a strict json_schema response_format and
    parses the answer back into the model: the whole round trip must work on a random-init model."""
    for seed in range(3):
        r = client.chat.completions.parse(model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}],
                                          response_format=Weather, max_tokens=80, seed=seed, temperature=1.0,
                                          extra_body={"thinking": {"type": thinking}})
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop" and isinstance(msg.parsed, Weather), msg.content
        assert msg.parsed.unit in ("c", "f") and r.usage.completion_tokens <= 80


class Booking(pydantic.BaseModel):
    """Fields whose JSON Schema has ``format`` / ``pattern``, as pydantic writes them."""
    id: uuid.UUID
    day: datetime.date
    at: datetime.datetime
    code: Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Z]{3}\d$")]


def test_parse_helper_with_formats_and_patterns(client):
    schema = Booking.model_json_schema()
    assert schema["properties"]["at"]["format"] == "date-time" and "pattern" in schema["properties"]["code"]
    for seed in range(3):
        r = client.chat.completions.parse(model=MODEL_NAME, messages=[{"role": "user", "content": "Book it"}],
                                          response_format=Booking, max_tokens=120, seed=seed, temperature=1.0,
                                          extra_body={"thinking": {"type": "disabled"}})
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop" and isinstance(msg.parsed, Booking), msg.content


def test_json_schema_streamed_and_on_completions(client):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                                               "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
              "required": ["n", "tags"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    stream = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=30, seed=3, stream=True,
                                            response_format=rf, extra_body={"thinking": {"type": "disabled"}})
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), schema)
    r = client.completions.create(model=MODEL_NAME, prompt="JSON:", max_tokens=30, n=2, seed=4,
                                  extra_body={"response_format": rf})
    for c in r.choices:
        jsonschema.validate(json.loads(c.text), schema)


def test_vllm_structured_outputs_choice_and_json(client):
    """vLLM's request field (``extra_body``), its older ``guided_*`` names, on chat and completions."""
    import jsonschema

    labels = ["positive", "negative", "neutral"]
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=40, seed=seed, temperature=1.5,
                                           extra_body={"structured_outputs": {"choice": labels}})
        assert r.choices[0].message.content in labels and r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.tool_calls is None
    r = client.completions.create(model=MODEL_NAME, prompt="Label:", max_tokens=10, n=3, seed=5, temperature=1.5,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert all(c.text in ("yes", "no") for c in r.choices)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for body in ({"structured_outputs": {"json": schema}}, {"guided_json": json.dumps(schema)}):
        r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=24, seed=2,
                                           extra_body={**body, "thinking": {"type": "disabled"}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=24, seed=2, stream=False,
                                       extra_body={"structured_outputs": {"json_object": True},
                                                   "thinking": {"type": "disabled"}})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_vllm_structured_outputs_regex(client):
    """``structured_outputs.regex`` and ``guided_regex``: every sample fully matches, chat and completions."""
    date = r"20\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=20, seed=seed, temperature=1.5,
                                           extra_body={"structured_outputs": {"regex": date},
                                                       "thinking": {"type": "disabled"}})
        assert re.fullmatch(date, r.choices[0].message.content, re.ASCII), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL_NAME, prompt="Code:", max_tokens=12, n=3, seed=5, temperature=1.5,
                                  extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3,5}"})
    assert all(re.fullmatch("[A-Z]{2}-[0-9]{3,5}", c.text) for c in r.choices), [c.text for c in r.choices]


ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= num | "(" expr ")"
num  ::= [1-9] [0-9]{0,2}
"""


def test_vllm_structured_outputs_grammar(client):
    """``structured_outputs.grammar`` and ``guided_grammar`` (GBNF): balanced arithmetic, which no regex can state."""
    def well_formed(text):
        depth = 0
        for c in text:
            depth += (c == "(") - (c == ")")
            if depth < 0:
                return False
        return depth == 0 and re.fullmatch(r"[0-9+\-()]+", text) and eval(text) is not None  # noqa: S307

    for seed in range(3):
        r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=30, seed=seed, temperature=1.5,
                                           extra_body={"structured_outputs": {"grammar": ARITHMETIC},
                                                       "thinking": {"type": "disabled"}})
        assert r.choices[0].finish_reason == "stop" and well_formed(r.choices[0].message.content)
    r = client.completions.create(model=MODEL_NAME, prompt="Sum:", max_tokens=30, n=3, seed=5, temperature=1.5,
                                  extra_body={"guided_grammar": ARITHMETIC})
    assert all(well_formed(c.text) for c in r.choices), [c.text for c in r.choices]


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}


def parsed_calls(text: str, trigger: str, schemas: dict[str, dict]) -> int:
    """Checks each tag in ``text`` written after free text (begin, a JSON body the begin's schema accepts, its end);
    returns how many there are. A body's strings may hold the trigger, so they are read as JSON, not split on."""
    import jsonschema

    calls, at = 0, text.find(trigger)
    while at >= 0:
        begin = next(b for b in schemas if text.startswith(b, at))
        body, end = json.JSONDecoder().raw_decode(text, at + len(begin))
        jsonschema.validate(body, schemas[begin]["schema"])
        assert text.startswith(schemas[begin]["end"], end), text
        calls, at = calls + 1, text.find(trigger, end + len(schemas[begin]["end"]))
    return calls


def test_structural_tag_response_format(client, model_dir):
    """vLLM's ``response_format`` ``structural_tag`` (``structures`` + ``triggers``): free text in which every call
    written after a trigger has a valid body (a logit_bias towards "<" makes the random model write the trigger), and
    the same as ``structured_outputs.structural_tag`` JSON text; xgrammar's ``format`` form, where ``at_least_one``
    makes the answer start with a call."""
    from glm5.tokenizer import GLM5Tokenizer

    lt = GLM5Tokenizer.from_pretrained(model_dir).token_to_id("<")
    structures = [{"begin": "<weather>", "schema": CITY, "end": "</weather>"},
                  {"begin": "<time>", "schema": {"type": "object", "properties": {}}, "end": "</time>"}]
    rf = {"type": "structural_tag", "structures": structures, "triggers": ["<"]}
    schemas = {s["begin"]: s for s in structures}
    calls = 0
    for seed in range(4):
        off = {"thinking": {"type": "disabled"}}
        body = ({"response_format": rf, "extra_body": off} if seed % 2 else
                {"extra_body": {"structured_outputs": {"structural_tag": json.dumps(rf)}, **off}})
        r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=40, seed=seed, temperature=1.0,
                                           logit_bias={str(lt): 5}, **body)
        calls += parsed_calls(r.choices[0].message.content or "", "<", schemas)
    assert calls
    fmt = {"type": "triggered_tags", "triggers": ["<"], "at_least_one": True, "tags": [
        {"type": "tag", "begin": "<weather>", "content": {"type": "json_schema", "json_schema": CITY},
         "end": "</weather>"}]}
    r = client.completions.create(model=MODEL_NAME, prompt="Call:", max_tokens=50, n=2, seed=7,
                                  extra_body={"response_format": {"type": "structural_tag", "format": fmt}})
    for c in r.choices:
        assert c.text.startswith("<weather>") and parsed_calls(c.text, "<", {"<weather>": structures[0]}) >= 1


def test_json_schema_property_order_is_the_schemas(client):
    """Compiled grammars are reused for repeated schemas; two schemas that differ only in property order are
    different grammars (the output follows each one's order)."""
    for order in (["a", "b"], ["b", "a"], ["a", "b"]):
        schema = {"type": "object", "properties": {k: {"type": "integer"} for k in order}, "required": ["a", "b"]}
        r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=20, seed=1,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "o", "schema": schema}},
                                           extra_body={"thinking": {"type": "disabled"}})
        assert list(json.loads(r.choices[0].message.content)) == order


@pytest.mark.parametrize("seed", [0, 1])
def test_tool_choice_required(client, seed):
    r = client.chat.completions.create(model=MODEL_NAME, messages=HI, tools=TOOLS, tool_choice="required",
                                       max_tokens=80, seed=seed)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        args = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            assert {"location", "days"} <= set(args) and isinstance(args["days"], int)


def test_tool_choice_named_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=HI, tools=TOOLS, max_tokens=80, seed=3, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls, finish = {}, None
    for ch in stream:
        for c in ch.choices:
            for tc in c.delta.tool_calls or []:
                e = calls.setdefault(tc.index, {"name": None, "args": ""})
                e["name"] = e["name"] or (tc.function.name if tc.function else None)
                e["args"] += (tc.function.arguments or "") if tc.function else ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0]["name"] == "get_weather"
    assert {"location", "days"} <= set(json.loads(calls[0]["args"]))


def test_tool_round_trip_real_engine(client):
    first = client.chat.completions.create(model=MODEL_NAME, messages=HI, tools=TOOLS, max_tokens=60, seed=5,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    msg = first.choices[0].message
    call = msg.tool_calls[0]
    assert call.function.name == "get_time"
    messages = HI + [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"time": "12:00"}'}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=5)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_reasoning_accepted_on_input(client):
    """``reasoning`` (vLLM's name) renders like ``reasoning_content``; kept with clear_thinking=false."""
    def prompt_tokens(extra_msg):
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", **extra_msg}]
        r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=1,
                                           extra_body={"chat_template_kwargs": {"clear_thinking": False}})
        return r.usage.prompt_tokens

    a = prompt_tokens({"reasoning_content": "because of the weather"})
    b = prompt_tokens({"reasoning": "because of the weather"})
    c = prompt_tokens({})
    assert a == b > c


def test_thinking_switches_change_the_prompt(client, http):
    on = http.post("/tokenize", json={"messages": HI}).json()["prompt"]
    off = http.post("/tokenize", json={"messages": HI, "enable_thinking": False}).json()["prompt"]
    assert on.endswith("<|assistant|><think>") and off.endswith("<|assistant|></think>")
    base = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=3, extra_body={"ignore_eos": True})
    for extra in ({"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"enable_thinking": False}}):
        r = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=3,
                                           extra_body={"ignore_eos": True, **extra})
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
        assert getattr(r.choices[0].message, "reasoning_content", None) is None
        assert r.usage.prompt_tokens == base.usage.prompt_tokens  # </think> replaces <think>


def test_system_developer_and_list_content(client):
    r = client.chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}])
    assert r.choices[0].message.role == "assistant"


def test_async_client_concurrent_streams(server):
    import asyncio

    async def main():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

        async def one(i):
            s = await ac.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=8, stream=True, seed=i,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
            usage = None
            async for ch in s:
                usage = ch.usage or usage
            return usage.completion_tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await ac.close()

    assert asyncio.run(main()) == [8] * 8


def test_prefix_cache_shows_in_usage_and_cost(client):
    msgs = [{"role": "system", "content": "the weather in Beijing and Paris " * 8}, {"role": "user", "content": "hi"}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=2,
                                           extra_body={"ignore_eos": True})
    second = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=2,
                                            extra_body={"ignore_eos": True})
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached <= second.usage.prompt_tokens
    p = second.usage.prompt_tokens
    assert second.usage.cost == pytest.approx(((p - cached) * 1.0 + cached * 0.2 + 2 * 3.2) / 1e6)
    assert second.usage.cost < first.usage.cost or first.usage.prompt_tokens_details.cached_tokens > 0


def test_completions_echo_with_logprobs_scores_the_prompt(client, model_dir):
    """lm-eval's loglikelihood request (echo + logprobs): the prompt's tokens come back scored, the first one
    unscored, equal to the model's own log-softmax; streaming sends the same in its echo chunk."""
    import torch

    from glm5.model.transformer import GLM5ForCausalLM

    prompt = [11, 57, 203, 9, 140, 77, 31]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, echo=True, logprobs=2,
                                  temperature=0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    model = GLM5ForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    for t in range(1, len(prompt)):
        assert abs(lp.token_logprobs[t] - float(ref[t - 1, prompt[t]])) < 1e-4
        assert len(lp.top_logprobs[t]) <= 2
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    text = r.choices[0].text
    assert lp.text_offset[len(prompt)] == len(text) - len("".join(lp.tokens[len(prompt):]))
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, echo=True, logprobs=2,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    first = chunks[0].choices[0]
    assert first.logprobs.token_logprobs == lp.token_logprobs[: len(prompt)]
    streamed = [t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices and c.choices[0].logprobs else [])]
    assert streamed == lp.tokens


def test_vllm_prompt_logprobs_field(client, http, model_dir):
    """vLLM's prompt_logprobs extension: per prompt token {id: {logprob, rank, decoded_token}} (first None),
    in each completions choice and at the top of a chat response; refused with stream, as vLLM does."""
    import torch

    from glm5.model.transformer import GLM5ForCausalLM

    prompt = [11, 57, 203, 9, 140, 77]
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2,
                                           "prompt_logprobs": 2, "temperature": 0}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(prompt)
    model = GLM5ForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    for t in range(1, len(prompt)):
        e = plp[t][str(prompt[t])]
        assert abs(e["logprob"] - float(ref[t - 1, prompt[t]])) < 1e-4
        x = ref[t - 1, prompt[t]]  # the server ranks its own logits, equal to these within 1e-4: near-ties may flip
        assert 1 + int((ref[t - 1] > x + 1e-4).sum()) <= e["rank"] <= int((ref[t - 1] > x - 1e-4).sum())
        assert isinstance(e["decoded_token"], str)
        top = ref[t - 1].topk(2).indices.tolist()
        assert plp[t][str(top[0])]["rank"] == 1 and str(top[1]) in plp[t]
    chat = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": HI, "max_tokens": 2,
                                                   "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    bad = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "prompt_logprobs": 1,
                                             "stream": True})
    assert bad.status_code == 400 and "prompt_logprobs" in bad.json()["error"]["message"]


def test_strict_tools_in_auto_mode(client, model_dir):
    """OpenAI's strict function calling with tool_choice "auto": the model may answer in text, and every call it
    makes has valid arguments (a logit_bias towards <tool_call> makes this random model call tools sometimes)."""
    import jsonschema

    from glm5.tokenizer import GLM5Tokenizer

    call_id = GLM5Tokenizer.from_pretrained(model_dir).token_to_id("<tool_call>")
    strict_tools = [{"type": "function", "function": {**t["function"], "strict": True}} for t in TOOLS]
    kinds = set()
    for seed in range(6):
        r = client.chat.completions.create(model=MODEL_NAME, messages=HI, tools=strict_tools, max_tokens=60, seed=seed,
                                           temperature=1.2, logit_bias={str(call_id): 6 if seed % 2 else -100},
                                           extra_body={"thinking": {"type": "disabled"}})
        c = r.choices[0]
        for call in c.message.tool_calls or []:
            fn = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), {**fn["parameters"], "additionalProperties": False})
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls"
        kinds.add(bool(c.message.tool_calls))
    assert kinds == {True, False}
