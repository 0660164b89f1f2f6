"""GLM-5 inference engine: paged latent KV cache, DSA sparse decode, continuous batching, MTP speculation.

    from glm5.engine import LLM, SamplingParams          # offline / batch
    from glm5.engine import AsyncLLM                     # asyncio streaming (the server's engine)
    from glm5.engine import StructuredOutputsParams      # SamplingParams(structured_outputs=...): JSON / schema

Files, one idea each: sampling_params, sequence, block_manager (paged blocks, ref counts, prefix reuse),
kv_cache (latent + indexer-key storage), scheduler (continuous batching, chunked prefill, preemption),
model_runner (flattened varlen batches through the model's own modules), sampler, spec_decode (MTP
drafting, verification, rejection sampling; structured-output grammars come from glm5.structured),
static_decode (decode steps over a static layout: CUDA graphs, torch.compile), llm_engine, llm, async_engine,
beam_search (vLLM's LLM.beam_search over the engine), parallel (tensor / expert parallelism), cli.
"""

from glm5.engine.async_engine import AsyncLLM
from glm5.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from glm5.engine.llm import LLM, build_engine
from glm5.engine.llm_engine import EngineConfig, LLMEngine
from glm5.engine.outputs import CompletionOutput, RequestOutput
from glm5.engine.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["AsyncLLM", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams", "build_engine"]
