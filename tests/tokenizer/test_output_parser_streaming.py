"""Streaming parser: deltas for any split of the output concatenate to the one-shot parse."""

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as hs

from glm5.tokenizer import Delta, ParsedOutput, StreamingParser, ToolCallDelta, merge_deltas, parse_output
from glm5_chat_strategies import ALL_TAGS
from glm5_parser_tools import TOOLS

OUTPUTS = [
    ("Let me think.\n</think>\nThe answer is 4.", True),
    ("Just the answer.  ", False),
    ("<think>hmm</think>ok", False),
    ("The user is asking ... I'll call get_weather.</think><tool_call>get_weather<arg_key>location</arg_key>"
     "<arg_value>Bei jing </arg_value><arg_key>days</arg_key><arg_value>12</arg_value></tool_call><|observation|>", True),
    ("</think><tool_call>get_time</tool_call>", True),
    ("r</think>Checking.\n<tool_call>get_time</tool_call>\n<tool_call>get_weather<arg_key>location</arg_key>"
     "<arg_value>\"Paris\"\n\\n</arg_value></tool_call>\nand <tool_call>get_time</tool_call>done", True),
    ("I should check <tool_call>get_time</tool_call></think>", True),
    ("No end of thinking  \n", True),
    ("r</think>answer <tool_ca", True),
    ("r</think><tool_call>get_weather<arg_key>location</arg_key><arg_value>Bei", True),
    ("r</think><tool_call>get_weather<arg_key>opts</arg_key><arg_value>{\"a\": [1, 2]", True),
    ("r</think><tool_call>get_wea", True),
    ("</think><tool_call>launch<arg_key>when</arg_key><arg_value>now</arg_value></tool_call>", True),
    ("</think><tool_call>send_commandcommand</arg_key><arg_value>ls -la</arg_value></tool_call>", True),
    ("</think><tool_call>get_weather<arg_key>days</arg_key>oops<arg_value>3</arg_value> junk <arg_key>lat</arg_key>"
     "<arg_value>1.5</arg_value><arg_key>unit</arg_key></tool_call>", True),
    ("</think><tool_call><arg_key>a</arg_key></tool_call><tool_call>x<arg_value>1</arg_value></tool_call>"
     "<tool_call>send_command<arg_key>command</arg_key><arg_value>a < b</tool_call>", True),
    ("</think><tool_call>get_weather\n<arg_key>location</arg_key>\n<arg_value>Beijing</arg_value>\n</tool_call>", True),
    ("r</think>answer<|user|>next user turn", True),
    ("a</arg_value>b</think>c</think>d</tool_call>e", True),
    ("</think><tool_call>send_command<arg_key>command</arg_key><arg_value>echo \"<|user|>\" 你好 🙂</arg_value></tool_call>", True),
    ("  \n 你好 🙂 </think>  \n  ", True),
]


def counter_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def stream(pieces, thinking=True, tools=TOOLS):
    parser = StreamingParser(tools, thinking=thinking, id_factory=counter_ids())
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    return parser, deltas


def one_shot(text, thinking=True, tools=TOOLS):
    return parse_output(text, tools, thinking=thinking, id_factory=counter_ids())


def test_every_single_split_point():
    for text, thinking in OUTPUTS:
        expected = one_shot(text, thinking)
        for i in range(len(text) + 1):
            parser, deltas = stream([text[:i], text[i:]], thinking)
            got = ParsedOutput.from_deltas(deltas, parser.errors, parser.unterminated_reasoning)
            assert got == expected, (text, i)
            assert parser.result() == expected


def test_character_by_character():
    for text, thinking in OUTPUTS:
        parser, deltas = stream(list(text), thinking)
        assert ParsedOutput.from_deltas(deltas, parser.errors, parser.unterminated_reasoning) == one_shot(text, thinking)


def test_no_partial_tag_ever_leaks():
    # outputs whose parse contains no "<": then no delta of any partition may contain one
    for text, thinking in OUTPUTS:
        expected = one_shot(text, thinking)
        fields = [expected.content or "", expected.reasoning_content or ""]
        fields += [c.arguments + c.name for c in expected.tool_calls]
        if any("<" in f for f in fields):
            continue
        for i, j in itertools.combinations(range(0, len(text) + 1, 3), 2):
            _, deltas = stream([text[:i], text[i:j], text[j:]], thinking)
            for d in deltas:
                assert "<" not in (d.content or "") and "<" not in (d.reasoning_content or ""), (text, i, j, d)
                for tc in d.tool_calls or []:
                    assert "<" not in tc.arguments and "<" not in (tc.name or "")


