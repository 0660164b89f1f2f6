"""Decode steps over a static layout, as nano-vllm runs them: plain decode (one new token per sequence) and MTP
verification (the last token plus up to k drafts per sequence). On CUDA the step is captured into CUDA graphs; on
either device it may be torch.compile'd (``compile_decode``). On CPU, compiling is the point: a batch-1 step is a
few hundred small ops, and inductor's fused C++ loops run it 1.5–1.7× faster than eager (benchmarks/engine.md §1).

A step is set up for each (kind, batch bucket, rows per sequence): kind "model" (the main model and its head) or
"mtp" (the MTP layer at draft depth 1 and its head: the chained drafts and depth 1's catch-up); buckets 1, 2, 4, 8,
16, 32, ... up to max_num_seqs; rows 1 for plain decode and one-row drafts, k + 1 for verification and catch-up.
Without capture, greedy chained drafts (2..k) are one more step (``run_chain``): k - 1 one-row MTP steps in a
loop, each fed the previous one's argmax, so a compiled CPU engine drafts them in one call instead of k - 1.
The batch is padded to the bucket, each sequence's rows to R, and keys to a length T (block tables [B, T/bs]):
``max_model_len`` under CUDA graphs, whose shapes are fixed at capture; without capture the next power of two of
blocks that holds every sequence, so a short sequence does not attend over ``max_model_len`` padding keys (the CPU
compile is dynamic in B, R and T: one compilation serves them all after the first few). The attention layout (key
slots, causal visibility) is computed *inside* the step from the block tables and positions, so a replay only
copies four small integer tensors in. Padding rows write their latents to the reserved null block 0 and their
outputs are dropped; a padded row of a real sequence sits after its last real row, so no real row sees it. With
keys padded beyond ``index_topk``, DSA always runs the indexer and gathers the top-k rows, which is exact for short
sequences too (every visible key has a finite score and is selected).

MoE routing is written to be capturable: expert counts come from a fixed-size ``scatter_add``
(``glm5.model.moe.expert_counts``), not ``torch.bincount``, and the grouped GEMM takes its offsets on the
device. The padded-bmm fallback (used where ``torch._grouped_mm`` is unavailable, e.g. fp32 on CUDA) takes a
static capacity at decode sizes for the same reason; compiled on CPU, the experts are a gathered batched product
that inductor fuses (see ``glm5.model.moe.grouped_linear``). An op that still syncs is caught by a checked warm-up
before capture; if a capture fails anyway, graphs are switched off for the engine and decode runs eagerly
(the output is the same either way). Measured on an H100: benchmarks/engine.md §4.
"""

from __future__ import annotations

import logging
import time

import torch

from glm5.engine.model_runner import Chunk
from glm5.engine.spec_decode import top2_gap
from glm5.model.cache import AttnGroup, PagedBatch

log = logging.getLogger(__name__)


