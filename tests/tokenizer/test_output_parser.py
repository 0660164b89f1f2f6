"""One-shot parsing of hand-written GLM-5 outputs, including malformed and truncated ones."""

import itertools
import json
import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as hs

from glm5.tokenizer import parse_output, prompt_opens_reasoning, render_chat

from glm5_chat_strategies import plain_text
from glm5_parser_tools import TOOLS


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def parse(text, tools=TOOLS, **kw):
    return parse_output(text, tools, id_factory=ids(), **kw)


def calls(result):
    return [(c.name, json.loads(c.arguments)) for c in result.tool_calls]


def test_reasoning_then_answer():
    r = parse("Let me think.\n</think>\nThe answer is 4.")
    assert (r.reasoning_content, r.content, r.tool_calls, r.errors) == ("Let me think.", "The answer is 4.", [], [])
    assert r.finish_reason == "stop" and not r.unterminated_reasoning
    assert r.to_message() == {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "Let me think."}


def test_thinking_off_output_is_content():
    r = parse("Just the answer.", thinking=False)
    assert (r.reasoning_content, r.content) == (None, "Just the answer.")
    # a model that opens <think> anyway
    r = parse("<think>hmm</think>ok", thinking=False)
    assert (r.reasoning_content, r.content) == ("hmm", "ok")
    assert prompt_opens_reasoning("...<|assistant|><think>") and not prompt_opens_reasoning("...<|assistant|></think>")


def test_prompt_opens_reasoning_only_when_it_ends_with_think():
    """The output starts in reasoning iff the prompt *ends* with <think> (reference §8). With preserved thinking the
    history holds <think>...</think> blocks, so merely containing <think> says nothing about the generation prompt."""
    history = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
        {"role": "user", "content": "q2"},
    ]
    off = render_chat(history, enable_thinking=False, clear_thinking=False)
    assert "<think>R1</think>" in off and off.endswith("<|assistant|></think>")
    assert not prompt_opens_reasoning(off)
    assert prompt_opens_reasoning(render_chat(history, clear_thinking=False))


def test_reference_tool_call_example():
    out = (
        "The user is asking for the weather in Beijing ... I'll call get_weather.</think><tool_call>get_weather"
        "<arg_key>location</arg_key><arg_value>Beijing</arg_value></tool_call><|observation|>"
    )
    r = parse(out)
    assert r.reasoning_content == "The user is asking for the weather in Beijing ... I'll call get_weather."
    assert r.content is None
    assert [c.to_openai() for c in r.tool_calls] == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Beijing"}'}}
    ]
    assert r.finish_reason == "tool_calls" and r.errors == []
    assert r.to_message()["tool_calls"][0]["function"]["name"] == "get_weather"
    # OpenAI's message always carries "content", null for a pure tool-call turn (reference §7.3)
    assert "content" in r.to_message() and r.to_message()["content"] is None


def test_zero_argument_call():
    r = parse("</think><tool_call>get_time</tool_call>")
    assert calls(r) == [("get_time", {})] and r.tool_calls[0].arguments == "{}" and r.errors == []


def test_several_calls_with_text_between():
    r = parse(
        "r</think>Checking.\n<tool_call>get_time</tool_call>\n<tool_call>get_weather<arg_key>location</arg_key>"
        "<arg_value>Paris</arg_value></tool_call>\nand <tool_call>get_time</tool_call>done"
    )
    assert calls(r) == [("get_time", {}), ("get_weather", {"location": "Paris"}), ("get_time", {})]
    assert [c.id for c in r.tool_calls] == ["call_0", "call_1", "call_2"]
    assert r.content == "Checking.\n\n\nand done"  # text between calls joins, outer whitespace trimmed


def test_tool_call_starting_inside_think():
    r = parse("I should check the time <tool_call>get_time</tool_call></think>")
    assert r.reasoning_content == "I should check the time"
    assert calls(r) == [("get_time", {})]
    assert r.content is None and not r.unterminated_reasoning


def test_tool_call_inside_reasoning_ends_reasoning_for_good():
    """§2.4.3: a <tool_call> ends reasoning even without </think>; what follows the call is content, not a resumed
    reasoning block (vLLM #42400: calls inside <think> swallowed as reasoning)."""
    r = parse("I need the time <tool_call>get_time</tool_call> Checking now.")
    assert (r.reasoning_content, r.content) == ("I need the time", "Checking now.")
    assert calls(r) == [("get_time", {})] and not r.unterminated_reasoning


