"""Render -> parse round trip: the parser recovers what the template rendered for assistant turns."""

import itertools
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from glm5.tokenizer import ParsedOutput, StreamingParser, parse_output, render_chat
from glm5.tokenizer.chat_template import split_reasoning
from glm5_chat_strategies import as_tool_call, plain_text, tool_specs, typed_call

text_content = hs.one_of(
    hs.none(),
    plain_text,
    hs.lists(hs.builds(lambda t: {"type": "text", "text": t}, plain_text), max_size=2),
)


@hs.composite
def agent_turns(draw):
    """``(tools, messages, first_assistant_index)`` ending with assistant turns after the last user."""
    tools, params = draw(tool_specs())
    messages = []
    if draw(hs.booleans()):
        messages.append({"role": "system", "content": draw(plain_text)})
    for _ in range(draw(hs.integers(0, 2))):  # earlier exchanges
        messages.append({"role": "user", "content": draw(plain_text)})
        messages.append({"role": "assistant", "reasoning_content": draw(plain_text), "content": draw(plain_text)})
    messages.append({"role": "user", "content": draw(plain_text)})
    first = len(messages)
    for turn in range(draw(hs.integers(1, 3))):
        msg = {"role": "assistant", "content": draw(text_content)}
        reasoning = draw(hs.one_of(hs.none(), plain_text))
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        calls = draw(hs.lists(typed_call(params), max_size=3))
        if calls:
            msg["tool_calls"] = [as_tool_call(n, a, draw(hs.booleans())) for n, a in calls]
        messages.append(msg)
        for _ in calls:
            messages.append({"role": "tool", "content": draw(plain_text)})
    return tools, messages, first


def expected_from(message):
    reasoning, content = split_reasoning(message)
    calls = []
    for tc in message.get("tool_calls") or []:
        args = tc["function"]["arguments"]
        calls.append((tc["function"]["name"], json.loads(args) if isinstance(args, str) else args))
    return reasoning.strip() or None, content.strip() or None, calls


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=agent_turns(), cut_seed=hs.integers(0, 10**6))
def test_render_then_parse_recovers_assistant_turns(case, cut_seed):
    tools, messages, first = case
    for i in range(first, len(messages)):
        message = messages[i]
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:i], tools, add_generation_prompt=False)
        rendered = render_chat(messages[: i + 1], tools, add_generation_prompt=False)
        assert rendered.startswith(before + "<|assistant|>")
        # the model's output: what follows the "<|assistant|><think>" generation prompt, then its EOS
        output = rendered[len(before) + len("<|assistant|>"):]
        if output.startswith("<think>"):
            output = output[len("<think>"):]
        output += "<|observation|>" if message.get("tool_calls") else "<|user|>"

        counter = itertools.count()
        result = parse_output(output, tools, id_factory=lambda: f"call_{next(counter)}")
        reasoning, content, calls = expected_from(message)
        assert result.reasoning_content == reasoning
        assert result.content == content
        assert [(c.name, c.parsed_arguments) for c in result.tool_calls] == calls
        assert [c.arguments for c in result.tool_calls] == [json.dumps(a, ensure_ascii=False) for _, a in calls]
        assert result.errors == [] and not result.unterminated_reasoning

        # the same output streamed in random pieces gives the same result
        rng = __import__("random").Random(cut_seed)
        points = sorted(rng.sample(range(len(output) + 1), min(6, len(output) + 1)))
        counter = itertools.count()
        parser = StreamingParser(tools, id_factory=lambda: f"call_{next(counter)}")
        deltas = []
        for a, b in zip([0] + points, points + [len(output)]):
            deltas += parser.feed(output[a:b])
        deltas += parser.finish()
        assert ParsedOutput.from_deltas(deltas, parser.errors, parser.unterminated_reasoning) == result
