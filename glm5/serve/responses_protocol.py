"""The request side of OpenAI's Responses API (``POST /v1/responses``) and its translation to chat messages.

A Responses request is a chat request in another shape: ``instructions`` is a system message, ``input`` is a
list of items (messages, and the ``reasoning`` / ``function_call`` / ``function_call_output`` items of earlier
turns), tools are flat (``{"type": "function", "name", "parameters", ...}``) and the output constraint is
``text.format``. :func:`items_to_messages` turns items into the chat messages that
:class:`~glm5.serve.protocol.ChatCompletionRequest` takes, so the prompt is rendered by the same template call
as ``/v1/chat/completions``; :mod:`glm5.serve.responses` builds that request and the response.

Items are checked here, by hand, rather than by a pydantic union: the error then names the item and the field
(``input.3.call_id``) and an unknown item type gets a message that says which types exist, not a list of every
union branch that failed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from .errors import APIError, bad_request
from .protocol import INT64_MAX, MAX_TOP_LOGPROBS, _Closed, _Open

#: ``reasoning.effort`` values that switch GLM-5's thinking off (its template renders ``</think>`` instead of
#: ``<think>``); every other effort leaves it on, since GLM-5 has no graded effort.
THINKING_OFF_EFFORTS = ("none", "minimal")

#: ``include`` values honoured: logprobs on ``output_text`` parts (and on ``response.output_text.delta`` events)
LOGPROBS_INCLUDE = "message.output_text.logprobs"
#: ``include`` values OpenAI documents. Besides logprobs they add data of items this server never writes (hosted
#: tool calls, images, encrypted reasoning: its reasoning items carry their text in the clear), so they are
#: accepted and change nothing; any other string is a 400, as a misspelt value should be.
INCLUDABLE = (LOGPROBS_INCLUDE, "reasoning.encrypted_content", "file_search_call.results", "web_search_call.results",
              "web_search_call.action.sources", "message.input_image.image_url",
              "computer_call_output.output.image_url", "code_interpreter_call.outputs")

_ITEM_TYPES = ("message", "reasoning", "function_call", "function_call_output")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text")
_MEDIA_PARTS = ("input_image", "input_file", "input_audio")


class ReasoningConfig(_Closed):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(_Closed):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with the schema inline (not nested under
    ``json_schema`` as in chat's ``response_format``)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(None, max_length=256)
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def echo(self) -> dict:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "name": self.name, "schema": self.schema_, "description": self.description,
                "strict": self.strict}


class TextConfig(_Closed):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Open):
    """``POST /v1/responses``. Unknown top-level fields are accepted and ignored, as on the chat route; of
    vLLM's sampling extensions, those in :data:`PASSTHROUGH` reach the chat request unchanged."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "glm-5", "input": "Hello!", "max_output_tokens": 64},
        {"input": [{"role": "user", "content": "Weather in Paris?"}], "tool_choice": "required",
         "tools": [{"type": "function", "name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
         "reasoning": {"effort": "none"}, "stream": True},
    ]})

    model: str | None = Field(None, max_length=512)
    input: str | list[Any] | None = Field(None, description="a user message, or a list of input items")
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[Any] | None = Field(None, max_length=256)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=512)
    store: bool = True
    previous_response_id: str | None = Field(None, max_length=256)
    background: bool = False
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    include: list[str] | None = Field(None, max_length=32)
    max_tool_calls: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list) and len(v) > 4096:
            raise ValueError("at most 4096 input items")
        return v

    @field_validator("include")
    @classmethod
    def _include(cls, v):
        check_include(v)
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):  # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("metadata takes at most 16 pairs, keys up to 64 and values up to 512 characters")
        return v

    @property
    def effort(self) -> str | None:
        return self.reasoning.effort if self.reasoning is not None else None

    @property
    def text_format(self) -> TextFormat:
        return self.text.format if self.text is not None and self.text.format is not None else TextFormat()


def check_include(values: list[str] | None) -> None:
    """ValueError naming an ``include`` value that OpenAI does not document."""
    for x in values or ():
        if x not in INCLUDABLE:
            raise ValueError(f"unsupported include value {x!r}; supported values are {', '.join(INCLUDABLE)}")


#: vLLM sampling extensions a Responses request may carry (``extra_body``): copied to the chat request as they are
PASSTHROUGH = ("top_k", "min_p", "seed", "ignore_eos", "stop", "stop_token_ids", "min_tokens", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "logit_bias", "bad_words", "priority",
               "skip_special_tokens", "include_stop_str_in_output", "chat_template_kwargs")


# ------------------------------------------------------------------------------------------------ items
def _text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or text parts concatenated (the chat template concatenates a
    list's text parts too, so this renders identically and keeps tool results one ``<tool_response>``)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of content parts", param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise bad_request(f"{kind} content is not supported by this text-only model", param=f"{where}.{j}.type",
                              code="unsupported_content")
        if kind not in _TEXT_PARTS:
            raise bad_request(f"unsupported content part type {kind!r}; use input_text or output_text",
                              param=f"{where}.{j}.type")
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"a {kind} part needs a string {'refusal' if kind == 'refusal' else 'text'}",
                              param=f"{where}.{j}")
        out.append(text)
    return "".join(out)


