"""CUDA graphs for plain decode steps (one new token per sequence), as nano-vllm does. CUDA only.

For each batch-size bucket (1, 2, 4, 8, 16, 32, ... up to max_num_seqs) one graph is captured lazily on
first use. Everything shape-dependent is fixed at capture: the batch is padded to the bucket, keys to
``max_model_len`` (block tables [B, max_blocks]); the attention layout (key slots, causal visibility) is
computed *inside* the graph from the block tables and positions, so a replay only copies four small
integer tensors in. Padding rows use the reserved null block 0. With keys padded beyond ``index_topk``,
DSA always runs the indexer and gathers the top-k rows, which is exact for short sequences too (every
visible key has a finite score and is selected).

MoE routing is written to be capturable: expert counts come from a fixed-size ``scatter_add``
(``glm5.model.moe.expert_counts``), not ``torch.bincount``, and the grouped GEMM takes its offsets on the
device. The padded-bmm fallback (used where ``torch._grouped_mm`` is unavailable, e.g. fp32 on CUDA) takes a
static capacity at decode sizes for the same reason. An op that still syncs is caught by a checked warm-up
before capture; if a capture fails anyway, graphs are switched off for the engine and decode runs eagerly
(the output is the same either way). Measured on an H100: benchmarks/engine.md §4.
"""

from __future__ import annotations

import logging

import torch

from glm5.model.cache import AttnGroup, PagedBatch

log = logging.getLogger(__name__)


class CudaGraphRunner:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int, capture: bool = True, compile: bool = False):
        self.runner = runner
        self.capture = capture
        # torch.compile the captured forward: inductor fuses the ~125 small kernels per layer (norms, rope,
        # routing, the latent-attention glue) that dominate a batch-1 step's device time (benchmarks/engine.md §4)
        self.compiled = compile
        self.step = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self.bs = runner.block_size
        self.max_blocks = -(-max_model_len // self.bs)
        self.T = self.max_blocks * self.bs
        sizes, b = [], 1
        while b < max_num_seqs:
            sizes.append(b)
            b *= 2
        self.sizes = sizes + [max_num_seqs]
        self.graphs: dict[int, tuple] = {}
        self.failed: set[int] = set()
        self.disabled = False
        self.pool = None
        self.device = runner.device

    def _bucket(self, n: int) -> int | None:
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def _static_group(self, bt: torch.Tensor, pos: torch.Tensor) -> AttnGroup:
        B = bt.shape[0]
        t = torch.arange(self.T, device=self.device)
        kv_slots = bt[:, t // self.bs] * self.bs + t % self.bs
        visible = (t[None] <= pos[:, None])[:, None]  # [B,1,T]
        rows = torch.arange(B, device=self.device)
        return AttnGroup(q_index=rows[:, None], q_valid=torch.ones(B, 1, dtype=torch.bool, device=self.device),
                         kv_slots=kv_slots, visible=visible, absorbed=True, q_rows=rows, q_flat=rows)

    def _buffers(self, B: int) -> dict:
        dev = self.device
        z = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=dev)  # noqa: E731
        return dict(ids=z(B), pos=z(B), slots=z(B), bt=z(B, self.max_blocks))

    def _forward(self, buf: dict) -> torch.Tensor:
        batch = PagedBatch(slot_mapping=buf["slots"], groups=[self._static_group(buf["bt"], buf["pos"])])
        return self.runner.head(self.runner.run_model(buf["ids"], buf["pos"], batch))

    def _capture(self, B: int):
        if not self.compiled:
            return self._capture_graph(B)
        # Traced under no_grad outside inference mode (the engine's steps run in it; dynamo cannot trace tensors
        # made in an inference_mode it did not enter). Compiling, warming up and capturing under one mode keeps
        # dynamo's guards stable, so nothing recompiles inside the capture.
        with torch.inference_mode(False), torch.no_grad():
            _allow_recompiles(2 * len(self.sizes))  # one compiled graph per batch bucket
            return self._capture_graph(B)

    def _capture_graph(self, B: int):
        dev = self.device
        buf = self._buffers(B)
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

    def _fill(self, buf: dict, chunks) -> None:
        n, B, bs, mb = len(chunks), buf["ids"].shape[0], self.bs, self.max_blocks
        tables = [(c.block_table + [0] * mb)[:mb] for c in chunks] + [[0] * mb] * (B - n)
        for key, vals in (("ids", [c.token_ids[0] for c in chunks]), ("pos", [c.start for c in chunks]),
                          ("slots", [c.block_table[c.start // bs] * bs + c.start % bs for c in chunks])):
            buf[key].copy_(torch.tensor(vals + [0] * (B - n)), non_blocking=True)
        buf["bt"].copy_(torch.tensor(tables), non_blocking=True)

    def run(self, chunks) -> torch.Tensor | None:
        """Logits [len(chunks), V] for a plain decode batch, or None when no graph applies."""
        n = len(chunks)
        B = self._bucket(n)
        if self.disabled or B is None or any(c.start >= self.T for c in chunks):
            return None
        if not self.capture:  # same static layout, run eagerly (CPU tests of the graph path)
            buf = self._buffers(B)
            self._fill(buf, chunks)
            with torch.inference_mode():
                return self.step(buf)[:n]
        if B not in self.graphs:
            try:
                self.graphs[B] = self._capture(B)
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly from now on
                log.warning("CUDA graph capture for batch %d failed (%s); decoding eagerly", B, e)
                self.failed.add(B)
                self.disabled = True
                self.graphs.clear()
                try:
                    torch.cuda.synchronize(self.device)
                except Exception:  # noqa: BLE001
                    pass
                return None
        graph, buf, out = self.graphs[B]
        self._fill(buf, chunks)
        graph.replay()
        return out[:n].clone()


def _allow_recompiles(n: int) -> None:
    """Dynamo recompiles the forward once per bucket shape; raise its per-function limit to cover them all."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))
