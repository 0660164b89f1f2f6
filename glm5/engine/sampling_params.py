"""Per-request sampling parameters (vLLM's ``SamplingParams`` shape)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# (output_token_ids so far, next-token logits [V]) -> logits [V]: vLLM v0's logits-processor signature
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's ``StructuredOutputsParams``): exactly one of

    json: a JSON Schema (dict, or its JSON text); the output is a document it accepts. Keywords the grammar cannot
        enforce are refused when the request is added (see :mod:`glm5.structured.json_schema`).
    json_object: True; the output is one JSON object.
    choice: a list of strings; the output is exactly one of them.
    regex: a regular expression the whole output matches (Python syntax, ASCII classes; see
        :mod:`glm5.structured.regex` for what is supported).
    grammar: a GBNF grammar (llama.cpp's syntax, start rule ``root``) the whole output is a sentence of (see
        :mod:`glm5.structured.gbnf`).
    structural_tag: a structural tag (dict, or its JSON text as vLLM passes it): free text in which a trigger starts
        a tag (begin, JSON its schema accepts, end), in vLLM's ``{"structures": [...], "triggers": [...]}`` form or
        xgrammar's ``{"format": {...}}`` (see :mod:`glm5.structured.structural_tag` for the supported formats).

    Either way the output ends with EOS within ``max_tokens`` (the grammar closes strings and containers in
    time). When the prompt opened ``<think>`` (the chat template with thinking on), reasoning comes first.
    """

    json: dict | str | None = None
    json_object: bool = False
    choice: list[str] | None = None
    regex: str | None = None
    grammar: str | None = None
    structural_tag: dict | str | None = None

    def __post_init__(self):
        given = [self.json is not None, bool(self.json_object), self.choice is not None, self.regex is not None,
                 self.grammar is not None, self.structural_tag is not None]
        if sum(given) != 1:
            raise ValueError("structured_outputs: give exactly one of json (a schema), json_object=True, choice, "
                             "regex, grammar and structural_tag")
        for name in ("json", "structural_tag"):
            if isinstance(getattr(self, name), str):
                try:
                    object.__setattr__(self, name, json.loads(getattr(self, name)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.{name} is not valid JSON: {e}") from None
        if self.structural_tag is not None and not isinstance(self.structural_tag, dict):
            raise ValueError("structured_outputs.structural_tag must be a JSON object, got "
                             f"{type(self.structural_tag).__name__}")
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON Schema object, got {type(self.json).__name__}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", list(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {type(value).__name__}")

    @property
    def constraint(self) -> tuple[str, Any]:
        """(kind, value) for :meth:`glm5.structured.GrammarCache.get`: ("json", schema or None for any object),
        ("choice", strings), ("regex", pattern), ("grammar", GBNF text) or ("structural_tag", spec)."""
        for kind in ("choice", "regex", "grammar", "structural_tag"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return "json", self.json


@dataclass
class SamplingParams:
    """How to sample one request.

    temperature: 0 (< 1e-5) = greedy (argmax); otherwise logits / temperature.
    top_p: nucleus sampling (1.0 = off). top_k: keep the k most likely tokens (0 or -1 = off).
    max_tokens: generated tokens at most (None = until max_model_len). min_tokens: EOS and stop ids cannot be
        sampled before this many tokens (their logits are masked; so are the logprobs of those positions).
    stop: strings that end generation (needs a tokenizer); the text is cut before the match unless
        ``include_stop_str_in_output``. stop_token_ids: extra ids that end generation (kept in token_ids).
    ignore_eos: do not stop on the model's EOS ids.
    seed: per-request RNG seed; the same seed gives the same tokens whatever else is in the batch.
        With n > 1, completion i uses seed + i. The seed fixes the random numbers of each output position
        (glm5/engine/sampler.py), so requests for different prompts with one seed are not independent draws:
        where their distributions are alike they tend to pick alike. Give each prompt its own seed.
    logprobs: return the log-probabilities (of the raw model distribution, or with the engine's
        ``logprobs_mode="processed_logprobs"`` of the distribution it was sampled from) of each sampled token plus the
        ``logprobs`` most likely alternatives (0 = only the sampled token, None = none).
    prompt_logprobs: also return, for every prompt token after the first, its log-probability given the tokens
        before it plus the ``prompt_logprobs`` most likely alternatives (vLLM's field; what scoring harnesses use).
        Such a request does not reuse cached prefix blocks: every prompt position must be computed.
    n: completions per prompt.
    skip_special_tokens: drop special added tokens from the text (GLM-5's think/tool tags are not special).
    logits_processors: callables ``(output_token_ids, logits[V]) -> logits[V]`` (vLLM v0's signature) applied in
        order to the sequence's next-token logits before temperature/top-k/top-p; logprobs follow the engine's
        ``logprobs_mode``. Used for grammars (JSON mode, forced tool calls), logit_bias and penalties. With MTP
        speculation, each verified draft position is processed as if the drafts before it had been sampled, so a
        draft a processor forbids is rejected and the output is what one-token steps would give.
    structured_outputs: :class:`StructuredOutputsParams`; the engine compiles the grammar (cached per schema) and
        applies it after ``logits_processors`` and before the penalty / bias / allowed-ids / min_p fields. Needs the
        engine's tokenizer.
    bad_words: words that must not be generated (vLLM's field; needs the engine's tokenizer). Each word is tokenized
        as written and with a leading space; the last token of such a sequence is banned whenever the generated
        tokens before it would complete the sequence (a one-token word is banned outright).
    truncate_prompt_tokens: keep only the last k prompt tokens (left truncation; -1 = the longest prompt that
        leaves room for one generated token).
    presence_penalty, frequency_penalty (OpenAI's, over the generated tokens), repetition_penalty (vLLM's: > 1
        discourages repeats), logit_bias ({token id: bias}), allowed_token_ids (only these may be sampled), min_p
        (drop tokens below min_p × the top token's probability, after temperature): vLLM's fields, applied as
        logits processors.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    min_p: float = 0.0
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        else:
            self.stop_list = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop_list):
            raise ValueError("stop: strings must be non-empty")
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        self.logits_processors = list(self.logits_processors or []) or None
        if self.logits_processors and not all(callable(f) for f in self.logits_processors):
            raise ValueError("logits_processors must be callables (output_token_ids, logits) -> logits")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()} or None
            if self.logit_bias and min(self.logit_bias) < 0:
                raise ValueError("logit_bias keys must be token ids (>= 0)")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
            if not self.allowed_token_ids or min(self.allowed_token_ids) < 0:
                raise ValueError("allowed_token_ids must be a non-empty list of token ids")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
                raise ValueError("bad_words must be a list of non-blank strings")
            self.bad_words = list(self.bad_words) or None
        t = self.truncate_prompt_tokens
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens must be a positive integer or -1, got {t!r}")

    @property
    def needs_processors(self) -> bool:
        """Whether the engine adds processors of its own (penalties, bias, allowed ids, min_p, bad words, a grammar)."""
        return (self.structured_outputs is not None or self.logit_bias is not None or self.allowed_token_ids is not None
                or self.bad_words is not None
                or self.min_p > 0 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
