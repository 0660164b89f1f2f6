"""Request handling for ``/v1/chat/completions`` and ``/v1/completions``.

A request becomes (prompt token ids, ``SamplingParams``, logits processors) in :func:`prepare_chat` /
:func:`prepare_completion`, which raise :class:`~glm5.serve.errors.APIError` for anything invalid (400 for
bad parameters and context overflow) before the engine sees it. :class:`Generation` then drives the
backend, records metrics (TTFT, inter-token latency, tokens, cost) and turns engine deltas into OpenAI
objects: the chat path feeds each completion's text through GLM-5's :class:`StreamingParser`
(reasoning / content / tool calls); the non-streaming response is the concatenation of the same deltas, so
streamed and non-streamed results cannot disagree.

tool_choice: ``auto`` parses whatever calls the model writes; ``none`` renders the tools but bans the
``<tool_call>`` token and does not parse; ``required`` and a named tool constrain decoding with
:class:`~glm5.structured.tool_grammar.ToolCallGrammar` (the model may think first, then must write well-formed
calls of the allowed tools). ``response_format`` ``json_object`` / ``json_schema`` / ``structural_tag``, or vLLM's
``structured_outputs`` (``json`` / ``json_object`` / ``choice`` / ``regex`` / ``grammar`` / ``structural_tag``; older
names ``guided_*``), constrains the content with :class:`~glm5.structured.constrained.JsonGrammar` (reasoning first
when thinking is on); a schema is compiled by :mod:`glm5.structured.json_schema`, a structural tag by
:mod:`glm5.structured.structural_tag`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from glm5.engine.processors import ban_tokens
from glm5.engine.sampler import NO_TOKEN_ALLOWED
from glm5.engine.sampling_params import SamplingParams
from glm5.tokenizer import StreamingParser, prompt_opens_reasoning
from glm5.tokenizer import special_tokens as st
from glm5.structured import ConstrainedLogitsProcessor, GrammarCache, JsonGrammar, ToolCallGrammar
from glm5.tokenizer.detokenize import byte_level_char_to_byte

from .backend import Backend, LogitsProcessor
from .errors import APIError, bad_request
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, ImagePart, NamedToolChoice, TextPart, _Sampling
from .settings import ServeSettings

# chat_template_kwargs that are passed to the renderer as named arguments; the rest go to the template
_TEMPLATE_RESERVED = {"messages", "tools", "add_generation_prompt", "tokenize", "enable_thinking", "clear_thinking"}


# =============================================================================================== shared
class ServerState:
    """What the handlers share: backend, settings, metrics, token tables."""

    def __init__(self, backend: Backend, settings: ServeSettings):
        self.backend = backend
        self.settings = settings
        self.metrics = ServerMetrics(settings.model_name)
        self.tokenizer = backend.tokenizer
        self.grammars = GrammarCache(self.tokenizer, backend.vocab_size)
        self._token_str: dict[int, tuple[str, bytes]] = {}
        added = self.tokenizer.backend.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self.ids = {name: self.tokenizer.token_to_id(name) for name in
                    (st.THINK_START, st.THINK_END, st.TOOL_CALL_START, st.ASSISTANT, st.SYSTEM)}

    def output_grammar(self, req: _Sampling, thinking: bool) -> JsonGrammar | None:
        """The grammar of the request's output constraint (``response_format`` json_object / json_schema, or
        vLLM's ``structured_outputs`` / ``guided_*``), None without one; compiled grammars are cached."""
        constraint = req.output_constraint
        if constraint is None:
            return None
        kind, value = constraint
        try:
            return self.grammars.get(kind, value, thinking)
        except ValueError as e:
            rf = req.response_format is not None and req.response_format.type != "text"
            if kind == "structural_tag":  # mostly malformed specs; the message names the part
                raise bad_request(f"invalid structural_tag: {e}",
                                  param="response_format" if rf else "structured_outputs.structural_tag") from None
            if rf:
                raise bad_request(f"unsupported json_schema: {e}", param="response_format.json_schema.schema") from None
            what = "json_schema" if kind == "json" else kind
            raise bad_request(f"unsupported {what}: {e}", param=f"structured_outputs.{kind}") from None

    def token_text(self, token_id: int) -> tuple[str, bytes]:
        hit = self._token_str.get(token_id)
        if hit is None:
            if token_id in self._added:
                data = self._added[token_id].encode("utf-8")
            else:
                tok = self.tokenizer.id_to_token(token_id)
                if tok is None:
                    data = b""
                else:
                    table = byte_level_char_to_byte()
                    try:
                        data = bytes(table[c] for c in tok)
                    except KeyError:
                        data = tok.encode("utf-8")
            hit = (data.decode("utf-8", errors="replace"), data)
            if len(self._token_str) < 1_000_000:
                self._token_str[token_id] = hit
        return hit

    def check_model(self, model: str | None) -> str:
        names = self.settings.served_model_names
        if model is None or model == "":
            return names[0]
        if model not in names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model

    def admit(self) -> None:
        if not self.backend.healthy:
            raise APIError(503, "The engine is not available.", code="engine_unavailable")
        limit = self.settings.max_pending_requests
        if self.metrics.in_flight >= limit:
            raise APIError(429, f"The server is busy ({self.metrics.in_flight} requests in flight, limit {limit}); "
                                "retry later.", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    def usage(self, prompt: int, cached: int, completion: int, reasoning: int) -> dict:
        cost = self.settings.cost(prompt, cached, completion)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
            "cost": cost["total"],
            "cost_details": cost["details"],
        }


