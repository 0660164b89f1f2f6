"""What the engine hands back: per-request outputs in vLLM's shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion. In streaming (delta) outputs ``text``/``token_ids``/``logprobs`` hold only what is new
    since the previous output of the same request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; for "error", why

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # prompt tokens served from the prefix cache: for n > 1, the fewest any completion found (its siblings share what
    # the first computed in the same step, which the request as a whole did not find cached)
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: per prompt token, {token: logprob, alternatives...}; None for the first.
    # Delta (streaming) outputs carry them once, in the first output after the prefill.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_ranks: list[int | None] | None = None  # vocabulary rank of each prompt token (1 = argmax)
    metrics: dict = field(default_factory=dict)
