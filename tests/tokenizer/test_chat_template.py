"""Golden renderings of hand-written conversations (reference chat-format-and-serving.md §1.3)."""

import copy
import json

import pytest

from glm5.tokenizer import GLM5_CHAT_TEMPLATE, normalize_messages, render_chat, render_template

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "Summarize GLM-5 in one sentence."}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}

TOOLS_BLOCK = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a location", '
    '"parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "The city name"}, '
    '"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"]}}}\n'
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
)
REASONING = "The user is asking for the weather in Beijing ... I'll call get_weather."


def both(messages, tools=None, **kw):
    """Render with the Python renderer and with our Jinja (HF semantics); they must agree."""
    py = render_chat(messages, tools, **kw)
    jinja_kw = {"add_generation_prompt": kw.pop("add_generation_prompt", True), **kw}
    jinja_kw.setdefault("enable_thinking", True)
    assert render_template(GLM5_CHAT_TEMPLATE, normalize_messages(messages), tools, **jinja_kw) == py
    return py


def test_plain_chat_thinking_on():
    assert both([SYSTEM, USER]) == (
        "[gMASK]<sop><|system|>You are a helpful assistant.<|user|>Summarize GLM-5 in one sentence.<|assistant|><think>"
    )
    # "undefined" enable_thinking means on
    assert both([SYSTEM, USER], enable_thinking=None).endswith("<|assistant|><think>")


def test_plain_chat_thinking_off():
    assert both([SYSTEM, USER], enable_thinking=False) == (
        "[gMASK]<sop><|system|>You are a helpful assistant.<|user|>Summarize GLM-5 in one sentence.<|assistant|></think>"
    )


def test_no_generation_prompt():
    assert both([USER], add_generation_prompt=False) == "[gMASK]<sop><|user|>Summarize GLM-5 in one sentence."


MULTI = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
    {"role": "user", "content": "U2"},
]


def test_multi_turn_drops_earlier_reasoning():
    assert both(MULTI) == "[gMASK]<sop><|system|>S<|user|>U1<|assistant|></think>A1<|user|>U2<|assistant|><think>"
    assert both(MULTI, clear_thinking=True) == both(MULTI)


def test_multi_turn_clear_thinking_false_keeps_reasoning():
    assert both(MULTI, clear_thinking=False) == (
        "[gMASK]<sop><|system|>S<|user|>U1<|assistant|><think>R1</think>A1<|user|>U2<|assistant|><think>"
    )


def test_tools_first_request():
    msgs = [{"role": "user", "content": "What's the weather in Beijing?"}]
    assert both(msgs, [WEATHER_TOOL]) == (
        "[gMASK]<sop>" + TOOLS_BLOCK + "<|user|>What's the weather in Beijing?<|assistant|><think>"
    )


def tool_turn(reasoning=REASONING, arguments='{"location":"Beijing"}'):
    return {
        "role": "assistant",
        "content": None,
        "reasoning_content": reasoning,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}],
    }


def test_tools_call_and_result_interleaved_thinking():
    msgs = [
        {"role": "user", "content": "What's the weather in Beijing?"},
        tool_turn(),
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18, "condition": "sunny"}'},
    ]
    assert both(msgs, [WEATHER_TOOL]) == (
        "[gMASK]<sop>" + TOOLS_BLOCK + "<|user|>What's the weather in Beijing?<|assistant|><think>" + REASONING
        + "</think><tool_call>get_weather<arg_key>location</arg_key><arg_value>Beijing</arg_value></tool_call>"
        "<|observation|><tool_response>{\"temp_c\": 18, \"condition\": \"sunny\"}</tool_response><|assistant|><think>"
    )