def test_no_think_end_before_the_end():
    r = parse("The model skipped thinking and answered.")
    assert r.reasoning_content == "The model skipped thinking and answered." and r.content is None
    assert r.unterminated_reasoning
    moved = parse("The model skipped thinking and answered.", unterminated_reasoning="content")
    assert (moved.reasoning_content, moved.content) == (None, "The model skipped thinking and answered.")
    # the policy never moves reasoning when there are calls or content
    r = parse("x<tool_call>get_time</tool_call>", unterminated_reasoning="content")
    assert r.reasoning_content == "x"
    # ... nor when the output ends inside a reopened <think> after a call (§2.4.4: "and there were no tool calls")
    r = parse("x<tool_call>get_time</tool_call><think>more", unterminated_reasoning="content")
    assert r.unterminated_reasoning and (r.reasoning_content, r.content) == ("xmore", None) and calls(r)
    with pytest.raises(ValueError):
        parse("x", unterminated_reasoning="drop")


def test_terminator_inside_reasoning_counts_as_unterminated():
    r = parse("thinking...<|user|>hallucinated user turn")
    assert r.reasoning_content == "thinking..." and r.unterminated_reasoning


@pytest.mark.parametrize(
    "out, expected",
    [
        ("r</th", ("r</th", None)),  # ends with a partial tag: literal text
        ("r</think>answer <tool_ca", ("r", "answer <tool_ca")),
        ("r</think>a <", ("r", "a <")),
    ],
)
def test_output_cut_mid_tag(out, expected):
    r = parse(out)
    assert (r.reasoning_content, r.content) == expected and r.tool_calls == []
    # a cut tag is reported; a lone trailing "<" is just text
    assert any("partial tag" in e for e in r.errors) == (not out.endswith("<"))


@settings(max_examples=100, deadline=None)
@given(before=plain_text, body=plain_text, after=plain_text, end=hs.sampled_from(["", "<|user|>", "<|endoftext|>"]))
@example(before="\u3000 r\n", body="\n a b\u2003\t", after="\u3000\u2003", end="")
def test_reasoning_and_content_are_stripped_like_the_template(before, body, after, end):
    """The template writes ``reasoning.strip()`` / ``content.strip()`` (str.strip: every Unicode space, e.g. U+3000),
    so the parser trims the same way, whether the output stops at an EOS token or just ends (length / stop string);
    whitespace-only becomes null."""
    r = parse(before + "</think>" + body + end)
    assert (r.reasoning_content, r.content) == (before.strip() or None, body.strip() or None)
    r = parse(after + end, thinking=False)
    assert (r.reasoning_content, r.content) == (None, after.strip() or None)


def test_output_cut_inside_a_call():
    r = parse("r</think><tool_call>get_weather<arg_key>location</arg_key><arg_value>Bei")
    assert calls(r) == [("get_weather", {"location": "Bei"})]
    assert any("unterminated" in e for e in r.errors)
    r = parse("r</think><tool_call>get_weather<arg_key>days</arg_key><arg_value>1")
    assert calls(r) == [("get_weather", {"days": 1})]
    r = parse("r</think><tool_call>get_weather<arg_key>locat")
    assert calls(r) == [("get_weather", {})]
    r = parse("r</think><tool_call>get_wea")  # name never closed and not a declared tool: dropped
    assert r.tool_calls == [] and r.errors
    r = parse("r</think><tool_call>get_time")  # never closed but names a declared tool
    assert calls(r) == [("get_time", {})]
    r = parse("r</think><tool_call>get_time<|observation|>")
    assert calls(r) == [("get_time", {})]


def test_unknown_tool_is_reported_not_fatal():
    r = parse("</think><tool_call>launch_rocket<arg_key>when</arg_key><arg_value>now</arg_value><arg_key>n</arg_key><arg_value>3</arg_value></tool_call>")
    assert calls(r) == [("launch_rocket", {"when": "now", "n": 3})]
    assert r.errors == ["unknown tool 'launch_rocket' called"]
    # without declared tools nothing is unknown
    assert parse_output("</think><tool_call>anything</tool_call>").errors == []


def test_whitespace_around_an_argument_key_is_not_part_of_it():
    """Keys are identifiers: a key written with surrounding whitespace (newline formats) still names the declared
    parameter, so its schema applies (here: a string parameter keeps "1" as a string)."""
    r = parse("</think><tool_call>get_weather<arg_key> location\n</arg_key><arg_value>1</arg_value>"
              "<arg_key>\ndays </arg_key><arg_value>2</arg_value></tool_call>")
    assert calls(r) == [("get_weather", {"location": "1", "days": 2})] and r.errors == []


