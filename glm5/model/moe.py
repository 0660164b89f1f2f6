"""Feed-forward blocks: the dense SwiGLU MLP and GLM-5's MoE (sigmoid router, aux-loss-free bias, shared expert).

Routed experts are held fused, as transformers keeps them in memory: ``experts.gate_up_proj``
[E, 2I, H] (gate rows then up rows) and ``experts.down_proj`` [E, H, I]. The checkpoint files use
per-expert keys; glm5.checkpoint converts both ways. Tokens are sorted by expert and run through one
grouped GEMM (``torch._grouped_mm``), or a padded batched GEMM where grouped GEMM is unavailable; no
Python loop over experts. ``experts_impl="reference"`` is the plain per-expert loop used by tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and the shared expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route_tokens(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
                 normalize: bool = True, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """noaux_tc routing. logits [N,E] fp32 -> (weights [N,k] fp32, expert ids [N,k] int64).

    The correction bias shifts which experts are *chosen*; the weights are the un-biased sigmoid scores,
    renormalised over the chosen k and multiplied by ``scaling`` (routed_scaling_factor).
    """
    N, E = logits.shape
    scores = logits.sigmoid()
    choice = scores + bias
    if n_group > 1:
        # Group-limited routing: keep the topk_group groups whose best-two scores sum highest.
        group_scores = choice.view(N, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # [N,G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


class Router(nn.Module):
    """``mlp.gate``: weight [E,H] and the fp32 ``e_score_correction_bias`` buffer (updated by the trainer's
    aux-loss-free balancing, never by gradients)."""

    def __init__(self, cfg: GLM5Config):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, 0.0, cfg.initializer_range)  # finite from a bare constructor (see Experts)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # router always in fp32
        c = self.cfg
        weights, ids = route_tokens(logits, self.e_score_correction_bias.float(), c.num_experts_per_tok, c.n_group,
                                    c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
        return logits, weights, ids

    def _apply(self, fn, recurse=True):
        # Keep the correction bias in fp32 whatever dtype the model is cast to (move it, never round it).
        bias = self._buffers.pop("e_score_correction_bias")
        super()._apply(fn, recurse)
        moved = fn(bias)
        self._buffers["e_score_correction_bias"] = moved if moved.dtype == torch.float32 else bias.to(device=moved.device)
        return self


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: ids [N,k] -> [E] int64. A fixed-size scatter_add rather than
    ``torch.bincount``, whose output size depends on the data and so synchronises with the host on CUDA
    (which would make MoE layers impossible to capture in a CUDA graph)."""
    flat = ids.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


class _ContiguousGrad(torch.autograd.Function):
    # torch._grouped_mm's CPU backward rejects broadcast (stride-0) incoming gradients.
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