# ============================================================================================ preparing
@dataclass
class Prepared:
    request_id: str
    model: str
    prompts: list[list[int]]  # one per engine request (chat: exactly one)
    prompt_texts: list[str | None]
    params: SamplingParams
    processors: list[LogitsProcessor]
    # chat only
    opens_reasoning: bool = False
    tools: list[dict] | None = None
    parse_tool_calls: bool = False
    include_reasoning: bool = True
    top_logprobs: int | None = None  # None: no logprobs
    extra: dict = field(default_factory=dict)
    priority: int = 0  # the engine's scheduling priority (lower first)


def _text_of(content, where: str) -> str | list[dict]:
    if content is None or isinstance(content, str):
        return content if content is not None else ""
    parts = []
    for p in content:
        if isinstance(p, ImagePart):
            raise bad_request("image content is not supported by this text-only model", param=where,
                              code="unsupported_content")
        if isinstance(p, TextPart):
            parts.append({"type": "text", "text": p.text})
    return parts


def _messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                             "content": _text_of(m.content, where)}
        if m.role == "assistant":
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning is not None:
                d["reasoning_content"] = reasoning
            if m.tool_calls:
                calls = []
                for j, tc in enumerate(m.tool_calls):
                    try:
                        args = json.loads(tc.function.arguments) if tc.function.arguments.strip() else {}
                    except (ValueError, RecursionError):
                        raise bad_request("tool call arguments must be a JSON object",
                                          param=f"messages.{i}.tool_calls.{j}.function.arguments") from None
                    if not isinstance(args, dict):
                        raise bad_request("tool call arguments must be a JSON object",
                                          param=f"messages.{i}.tool_calls.{j}.function.arguments")
                    calls.append({"id": tc.id, "type": "function",
                                  "function": {"name": tc.function.name, "arguments": args}})
                d["tool_calls"] = calls
        if m.role == "tool" and m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _sampling(state: ServerState, req: _Sampling, *, max_tokens: int, logprobs: int | None, stop_ids: list[int]
              ) -> SamplingParams:
    s = state.settings
    temperature = req.temperature if req.temperature is not None else s.default_temperature
    top_p = req.top_p if req.top_p is not None else s.default_top_p
    top_k = req.top_k if req.top_k not in (None, -1) else 0
    seed = req.seed % (2**63) if req.seed is not None else None
    stop_token_ids = sorted(set(list(req.stop_token_ids or []) + stop_ids))
    bad = [t for t in stop_token_ids if t >= state.backend.vocab_size]
    if bad:
        raise bad_request(f"stop_token_ids must be below the vocabulary size {state.backend.vocab_size}",
                          param="stop_token_ids")
    bias = {int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None
    if bias and max(bias) >= state.backend.vocab_size:
        raise bad_request(f"logit_bias token ids must be below {state.backend.vocab_size}", param="logit_bias")
    try:  # the penalties, logit_bias and min_p become logits processors in the engine
        return SamplingParams(
            n=req.n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
            min_tokens=min(req.min_tokens, max_tokens), stop=req.stop_list or None, stop_token_ids=stop_token_ids,
            ignore_eos=req.ignore_eos, include_stop_str_in_output=req.include_stop_str_in_output, seed=seed,
            logprobs=logprobs, skip_special_tokens=req.skip_special_tokens, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, logit_bias=bias,
            min_p=req.min_p or 0.0, bad_words=req.bad_words)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e)) from None