class StaticDecodeRunner:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int, capture: bool = True, compile: bool = False):
        self.runner = runner
        self.capture = capture
        # torch.compile the step: inductor fuses the ~125 small ops per layer (norms, rope, routing, the
        # latent-attention glue) that dominate a batch-1 step (benchmarks/engine.md §1 on CPU, §4 on an H100).
        # Captured graphs fix every shape; without capture one dynamic compilation covers every B, R and T.
        self.compiled = compile
        self.step = torch.compile(self._forward, dynamic=not capture) if compile else self._forward
        if compile and not capture:  # a few shapes specialise (batch or rows of 1) before the dynamic graph
            _allow_recompiles(16)
        self.bs = runner.block_size
        self.max_blocks = -(-max_model_len // self.bs)
        self.T = self.max_blocks * self.bs
        sizes, b = [], 1
        while b < max_num_seqs:
            sizes.append(b)
            b *= 2
        self.sizes = sizes + [max_num_seqs]
        self.graphs: dict[tuple[int, int], tuple] = {}  # (batch bucket, rows per sequence) -> graph
        self.failed: set[tuple[int, int]] = set()
        self.disabled = False
        self.pool = None
        self.device = runner.device

    def reset(self) -> None:
        """Drop every captured graph and its memory pool (sleep mode: they point at cache and weight storage that
        is being released). Graphs are captured again on first use."""
        self.graphs.clear()
        self.failed.clear()
        self.pool = None

    def _bucket(self, n: int) -> int | None:
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def _key_blocks(self, chunks, R: int) -> int:
        """Blocks of keys the step attends over: all of ``max_model_len`` under capture, else the next power of
        two that covers every sequence's last row (so dynamic shapes take a handful of values) and more than
        ``index_topk`` keys: attention branches on T ≤ index_topk (dense) and a compiled step would be
        compiled again for each side."""
        if self.capture:
            return self.max_blocks
        need = -(-max(c.start + R for c in chunks) // self.bs)
        if self.runner.dsa == "sparse":
            need = max(need, self.runner.cfg.index_topk // self.bs + 1)
        return min(self.max_blocks, 1 << (need - 1).bit_length())

    def _static_group(self, bt: torch.Tensor, pos: torch.Tensor) -> AttnGroup:
        """bt [B, nb], pos [B*R] (sequence b's rows: b*R .. b*R+R-1) -> one absorbed group of B×R queries."""
        B = bt.shape[0]
        R = pos.shape[0] // B
        t = torch.arange(bt.shape[1] * self.bs, device=self.device)
        kv_slots = bt[:, t // self.bs] * self.bs + t % self.bs
        visible = t[None, None] <= pos.view(B, R)[..., None]  # [B,R,T]
        rows = torch.arange(B * R, device=self.device)
        return AttnGroup(q_index=rows.view(B, R), q_valid=torch.ones(B, R, dtype=torch.bool, device=self.device),
                         kv_slots=kv_slots, visible=visible, absorbed=True, q_rows=rows, q_flat=rows)

    def _buffers(self, kind: str, B: int, R: int, nb: int | None = None) -> dict:
        dev = self.device
        z = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=dev)  # noqa: E731
        buf = dict(ids=z(B * R), pos=z(B * R), slots=z(B * R), bt=z(B, nb or self.max_blocks))
        if kind == "mtp":  # the MTP layer's other input, h^0 (or the previous draft's h), one row per token
            m = self.runner.model
            buf["hidden"] = torch.zeros(B * R, m.config.hidden_size, dtype=m.dtype, device=dev)
        return buf

    def _forward(self, buf: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden states [B*R,H], logits [B*R,V]): the main model's final normed ones, or with an input
        ``hidden`` the MTP layer's output h^1 (un-normed) and its draft logits; with ``chain_steps``, ``_chain``'s."""
        r = self.runner
        # no gather scratch when compiled: its buffers' sizes would be guarded on, and inductor plans the memory
        scratch = not self.compiled
        if "chain_steps" in buf:
            return self._chain(buf, scratch)
        batch = PagedBatch(slot_mapping=buf["slots"], groups=[self._static_group(buf["bt"], buf["pos"])])
        if "hidden" in buf:
            h = r.run_mtp(buf["hidden"], buf["ids"], buf["pos"], batch, 1, scratch=scratch)
            return h, r.mtp_head(h)
        hidden = r.run_model(buf["ids"], buf["pos"], batch, scratch=scratch)
        return hidden, r.head(hidden)

    def _chain(self, buf: dict, scratch: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy chained drafts (glm5/engine/spec_decode.py ``_chain``), S of them in one step: each a one-row MTP
        step at depth 1 fed the previous one's h and argmax. -> (tokens [B,S], top-2 logit gaps [B,S]). Sequence b's
        steps past ``chain_steps[b]`` write to the null block, so the cache entries written are those of its drafts
        one by one (the caller cuts its drafts after a close call; entries past it are tentative either way)."""
        r, bs = self.runner, self.bs
        h, ids, pos, bt = buf["hidden"], buf["ids"], buf["pos"], buf["bt"]
        toks, gaps = [], []
        for j in range(buf["chain_len"].shape[0]):
            slots = bt.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
            slots = torch.where(buf["chain_steps"] > j, slots, 0)
            batch = PagedBatch(slot_mapping=slots, groups=[self._static_group(bt, pos)])
            h = r.run_mtp(h, ids, pos, batch, 1, scratch=scratch)
            logits = r.mtp_head(h)
            ids = logits.argmax(-1)
            toks.append(ids)
            gaps.append(top2_gap(logits))
            pos = pos + 1
        return torch.stack(toks, 1), torch.stack(gaps, 1)

    def run_chain(self, chunks, hidden: torch.Tensor, steps: list[int], S: int):
        """Chunk b: one token, sequence b's first chained draft input; hidden [n,H] its h; it takes ``steps[b]`` of
        the S drafts. -> (tokens [n,S], gaps [n,S]) as lists, or None where this runner cannot (under CUDA graphs
        the drafts run one graph replay each)."""
        n = len(chunks)
        B = self._bucket(n)
        if self.capture or self.disabled or B is None or any(c.start + S > self.T for c in chunks):
            return None
        buf = self._buffers("mtp", B, 1, self._key_blocks(chunks, S))
        self._fill(buf, chunks, 1, slice(0, n), hidden)
        buf["chain_steps"] = torch.tensor(steps + [0] * (B - n), device=self.device)
        buf["chain_len"] = torch.empty(S, device=self.device)  # S, as a shape: the loop's length
        with torch.inference_mode(), _no_duck_shapes():
            toks, gaps = self.step(buf)
        return toks[:n].tolist(), gaps[:n].tolist()

    def _capture(self, kind: str, B: int, R: int):
        if not self.compiled:
            return self._capture_graph(kind, B, R)
        # Traced under no_grad outside inference mode (the engine's steps run in it; dynamo cannot trace tensors
        # made in an inference_mode it did not enter). Compiling, warming up and capturing under one mode keeps
        # dynamo's guards stable, so nothing recompiles inside the capture.
        with torch.inference_mode(False), torch.no_grad():
            _allow_recompiles(8 * len(self.sizes))  # one compiled graph per kind, batch bucket and row count
            return self._capture_graph(kind, B, R)

    def _capture_graph(self, kind: str, B: int, R: int):
        dev = self.device
        buf = self._buffers(kind, B, R)
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        # Warm-up outside the capture (allocator, cuBLAS handles), with host syncs made errors: an op that reads
        # a device value back (.item(), nonzero, a pageable copy) cannot be captured, and a capture that fails
        # midway leaves the CUDA generator marked as capturing, breaking later sampling in this process. So
        # such an op is found here, before any capture starts.
        with torch.cuda.stream(s):
            before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                self._forward(buf)  # the eager ops, checked (compiled code runs the same ops, fused)
            finally:
                torch.cuda.set_sync_debug_mode(before)
            if self.compiled:
                self.step(buf)  # compiles (autotuning may sync: not under the check)
                self.step(buf)
        torch.cuda.current_stream(dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(buf)
        self.pool = graph.pool()
        return graph, buf, out

    def _fill(self, buf: dict, chunks, R: int, real, hidden: torch.Tensor | None) -> None:
        """Sequence b's rows b*R .. b*R+R-1: its tokens at positions start, start+1, ...; rows past its tokens, and
        the rows of padding sequences, write to the null block (their ``hidden`` rows keep stale, finite values)."""
        if hidden is not None:
            buf["hidden"][real] = hidden.to(buf["hidden"].dtype)
        n, (B, mb), bs = len(chunks), buf["bt"].shape, self.bs
        ids, pos, slots = [], [], []
        for c in chunks:
            bt = c.block_table
            for j in range(R):
                p = c.start + j
                real = j < c.n
                ids.append(c.token_ids[j] if real else 0)
                pos.append(p)
                slots.append(bt[p // bs] * bs + p % bs if real else 0)
        pad = [0] * (R * (B - n))
        tables = [(c.block_table + [0] * mb)[:mb] for c in chunks] + [[0] * mb] * (B - n)
        for key, vals in (("ids", ids + pad), ("pos", pos + pad), ("slots", slots + pad)):
            buf[key].copy_(torch.tensor(vals), non_blocking=True)
        buf["bt"].copy_(torch.tensor(tables), non_blocking=True)

    def run(self, chunks) -> torch.Tensor | None:
        """Logits [len(chunks), V] for a plain decode batch, or None when no graph applies."""
        out = self.run_rows(chunks, 1)
        return None if out is None else out[1]

    def run_rows(self, chunks, R: int, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Chunks of 1..R tokens each (a verification: the last token and its drafts) -> (hidden [N,H], logits
        [N,V]) for their N tokens in order, as ``ModelRunner.forward`` and ``logits`` would give them; with
        ``hidden`` [N,H], the MTP layer at depth 1 instead (``ModelRunner.mtp`` and ``mtp_logits``). None when no
        graph applies (the caller then runs eagerly)."""
        n = len(chunks)
        B = self._bucket(n)
        if self.disabled or B is None or any(c.n > R or c.start + R > self.T for c in chunks):
            return None
        # the real rows: with one row per sequence the first n (a slice, no index tensor to copy to the device)
        real = slice(0, n) if R == 1 else \
            torch.tensor([b * R + j for b, c in enumerate(chunks) for j in range(c.n)], device=self.device)
        kind = "model" if hidden is None else "mtp"
        if not self.capture:  # same static layout, no graph: compiled (CPU compile_decode) or eager (CPU tests)
            buf = self._buffers(kind, B, R, self._key_blocks(chunks, R))
            self._fill(buf, chunks, R, real, hidden)
            with torch.inference_mode(), _no_duck_shapes():
                h, logits = self.step(buf)
            return h[real], logits[real]
        key = (kind, B, R)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(kind, B, R)
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly from now on
                log.warning("CUDA graph capture (%s, batch %d × %d rows) failed (%s); decoding eagerly", kind, B, R, e)
                self.failed.add(key)
                self.disabled = True
                self.graphs.clear()
                try:
                    torch.cuda.synchronize(self.device)
                except Exception:  # noqa: BLE001
                    pass
                return None
        graph, buf, (h, logits) = self.graphs[key]
        self._fill(buf, chunks, R, real, hidden)
        graph.replay()
        return h[real].clone(), logits[real].clone()  # copies: the next replay overwrites the graph's outputs


def compile_ahead(engine) -> None:
    """CPU ``compile_decode``: compile the decode steps before the first request, as vLLM compiles at start-up, so
    that no request waits a minute behind the compiler. Greedy generations of one and of two sequences (with drafts
    when speculation is on) meet the step shapes decoding does: batch 1 and the dynamic batch, one row and k + 1
    rows, the main model and the MTP layer; with drafts, depth 1 over one row per sequence is run directly as well.
    The engine is then left as it was built: no request, no prefix-cache entry, statistics, request ids and its RNG
    as new."""
    from glm5.engine.sampling_params import SamplingParams

    start = time.perf_counter()
    log.info("compile_decode: compiling the decode steps (a minute or more per step shape) ...")
    n = max(1, min(engine.k + 3, engine.max_model_len - 3))
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    stats = dict.fromkeys(engine.stats, 0)
    for prompts in ([[1, 2]], [[1, 2], [3, 4]]):
        for p in prompts:
            engine.add_request(p, params)
        while engine.has_unfinished_requests():
            engine.step()
    if engine.k:  # depth 1 over one row per sequence: a catch-up after no draft was accepted, rare in a warm-up whose
        # greedy drafts chain in one step; run here on the null block, which padding rows write anyway
        graphs, H = engine.runner.graphs, engine.model.config.hidden_size
        with torch.inference_mode():  # as the engine's steps run: dynamo guards on it
            for n in (1, 2):
                graphs.run_rows([Chunk([0], 0, [0])] * n, 1, hidden=torch.zeros(n, H, dtype=engine.dtype,
                                                                               device=engine.device))
    engine.reset_prefix_cache()
    engine.stats, engine._next_id = stats, 0
    engine.rng.manual_seed(engine.config.seed)
    log.info("compile_decode: decode steps compiled in %.0f s", time.perf_counter() - start)


def _no_duck_shapes():
    """Dynamic shapes without duck sizing while tracing: by default dynamo gives dims of equal size one symbol, so a
    key length of 4 blocks would be tied to the rope cache's width of 4 (then fixed to it) or to a batch of 4, and
    every other length would compile again."""
    import torch.fx.experimental._config as shapes_config

    return shapes_config.patch(use_duck_shape=False)


def _allow_recompiles(n: int) -> None:
    """Dynamo recompiles the forward once per bucket shape; raise its per-function limit to cover them all."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))