def test_clear_thinking_true_still_keeps_reasoning_after_the_last_user_turn():
    """clear_thinking only drops reasoning *before* the last user message (§1.2: "after the last user message, or
    clear_thinking explicitly false"); an explicit True must not strip the interleaved thinking of the current turn."""
    msgs = [
        {"role": "user", "content": "What's the weather in Beijing?"},
        tool_turn(),
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    rendered = both(msgs, [WEATHER_TOOL], clear_thinking=True)
    assert rendered == both(msgs, [WEATHER_TOOL])
    assert "<|assistant|><think>" + REASONING + "</think><tool_call>get_weather" in rendered


def test_tool_call_without_reasoning_renders_bare_think_end():
    msgs = [{"role": "user", "content": "q"}, tool_turn(reasoning=None), {"role": "tool", "content": "r"}]
    assert both(msgs) == (
        "[gMASK]<sop><|user|>q<|assistant|></think><tool_call>get_weather<arg_key>location</arg_key>"
        "<arg_value>Beijing</arg_value></tool_call><|observation|><tool_response>r</tool_response><|assistant|><think>"
    )


def test_parallel_calls_and_results_share_one_observation():
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [
                {"type": "function", "function": {"name": "a", "arguments": {}}},
                {"type": "function", "function": {"name": "b", "arguments": {"x": "1"}}},
            ],
        },
        {"role": "tool", "content": "ra"},
        {"role": "tool", "content": "rb"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    assert both(msgs, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>q<|assistant|></think>Checking both.<tool_call>a</tool_call>"
        "<tool_call>b<arg_key>x</arg_key><arg_value>1</arg_value></tool_call>"
        "<|observation|><tool_response>ra</tool_response><tool_response>rb</tool_response>"
        "<|user|>thanks<|assistant|></think>You're welcome."
    )


def test_non_string_values_use_tojson():
    args = {"n": 3, "f": 1.5, "ok": True, "none": None, "obj": {"a": 1, "é": "ü"}, "arr": ["x", 2], "s": "3"}
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": args}}]}]
    assert both(msgs, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>q<|assistant|></think><tool_call>f"
        "<arg_key>n</arg_key><arg_value>3</arg_value><arg_key>f</arg_key><arg_value>1.5</arg_value>"
        "<arg_key>ok</arg_key><arg_value>true</arg_value><arg_key>none</arg_key><arg_value>null</arg_value>"
        '<arg_key>obj</arg_key><arg_value>{"a": 1, "é": "ü"}</arg_value>'
        '<arg_key>arr</arg_key><arg_value>["x", 2]</arg_value><arg_key>s</arg_key><arg_value>3</arg_value></tool_call>'
    )


def test_reasoning_and_content_are_stripped_and_user_text_is_not():
    msgs = [
        {"role": "user", "content": "  spaced  \n"},
        {"role": "assistant", "reasoning_content": "\n  think  \n", "content": "\n\n answer \n"},
    ]
    assert both(msgs, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>  spaced  \n<|assistant|><think>think</think>answer"
    )


def test_reasoning_split_out_of_content():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"}]
    assert both(msgs, add_generation_prompt=False) == "[gMASK]<sop><|user|>q<|assistant|><think>R</think>A"
    # before the last user turn it is dropped, and the content keeps only the answer
    msgs2 = msgs + [{"role": "user", "content": "q2"}]
    assert both(msgs2) == "[gMASK]<sop><|user|>q<|assistant|></think>A<|user|>q2<|assistant|><think>"


def test_embedded_reasoning_is_before_the_first_think_end_and_content_after_the_last():
    """Content with several </think> (GLM-4.x template convention, module docstring): the reasoning is the text up
    to the first </think> (after the last <think> in it) and the content is what follows the last </think>."""
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>R1<think>R2</think>mid</think>\nA"}]
    assert both(msgs, add_generation_prompt=False) == "[gMASK]<sop><|user|>q<|assistant|><think>R2</think>A"
    msgs2 = msgs + [{"role": "user", "content": "q2"}]
    assert both(msgs2, add_generation_prompt=False) == "[gMASK]<sop><|user|>q<|assistant|></think>A<|user|>q2"


def test_reasoning_content_field_wins_over_its_aliases():
    """§1.2: reasoning comes from ``reasoning_content`` when it is a string; ``reasoning``/``thinking`` only fill it
    in when it is absent (a client may send a stale alias next to the real field)."""
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "reasoning_content": "R", "reasoning": "X", "thinking": "Y", "content": "A"}]
    assert both(msgs, add_generation_prompt=False) == "[gMASK]<sop><|user|>q<|assistant|><think>R</think>A"
    # an explicit null field is "absent": the alias fills it
    msgs[1]["reasoning_content"] = None
    assert both(msgs, add_generation_prompt=False).startswith("[gMASK]<sop><|user|>q<|assistant|><think>")


def test_reasoning_aliases_accepted():
    for key in ("reasoning", "thinking"):
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", key: "R", "content": "A"}]
        assert both(msgs, add_generation_prompt=False) == "[gMASK]<sop><|user|>q<|assistant|><think>R</think>A"


def test_whitespace_only_reasoning_renders_empty_think():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "  ", "content": "A"}]
    assert both(msgs, add_generation_prompt=False) == "[gMASK]<sop><|user|>q<|assistant|><think></think>A"


def test_list_contents():
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}]},
        {"role": "user", "content": [{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {"url": "x"}}, "plain"]},
        {"role": "tool", "content": ["r1", {"output": "r2"}]},
    ]
    assert both(msgs, add_generation_prompt=False) == (
        "[gMASK]<sop><|system|>S1S2<|user|>look plain"
        "<|observation|>\n<tool_response>r1</tool_response>\n<tool_response>r2</tool_response>"
    )


def test_system_prompt_after_tools_block_and_developer_role():
    msgs = [{"role": "developer", "content": "D"}, {"role": "user", "content": "q"}]
    assert both(msgs, [WEATHER_TOOL]) == "[gMASK]<sop>" + TOOLS_BLOCK + "<|system|>D<|user|>q<|assistant|><think>"


def test_empty_tools_list_renders_no_block():
    assert both([USER], []) == both([USER])


def test_unknown_role_is_an_error():
    with pytest.raises(ValueError, match="Unsupported message role"):
        render_chat([{"role": "narrator", "content": "x"}])


def test_bad_arguments_are_an_error():
    with pytest.raises(ValueError):
        render_chat([tool_turn(arguments="{not json")])
    with pytest.raises(ValueError):
        render_chat([tool_turn(arguments="[1, 2]")])


def test_normalize_does_not_mutate_and_is_idempotent():
    msgs = [{"role": "user", "content": "q"}, tool_turn(), {"role": "assistant", "reasoning": "R", "content": "A"}]
    before = copy.deepcopy(msgs)
    once = normalize_messages(msgs)
    assert msgs == before
    assert normalize_messages(once) == once
    assert once[1]["tool_calls"][0]["function"]["arguments"] == {"location": "Beijing"}
    assert once[2]["reasoning_content"] == "R"
    assert json.loads(json.dumps(once))  # still plain JSON
    assert normalize_messages([tool_turn(arguments="")])[0]["tool_calls"][0]["function"]["arguments"] == {}
    # None-valued keys are dropped, so a template testing ``is defined`` sees them as undefined
    assert normalize_messages([{"role": "assistant", "content": None, "tool_calls": None}]) == [{"role": "assistant"}]
