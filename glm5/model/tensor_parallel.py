"""Tensor parallelism for inference, applied to a plain GLM5ForCausalLM (Megatron's column/row split).

``apply_tensor_parallel(model, rank, world, group)`` slices the model's own parameters in place and adds the
few collectives the split needs as forward hooks; the modules and their code stay those of the one-device
model, so the engine runs them unchanged. The plan, per decoder layer (and the MTP block):

* attention: heads split. ``q_b_proj`` and ``kv_b_proj`` keep this rank's heads (rows, head-major),
  ``o_proj`` the matching input columns; its output is a partial sum, all-reduced. The low-rank
  ``q_a_proj`` / ``kv_a_proj_with_mqa`` and their norms are replicated: MLA's latent cache is shared by all
  heads, so every rank caches the whole latent (as vLLM does for MLA under TP).
* the lightning indexer is replicated: every rank then selects the same top-k keys.
* dense MLP, shared experts and every routed expert: the intermediate dimension split (gate/up rows,
  down columns); the block's output (routed + shared partials) is all-reduced once.
* the router, embeddings, norms and the MTP block's ``eh_proj`` are replicated; ``lm_head`` keeps a
  slice of the vocabulary and its logits are all-gathered.
* with ``expert_parallel`` (vLLM's ``enable_expert_parallel``), the routed experts are instead dealt out whole,
  E/world per rank: each rank runs the (token, slot) pairs routed to its experts, and the same all-reduce adds
  the shares. At GLM-5's 256 experts this keeps every expert GEMM at full width, and a rank reads only its
  experts from the checkpoint.

After each all-reduce every rank holds bit-identical activations (a collective returns the same sum to every
rank), so routing, top-k selection, sampling and scheduling agree without further communication.

Checkpoint loading (``glm5.checkpoint.hf.load_pretrained(tensor_parallel=...)``) reads only this rank's slice of
each sharded tensor (``file_slice``), so a rank never holds the full weights. FP8 weights kept as float8
(``fp8="keep"``) are split with their 128×128 scale blocks, which needs every split width to be a multiple of 128
(GLM-5 at 8 ranks: 8 heads × 256 q rows, 256 expert rows; ``kv_b_proj`` is dequantised at load anyway).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from glm5.config import GLM5Config

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# model parameter name -> dimension it is split along (None: replicated). gate_up_proj is special: its gate
# rows and its up rows are split separately (see _shard_gate_up).
# FP8 weights (kept as float8) split with their 128×128 scale blocks: ``X.weight_scale_inv`` along the same dim.
_SHARD_DIM = [
    (re.compile(r"\.self_attn\.(q_b_proj|kv_b_proj)\.weight(_scale_inv)?$"), 0),
    (re.compile(r"\.self_attn\.o_proj\.weight(_scale_inv)?$"), 1),
    (re.compile(r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight(_scale_inv)?$"), 0),
    (re.compile(r"\.mlp\.(shared_experts\.)?down_proj\.weight(_scale_inv)?$"), 1),
    (re.compile(r"\.mlp\.experts\.gate_up_proj(_scale_inv)?$"), 1),
    (re.compile(r"\.mlp\.experts\.down_proj(_scale_inv)?$"), 2),
    (re.compile(r"^lm_head\.weight(_scale_inv)?$"), 0),
]
# the same split for the per-expert keys of checkpoint files (glm5.checkpoint.hf)
_FILE_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight(_scale_inv)?$")
_FUSED_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)(_scale_inv)?$")


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: rank in [0, world), and the torch.distributed group
    (None = the default group; unused when world is 1)."""

    rank: int = 0
    world: int = 1
    group: object | None = None
    expert_parallel: bool = False  # routed experts dealt out whole instead of split

    def __post_init__(self):
        if not (isinstance(self.world, int) and self.world >= 1 and 0 <= self.rank < self.world):
            raise ValueError(f"tensor parallel: rank {self.rank} of world {self.world} is not a valid placement")

    def local_experts(self, n_experts: int) -> range:
        """The global ids of the routed experts this rank holds."""
        if not self.expert_parallel:
            return range(n_experts)
        n = n_experts // self.world
        return range(self.rank * n, (self.rank + 1) * n)


def shard_dim(name: str, expert_parallel: bool = False) -> int | None:
    """The dimension a model parameter (state-dict name) is split along, or None when replicated."""
    if expert_parallel and _FUSED_EXPERTS.search(name):
        return 0  # whole experts
    for pat, dim in _SHARD_DIM:
        if pat.search(name):
            return dim
    return None


