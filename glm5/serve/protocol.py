"""Request and response models of the OpenAI-compatible API (pydantic v2).

Requests validate everything a client can get wrong, so a bad value is a 400 with the field named in
``param``, never an exception deeper in the server. Like vLLM, unknown top-level fields are accepted and
ignored (``extra="allow"``), so clients that send newer OpenAI fields keep working. Ranges are bounded
(``n``, ``top_logprobs``, ``seed``, ``max_tokens`` ...) so that no value can make the engine allocate
without limit; context-length checks need the tokenizer and live in :mod:`glm5.serve.chat`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glm5.engine.sampling_params import StructuredOutputsParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
MAX_PATTERN_CHARS = 16_384  # structured_outputs.regex
MAX_GRAMMAR_CHARS = 65_536  # structured_outputs.grammar
MAX_STRUCTURAL_TAG_CHARS = 262_144  # structured_outputs.structural_tag given as JSON text
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_.\-]{1,64}$"


class _Open(BaseModel):
    """Extra fields accepted (and ignored)."""

    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------------------------- messages
class TextPart(_Closed):
    type: Literal["text"]
    text: str


class ImageURL(_Closed):
    url: str


class ImagePart(_Closed):
    """Accepted by the schema so that the error is a clear 400 ("images are not supported")."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]
Content = Union[str, list[ContentPart]]


class FunctionCall(_Closed):
    name: str = Field(max_length=256)
    arguments: str = Field("{}", description="JSON text of an object, as OpenAI sends it")


class ToolCallIn(_Closed):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Closed):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(_Closed):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Closed):
    role: Literal["assistant"]
    content: Content | None = None
    reasoning_content: str | None = Field(None, description="the turn's reasoning (GLM-5 / Z.ai field name)")
    reasoning: str | None = Field(None, description="vLLM's name for reasoning_content; accepted on input")
    tool_calls: list[ToolCallIn] | None = None
    name: str | None = None


class ToolMessage(_Closed):
    role: Literal["tool"]
    content: Content
    tool_call_id: str | None = None
    name: str | None = None


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


# ---------------------------------------------------------------------------------------------- tools
class FunctionDef(_Closed):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Closed):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Closed):
    name: str = Field(max_length=256)


class NamedToolChoice(_Closed):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class ResponseFormat(_Closed):
    """OpenAI's ``response_format``: ``json_schema`` carries ``{"name", "schema", "strict", "description"}``. vLLM's
    ``structural_tag`` carries ``structures`` (``{"begin", "schema", "end"}``) and ``triggers``, or xgrammar's
    ``format``; what they mean is checked when the grammar is compiled (:mod:`glm5.structured.structural_tag`)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None
    structures: list[Any] | None = Field(None, max_length=1024)
    triggers: list[Any] | None = Field(None, max_length=256)
    format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.type == "json_schema":
            spec = self.json_schema
            if spec is None or not isinstance(spec.get("schema"), (dict, bool)):
                raise ValueError("response_format json_schema needs json_schema.schema (a JSON Schema object)")
        elif self.json_schema is not None:
            raise ValueError(f"json_schema is only allowed with type json_schema, not {self.type}")
        tag_fields = [k for k in ("structures", "triggers", "format") if getattr(self, k) is not None]
        if self.type == "structural_tag" and not tag_fields:
            raise ValueError("response_format structural_tag needs structures and triggers (vLLM's form) or format "
                             "(xgrammar's)")
        if self.type != "structural_tag" and tag_fields:
            raise ValueError(f"{tag_fields[0]} is only allowed with type structural_tag, not {self.type}")
        return self

    @property
    def constraint(self) -> tuple[str, Any] | None:
        """(kind, value) as :meth:`glm5.structured.GrammarCache.get` takes it; None for ``text``."""
        if self.type == "structural_tag":
            return "structural_tag", self.model_dump(include={"type", "structures", "triggers", "format"},
                                                     exclude_none=True)
        if self.type == "text":
            return None
        return "json", self.json_schema["schema"] if self.type == "json_schema" else None


class StructuredOutputs(_Closed):
    """vLLM's ``structured_outputs`` request field (sent through the OpenAI client's ``extra_body``): exactly one
    of ``json`` (a JSON Schema), ``json_object: true``, ``choice`` (the text is one of these strings), ``regex``
    (the text fully matches it), ``grammar`` (GBNF: the text is a sentence of it) and ``structural_tag`` (free text
    with triggered tags; an object or, as vLLM sends it, its JSON text)."""

    json_schema: dict[str, Any] | bool | str | None = Field(None, alias="json")
    json_object: bool | None = None
    choice: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(None, min_length=1,
                                                                                      max_length=1024)
    regex: str | None = Field(None, max_length=MAX_PATTERN_CHARS)
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    structural_tag: dict[str, Any] | Annotated[str, Field(max_length=MAX_STRUCTURAL_TAG_CHARS)] | None = None

    @model_validator(mode="after")
    def _checks(self):
        if isinstance(self.structural_tag, str):
            try:
                self.structural_tag = json.loads(self.structural_tag)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.structural_tag is not valid JSON: {e}") from None
            if not isinstance(self.structural_tag, dict):
                raise ValueError("structured_outputs.structural_tag must be a JSON object")
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(self.json_schema, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON Schema object")
        given = [self.json_schema is not None, bool(self.json_object), self.choice is not None, self.regex is not None,
                 self.grammar is not None, self.structural_tag is not None]
        if given.count(True) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object (true), choice, regex, "
                             "grammar and structural_tag")
        return self

    def to_params(self) -> StructuredOutputsParams:
        """The engine's form of the same constraint."""
        return StructuredOutputsParams(json=self.json_schema, json_object=bool(self.json_object), choice=self.choice,
                                       regex=self.regex, grammar=self.grammar, structural_tag=self.structural_tag)