STATIC_CAP_ROWS = 256  # padded-bmm fallback: up to this many rows, a static capacity (see grouped_linear)


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def _row_groups(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """The group of each row, rows sorted by group: counts [G] -> [rows] (no host sync: ``output_size`` given)."""
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=rows)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group; group g (counts[g] rows) multiplies w[g]^T. x [M,in], w [G,out,in] -> [M,out]."""
    if w.dtype != x.dtype:  # under autocast the activations arrive in bf16 while parameters stay fp32
        w = w.to(x.dtype)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if x.device.type == "cpu" and not needs_grad:
        if torch.compiler.is_compiling():
            # Compiled CPU decode (compile_decode): torch._grouped_mm traces only in bf16 and the loop below reads
            # the counts back; each row's expert gathered into a batched product is static in shape, and inductor
            # fuses the gather into the product's loop, so no weight is copied (glm5/engine/static_decode.py).
            rows_w = w[_row_groups(counts, x.shape[0])]  # [M,out,in]
            return torch.bmm(rows_w, x[:, :, None])[..., 0]  # [M,out]
        # Decode of one token: torch._grouped_mm's CPU kernel visits every expert, ~1 µs per empty one (GLM-5:
        # ~250 of 256 at batch 1). A loop over the non-empty ones makes the same products (the same bits) at ~25 µs
        # each; it wins while at most an eighth of the experts have rows (benchmarks/bench_moe.py: 470 -> 196 µs
        # at 256 experts, 119 -> 112 µs at glm5-small's 32; slower at 32 experts with 7 active).
        cl = counts.tolist()
        active = [(g, c) for g, c in enumerate(cl) if c]
        if 8 * len(active) <= len(cl):
            out = x.new_empty(x.shape[0], w.shape[1])
            s = 0
            for g, c in active:
                torch.mm(x[s:s + c], w[g].t(), out=out[s:s + c])
                s += c
            return out
    if _grouped_mm_ok(x):
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
        # the Function only mends the backward; applying it costs ~15 µs a call, so not without autograd
        return _ContiguousGrad.apply(y) if needs_grad else y
    # Sort-and-batch fallback: scatter rows into a [G, cap, in] buffer, one bmm, gather back.
    G = w.shape[0]
    if x.device.type == "cuda" and x.shape[0] <= STATIC_CAP_ROWS:
        # decode-sized batches: a capacity known without reading the counts back (no host sync, so a CUDA
        # graph can capture it); no group holds more rows than there are rows
        cap = x.shape[0]
    else:
        cap = int(counts.max().item()) if counts.numel() else 0
    starts = offs - counts
    group = _row_groups(counts, x.shape[0])
    rank = torch.arange(x.shape[0], device=x.device) - starts[group]
    buf = x.new_zeros(G, max(cap, 1), x.shape[1])
    buf = buf.index_put((group, rank), x)
    out = torch.bmm(buf, w.transpose(-2, -1))  # [G,cap,out]
    return out[group, rank]


def expert_parallel_share(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, offset: int, n_local: int,
                          pair_outputs) -> torch.Tensor:
    """Expert parallelism: this rank's share of an experts block, the (token, slot) pairs routed to its experts
    [offset, offset + n_local); the other pairs add 0 and the MoE block's all-reduce adds the ranks' shares.
    x [N,H], global ids / weights [N,k] -> [N,H]. ``pair_outputs(x_pairs [P,H], local ids [P,1], weights [P,1])`` is
    the module's own computation, each pair as a one-slot token: its weighted outputs [P,H]."""
    N, k = ids.shape
    local = (ids - offset).reshape(-1)  # [N*k] local expert of each pair
    pairs = ((local >= 0) & (local < n_local)).nonzero().squeeze(1)
    ys = x.new_zeros(N * k, x.shape[-1], dtype=torch.float32)
    if pairs.numel():
        ys[pairs] = pair_outputs(x[pairs // k], local[pairs, None], weights.reshape(-1)[pairs, None]).float()
    return ys.view(N, k, -1).sum(1).to(x.dtype)  # slots summed in order, as the one-device path does


class Experts(nn.Module):
    def __init__(self, n_experts: int, hidden: int, intermediate: int, init_std: float = 0.02):
        super().__init__()
        self.n_experts, self.hidden, self.intermediate = n_experts, hidden, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))
        # Initialised here, not left as torch.empty: GLM5ForCausalLM(cfg) without init_weights() used to hold
        # whatever memory it was given, NaN included. (No-op under torch.device("meta"), as checkpoint loading uses.)
        nn.init.normal_(self.gate_up_proj, 0.0, init_std)
        nn.init.normal_(self.down_proj, 0.0, init_std)
        # Expert parallelism (glm5.model.tensor_parallel): this module holds global experts
        # [expert_offset, expert_offset + n_experts) and computes only the (token, slot) pairs routed to them.
        self.expert_offset: int | None = None

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, impl: str = "grouped",
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """x [N,H], ids/weights [N,k] -> [N,H]. Per-slot outputs are weighted and summed over k in fp32.
        ``counts`` ([E], from :func:`expert_counts`) may be passed in when the caller already has it. Under expert
        parallelism (``expert_offset`` set) only this rank's share: see :func:`expert_parallel_share`."""
        if self.expert_offset is not None:
            return expert_parallel_share(x, ids, weights, self.expert_offset, self.n_experts,
                                         lambda xs, i, w: self._slot_outputs(xs, i, w, impl, None))
        return self._slot_outputs(x, ids, weights, impl, counts).view(ids.shape[0], ids.shape[1], -1).sum(1).to(x.dtype)

    def _slot_outputs(self, x, ids, weights, impl, counts) -> torch.Tensor:
        """The weighted output of every (token, slot) pair, fp32 [N*k,H] in (token, slot) order."""
        if impl == "reference":
            return self._reference(x, ids, weights)
        N, k = ids.shape
        flat = ids.reshape(-1)  # [N*k] expert of each (token, slot)
        order = flat.argsort(stable=True)
        if counts is None:
            counts = expert_counts(ids, self.n_experts)
        offs = counts.cumsum(0).to(torch.int32)
        xs = x[order // k]  # [N*k,H] tokens grouped by expert
        gate, up = grouped_linear(xs, self.gate_up_proj, counts, offs).chunk(2, dim=-1)
        ys = grouped_linear(F.silu(gate) * up, self.down_proj, counts, offs)  # [N*k,H]
        ys = ys.float() * weights.reshape(-1)[order, None].float()
        out = torch.empty_like(ys)
        out[order] = ys  # back to (token, slot) order: a deterministic sum, no atomics
        return out

    def _reference(self, x, ids, weights):
        """The plain per-expert loop (tests): the weighted output of each (token, slot) pair, fp32 [N*k,H]."""
        k = ids.shape[1]
        flat = ids.reshape(-1)
        out = torch.zeros(flat.shape[0], self.hidden, dtype=torch.float32, device=x.device)
        for e in range(self.n_experts):
            pairs = (flat == e).nonzero().squeeze(1)
            if pairs.numel() == 0:
                continue
            gate, up = F.linear(x[pairs // k], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out[pairs] = y.float() * weights.reshape(-1)[pairs, None].float()
        return out


class MoE(nn.Module):
    def __init__(self, cfg: GLM5Config):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.initializer_range)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts > 0 else None
        self.experts_impl = "grouped"
        # Set by each forward, read by the trainer for aux-loss-free balancing and load logging.
        self.last_expert_load: torch.Tensor | None = None  # [E] tokens routed to each expert
        # [N,E] sigmoid scores (with grad; for the sequence balance loss). Computed in every forward, not lazily:
        # activation checkpointing needs the recomputed forward to save exactly what the original one did.
        self.last_router_scores: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, ids = self.gate(flat)
        load = expert_counts(ids, self.n_experts)
        self.last_expert_load = load.detach()
        self.last_router_scores = logits.sigmoid()
        y = self.experts(flat, ids, weights, impl=self.experts_impl, counts=load).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