def test_values_typed_by_schema():
    pairs = {
        "location": " 123 ",  # string: kept verbatim, never stripped or decoded
        "unit": "celsius",
        "days": "7",
        "lat": "-12.5",
        "detailed": "false",
        "tags": '["a", "b"]',
        "opts": '{"x": [1, {"y": null}], "é": "你好"}',
        "note": "null",
        "alt": "Smith",
        "ref": "42",
        "code": "17",
    }
    body = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in pairs.items())
    r = parse(f"</think><tool_call>get_weather{body}</tool_call>")
    args = r.tool_calls[0].parsed_arguments
    assert args == {
        "location": " 123 ",
        "unit": "celsius",
        "days": 7,
        "lat": -12.5,
        "detailed": False,
        "tags": ["a", "b"],
        "opts": {"x": [1, {"y": None}], "é": "你好"},
        "note": None,
        "alt": "Smith",
        "ref": 42,
        "code": 17,
    }
    assert r.tool_calls[0].arguments == json.dumps(args, ensure_ascii=False)


def test_value_typing_fallbacks():
    body = (
        "<arg_key>days</arg_key><arg_value>not a number</arg_value>"
        "<arg_key>detailed</arg_key><arg_value>True</arg_value>"
        "<arg_key>tags</arg_key><arg_value>['x', 'y']</arg_value>"
        "<arg_key>lat</arg_key><arg_value>NaN</arg_value>"
        "<arg_key>note</arg_key><arg_value>123</arg_value>"
        "<arg_key>extra</arg_key><arg_value>{\"k\": 1}</arg_value>"
        "<arg_key>extra2</arg_key><arg_value>plain words</arg_value>"
    )
    args = parse(f"</think><tool_call>get_weather{body}</tool_call>").tool_calls[0].parsed_arguments
    assert args == {
        "days": "not a number",  # undecodable: raw string
        "detailed": True,  # Python literal
        "tags": ["x", "y"],
        "lat": "NaN",  # not valid JSON output: kept as text
        "note": "123",  # integer is not allowed by ["string", "null"]
        "extra": {"k": 1},  # unknown parameter: inferred
        "extra2": "plain words",
    }


def test_glm45_newline_format_is_accepted():
    out = "</think><tool_call>get_weather\n<arg_key>location</arg_key>\n<arg_value>Beijing</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
    r = parse(out)
    assert calls(r) == [("get_weather", {"location": "Beijing", "days": 2})] and r.errors == []


def test_malformed_argument_blocks():
    # <arg_key> missing after the name: recovered because the prefix is a declared tool
    r = parse("</think><tool_call>send_commandcommand</arg_key><arg_value>ls -la</arg_value></tool_call>")
    assert calls(r) == [("send_command", {"command": "ls -la"})] and r.errors
    # ... but not for an unknown prefix
    r = parse("</think><tool_call>frobnicatex</arg_key><arg_value>1</arg_value></tool_call>after")
    assert r.tool_calls == [] and r.content == "after" and r.errors
    # missing </arg_value> before </tool_call>
    r = parse("</think><tool_call>send_command<arg_key>command</arg_key><arg_value>ls</tool_call>")
    assert calls(r) == [("send_command", {"command": "ls"})] and r.errors
    # missing </arg_key>
    r = parse("</think><tool_call>send_command<arg_key>command<arg_value>pwd</arg_value></tool_call>")
    assert calls(r) == [("send_command", {"command": "pwd"})]
    # a key without a value is dropped
    r = parse("</think><tool_call>get_weather<arg_key>days</arg_key><arg_key>location</arg_key><arg_value>X</arg_value><arg_key>unit</arg_key></tool_call>")
    assert calls(r) == [("get_weather", {"location": "X"})] and len(r.errors) == 2
    # junk between pairs is ignored
    r = parse("</think><tool_call>get_weather<arg_key>days</arg_key>oops<arg_value>3</arg_value> junk <arg_key>lat</arg_key><arg_value>1.5</arg_value></tool_call>")
    assert calls(r) == [("get_weather", {"days": 3, "lat": 1.5})] and r.errors
    # empty name / value right after the name: the call is skipped, the rest survives
    r = parse("</think><tool_call><arg_key>a</arg_key></tool_call><tool_call>x<arg_value>1</arg_value></tool_call><tool_call>get_time</tool_call>")
    assert calls(r) == [("get_time", {})] and [c.id for c in r.tool_calls] == ["call_0"]
    # a new <tool_call> before </tool_call>
    r = parse("</think><tool_call>send_command<arg_key>command</arg_key><arg_value>a</arg_value><tool_call>get_time</tool_call>")
    assert calls(r) == [("send_command", {"command": "a"}), ("get_time", {})]
    # a duplicate key keeps valid JSON (last one wins when decoded)
    r = parse("</think><tool_call>get_weather<arg_key>days</arg_key><arg_value>1</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>")
    assert calls(r) == [("get_weather", {"days": 2})] and r.errors