class StreamOptions(_Closed):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class Thinking(_Closed):
    """Z.ai's switch: ``{"type": "enabled" | "disabled"}``."""

    type: Literal["enabled", "disabled"] = "enabled"
    clear_thinking: bool | None = None


# ------------------------------------------------------------------------------------- shared sampling
class _Sampling(_Open):
    model: str | None = Field(None, max_length=512)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=1_000_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # vLLM's bounds are (0, ∞); below 0.01 the logits are divided by > 100 and, under ~1e-38, by an fp32 zero
    # (inf → NaN probabilities: found by the schema fuzz test with 5e-324)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    ignore_eos: bool = False
    bad_words: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        None, max_length=MAX_STOP, description="vLLM extension: words that must not be generated")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT64_MAX, description="vLLM extension: keep only the "
                                               "last k prompt tokens (-1: as many as leave room to generate)")
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX, description="vLLM extension: lower is served sooner "
                                                                      "(a server started with --scheduling-policy "
                                                                      "priority)")
    use_beam_search: bool = Field(False, description="vLLM extension: beam search (n = beam width = choices "
                                                      "returned; greedy, not with stream)")
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0, description="vLLM extension, with use_beam_search: "
                                  "beams rank by cumulative log-probability / length^length_penalty")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    request_id: str | None = Field(None, max_length=256)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                        description="vLLM extension: score every prompt token (with this many "
                                                    "alternatives); not with stream")
    response_format: ResponseFormat | None = None  # chat's field; on completions vLLM's extension
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM extension: json / json_object / "
                                                                           "choice / regex / grammar / "
                                                                           "structural_tag")
    guided_json: dict[str, Any] | bool | str | None = Field(None, description="vLLM's older name for "
                                                                              "structured_outputs.json")
    guided_choice: list[str] | None = Field(None, description="vLLM's older name for structured_outputs.choice")
    guided_regex: str | None = Field(None, max_length=MAX_PATTERN_CHARS,
                                     description="vLLM's older name for structured_outputs.regex")
    guided_grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS,
                                       description="vLLM's older name for structured_outputs.grammar")

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate(cls, v):
        if v == 0:
            raise ValueError("truncate_prompt_tokens must be a positive integer or -1")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > 1000 for s in stops):
            raise ValueError("stop sequences must be at most 1000 characters")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("at most 1024 logit_bias entries")
        for k in v:
            if not k.lstrip("-").isdigit() or int(k) < 0 or len(k) > 12:
                raise ValueError(f"logit_bias keys must be token ids, got {k[:20]!r}")
        return v

    @model_validator(mode="after")
    def _sampling_checks(self):  # not `_checks`: the request classes' own validators have that name
        legacy = {}
        for name in ("json", "choice", "regex", "grammar"):
            if getattr(self, f"guided_{name}") is not None:
                legacy[name] = getattr(self, f"guided_{name}")
        rf = self.response_format is not None and self.response_format.type != "text"
        if rf + (self.structured_outputs is not None) + len(legacy) > 1:
            raise ValueError("give one output constraint: response_format, structured_outputs or one guided_* "
                             "field")
        if legacy:
            self.structured_outputs = StructuredOutputs(**legacy)
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available when stream is true")
        return self

    @property
    def output_constraint(self) -> tuple[str, Any] | None:
        """(kind, value) as :meth:`glm5.structured.GrammarCache.get` takes it, from whichever field set it."""
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type != "text":
            return rf.constraint
        return so.to_params().constraint if so is not None else None

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


