"""``EngineConfig``: every knob of the inference engine (vLLM's engine arguments, where it has them)."""

from __future__ import annotations

from dataclasses import dataclass

from glm5.engine.kv_quant import resolve_kv_cache_dtype
from glm5.engine.spec_decode import mtp_cache_layers


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    num_blocks: int | None = None  # cache blocks (including the reserved null block); else from the memory budget
    kv_cache_memory: int | None = None  # bytes for the cache; default: room for max_num_seqs full sequences (CPU
    # capped at 4 GiB) or gpu_memory_utilization of the free GPU memory
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill size)
    enable_prefix_caching: bool = True
    num_speculative_tokens: int = 0  # MTP drafts per step (0 = off)
    # Pause drafting while more than this many sequences run (0 = never), as vLLM's ``disable_by_batch_size``:
    # verifying k drafts multiplies a step's rows by k + 1, which pays off only while decode is memory-bound
    # (small batches). The MTP caches then catch up in one pass when the batch shrinks again. Applies to every
    # request: greedy and seeded sampled tokens are the same with or without drafts (position-keyed noise).
    spec_disable_batch_size: int = 0
    # "chain": drafts 2..k one row each on depth 1's cache, as vLLM's MTP proposer; "recursive": each depth is the
    # trained MTP recursion over its own cache (glm5/engine/spec_decode.py). Same outputs: verification decides.
    mtp_draft_mode: str = "chain"
    # Greedy requests stop drafting after a draft whose two best MTP logits are closer than this (nats; 0 = always
    # draft num_speculative_tokens). With a stop, a larger num_speculative_tokens pays: confident runs go long and
    # close calls end early (benchmarks/engine.md §2: 0.1 with 10 drafts). Sampled requests always draft k.
    spec_draft_stop_gap: float = 0.0
    dsa: str = "sparse"  # "sparse" (the model's DSA) or "dense"
    # "auto": the cache in the model's dtype (outputs equal the model's); "fp8" (= "fp8_e4m3" = "fp8_ds_mla"): GLM-5's
    # FP8 serving layouts, 656 + 132 bytes per token and layer at GLM-5's widths (glm5/engine/kv_quant.py)
    kv_cache_dtype: str = "auto"
    seed: int = 0  # engine RNG for requests without a seed
    use_cuda_graph: bool = True  # CUDA only; ignored on CPU
    # torch.compile the decode step (fused kernels): on CUDA before capturing its graphs (once per batch bucket,
    # tens of seconds each); on CPU when the engine is built (dynamic shapes: 2 compilations, ~8 with MTP, under a
    # minute each here) for 1.5-1.7x faster decode at small batches. Outputs may differ from eager at near-ties
    # (a fused sum's rounding)
    compile_decode: bool = False
    # CPU only: "auto" stores linear weights column-major where that decodes faster on this machine, and keeps the
    # LM head pre-packed for oneDNN for products of 2+ rows where that is faster (glm5/engine/cpu_layout.py; values
    # unchanged, the model's parameters are re-strided in place); "row" keeps them as they are, with no packed head
    cpu_weight_layout: str = "auto"
    # "raw_logprobs": SamplingParams.logprobs report the model's distribution (vLLM's default); "processed_logprobs":
    # the distribution each token was sampled from (temperature, top-k/top-p, logits processors), as RL needs
    logprobs_mode: str = "raw_logprobs"
    # "fcfs": requests wait in arrival order; "priority": by each request's priority (lower first), then arrival,
    # and the cache preempts the largest (priority, arrival) first (vLLM's scheduling_policy)
    scheduling_policy: str = "fcfs"
    # ranks the weights are split over (glm5.engine.parallel: one process per rank under torchrun); the model is
    # sharded when the engine is built
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # with tensor_parallel_size > 1: routed experts dealt out whole, not split

    def __post_init__(self):  # what can be checked without the model, checked where the settings come in
        if self.spec_disable_batch_size < 0:
            raise ValueError(f"spec_disable_batch_size must be >= 0, got {self.spec_disable_batch_size}")
        if self.dsa not in ("sparse", "dense"):
            raise ValueError(f"dsa must be 'sparse' or 'dense', got {self.dsa!r}")
        if self.cpu_weight_layout not in ("auto", "row"):
            raise ValueError(f"cpu_weight_layout must be 'auto' or 'row', got {self.cpu_weight_layout!r}")
        mtp_cache_layers(self.num_speculative_tokens, self.mtp_draft_mode)  # the draft mode's one check
        if not self.spec_draft_stop_gap >= 0:  # (also rejects NaN)
            raise ValueError(f"spec_draft_stop_gap must be >= 0, got {self.spec_draft_stop_gap}")
        resolve_kv_cache_dtype(self.kv_cache_dtype)