def _constrained(grammar, max_tokens: int) -> ConstrainedLogitsProcessor:
    try:
        return ConstrainedLogitsProcessor(grammar, max_tokens)
    except ValueError as e:  # max_tokens cannot fit the shortest valid output
        raise bad_request(str(e), param="max_tokens") from None


def _truncate(state: ServerState, ids: list[int], keep: int | None) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: the most that leave room for one
    generated token), applied before the context check, as vLLM does."""
    if keep is None:
        return ids
    return ids[-(state.backend.max_model_len - 1 if keep == -1 else keep):]


def _check_context(state: ServerState, n_prompt: int, max_tokens: int | None, prompt_param: str) -> int:
    limit = state.backend.max_model_len
    if n_prompt >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                            f"{n_prompt} input tokens. Please reduce the length of the input.",
                       param=prompt_param, code="context_length_exceeded")
    room = limit - n_prompt
    if max_tokens is None:
        cap = state.settings.max_default_tokens
        return min(room, cap) if cap else room
    if n_prompt + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{n_prompt + max_tokens} tokens ({n_prompt} in the input, {max_tokens} in the "
                            "completion). Please reduce the length of the input or the completion.",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> Prepared:
    model = state.check_model(req.model)
    tok = state.tokenizer
    kwargs = dict(req.chat_template_kwargs or {})
    if "enable_thinking" in kwargs:
        enable_thinking = kwargs.pop("enable_thinking")
        if enable_thinking is not None and not isinstance(enable_thinking, bool):
            raise bad_request("chat_template_kwargs.enable_thinking must be a boolean",
                              param="chat_template_kwargs.enable_thinking")
    elif req.thinking is not None:
        enable_thinking = req.thinking.type == "enabled"
    else:
        enable_thinking = True
    clear_thinking = kwargs.pop("clear_thinking", None)
    if clear_thinking is None and req.thinking is not None:
        clear_thinking = req.thinking.clear_thinking
    if clear_thinking is not None and not isinstance(clear_thinking, bool):
        raise bad_request("chat_template_kwargs.clear_thinking must be a boolean",
                          param="chat_template_kwargs.clear_thinking")
    extra_kwargs = {k: v for k, v in kwargs.items() if isinstance(k, str) and k not in _TEMPLATE_RESERVED
                    and k.isidentifier()}
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    messages = _messages(req)
    try:
        prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
                                         enable_thinking=enable_thinking, clear_thinking=clear_thinking,
                                         **extra_kwargs)
        ids = tok.encode(prompt)
    except APIError:
        raise
    except Exception as e:  # template errors are the request's fault (bad roles, bad arguments ...)
        raise bad_request(f"cannot render the conversation: {type(e).__name__}: {e}", param="messages") from None
    if not ids:
        raise bad_request("the rendered prompt is empty", param="messages")
    ids = _truncate(state, ids, req.truncate_prompt_tokens)
    max_tokens = _check_context(state, len(ids), req.effective_max_tokens, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    # a turn that starts another role has left the assistant's turn (not EOS ids, so ignore_eos skips them too)
    stop_ids = [] if req.ignore_eos else [i for i in (state.ids[st.ASSISTANT], state.ids[st.SYSTEM]) if i is not None]
    params = _sampling(state, req, max_tokens=max_tokens, logprobs=logprobs, stop_ids=stop_ids)
    params.prompt_logprobs = req.prompt_logprobs
    opens = prompt_opens_reasoning(prompt)
    choice = req.effective_tool_choice
    procs: list[LogitsProcessor] = []
    parse_tool_calls = bool(tools) and choice != "none"
    if tools and choice == "none" and state.ids[st.TOOL_CALL_START] is not None:
        procs.append(ban_tokens([state.ids[st.TOOL_CALL_START]]))
    grammar = state.output_grammar(req, thinking=opens)
    if grammar is not None:
        parse_tool_calls = False
    elif tools and (choice == "required" or isinstance(choice, NamedToolChoice)
                    or (choice == "auto" and any(t.function.strict for t in req.tools))):
        # required / named: the output is calls; auto with strict tools (OpenAI's strict function calling): text,
        # and any call it makes is well-formed with schema-checked arguments
        names = [choice.function.name] if isinstance(choice, NamedToolChoice) else None
        try:
            grammar = ToolCallGrammar(state.grammars.vocab, tools, names=names,
                                      parallel=req.parallel_tool_calls and names is None, thinking=opens,
                                      optional=choice == "auto")
        except ValueError as e:
            raise bad_request(str(e), param="tool_choice" if choice != "auto" else "tools") from None
    if grammar is not None:
        procs.append(_constrained(grammar, max_tokens))
    return Prepared(
        request_id=req.request_id or f"chatcmpl-{uuid.uuid4().hex}", model=model, prompts=[ids],
        prompt_texts=[prompt], params=params, processors=procs, opens_reasoning=opens, tools=tools,
        parse_tool_calls=parse_tool_calls, include_reasoning=req.include_reasoning, top_logprobs=logprobs,
        extra={"prompt_logprobs": req.prompt_logprobs}, priority=req.priority)


def prepare_completion(state: ServerState, req: CompletionRequest) -> Prepared:
    model = state.check_model(req.model)
    tok = state.tokenizer
    V = state.backend.vocab_size
    prompts, texts = [], []
    for p in req.prompts():
        if isinstance(p, str):
            ids = tok.encode(p)
            texts.append(p)
        else:
            ids = list(p)
            if any(t >= V for t in ids):
                raise bad_request(f"prompt token ids must be below the vocabulary size {V}", param="prompt")
            texts.append(None)
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        kept = _truncate(state, ids, req.truncate_prompt_tokens)
        if len(kept) < len(ids):
            texts[-1] = None  # echo the tokens that were kept, not the text that was sent
        prompts.append(kept)
    max_tokens = min(_check_context(state, len(ids), req.max_tokens, "prompt") for ids in prompts)
    params = _sampling(state, req, max_tokens=max_tokens, logprobs=req.logprobs, stop_ids=[])
    wanted = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
    if wanted:  # echo + logprobs (lm-eval's loglikelihood) or vLLM's prompt_logprobs: score the prompt
        params.prompt_logprobs = max(wanted)
    procs: list[LogitsProcessor] = []
    grammar = state.output_grammar(req, thinking=False)
    if grammar is not None:
        procs.append(_constrained(grammar, max_tokens))
    return Prepared(request_id=req.request_id or f"cmpl-{uuid.uuid4().hex}", model=model, prompts=prompts,
                    prompt_texts=texts, params=params, processors=procs, top_logprobs=req.logprobs,
                    extra={"echo": req.echo, "prompt_logprobs": req.prompt_logprobs}, priority=req.priority)


# ============================================================================================ generating
@dataclass
class ChoiceState:
    index: int
    parser: StreamingParser | None = None
    in_reasoning: bool = False
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # chat entries or (token, lp, top) tuples
    reasoning_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_time: float | None = None
    finish_sent: bool = False


class Generation:
    """Runs one prepared request (all its prompts and completions) and keeps the per-choice state."""

    def __init__(self, state: ServerState, prep: Prepared, endpoint: str, chat: bool, arrival: float | None = None):
        self.state = state
        self.prep = prep
        self.endpoint = endpoint
        self.chat = chat
        self.created = int(time.time())
        self.arrival = arrival if arrival is not None else time.monotonic()  # TTFT/e2e include preparation
        self.first_token_time: float | None = None
        self.cached_tokens = 0
        self.n = prep.params.n
        self.choices: dict[int, ChoiceState] = {}
        for p in range(len(prep.prompts)):
            for i in range(self.n):
                idx = p * self.n + i
                c = ChoiceState(index=idx, in_reasoning=prep.opens_reasoning)
                if chat:
                    c.parser = StreamingParser(prep.tools, thinking=prep.opens_reasoning,
                                               parse_tool_calls=prep.parse_tool_calls)
                self.choices[idx] = c
        self.engine_ids = [prep.request_id if len(prep.prompts) == 1 else f"{prep.request_id}-{p}"
                           for p in range(len(prep.prompts))]
        self.finished = False
        self.outcome = "ok"
        self._cached: dict[int, int] = {}
        self.prompt_scores: dict[int, tuple] = {}  # prompt index -> (prompt logprobs, prompt token ranks)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prep.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices.values())

    @property
    def reasoning_tokens(self) -> int:
        return sum(c.reasoning_tokens for c in self.choices.values())

    def usage(self) -> dict:
        return self.state.usage(self.prompt_tokens, self.cached_tokens, self.completion_tokens, self.reasoning_tokens)

    async def abort(self) -> None:
        for rid in self.engine_ids:
            await self.state.backend.abort(rid)

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """Yields (prompt index, delta RequestOutput) from all engine requests of this generation."""
        backend = self.state.backend
        prep = self.prep
        with self.tracked():
            if len(prep.prompts) == 1:
                agen = backend.generate(self.engine_ids[0], prep.prompts[0], prep.params, prep.processors,
                                        priority=prep.priority)
                try:
                    async for out in agen:
                        self._record(0, out)
                        yield 0, out
                finally:
                    await agen.aclose()
            else:
                async for p, out in _merge([backend.generate(rid, ids, prep.params, prep.processors,
                                                             priority=prep.priority)
                                            for rid, ids in zip(self.engine_ids, prep.prompts)]):
                    self._record(p, out)
                    yield p, out
            self.finished = True

    @contextlib.contextmanager
    def tracked(self):
        """This generation in the server metrics while it runs: in flight, its prompt length, and its outcome
        ("error" / "aborted" when an exception or a cancellation ends it)."""
        m = self.state.metrics
        m.in_flight += 1
        m.prompt_len.observe(self.prompt_tokens)
        try:
            yield
        except BaseException as e:
            if self.outcome == "ok":
                self.outcome = "error" if isinstance(e, Exception) else "aborted"
            raise
        finally:
            m.in_flight -= 1
            self._finish_metrics()

    def vllm_prompt_logprobs(self, p: int) -> list | None:
        """vLLM's ``prompt_logprobs`` for prompt p: None for the first token, then {token id: {logprob, rank,
        decoded_token}} for the prompt token and the requested number of most likely alternatives."""
        got = self.prompt_scores.get(p)
        k = self.prep.extra.get("prompt_logprobs")
        if got is None or k is None:
            return None
        lps, ranks = got
        ids, out = self.prep.prompts[p], [None]
        for t in range(1, len(ids)):
            d = lps[t]
            entry = {str(ids[t]): {"logprob": finite_logprob(d[ids[t]]), "rank": ranks[t],
                                   "decoded_token": self.state.token_text(ids[t])[0]}}
            for r, (j, v) in enumerate(sorted(d.items(), key=lambda kv: -kv[1])[:k], start=1):
                entry.setdefault(str(j), {"logprob": finite_logprob(v), "rank": r,
                                          "decoded_token": self.state.token_text(j)[0]})
            out.append(entry)
        return out

    def _record(self, p: int, out) -> None:
        now = time.monotonic()
        if getattr(out, "prompt_logprobs", None) is not None:
            self.prompt_scores[p] = (out.prompt_logprobs, out.prompt_token_ranks)
        if getattr(out, "num_cached_tokens", 0):
            self._cached[p] = out.num_cached_tokens
            self.cached_tokens = sum(self._cached.values())
        m = self.state.metrics
        for comp in out.outputs:
            c = self.choices[p * self.n + comp.index]
            k = len(comp.token_ids)
            if k:
                if self.first_token_time is None:
                    self.first_token_time = now
                    m.ttft.observe(now - self.arrival)
                if c.last_token_time is not None:
                    m.itl.observe((now - c.last_token_time) / k, k)
                c.last_token_time = now
                self._count_reasoning(c, comp.token_ids)
                c.token_ids.extend(comp.token_ids)
            if comp.finish_reason == "error":  # this request's sampling failed; the engine serves on
                if comp.stop_reason == NO_TOKEN_ALLOWED:  # its parameters contradict each other
                    raise APIError(400, f"Generation stopped after {len(c.token_ids)} tokens: {comp.stop_reason}",
                                   code="conflicting_constraints")
                raise APIError(500, f"Generation failed: {comp.stop_reason}", code="generation_failed")
            if comp.finish_reason is not None:
                c.finish_reason = comp.finish_reason
                c.stop_reason = comp.stop_reason

    def _count_reasoning(self, c: ChoiceState, ids: list[int]) -> None:
        ends = (self.state.ids[st.THINK_END], self.state.ids[st.TOOL_CALL_START])
        start = self.state.ids[st.THINK_START]
        for t in ids:
            if c.in_reasoning:
                c.reasoning_tokens += 1
                if t in ends:
                    c.in_reasoning = False
            elif t == start and self.chat:
                c.in_reasoning = True
                c.reasoning_tokens += 1

    def _finish_metrics(self) -> None:
        m = self.state.metrics
        s = self.state.settings
        prompt, comp, cached = self.prompt_tokens, self.completion_tokens, min(self.cached_tokens, self.prompt_tokens)
        m.prompt_tokens.inc(prompt)
        m.cached_prompt_tokens.inc(cached)
        m.generation_tokens.inc(comp)
        m.reasoning_tokens.inc(self.reasoning_tokens)
        m.gen_len.observe(comp)
        m.e2e.observe(time.monotonic() - self.arrival)
        m.cost.inc((prompt - cached) * s.price_input_per_million / 1e6, "input")
        m.cost.inc(cached * s.price_cached_input_per_million / 1e6, "cached_input")
        m.cost.inc(comp * s.price_output_per_million / 1e6, "output")
        for c in self.choices.values():
            m.request_success.inc(1, self.final_reason(c) or "abort")
        m.requests.inc(1, self.endpoint, self.outcome if (self.finished or self.outcome != "ok") else "aborted")

    # ---- chat helpers
    def final_reason(self, c: ChoiceState) -> str | None:
        r = c.finish_reason
        if r == "stop" and self.chat and self.prep.parse_tool_calls and c.parser is not None \
                and c.parser.result().tool_calls:
            return "tool_calls"
        return r

    def chat_logprobs(self, ids: list[int], lps: list[dict] | None) -> list[dict]:
        if lps is None or self.prep.top_logprobs is None:
            return []
        out = []
        k = self.prep.top_logprobs
        for t, d in zip(ids, lps):
            s, b = self.state.token_text(t)
            top = sorted(d.items(), key=lambda kv: -kv[1])[:k] if k else []
            out.append({"token": s, "logprob": finite_logprob(d.get(t, -9999.0)), "bytes": list(b),
                        "top_logprobs": [{"token": self.state.token_text(j)[0], "logprob": finite_logprob(v),
                                          "bytes": list(self.state.token_text(j)[1])} for j, v in top]})
        return out


def finite_logprob(x: float) -> float:
    """OpenAI's stand-in for a log-probability of -inf (a token masked out): -9999.0."""
    return x if math.isfinite(x) else -9999.0


async def _merge(agens: list) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators; yields (iterator index, item). Closes all on exit."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, agen):
        try:
            async for item in agen:
                await queue.put((i, item))
            await queue.put((i, done))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, a)) for i, a in enumerate(agens)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for a in agens:
            try:
                await a.aclose()
            except (RuntimeError, StopAsyncIteration):
                pass
