"""Hypothesis strategies for GLM-5 conversations, tools and tool-call arguments."""

import json

from hypothesis import strategies as hs

from glm5.tokenizer.parser import TERMINATORS
from glm5.tokenizer.special_tokens import SPECIAL_TOKEN_STRINGS

ALL_TAGS = tuple(SPECIAL_TOKEN_STRINGS) + tuple(TERMINATORS)
_ALPHABET = "ab yz09 \n\t<>/|\"'\\{}[],:=_-é你🙂\u3000\u2003"

#: Any short text; may contain tags (fine for rendering).
any_text = hs.one_of(
    hs.text(alphabet=_ALPHABET, max_size=24),
    hs.lists(hs.one_of(hs.text(alphabet=_ALPHABET, max_size=6), hs.sampled_from(ALL_TAGS)), max_size=4).map("".join),
)
#: Text without any tag inside (what a parser can recover verbatim).
plain_text = hs.text(alphabet=_ALPHABET, max_size=24).filter(lambda s: not any(t in s for t in ALL_TAGS))
identifier = hs.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True)

# (schema, value strategy) per parameter kind
PARAM_KINDS = {
    "string": ({"type": "string"}, plain_text),
    "integer": ({"type": "integer"}, hs.integers(-(10**9), 10**9)),
    "number": ({"type": "number"}, hs.floats(-1e6, 1e6, allow_nan=False)),
    "boolean": ({"type": "boolean"}, hs.booleans()),
    "array": ({"type": "array", "items": {"type": "integer"}}, hs.lists(hs.integers(-99, 99), max_size=3)),
    "object": (
        {"type": "object"},
        hs.dictionaries(plain_text, hs.one_of(hs.integers(-9, 9), plain_text, hs.none()), max_size=2),
    ),
    "nullable_string": ({"type": ["string", "null"]}, hs.one_of(hs.none(), plain_text.filter(lambda s: s != "null"))),
    "anyof_nullable_string": ({"anyOf": [{"type": "string"}, {"type": "null"}]}, hs.one_of(hs.none(), plain_text.filter(lambda s: s != "null"))),
    "enum": ({"type": "string", "enum": ["celsius", "fahrenheit"]}, hs.sampled_from(["celsius", "fahrenheit"])),
}


@hs.composite
def tool_specs(draw, max_tools=3):
    """``(tools, {name: {param: kind}})``: OpenAI tool definitions with typed parameters."""
    names = draw(hs.lists(identifier, min_size=1, max_size=max_tools, unique=True))
    tools, params = [], {}
    for name in names:
        kinds = draw(hs.dictionaries(identifier, hs.sampled_from(sorted(PARAM_KINDS)), max_size=4))
        params[name] = kinds
        fn = {
            "name": name,
            "description": draw(plain_text),
            "parameters": {"type": "object", "properties": {k: PARAM_KINDS[v][0] for k, v in kinds.items()}},
        }
        tools.append({"type": "function", "function": fn})
    return tools, params


@hs.composite
def typed_call(draw, params):
    """A call of one of the tools with schema-conforming arguments: ``(name, args)``."""
    name = draw(hs.sampled_from(sorted(params)))
    kinds = params[name]
    keys = draw(hs.lists(hs.sampled_from(sorted(kinds)), unique=True)) if kinds else []
    return name, {k: draw(PARAM_KINDS[kinds[k]][1]) for k in keys}


def as_tool_call(name, args, draw_json_string):
    arguments = json.dumps(args, ensure_ascii=False) if draw_json_string else args
    return {"id": "call_" + name, "type": "function", "function": {"name": name, "arguments": arguments}}


content_value = hs.one_of(
    any_text,
    hs.none(),
    hs.lists(
        hs.one_of(
            hs.builds(lambda t: {"type": "text", "text": t}, any_text),
            hs.just({"type": "image_url", "image_url": {"url": "u"}}),
            any_text,
        ),
        max_size=3,
    ),
)


@hs.composite
def any_message(draw, params):
    role = draw(hs.sampled_from(["system", "user", "assistant", "tool", "developer"]))
    if role in ("system", "user", "developer"):
        return {"role": role, "content": draw(content_value)}
    if role == "tool":
        content = draw(
            hs.one_of(
                any_text,
                hs.none(),
                hs.lists(hs.one_of(any_text, hs.builds(lambda t: {"output": t}, any_text), hs.just({"type": "text", "text": "t"})), max_size=3),
            )
        )
        return {"role": "tool", "tool_call_id": "c", "content": content}
    msg = {"role": "assistant"}
    style = draw(hs.sampled_from(["field", "alias", "embedded", "none"]))
    if style == "field":
        msg["reasoning_content"] = draw(any_text)
        msg["content"] = draw(content_value)
    elif style == "alias":
        msg["reasoning"] = draw(any_text)
        msg["content"] = draw(any_text)
    elif style == "embedded":
        msg["content"] = draw(hs.sampled_from(["", "<think>", "\n<think>\n"])) + draw(any_text) + draw(
            hs.sampled_from(["</think>", "\n</think>\n\n"])
        ) + draw(any_text)
    else:
        msg["content"] = draw(content_value)
    if params and draw(hs.booleans()):
        calls = draw(hs.lists(typed_call(params), max_size=3))
        msg["tool_calls"] = [as_tool_call(n, a, draw(hs.booleans())) for n, a in calls]
    return msg


@hs.composite
def conversations(draw):
    """``(messages, tools, kwargs)`` covering every branch of the template."""
    tools, params = draw(tool_specs()) if draw(hs.booleans()) else ([], {})
    messages = draw(hs.lists(any_message(params or {"f": {"x": "string"}}), min_size=1, max_size=8))
    kwargs = {
        "add_generation_prompt": draw(hs.booleans()),
        "enable_thinking": draw(hs.sampled_from([True, False, None])),
        "clear_thinking": draw(hs.sampled_from([True, False, None])),
    }
    if tools and draw(hs.booleans()):
        tools = [t["function"] for t in tools]  # bare function objects render as given
    return messages, (tools if tools or draw(hs.booleans()) else None), kwargs