def test_string_value_may_contain_markup_and_role_tokens():
    value = 'if x < 3 and y > 2: print("<think>") # <|user|> {"a": 1} 你好 🙂'
    r = parse(f"</think><tool_call>send_command<arg_key>command</arg_key><arg_value>{value}</arg_value></tool_call>")
    assert calls(r) == [("send_command", {"command": value})]
    # arguments are re-serialised as json.dumps(ensure_ascii=False) (reference §2.2): no \\uXXXX escapes
    assert r.tool_calls[0].arguments == json.dumps({"command": value}, ensure_ascii=False)


@pytest.mark.parametrize("stop", ["<|endoftext|>", "<|user|>", "<|observation|>", "<|assistant|>", "<|system|>"])
def test_every_eos_and_extra_stop_token_ends_the_output(stop):
    """EOS = <|endoftext|>, <|user|>, <|observation|>; a conservative server also stops at <|assistant|> and
    <|system|> (reference §1.1). Whatever follows one of them, in text or inside an open call, is not the answer."""
    r = parse(f"r</think>answer{stop}leaked <tool_call>get_time</tool_call>")
    assert (r.reasoning_content, r.content, r.tool_calls) == ("r", "answer", [])
    r = parse(f"r</think><tool_call>get_weather<arg_key>days</arg_key><arg_value>3</arg_value>{stop}more")
    assert calls(r) == [("get_weather", {"days": 3})] and r.content is None


def test_terminators_end_the_output():
    r = parse("r</think>answer<|user|>next user turn<|assistant|>more")
    assert (r.reasoning_content, r.content) == ("r", "answer")
    r = parse("r</think><tool_call>get_time</tool_call><|observation|><tool_response>x</tool_response>")
    assert calls(r) == [("get_time", {})] and r.content is None
    r = parse("r</think>done<|endoftext|>")
    assert r.content == "done"


def test_stray_tags_are_dropped():
    r = parse("a</arg_value>b</think>c</think>d</tool_call>e")
    assert (r.reasoning_content, r.content) == ("ab", "cde")


def test_tool_parsing_disabled_leaves_text():
    text = "r</think>see <tool_call>get_time</tool_call>"
    r = parse(text, parse_tool_calls=False)
    assert r.content == "see <tool_call>get_time</tool_call>" and r.tool_calls == []


def test_default_ids_are_unique():
    r = parse_output("</think><tool_call>a</tool_call><tool_call>b</tool_call>")
    assert len({c.id for c in r.tool_calls}) == 2 and all(c.id.startswith("call_") for c in r.tool_calls)


def test_default_ids_are_unique_across_outputs():
    """Tool results are matched to calls by id over the whole conversation, so two turns (two parses of the same
    text, e.g. the same call repeated) must not reuse ids: ids are random (reference §2.2), not per-output counters."""
    text = "</think><tool_call>get_time</tool_call><tool_call>get_time</tool_call>"
    ids_seen = [c.id for _ in range(3) for c in parse_output(text, TOOLS).tool_calls]
    assert len(set(ids_seen)) == 6


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_processes_do_not_repeat_each_others_ids():
    """A server's workers and RL rollout processes are forked from one parent: each must draw its own ids, not
    continue the parent's random sequence in step with its siblings."""
    text = "</think><tool_call>get_time</tool_call>"
    parse_output(text, TOOLS)  # the parent has drawn ids before forking
    children = []
    for _ in range(2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report one id and leave at once (no pytest teardown in the child)
            os.write(w, parse_output(text, TOOLS).tool_calls[0].id.encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            children.append(f.read())
        assert os.waitpid(pid, 0)[1] == 0
    mine = parse_output(text, TOOLS).tool_calls[0].id
    assert len({mine, *children}) == 3, (mine, children)