def _string(item: dict, key: str, where: str, required: bool = True) -> str | None:
    v = item.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or (required and not v and key != "arguments"):
        raise bad_request(f"{item.get('type')} items need a string {key}", param=f"{where}.{key}")
    return v


def items_to_messages(items: list[Any], where: str = "input") -> list[dict]:
    """Responses items -> chat messages. One assistant turn arrives as several items (``reasoning``, then a
    ``message``, then ``function_call`` items, the order this server writes them): consecutive items of one turn
    become one assistant message with ``reasoning_content``, ``content`` and ``tool_calls``, which is how the chat
    template renders a turn (reasoning kept after the last user message: interleaved thinking with tools)."""
    msgs: list[dict] = []
    turn: dict | None = None  # the assistant message that later items of the same turn join

    def assistant(has: tuple[str, ...]) -> dict:
        nonlocal turn
        if turn is None or any(turn.get(k) is not None for k in has):
            turn = {"role": "assistant", "content": None}
            msgs.append(turn)
        return turn

    for i, item in enumerate(items):
        p = f"{where}.{i}"
        if not isinstance(item, dict):
            raise bad_request("input items must be objects", param=p)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"unsupported message role {role!r}; use user, system, developer or assistant",
                                  param=f"{p}.role")
            if "content" not in item:
                raise bad_request("messages need content", param=f"{p}.content")
            text = _text(item["content"], f"{p}.content")
            if role == "assistant":
                assistant(("content", "tool_calls"))["content"] = text
            else:
                turn = None
                msgs.append({"role": role, "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []  # the text, else the summary
            assistant(("reasoning_content", "content", "tool_calls"))["reasoning_content"] = _text(parts,
                                                                                                   f"{p}.content")
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", p), "type": "function",
                    "function": {"name": _string(item, "name", p), "arguments": _string(item, "arguments", p)}}
            msg = assistant(())
            msg.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            turn = None
            msgs.append({"role": "tool", "tool_call_id": _string(item, "call_id", p),
                         "content": _text(item.get("output"), f"{p}.output")})
        else:
            hint = " (items of stored responses are reached with previous_response_id)" \
                if kind == "item_reference" else ""
            raise bad_request(f"unsupported input item type {kind!r}{hint}; this server takes "
                              f"{', '.join(_ITEM_TYPES)}", param=f"{p}.type", code="unsupported_item")
    return msgs


# ------------------------------------------------------------------------------------------------ tools
def chat_tools(tools: list[Any] | None) -> tuple[list[dict] | None, list[dict]]:
    """(chat ``tools``, the tools as the response echoes them). Only function tools: the others (web search,
    file search, MCP, code interpreter ...) are OpenAI-hosted and have nothing to run them here."""
    if tools is None:
        return None, []
    chat, echo = [], []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise bad_request(f"tool type {kind!r} is not supported; this server runs function tools only",
                              param=f"tools.{i}.type", code="unsupported_tool")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        chat.append({"type": "function", "function": fn})
        echo.append({"type": "function", "name": t.get("name"), "description": t.get("description"),
                     "parameters": t.get("parameters"), "strict": t.get("strict")})
    return chat, echo


def chat_tool_choice(tc: str | dict | None) -> str | dict | None:
    if tc is None or isinstance(tc, str):
        if tc not in (None, "auto", "none", "required"):
            raise bad_request(f"tool_choice must be auto, none, required or a function, not {tc!r}",
                              param="tool_choice")
        return tc
    if tc.get("type") != "function" or not isinstance(tc.get("name"), str):
        raise bad_request("tool_choice objects must be {\"type\": \"function\", \"name\": ...}; "
                          f"{tc.get('type')!r} is not supported", param="tool_choice", code="unsupported_tool")
    return {"type": "function", "function": {"name": tc["name"]}}


def response_format(fmt: TextFormat) -> dict | None:
    """``text.format`` as chat's ``response_format`` (the grammar machinery reads that)."""
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise bad_request("text.format json_schema needs a schema", param="text.format.schema")
    spec = {"name": fmt.name or "response", "schema": fmt.schema_}
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}


def param_of_chat(param: str | None) -> str | None:
    """A chat-request parameter path as the Responses request names it (errors from the shared machinery)."""
    if param is None:
        return None
    head, _, rest = param.partition(".")
    if head == "messages":
        return "input"
    if head in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if head == "response_format":
        return "text.format" + (".schema" if rest.endswith("schema") else "")
    if head == "tools":  # tools.N.function.name -> tools.N.name
        return param.replace(".function.", ".")
    if head == "tool_choice":
        return "tool_choice"
    return param


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param, code="not_found")
