"""What the server needs from an inference engine, and the adapter to ``glm5.engine.AsyncLLM``.

The server makes exactly these calls (:class:`Backend`):

* ``tokenizer`` (a :class:`~glm5.tokenizer.GLM5Tokenizer`), ``max_model_len``, ``vocab_size`` (logits width),
  ``model_path``, ``eos_ids`` (the ids that end a generation; beam search finishes beams on them);
* ``await start()`` / ``await shutdown()`` (FastAPI lifespan);
* ``generate(request_id, prompt_token_ids, params, logits_processors)``: an async iterator of *delta*
  :class:`~glm5.engine.outputs.RequestOutput` (new token ids, text and logprobs per completion; the last
  one ``finished``). Closing the iterator early aborts the request and frees its cache;
* ``await abort(request_id)``;
* ``stats()``: running / waiting requests, KV-cache use, speculative-decoding counters;
* ``healthy`` (False once the engine loop died).

``logits_processors`` are ``(output_token_ids, logits[V]) -> logits`` callables (vLLM v0's signature),
used for ``json_object`` / ``json_schema``, required/named ``tool_choice``, ``tool_choice: none``, ``logit_bias``
and the penalties. They travel in ``SamplingParams.logits_processors``; the engine's sampler applies them per
sequence (each of the n completions sees its own output ids) and reports log-probabilities of the raw model
distribution, as vLLM does. With MTP speculation on, such sequences simply decode without drafts.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from glm5.engine.outputs import RequestOutput
from glm5.engine.sampling_params import LogitsProcessor, SamplingParams

log = logging.getLogger("glm5.serve")


class QueueFullError(Exception):
    """The engine cannot take more requests now (HTTP 429)."""


class Backend:
    """Interface the server drives (see the module docstring)."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int
    model_path: str = ""

    async def start(self) -> None:  # pragma: no cover - interface
        pass

    async def shutdown(self) -> None:  # pragma: no cover - interface
        pass

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 logits_processors: list[LogitsProcessor] | None = None, priority: int = 0
                 ) -> AsyncIterator[RequestOutput]:
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        return {}

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a generation (what beam search finishes a beam on)."""
        return set(getattr(self.tokenizer, "eos_token_ids", None) or [])

    @property
    def healthy(self) -> bool:
        return True


class EngineBackend(Backend):
    """:class:`Backend` over ``glm5.engine.AsyncLLM``."""

    def __init__(self, async_llm, model_path: str = ""):
        self.llm = async_llm
        self.engine = async_llm.engine
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the engine has no tokenizer (the model directory needs tokenizer.json)")
        self.max_model_len = int(self.engine.max_model_len)
        self.vocab_size = int(self.engine.model.config.vocab_size)
        self.model_path = model_path
        self.num_speculative_tokens = int(getattr(self.engine, "k", 0) or 0)

    @classmethod
    def from_pretrained(cls, model_dir: str, **engine_kwargs) -> "EngineBackend":
        from glm5.engine import AsyncLLM

        return cls(AsyncLLM.from_pretrained(model_dir, **engine_kwargs), model_path=str(model_dir))

    async def shutdown(self) -> None:
        self.llm.shutdown()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       logits_processors: list[LogitsProcessor] | None = None, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        procs = [p for p in (logits_processors or []) if p is not None]
        if procs:
            params = dataclasses.replace(params, logits_processors=list(params.logits_processors or []) + procs)
        agen = self.llm.generate(list(prompt_token_ids), params, request_id=request_id, priority=priority)
        try:
            async for out in agen:
                yield out
        finally:
            await agen.aclose()  # aborts the request (frees its blocks) if it did not finish

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    def stats(self) -> dict[str, float]:
        e = self.engine
        s = e.stats
        bm = e.block_manager
        return {
            "num_requests_running": float(len(e.scheduler.running)),
            "num_requests_waiting": float(len(e.scheduler.waiting)),
            "kv_cache_usage_perc": float(bm.usage),
            "kv_cache_free_blocks": float(bm.num_free_blocks),
            "kv_cache_total_blocks": float(bm.num_blocks - 1),
            "num_preemptions_total": float(getattr(e.scheduler, "num_preemptions", 0)),
            "prefix_cache_hit_tokens_total": float(getattr(bm, "prefix_hits", 0)),
            "engine_steps_total": float(s.get("steps", 0)),
            "spec_decode_num_draft_tokens_total": float(s.get("spec_draft_tokens", 0)),
            "spec_decode_num_accepted_tokens_total": float(s.get("spec_accepted_tokens", 0)),
            "spec_decode_num_verify_steps_total": float(s.get("spec_verify_steps", 0)),
        }

    @property
    def eos_ids(self) -> set[int]:
        return set(self.engine.eos_ids)  # config.json's, generation_config.json's and the tokenizer's

    @property
    def healthy(self) -> bool:
        return getattr(self.llm, "_error", None) is None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