def check_divisible(cfg: GLM5Config, world: int, expert_parallel: bool = False) -> None:
    """Every split dimension must divide evenly: one clear error before anything is allocated."""
    need = {"num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size}
    if expert_parallel:
        need["n_routed_experts"] = cfg.n_routed_experts
    else:
        need["moe_intermediate_size"] = cfg.moe_intermediate_size
    if cfg.n_shared_experts:
        need["moe_intermediate_size × n_shared_experts"] = cfg.moe_intermediate_size * cfg.n_shared_experts
    bad = [f"{k}={v}" for k, v in need.items() if v % world]
    if bad:
        raise ValueError(f"tensor_parallel_size={world} must divide {', '.join(bad)}")


def file_slice(key: str, shape: tuple[int, ...], tp: TensorParallel) -> tuple[slice, ...] | None:
    """The part of checkpoint tensor ``key`` (full shape ``shape``) that rank ``tp.rank`` holds, as an index
    tuple for ``safe_open(...).get_slice(key)[...]``; None when the tensor is replicated. Per-expert file keys
    (``experts.E.gate_proj.weight`` [I, H], ``down_proj`` [H, I]) split like the fused tensors they fill."""
    if tp.world == 1:
        return None
    m = _FILE_EXPERT.search(key)
    if m:
        if tp.expert_parallel:
            return None  # a whole expert (``local_expert_key`` says whether this rank reads it at all)
        dim = 1 if m[2] == "down_proj" else 0
    else:
        dim = shard_dim(key)
        if dim is None:
            return None
    n = shape[dim] // tp.world
    return (slice(None),) * dim + (slice(tp.rank * n, (tp.rank + 1) * n),)


def local_expert_key(key: str, tp: TensorParallel, n_experts: int) -> str | None:
    """Under expert parallelism, a per-expert checkpoint key renamed to this rank's local expert index, or None
    for an expert another rank holds; every other key unchanged."""
    m = _FILE_EXPERT.search(key)
    if not m or not tp.expert_parallel:
        return key
    mine = tp.local_experts(n_experts)
    e = int(m[1])
    if e not in mine:
        return None
    return key[:m.start(1)] + str(e - mine.start) + key[m.end(1):]


def _narrow(t: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    n = t.shape[dim] // tp.world
    return t.narrow(dim, tp.rank * n, n).clone()


def _shard_gate_up(t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """[E, 2I, H] (gate rows, then up rows) -> [E, 2I/w, H]: this rank's gate rows, then its up rows."""
    gate, up = t.chunk(2, dim=1)
    return torch.cat([_narrow(gate, 1, tp), _narrow(up, 1, tp)], dim=1)


def shard_weight(name: str, full: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """This rank's part of the whole tensor ``name``: the slice :func:`apply_tensor_parallel` keeps of it (its
    split rule :func:`shard_dim`; gate/up rows of the fused experts are split separately). Weight updates send
    whole tensors, so every rank reads the same ones and keeps its slice."""
    dim = None if tp is None or tp.world == 1 else shard_dim(name, tp.expert_parallel)
    if dim is None:
        return full
    if name.endswith(("gate_up_proj", "gate_up_proj_scale_inv")) and not tp.expert_parallel:
        return _shard_gate_up(full, tp)
    return _narrow(full, dim, tp)


def _all_reduce_hook(group):
    import torch.distributed as dist

    def hook(module, args, out):
        dist.all_reduce(out, group=group)
        return out
    return hook


def _all_gather_last_dim_hook(group, world: int):
    import torch.distributed as dist

    def hook(module, args, out):
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous(), group=group)
        return torch.cat(parts, dim=-1)
    return hook


@torch.no_grad()
def apply_tensor_parallel(model: nn.Module, tp: TensorParallel, collectives: bool = True) -> nn.Module:
    """Shard ``model`` (a GLM5ForCausalLM, on any device, meta included) in place for rank ``tp.rank`` of
    ``tp.world`` and return it. ``collectives=False`` leaves out the hooks: each rank's modules then return
    their partial sums / vocabulary slice (what the tests sum up to check the split without processes)."""
    from glm5.model.fp8_linear import FP8Experts, FP8Linear
    from glm5.model.mla import MLAttention
    from glm5.model.moe import MLP, Experts, MoE

    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("the model is already tensor-parallel")
    check_divisible(model.config, tp.world, tp.expert_parallel)
    model.tensor_parallel = tp
    if tp.world == 1:
        return model
    params = dict(model.named_parameters())
    for name, p in params.items():
        dim = shard_dim(name, tp.expert_parallel)
        if dim is None:
            continue
        whole_experts = tp.expert_parallel and _FUSED_EXPERTS.search(name)
        if p.dtype in FP8_DTYPES and name + "_scale_inv" in params and not whole_experts:
            per_rank = p.shape[dim] // tp.world // (2 if name.endswith("gate_up_proj") else 1)  # gate, up: each
            if per_rank % 128:  # a 128×128 scale block must not straddle two ranks
                raise ValueError(f"tensor_parallel_size={tp.world}: {name} would split its FP8 scale blocks "
                                 f"({per_rank} rows or columns per rank, not a multiple of 128); load the "
                                 f"checkpoint with fp8='dequantize'")
        split_rows = name.endswith(("gate_up_proj", "gate_up_proj_scale_inv")) and not tp.expert_parallel
        p.data = _shard_gate_up(p.data, tp) if split_rows else _narrow(p.data, dim, tp)
    for m in model.modules():
        if isinstance(m, MLAttention):
            m.n_heads //= tp.world
        elif isinstance(m, (Experts, FP8Experts)) and tp.expert_parallel:
            m.expert_offset = tp.local_experts(m.n_experts).start
            m.n_experts //= tp.world
        elif isinstance(m, (Experts, FP8Experts)):
            m.intermediate //= tp.world
        elif isinstance(m, (nn.Linear, FP8Linear)):  # keep the reported shape that of the stored weight
            m.out_features, m.in_features = m.weight.shape
    if not collectives:
        return model
    # one all-reduce per attention block and per feed-forward block; MoE's shared expert is inside its block
    for m in model.modules():
        if isinstance(m, MLAttention):
            m.o_proj.register_forward_hook(_all_reduce_hook(tp.group))
        elif isinstance(m, MoE):
            m.register_forward_hook(_all_reduce_hook(tp.group))
        elif isinstance(m, MLP) and not _is_shared_expert(model, m):
            m.register_forward_hook(_all_reduce_hook(tp.group))
    model.lm_head.register_forward_hook(_all_gather_last_dim_hook(tp.group, tp.world))
    return model


def _is_shared_expert(model: nn.Module, mlp: nn.Module) -> bool:
    from glm5.model.moe import MoE

    return any(isinstance(m, MoE) and m.shared_experts is mlp for m in model.modules())