_CHAT_EXAMPLES = [
    {"model": "glm-5", "messages": [{"role": "system", "content": "You are helpful."},
                                    {"role": "user", "content": "Hello!"}], "max_tokens": 8},
    {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 40, "stream": True,
     "stream_options": {"include_usage": True}, "tool_choice": "required",
     "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
         "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]},
    {"messages": [{"role": "user", "content": "JSON please"}], "max_completion_tokens": 16, "n": 2, "seed": 1,
     "response_format": {"type": "json_object"}, "thinking": {"type": "disabled"}, "logprobs": True,
     "top_logprobs": 2},
]


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": _CHAT_EXAMPLES})

    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=256)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tools is not None and len(self.tools) == 0:
            raise ValueError("tools must not be an empty array; omit it instead")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        tc = self.tool_choice
        if tc is not None and tc != "none" and not self.tools:
            raise ValueError("tool_choice requires tools")
        if isinstance(tc, NamedToolChoice) and tc.function.name not in names:
            raise ValueError(f"tool_choice names tool {tc.function.name!r}, which is not in tools")
        if self.output_constraint is not None and (tc == "required" or isinstance(tc, NamedToolChoice)):
            raise ValueError("response_format / structured_outputs cannot be combined with a required or named "
                             "tool_choice")
        return self

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


PromptIds = list[Annotated[int, Field(ge=0, le=INT64_MAX)]]


class CompletionRequest(_Sampling):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, "n": 2, "logprobs": 2, "stream": True,
         "stream_options": {"include_usage": True}},
    ]})

    prompt: Union[str, list[str], PromptIds, list[PromptIds]] = Field(
        description="text, a batch of texts, token ids, or a batch of token-id lists")
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _checks(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (best-of sampling is not supported; with use_beam_search n "
                             "is the beam width)")
        p = self.prompt
        if isinstance(p, list):
            if len(p) == 0:
                raise ValueError("prompt must not be empty")
            if not isinstance(p[0], int) and len(p) > 64:
                raise ValueError("at most 64 prompts per request")
            if isinstance(p[0], list) and any(len(x) == 0 for x in p):
                raise ValueError("token-id prompts must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


# ------------------------------------------------------------------------------------------- responses
class CostDetails(BaseModel):
    currency: str = "USD"
    input_cost: float
    cached_input_cost: float
    output_cost: float
    input_price_per_million: float
    cached_input_price_per_million: float
    output_price_per_million: float


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)
    cost: float = Field(0.0, description="USD at the server's per-million-token prices")
    cost_details: CostDetails | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "glm5"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthResponse(BaseModel):
    status: str = Field(description='"ok"; with --enable-sleep-mode / --enable-weight-updates also "sleeping", '
                                    '"updating" or, under tensor parallelism, "degraded" (ranks left in different '
                                    'states) (alive, but generation requests get 503)')
    model: str
    is_sleeping: bool | None = Field(None, description="with --enable-sleep-mode: the engine is asleep")
