"""One sequence being generated: its tokens, how much of it is in the cache, its blocks and its output."""

from __future__ import annotations

import enum
import itertools

import torch

from glm5.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """A prompt plus the tokens generated so far.

    ``num_computed_tokens`` counts the leading tokens whose latents are in the main model's cache (also the
    MTP layer's, when speculative decoding is on: both advance together). A step feeds
    ``token_ids[num_computed_tokens:]`` (a prefill chunk, or the last sampled token in decode) plus any
    draft tokens; when the cache then covers every token, a new token is sampled. Preemption by recompute
    resets ``num_computed_tokens`` to 0 and keeps ``token_ids``, so the re-prefill includes the outputs.
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 generator: torch.Generator | int | None, arrival: float = 0.0):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        # the request's randomness: an int is a seeded request's seed (position-keyed noise), a torch.Generator an
        # unseeded one's stream, None greedy (glm5/engine/sampler.py)
        self.generator = generator
        self.arrival = arrival
        self.priority = 0  # the request's (lower = sooner) under scheduling_policy="priority"
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hashes of the leading full blocks registered for prefix reuse
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at (last) admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # speculative decoding: drafts proposed for the next step and their draft distributions
        self.draft_token_ids: list[int] = []
        self.draft_probs: torch.Tensor | None = None
        # output
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        # prompt_logprobs[t]: log-prob of prompt token t given tokens < t (None for t = 0); the request's first
        # completion computes them, the others may share its prefix blocks
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None)
        self.prompt_ranks: list[int | None] | None = [None] if self.prompt_logprobs is not None else None
        self.output_text = ""
        self.detokenizer = None  # set by the engine when a tokenizer is available
        self.sent_tokens = 0  # streaming bookkeeping: tokens / chars already handed out as deltas
        self.sent_chars = 0

    # ------------------------------------------------------------------------------------------ views
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions are still to be scored (so its prefill must not skip them via the prefix cache)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_decode(self) -> bool:
        """Every token but the last is cached: the next step feeds one token (plus drafts)."""
        return self.num_computed_tokens == self.num_tokens - 1

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, {self.status.value})")
