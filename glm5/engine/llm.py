"""``LLM``: offline batch generation in vLLM's shape.

    from glm5.engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", max_num_seqs=16, max_model_len=4096)
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].outputs[0].finish_reason
    outs = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64),
                    chat_template_kwargs={"enable_thinking": False})     # the GLM-5 chat format
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from glm5.engine.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from glm5.engine.llm_engine import EngineConfig, LLMEngine
from glm5.engine.outputs import RequestOutput
from glm5.engine.sampling_params import SamplingParams


def build_engine(model, tokenizer=None, device: str | torch.device | None = None, dtype=None, fp8: str = "dequantize",
                 **engine_kwargs) -> LLMEngine:
    """A model directory (or a GLM5ForCausalLM) plus EngineConfig fields -> LLMEngine. ``dtype``: a torch dtype, its
    name, or "auto" (the checkpoint's own, config.json's ``dtype``); default bf16 on CUDA, fp32 on CPU. ``fp8``: for
    an FP8 checkpoint, "dequantize" its weights at load (fast on a CPU) or "keep" them FP8 (half the memory;
    block-scaled FP8 GEMMs on Hopper GPUs, see glm5.model.fp8_linear)."""
    from glm5.checkpoint.hf import resolve_dtype

    if isinstance(model, (str, Path)):
        from glm5.engine.parallel import init_tensor_parallel
        from glm5.model.transformer import GLM5ForCausalLM

        path = Path(model)
        # under tensor parallelism each rank reads only its slice of the weights, on its own device
        tp, device = init_tensor_parallel(engine_kwargs.get("tensor_parallel_size", 1), device,
                                          engine_kwargs.get("enable_expert_parallel", False))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = GLM5ForCausalLM.from_pretrained(path, dtype=dtype, device=device, fp8=fp8,
                                                tensor_parallel=tp if tp.world > 1 else None)
        if tokenizer is None and (path / "tokenizer.json").exists():
            from glm5.tokenizer import GLM5Tokenizer

            tokenizer = GLM5Tokenizer.from_pretrained(path)
    else:
        dtype = None if dtype is None else resolve_dtype(dtype, model.config)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
    if isinstance(tokenizer, (str, Path)):
        from glm5.tokenizer import GLM5Tokenizer

        tokenizer = GLM5Tokenizer.from_pretrained(tokenizer)
    return LLMEngine(model, tokenizer, EngineConfig(**engine_kwargs))


def _unwrap(prompt):
    if not isinstance(prompt, Mapping):
        return prompt
    keys = set(prompt) & {"prompt", "prompt_token_ids"}
    if len(keys) != 1:
        raise ValueError(f"a prompt dict needs exactly one of 'prompt' and 'prompt_token_ids', got {sorted(prompt)}")
    return prompt[keys.pop()]


class LLM:
    """Synchronous engine front end.

    model: a checkpoint directory (config.json + safetensors; tokenizer.json used when present) or a
    GLM5ForCausalLM. Keyword arguments are EngineConfig fields (max_num_seqs, max_model_len, block_size,
    num_blocks / kv_cache_memory, max_num_batched_tokens, enable_prefix_caching, num_speculative_tokens,
    spec_disable_batch_size, dsa, kv_cache_dtype, seed, use_cuda_graph, cpu_weight_layout, logprobs_mode, scheduling_policy,
    tensor_parallel_size, enable_expert_parallel) plus
    device, dtype and tokenizer. ``tensor_parallel_size=N`` runs under ``torchrun --nproc-per-node N``, every rank
    executing the same script (glm5.engine.parallel).
    """

    def __init__(self, model, tokenizer=None, device: str | torch.device | None = None, dtype=None,
                 fp8: str = "dequantize", **engine_kwargs):
        self.engine = build_engine(model, tokenizer, device, dtype, fp8, **engine_kwargs)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """prompts: a string, a token-id list, a ``{"prompt": str}`` / ``{"prompt_token_ids": [...]}`` dict
        (vLLM's TextPrompt / TokensPrompt), or a list of these. Returns one RequestOutput per prompt, in
        order, each with ``n`` completions (text, token_ids, finish_reason, logprobs). ``use_tqdm``: a progress
        bar over finished prompts with the output tokens/s (stderr), as vLLM shows. ``priority``: one per prompt
        (lower first) for an engine built with ``scheduling_policy="priority"``."""
        if isinstance(prompts, (str, Mapping)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [_unwrap(p) for p in prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        priority = list(priority) if priority is not None else [0] * len(prompts)
        if len(priority) != len(prompts):
            raise ValueError("priority: one value per prompt")
        ids: list[str] = []
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="Processed prompts", unit="prompt", dynamic_ncols=True,
                   disable=not use_tqdm)
        t0, out_tokens = time.perf_counter(), 0
        try:
            for p, sp, pr in zip(prompts, params, priority):
                ids.append(self.engine.add_request(p, sp, priority=pr))
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.set_postfix_str(f"output: {out_tokens / (time.perf_counter() - t0):.1f} tok/s",
                                            refresh=False)
                        bar.update(1)
        finally:
            bar.close()
            for rid in ids:  # on an error (or KeyboardInterrupt) leave the engine clean
                if rid not in done:
                    self.engine.abort(rid)
        return [done[r] for r in ids]

    def beam_search(self, prompts, params: BeamSearchParams) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: for each prompt (text, token ids, or a prompt dict) the ``params.beam_width``
        best continuations by cumulative log-probability (glm5.engine.beam_search)."""
        if isinstance(prompts, (str, Mapping)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = []
        for p in map(_unwrap, prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token ids instead")
                p = self.tokenizer.encode(p)
            ids.append([int(t) for t in p])
        return beam_search(self.engine, ids, params)

    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template_kwargs: Mapping[str, Any] | None = None, add_generation_prompt: bool = True,
             tools: Sequence[Mapping[str, Any]] | None = None) -> list[RequestOutput]:
        """One conversation (a list of ``{"role", "content", ...}`` messages) or a list of them, rendered with the
        GLM-5 chat template (``chat_template_kwargs``: e.g. ``{"enable_thinking": False}``; ``tools``: OpenAI
        tool definitions) and generated like :meth:`generate`. The text is the raw assistant turn (reasoning,
        ``</think>``, answer, tool calls); ``glm5.tokenizer.parse_output`` splits it."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (tokenizer.json in the model directory or tokenizer=...)")
        if not messages:
            raise ValueError("chat: no messages")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(list(conv), tools=tools,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **dict(chat_template_kwargs or {}))
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def spec_metrics(self) -> dict:
        return self.engine.spec_metrics()

    # ------------------------------------------------------------------ memory between phases (sleep mode)
    def sleep(self, level: int = 1) -> None:
        """Free the engine's memory while it is idle (colocated RL): the KV cache always; the weights offloaded to
        host memory (``level=1``) or discarded (``level=2``, load new ones after ``wake_up``). vLLM's API; see
        glm5/engine/sleep_mode.py."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back what ``sleep`` released: ``["weights"]``, ``["kv_cache"]`` or both (None)."""
        self.engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def load_weights(self, weights, strict: bool = True) -> int:
        """Replace the model's weights in place (name -> tensor, or (name, tensor) pairs): see
        ``LLMEngine.load_weights``."""
        return self.engine.load_weights(weights, strict)