@settings(max_examples=150, deadline=None)
@given(
    parts=hs.lists(
        hs.one_of(
            hs.sampled_from(ALL_TAGS),
            hs.sampled_from(["get_time", "get_weather", "send_command", "location", "days", "command", "opts", "zzz"]),
            hs.text(alphabet="ab <>/|\n\"{}[]12.é🙂", max_size=6),
        ),
        max_size=25,
    ),
    cuts=hs.lists(hs.integers(0, 400), max_size=8),
    thinking=hs.booleans(),
)
def test_random_tag_soup_any_partition(parts, cuts, thinking):
    """Arbitrary (mostly malformed) outputs: never raises, and any partition gives the one-shot result."""
    text = "".join(parts)
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0] + points, points + [len(text)])]
    parser, deltas = stream(pieces, thinking)
    expected = one_shot(text, thinking)
    assert ParsedOutput.from_deltas(deltas, parser.errors, parser.unterminated_reasoning) == expected
    for call in expected.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)  # always valid JSON objects


def test_string_values_stream_and_others_buffer():
    parser = StreamingParser(TOOLS, id_factory=counter_ids())
    assert [d.to_openai() for d in parser.feed("r</think><tool_call>get_wea")] == [{"reasoning_content": "r"}]
    out = parser.feed("ther")
    assert all(d.tool_calls is None for d in out)  # name not closed yet: nothing about the call
    out = parser.feed("<arg_key>location</arg_key><arg_value>Bei")
    tool_deltas = [tc for d in out for tc in d.tool_calls or []]
    assert tool_deltas[0].name == "get_weather" and tool_deltas[0].id == "call_0" and tool_deltas[0].type == "function"
    assert "".join(tc.arguments for tc in tool_deltas) == '{"location": "Bei'
    out = parser.feed('jing "x"</arg_value><arg_key>days</arg_key><arg_value>1')
    assert "".join(tc.arguments for d in out for tc in d.tool_calls or []) == 'jing \\"x\\""'
    out = parser.feed("2</arg_val")
    assert out == []  # non-string value buffered; partial tag held
    out = parser.feed("ue></tool_call>")
    assert "".join(tc.arguments for d in out for tc in d.tool_calls or []) == ', "days": 12}'
    result = parser.result()
    assert result.tool_calls[0].arguments == json.dumps({"location": 'Beijing "x"', "days": 12})


def test_merge_deltas_never_joins_fragments_of_different_calls():
    """merge_deltas (public) coalesces argument fragments of the same call only: fragments of call 1 appended to
    call 0 would corrupt both calls' JSON for a client that concatenates per index."""
    deltas = [
        Delta(tool_calls=[ToolCallDelta(index=0, id="a", type="function", name="f", arguments="")]),
        Delta(tool_calls=[ToolCallDelta(index=0, arguments='{"x": ')]),
        Delta(tool_calls=[ToolCallDelta(index=0, arguments="1}")]),
        Delta(tool_calls=[ToolCallDelta(index=1, arguments="{}")]),
        Delta(content="a"),
        Delta(content="b"),
    ]
    merged = merge_deltas(deltas)
    assert [d.to_openai() for d in merged] == [
        {"tool_calls": [{"index": 0, "id": "a", "type": "function",
                         "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {"content": "ab"},
    ]


def test_openai_chunk_shapes():
    parser = StreamingParser(TOOLS, id_factory=counter_ids())
    chunks = [d.to_openai() for piece in ["Reason", "ing.</think>Hi", "!<tool_call>get_time</tool_call>"] for d in parser.feed(piece)]
    chunks += [d.to_openai() for d in parser.finish()]
    assert chunks == [
        {"reasoning_content": "Reason"},
        {"reasoning_content": "ing."},
        {"content": "Hi"},
        {"content": "!"},
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    ]


def test_feed_after_finish_raises_and_done_ignores_input():
    parser = StreamingParser()
    parser.feed("a</think>b<|user|>")
    assert parser.feed("ignored") == []
    parser.finish()
    assert parser.finish() == []
    try:
        parser.feed("x")
    except RuntimeError:
        pass
    else:
        raise AssertionError("feed after finish must raise")
    assert parser.result().content == "b"
