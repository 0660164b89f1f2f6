"""The engine loop: requests in, one scheduled forward per ``step()``, outputs out.

``LLMEngine`` owns the model runner, the paged cache, the block manager, the scheduler, the sampler and
(optionally) the MTP proposer. ``add_request`` / ``abort`` / ``step`` are its whole interface; ``LLM`` (sync)
and ``AsyncLLM`` (asyncio) are thin loops around it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from glm5.engine.block_manager import BlockManager
from glm5.engine.config import EngineConfig
from glm5.engine.cpu_layout import packed_head, tune_linear_layouts
from glm5.engine.kv_cache import PagedKVCache, bytes_per_block
from glm5.engine.model_runner import Chunk, ModelRunner
from glm5.engine.outputs import CompletionOutput, RequestOutput
from glm5.engine.parallel import agree_min, from_rank0
from glm5.engine.sampler import Sampler, token_logprobs, token_ranks, unusable_rows
from glm5.engine.sampling_params import SamplingParams
from glm5.engine.scheduler import Scheduler
from glm5.engine.sequence import Sequence, SequenceStatus
from glm5.engine.sleep_mode import SleepMode
from glm5.engine.spec_decode import MTPProposer, mtp_cache_layers, process_verify_rows, verify
from glm5.model.tensor_parallel import TensorParallel
from glm5.model.weights import load_weights

log = logging.getLogger(__name__)

PROMPT_SCORE_ROWS = 256  # prompt positions scored per LM-head call (bounds the [rows, vocab] logits)


@dataclass(eq=False)  # a request is itself: compared by identity (field-by-field equality cost ~13% of a 128-seq step)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival: float
    finished: bool = False
    metrics: dict = field(default_factory=dict)
    prompt_logprobs_sent: bool = False


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.config = cfg = config or EngineConfig()
        tp = getattr(model, "tensor_parallel", None)
        if tp is None and cfg.tensor_parallel_size > 1:  # a whole model on every rank: keep this rank's shard
            from glm5.engine.parallel import init_tensor_parallel
            from glm5.model.tensor_parallel import apply_tensor_parallel

            tp, dev = init_tensor_parallel(cfg.tensor_parallel_size, model.device, cfg.enable_expert_parallel)
            apply_tensor_parallel(model.to(dev), tp)
        self.tp = tp = tp or TensorParallel()
        if tp.world != cfg.tensor_parallel_size or (tp.world > 1 and tp.expert_parallel != cfg.enable_expert_parallel):
            raise ValueError(f"the model is split over {tp.world} rank(s) (expert parallel: {tp.expert_parallel}) but "
                             f"tensor_parallel_size is {cfg.tensor_parallel_size} (enable_expert_parallel: "
                             f"{cfg.enable_expert_parallel})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._grammars = None  # GrammarCache for structured outputs, built on first use
        mcfg = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
        self.k = cfg.num_speculative_tokens
        if self.k and model.model.mtp is None:
            raise ValueError("num_speculative_tokens > 0 needs a model with an MTP layer")
        head = None
        if cfg.cpu_weight_layout == "auto" and self.device.type == "cpu":
            tune_linear_layouts(model, agree=lambda layout: from_rank0(layout, tp))
            head = packed_head(model)
        mtp_layers = mtp_cache_layers(self.k, cfg.mtp_draft_mode)
        num_layers = mcfg.num_hidden_layers + mtp_layers  # + the MTP drafts' cache layers
        # config.json's eos ids and generation_config.json's (the same three for GLM-5; a fine-tune may add some)
        self.eos_ids = set(mcfg.eos_token_ids) | set(getattr(model, "generation_config", {}).get("eos_token_id", []))
        if tokenizer is not None:
            self.eos_ids |= set(tokenizer.eos_token_ids)
        # ---- cache budget
        per_block = bytes_per_block(mcfg, cfg.block_size, num_layers, self.dtype, cfg.kv_cache_dtype)
        min_blocks = 2 + -(-(self.max_model_len + 2 * self.k) // cfg.block_size)  # one full sequence + null block
        num_blocks = cfg.num_blocks
        if num_blocks is None:
            if cfg.kv_cache_memory is not None:
                num_blocks = cfg.kv_cache_memory // per_block
            else:
                num_blocks = cfg.max_num_seqs * (min_blocks - 1) + 1
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    num_blocks = min(num_blocks, int(free * cfg.gpu_memory_utilization) // per_block)
                else:
                    num_blocks = min(num_blocks, (4 << 30) // per_block)
        num_blocks = agree_min(num_blocks, tp, self.device)  # identical caches, identical schedules on every rank
        if num_blocks < min_blocks:
            raise ValueError(f"cache of {num_blocks} blocks cannot hold one {self.max_model_len}-token sequence "
                             f"(need >= {min_blocks}); raise the budget or lower max_model_len")
        self.kv_cache = PagedKVCache(mcfg, num_blocks, cfg.block_size, num_layers, self.dtype, self.device,
                                     cfg.kv_cache_dtype)
        log.info("KV cache: %d tokens in %d blocks, %.1f MiB (%s)", (num_blocks - 1) * cfg.block_size, num_blocks,
                 self.kv_cache.nbytes() / 2**20, self.kv_cache.kv_cache_dtype.replace("auto", str(self.dtype)[6:]))
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching,
                                          hash_extra_tokens=mtp_layers)  # depth d's entry at s reads x_{s+d}
        self.runner = ModelRunner(model, self.kv_cache, cfg.block_size, dsa=cfg.dsa, head=head)
        self.proposer = MTPProposer(self.runner, self.k, cfg.mtp_draft_mode, cfg.spec_draft_stop_gap) \
            if self.k else None
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.k,
                                   on_admit=self._on_admit, policy=cfg.scheduling_policy)
        self.sampler = Sampler(cfg.logprobs_mode)
        self.rng = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.requests: dict[str, _Request] = {}
        self._seq_req: dict[int, _Request] = {}
        self._next_id = 0
        self.stats = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "spec_verify_steps": 0,
                      "spec_paused_steps": 0,
                      "spec_draft_tokens": 0, "spec_accepted_tokens": 0}
        # Plain decode, MTP verification and the MTP layer's depth-1 steps run over a static layout
        # (glm5/engine/static_decode.py): replayed CUDA graphs on CUDA, a torch.compile'd step on CPU with
        # compile_decode. Not yet under tensor parallelism: its collectives would have to be captured too.
        self.sleep_mode = SleepMode(self)
        cuda_graphs = cfg.use_cuda_graph and self.device.type == "cuda"
        cpu_compiled = cfg.compile_decode and self.device.type == "cpu"
        if (cuda_graphs or cpu_compiled) and tp.world == 1:
            from glm5.engine.static_decode import StaticDecodeRunner, compile_ahead

            self.runner.graphs = StaticDecodeRunner(self.runner, cfg.max_num_seqs, self.max_model_len,
                                                    capture=cuda_graphs, compile=cfg.compile_decode)
            if cpu_compiled:
                compile_ahead(self)  # compiled now rather than in the first requests' steps

    # --------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path, tokenizer=None, dtype: torch.dtype = torch.float32, device="cpu",
                        config: EngineConfig | None = None) -> "LLMEngine":
        from glm5.model.transformer import GLM5ForCausalLM

        model = GLM5ForCausalLM.from_pretrained(path, dtype=dtype, device=device)
        if tokenizer is None and (Path(path) / "tokenizer.json").exists():
            from glm5.tokenizer import GLM5Tokenizer

            tokenizer = GLM5Tokenizer.from_pretrained(path)
        return cls(model, tokenizer, config)

    # -------------------------------------------------------------------------------------- requests
    def _with_processors(self, params: SamplingParams, ids: list[int]) -> SamplingParams:
        """A copy of ``params`` whose processors end with those its fields ask for: the structured-output grammar
        (compiled once per schema, shared by the request's n sequences: it keys its state by each one's output), then
        penalties / bias / allowed ids / min_p. The grammar comes first, as vLLM applies its bitmask before the
        sampler and as the server orders them: min_p then keeps tokens near the best *valid* one (before the grammar,
        it could keep only tokens the grammar forbids and leave nothing to sample)."""
        from glm5.engine.processors import bad_word_sequences, bad_words_processor, request_processors

        V = self.model.config.vocab_size
        for name in ("logit_bias", "allowed_token_ids"):
            if max(getattr(params, name) or [0]) >= V:
                raise ValueError(f"{name}: token ids must be below the vocabulary size {V}")
        procs = request_processors(params)
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words need a tokenizer")
            procs.insert(0, bad_words_processor(bad_word_sequences(self.tokenizer, params.bad_words)))
        so = params.structured_outputs
        if so is not None:
            from glm5.structured import ConstrainedLogitsProcessor, GrammarCache
            from glm5.tokenizer import special_tokens as st

            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer")
            if self._grammars is None:
                self._grammars = GrammarCache(self.tokenizer, V)
            thinking = ids[-1] == self.tokenizer.token_to_id(st.THINK_START)  # the chat template opened reasoning
            grammar = self._grammars.get(*so.constraint, thinking)  # ValueError for what it cannot enforce
            budget = min(params.max_tokens or self.max_model_len, self.max_model_len - len(ids))
            procs.insert(0, ConstrainedLogitsProcessor(grammar, budget))  # ValueError when the budget cannot fit it
        return replace(params, logits_processors=[*(params.logits_processors or []), *procs])

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        self.sleep_mode.check_ready()
        params = params or SamplingParams()
        if priority != 0 and self.scheduler.policy != "priority":
            raise ValueError(f"priority {priority} needs the engine's scheduling_policy='priority'")
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids instead")
            text = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        keep = params.truncate_prompt_tokens
        if keep is not None:  # left truncation: the end of a prompt is what the next token depends on most
            ids = ids[-(self.max_model_len - 1 if keep == -1 else keep):]
            text = None  # the text no longer matches the ids
        V = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"prompt token ids must be in [0, {V})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room to generate (max_model_len "
                             f"{self.max_model_len})")
        if params.stop_list and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if params.needs_processors:
            params = self._with_processors(params, ids)
        seqs = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self.rng))
            # a seeded request's randomness is its seed (position-keyed noise, glm5/engine/sampler.py), so its tokens
            # do not depend on speculation; an unseeded one's is a stream, which rejection sampling consumes
            gen = None
            if not params.greedy:
                gen = int(seed) if params.seed is not None else torch.Generator(device=self.device).manual_seed(seed)
            seq = Sequence(request_id, i, ids, params, gen, time.monotonic())
            seq.priority = int(priority)
            if self.tokenizer is not None:
                seq.detokenizer = self.tokenizer.incremental_detokenizer(skip_special_tokens=params.skip_special_tokens)
            seqs.append(seq)
        req = _Request(request_id, text, ids, params, seqs, time.monotonic())
        self.requests[request_id] = req
        for s in seqs:
            self._seq_req[s.seq_id] = req
            self.scheduler.add(s)
        self.stats["prompt_tokens"] += len(ids) * params.n
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now (finish reason "abort") and free its cache blocks."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._finish_request(req, delta=True)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------------------ memory (sleep mode)
    def sleep(self, level: int = 1) -> None:
        """Release the KV cache, and offload (1) or discard (2) the weights: see glm5/engine/sleep_mode.py."""
        self.sleep_mode.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back what ``sleep`` released: "weights", "kv_cache", or both (None)."""
        self.sleep_mode.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.sleep_mode.is_sleeping

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache (after new weights, cached entries no longer match the model)."""
        self.block_manager.reset_prefix_cache()

    def load_weights(self, weights, strict: bool = True, sharded: bool = False) -> int:
        """New weights for the running model, in place (name -> whole tensor, or (name, tensor) pairs; a
        tensor-parallel rank keeps its slice, or with ``sharded`` takes the tensors as its slices already):
        glm5.model.weights.load_weights, then the prefix cache is forgotten.
        Requests still running go on with the new weights over latents cached by the old ones (PipelineRL's
        in-flight update); abort them first for a clean switch, as the RL loop does. Returns the tensors copied."""
        if "weights" in self.sleep_mode.asleep:
            raise RuntimeError("the weights are asleep: wake_up(['weights']) before loading new ones")
        n = load_weights(self.model, weights, strict, sharded)
        self.reset_prefix_cache()
        return n

    # ------------------------------------------------------------------------------------------ step
    def _on_admit(self, seq: Sequence) -> None:
        if self.proposer is not None:
            self.proposer.reset(seq, seq.num_computed_tokens)

    @torch.inference_mode()
    def step(self, delta: bool = False) -> list[RequestOutput]:
        """Run one scheduled forward; return outputs of the requests that changed (all their text and tokens
        so far, or with ``delta`` only the new part)."""
        self.sleep_mode.check_ready()
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            if self.proposer is not None:
                seq.spec = None
        if not sched.scheduled:
            return []
        self.stats["steps"] += 1
        try:
            return self._run(sched.scheduled, delta)
        except BaseException:  # blocks registered ahead of a step that did not finish hold no final entries
            for s in sched.scheduled:
                self.block_manager.unpublish(s.seq, s.hashed_before)
            raise

    def _run(self, items, delta: bool) -> list[RequestOutput]:
        """The forward of the scheduled chunks, sampling or verification, and the commit."""
        plain_decode = all(s.num_new_tokens == 1 and not s.draft_ids and s.completes for s in items)
        hidden = None
        if plain_decode:  # one token per sequence, each row sampled: no row selection, no prompt to score
            chunks = [Chunk(s.seq.block_table, s.seq.num_computed_tokens, s.seq.token_ids[-1:]) for s in items]
            hidden, logits = self.runner.decode(chunks)  # (the hidden states feed the MTP caches, if any)
            row_of = list(range(len(items)))
            nrows = [1] * len(items)
        else:
            chunks, row_idx, row_of, nrows = [], [], [], []
            off = 0
            for s in items:
                seq = s.seq
                c = seq.num_computed_tokens
                toks = seq.token_ids[c:c + s.num_new_tokens] + s.draft_ids
                chunks.append(Chunk(seq.block_table, c, toks))
                m = 1 + len(s.draft_ids) if s.completes else 0
                row_of.append(len(row_idx))
                nrows.append(m)
                row_idx.extend(range(off + len(toks) - m, off + len(toks)))
                off += len(toks)
            graphed = self._graph_verify(items, chunks)
            if graphed is not None:  # every row is a sampled one here: row_idx covers them all, in order
                hidden, logits = graphed
            else:
                ids, pos, batch = self.runner.build(chunks)
                hidden = self.runner.forward(ids, pos, batch)
                logits = self.runner.logits(hidden[torch.tensor(row_idx, dtype=torch.long, device=self.device)]) \
                    if row_idx else None
            self._score_prompt(items, hidden)
        # ---- sample / verify
        plain = [i for i, s in enumerate(items) if s.completes and not s.draft_ids]
        sampled: dict[int, tuple[list[int], list]] = {}
        failed: dict[int, str] = {}  # item -> why its row could not be sampled; that request alone ends
        if logits is not None and any(s.completes and s.seq.params.min_tokens for s in items):
            logits = self._mask_min_tokens(logits, items, row_of, nrows)
        if plain:
            rows = torch.tensor([row_of[i] for i in plain], dtype=torch.long, device=logits.device)
            toks, lps, errs = self.sampler(logits[rows], [items[i].seq.params for i in plain],
                                           [items[i].seq.generator for i in plain],
                                           [items[i].seq.output_token_ids for i in plain])
            for j, i in enumerate(plain):
                if errs[j] is None:
                    sampled[i] = ([toks[j]], [lps[j]])
                else:
                    failed[i] = errs[j]
        for i, s in enumerate(items):
            if s.completes and s.draft_ids:
                seq = s.seq
                raw = logits[row_of[i]:row_of[i] + nrows[i]]
                if bool(unusable_rows(raw).any()):
                    failed[i] = "the model produced non-finite logits"
                    continue
                lg, why = process_verify_rows(seq, s.draft_ids, raw)
                if why is not None:
                    failed[i] = why
                    continue
                emitted, accepted = verify(seq, lg, s.draft_ids)
                n = len(emitted)
                lps = token_logprobs(self.sampler.logprob_source(raw[:n], lg[:n], [seq.params] * n), emitted,
                                     [seq.params.logprobs] * n)
                sampled[i] = (emitted, lps)
                self.stats["spec_verify_steps"] += 1
                self.stats["spec_draft_tokens"] += len(s.draft_ids)
                self.stats["spec_accepted_tokens"] += accepted
                rm = self._seq_req[seq.seq_id].metrics
                rm["spec_verify_steps"] = rm.get("spec_verify_steps", 0) + 1
                rm["spec_draft_tokens"] = rm.get("spec_draft_tokens", 0) + len(s.draft_ids)
                rm["spec_accepted_tokens"] = rm.get("spec_accepted_tokens", 0) + accepted
        # ---- commit
        touched: dict[int, _Request] = {}  # requests with news this step, by id(), in first-touched order
        spec_items, spec_want = [], []
        off = 0
        for i, s in enumerate(items):
            seq = s.seq
            width = s.num_new_tokens + len(s.draft_ids)
            c_old = seq.num_computed_tokens
            if i in failed:
                seq.num_computed_tokens = c_old + s.num_new_tokens
                log.warning("request %s failed: %s", self._seq_req[seq.seq_id].request_id, failed[i])
                self.stats["failed_sequences"] = self.stats.get("failed_sequences", 0) + 1
                self._finish_seq(seq, "error", failed[i])
                req = self._seq_req[seq.seq_id]
                touched.setdefault(id(req), req)
            elif i in sampled:
                toks, lps = sampled[i]
                seq.num_computed_tokens = c_old + s.num_new_tokens + len(toks) - 1  # fed + accepted drafts
                for t, lp in zip(toks, lps):
                    self._append_token(seq, t, lp)
                    if seq.is_finished:
                        break
                req = self._seq_req[seq.seq_id]
                touched.setdefault(id(req), req)
            else:
                seq.num_computed_tokens = c_old + s.num_new_tokens
            if s.draft_ids or i in sampled or i in failed:  # consumed; a recompute chunk keeps pending drafts
                seq.draft_token_ids, seq.draft_probs = [], None
            if i in failed:  # its entries may be garbage: no prefix-cache entries from this step
                self.block_manager.unpublish(seq, s.hashed_before)
                self.scheduler.finish(seq)
            elif self.proposer is None:
                self.block_manager.register_full_blocks(seq, seq.num_computed_tokens)
                if seq.is_finished:
                    self.scheduler.finish(seq)  # (its blocks stay cached)
            elif seq.is_finished and len(seq.block_hashes) == s.hashed_before:  # nothing registered ahead to finalise
                self.scheduler.finish(seq)
            else:  # its rows hidden[off:] feed the MTP caches; its blocks are published once those are final too
                # (a finishing sequence's too, when blocks were registered ahead of this step: they must be final)
                spec_items.append((seq, off, c_old))
                # draft only right after a sampled token: a prefill chunk that stops one token short
                # must not turn the next sample into a verification (see glm5.engine.scheduler)
                spec_want.append(seq.in_decode and i in sampled and not seq.is_finished)
            off += width
        if spec_items:
            live = len(self.scheduler.running) - sum(seq.is_finished for seq, _, _ in spec_items)
            pause = 0 < self.config.spec_disable_batch_size < live
            if pause:  # every request: greedy and seeded tokens do not depend on drafts, unseeded ones promise nothing
                spec_kmax = [0] * len(spec_items)
                self.stats["spec_paused_steps"] += 1
            else:
                spec_kmax = [self._max_drafts(seq) if want else 0 for (seq, _, _), want in zip(spec_items, spec_want)]
            # only sequences whose MTP caches ran can have newly final blocks (committed() is their minimum)
            for seq in self.proposer.propose(hidden, spec_items, spec_kmax, defer=pause):
                self.block_manager.register_full_blocks(seq, self.proposer.committed(seq))
            for seq, _, _ in spec_items:
                if seq.is_finished:
                    self.scheduler.finish(seq)
        outs = []
        for req in touched.values():
            if all(s.is_finished for s in req.seqs):
                outs.append(self._finish_request(req, delta))
            else:
                outs.append(self._make_output(req, delta))
        if not self.scheduler.has_unfinished():
            if self.kv_cache.scratch is not None:
                self.runner.idle()  # give the gather buffers back (see GatherScratch)
            if self.proposer is not None:
                self.proposer.held.prune()  # and the rows held for a pause, if it outlived every sequence
        return outs

    def _graph_verify(self, items, chunks) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A decode step with MTP drafts (each sequence: its last token + up to k drafts) through the CUDA graphs
        for k + 1 rows per sequence -> (hidden, logits) of every row; None when it is not such a step or no graph
        applies. (A decode step without drafts is a plain one: ``ModelRunner.decode``.)"""
        graphs = self.runner.graphs
        if graphs is None or not all(s.num_new_tokens == 1 and s.completes for s in items):
            return None
        return graphs.run_rows(chunks, 1 + self.k)

    def _mask_min_tokens(self, logits, items, row_of, nrows):
        """min_tokens: EOS and stop ids cannot be chosen before the output has min_tokens tokens (as vLLM). Rows
        of one sequence are consecutive output positions (a sampled token, or the MTP verification rows)."""
        logits = logits.clone()
        for i, s in enumerate(items):
            p = s.seq.params
            if not s.completes or not p.min_tokens:
                continue
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_ids))
            for j in range(nrows[i]):
                if s.seq.num_output_tokens + j < p.min_tokens and banned:
                    logits[row_of[i] + j, banned] = float("-inf")
        return logits

    def _score_prompt(self, items, hidden: torch.Tensor) -> None:
        """SamplingParams.prompt_logprobs: the final hidden state at prompt position p scores prompt token p + 1.
        Positions already scored are skipped (a recompute after preemption repeats none), and the logits are
        formed PROMPT_SCORE_ROWS rows at a time, so a long prompt never materialises [prompt, vocab] at once."""
        off = 0
        for s in items:
            seq, width = s.seq, s.num_new_tokens + len(s.draft_ids)
            lps = seq.prompt_logprobs
            if lps is not None and seq.needs_prompt_logprobs:
                c = seq.num_computed_tokens
                end = min(c + s.num_new_tokens, seq.num_prompt_tokens - 1)
                for a in range(max(c, len(lps) - 1), end, PROMPT_SCORE_ROWS):
                    b = min(end, a + PROMPT_SCORE_ROWS)
                    logits = self.runner.logits(hidden[off + a - c: off + b - c])
                    targets = seq.token_ids[a + 1: b + 1]
                    lps.extend(token_logprobs(logits, targets, [seq.params.prompt_logprobs] * (b - a)))
                    seq.prompt_ranks.extend(token_ranks(logits, targets))
            off += width

    def _max_drafts(self, seq: Sequence) -> int:
        p = seq.params
        left = self.max_model_len - seq.num_tokens
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - seq.num_output_tokens)
        return max(0, min(self.k, left - 1))

    # --------------------------------------------------------------------------------- stop checks
    def _append_token(self, seq: Sequence, tok: int, lp: dict | None) -> None:
        p = seq.params
        seq.token_ids.append(tok)
        self.stats["generation_tokens"] += 1
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp[tok]
        n_out = seq.num_output_tokens
        stop_id = None
        if n_out >= p.min_tokens and ((tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids):
            stop_id = tok  # ends the output; its text is not added
        if stop_id is None and seq.detokenizer is not None:
            before = len(seq.output_text)
            seq.output_text += seq.detokenizer.add(tok)
            if p.stop_list and n_out >= p.min_tokens:
                hit = _find_stop(seq.output_text, p.stop_list, before)
                if hit is not None:
                    idx, s = hit
                    seq.output_text = seq.output_text[: idx + (len(s) if p.include_stop_str_in_output else 0)]
                    return self._finish_seq(seq, "stop", s, flush=False)
        if stop_id is not None:
            return self._finish_seq(seq, "stop", stop_id)
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return self._finish_seq(seq, "length", None)
        if seq.num_tokens >= self.max_model_len:
            return self._finish_seq(seq, "length", None)

    def _finish_seq(self, seq: Sequence, reason: str, stop_reason, flush: bool = True) -> None:
        if flush and seq.detokenizer is not None:
            seq.output_text += seq.detokenizer.finish()
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.status = SequenceStatus.FINISHED

    # ------------------------------------------------------------------------------------- outputs
    def _completion(self, seq: Sequence, delta: bool) -> CompletionOutput:
        p = seq.params
        text = seq.output_text
        if not seq.is_finished and p.stop_list:  # hold back what a stop string could still cut
            text = text[: max(0, len(text) - (max(len(s) for s in p.stop_list) - 1))]
        toks = seq.output_token_ids
        lps = seq.logprobs
        if delta:
            t0, c0 = seq.sent_tokens, seq.sent_chars
            seq.sent_tokens, seq.sent_chars = len(toks), max(c0, len(text))
            toks, text = toks[t0:], text[c0:]
            lps = lps[t0:] if lps is not None else None
        return CompletionOutput(index=seq.index, text=text, token_ids=list(toks),
                                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                                logprobs=list(lps) if lps is not None else None,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

    def _make_output(self, req: _Request, delta: bool) -> RequestOutput:
        first, plp, ranks = req.seqs[0], None, None
        # complete ones only, and in a stream once
        if first.prompt_logprobs is not None and not first.needs_prompt_logprobs and not (
                delta and req.prompt_logprobs_sent):
            req.prompt_logprobs_sent = True
            plp, ranks = list(first.prompt_logprobs), list(first.prompt_ranks)
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=[self._completion(s, delta) for s in req.seqs], finished=req.finished,
                             num_cached_tokens=min(s.num_cached_tokens for s in req.seqs), metrics=req.metrics,
                             prompt_logprobs=plp, prompt_token_ranks=ranks)

    def _finish_request(self, req: _Request, delta: bool) -> RequestOutput:
        req.finished = True
        req.metrics.update(e2e_s=time.monotonic() - req.arrival,
                           preemptions=sum(s.num_preemptions for s in req.seqs))
        if req.metrics.get("spec_verify_steps"):  # tokens per verification step, bonus included
            req.metrics["spec_acceptance_length"] = (req.metrics["spec_accepted_tokens"]
                                                     + req.metrics["spec_verify_steps"]) / req.metrics["spec_verify_steps"]
        out = self._make_output(req, delta)
        self.requests.pop(req.request_id, None)
        for s in req.seqs:
            self._seq_req.pop(s.seq_id, None)
        return out

    # --------------------------------------------------------------------------------------- metrics
    def spec_metrics(self) -> dict:
        s = self.stats
        n = s["spec_verify_steps"]
        return {
            "verify_steps": n,
            "draft_tokens": s["spec_draft_tokens"],
            "accepted_tokens": s["spec_accepted_tokens"],
            "acceptance_rate": s["spec_accepted_tokens"] / s["spec_draft_tokens"] if s["spec_draft_tokens"] else 0.0,
            # tokens emitted per verification step, the bonus token included (vLLM's "mean acceptance length")
            "acceptance_length": (s["spec_accepted_tokens"] + n) / n if n else 0.0,
            "paused_steps": s["spec_paused_steps"],  # steps without drafts because of spec_disable_batch_size
        }


def _find_stop(text: str, stops: list[str], new_from: int) -> tuple[int, str] | None:
    """Earliest stop string that ends in the newly added text (from index ``new_from``)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, new_from - len(s) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best
