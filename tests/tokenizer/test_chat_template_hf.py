"""Property: transformers' apply_chat_template with our Jinja == the Python renderer, byte for byte."""

from hypothesis import HealthCheck, given, settings

from glm5.tokenizer import normalize_messages, render_chat
from glm5_chat_strategies import conversations


def hf_render(hf_tokenizer, messages, tools, kwargs):
    extra = {k: v for k, v in kwargs.items() if k != "add_generation_prompt" and v is not None}
    return hf_tokenizer.apply_chat_template(
        normalize_messages(messages),
        tools=tools,
        add_generation_prompt=kwargs["add_generation_prompt"],
        tokenize=False,
        **extra,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=conversations())
def test_hf_jinja_matches_python_renderer(hf_tokenizer, trained, case):
    messages, tools, kwargs = case
    ours = render_chat(messages, tools, **kwargs)
    assert hf_render(hf_tokenizer, messages, tools, kwargs) == ours
    # GLM5Tokenizer.apply_chat_template is the same renderer
    assert trained.apply_chat_template(messages, tools=tools, **kwargs) == ours
