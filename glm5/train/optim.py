"""Optimisers and learning-rate schedules.

Muon (momentum + Newton–Schulz orthogonalisation) trains the hidden matrices; AdamW trains what Muon
should not: embeddings, the LM head, the router, norms and biases (Moonlight / GLM-4.5 practice).

Our ``Muon`` orthogonalises a *batch* of matrices per parameter, described by its layout:

* a plain 2-D matrix [R, C]: one matrix;
* routed experts, ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]: one matrix per expert (gate and
  up rows are separate matrices);
* **Muon Split** (GLM-5): the MLA up-projections are split per attention head and each head's matrix is
  orthogonalised on its own: ``q_b_proj`` [h·d_qk, q_lora] → h × [d_qk, q_lora], ``kv_b_proj``
  [h·(d_nope+d_v), kv_lora] → h × [d_nope, kv_lora] (K-up) and h × [d_v, kv_lora] (V-up).

The update of each matrix is scaled by 0.2·√max(rows, cols) (Moonlight's "match RMS of AdamW",
``adjust_lr_fn="match_rms_adamw"`` in ``torch.optim.Muon``), so one learning rate serves Muon and AdamW.
Newton–Schulz runs in fp32 on CPU (bf16 matmuls are ~200× slower there) and bf16 on GPU.

With FSDP2 the parameters, gradients and momentum are DTensors sharded on dim 0: the momentum update runs
on the shards, the Nesterov update is all-gathered for Newton–Schulz (every rank computes the same full
update, as Moonlight's "distributed Muon" does) and each rank keeps its own shard of the result.

On plain matrices our update is bit-identical to ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` when
Newton–Schulz runs in bf16 (tested). ``torch.optim.Muon`` itself (2-D only, bf16 Newton–Schulz, no DTensor)
can take the plain matrices with ``muon_impl="torch"`` in a single CPU process; ``"auto"`` uses ours, because
GPU runs go through FSDP2 (DTensor parameters) and CPU runs need fp32 Newton–Schulz.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Muon", "zeropower_via_newtonschulz", "muon_layout", "build_optimizers", "OptimizerList", "lr_factor",
           "set_lr"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz(G: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7,
                               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise each matrix of G [..., m, n] (quintic Newton–Schulz, Keller Jordan's
    coefficients). Returns a tensor of G's shape and dtype."""
    a, b, c = coefficients
    X = G.to(dtype or G.dtype)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for _ in range(steps):
        A = X @ X.mT
        if X.dim() == 2:  # exactly torch.optim.Muon's ops
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
        else:
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def muon_layout(name: str, p: torch.Tensor, cfg, split: bool) -> dict:
    """How Muon sees parameter ``name``: {"batch": b, "chunks": [r1, r2, ...]} meaning the full tensor
    viewed as [b, R, C] with its rows cut into chunks r1, r2, ... (each chunk of each batch entry is one
    matrix)."""
    if name.endswith("experts.gate_up_proj"):
        return {"batch": p.shape[0], "chunks": [p.shape[1] // 2] * 2}
    if name.endswith("experts.down_proj"):
        return {"batch": p.shape[0], "chunks": [p.shape[1]]}
    if split and name.endswith("self_attn.q_b_proj.weight"):
        return {"batch": cfg.num_attention_heads, "chunks": [cfg.qk_head_dim]}
    if split and name.endswith("self_attn.kv_b_proj.weight"):
        return {"batch": cfg.num_attention_heads, "chunks": [cfg.qk_nope_head_dim, cfg.v_head_dim]}
    if p.dim() != 2:
        raise ValueError(f"{name}: no Muon layout for a {p.dim()}-D parameter")
    return {"batch": 1, "chunks": [p.shape[0]]}


def _orthogonalized_update(u: torch.Tensor, layout: dict, steps: int, coefficients, eps: float,
                           dtype: torch.dtype | None) -> tuple[torch.Tensor, float]:
    """Newton–Schulz per matrix of the layout, each matrix's update scaled by 0.2·√max(rows, cols).
    Returns (update, common scale): the scale is left to the caller when all matrices share it."""
    b = layout["batch"]
    v = u.reshape(b, -1, u.shape[-1])
    chunks = v.split(layout["chunks"], dim=1)
    scales = [0.2 * math.sqrt(max(c.shape[-2], c.shape[-1])) for c in chunks]
    if len(set(scales)) == 1:
        if b == 1 and len(chunks) == 1:  # a plain matrix: the 2-D path, bit-identical to torch.optim.Muon
            return zeropower_via_newtonschulz(v[0], steps, coefficients, eps, dtype).reshape(u.shape), scales[0]
        o = torch.cat([zeropower_via_newtonschulz(c, steps, coefficients, eps, dtype) for c in chunks], dim=1)
        return o.reshape(u.shape), scales[0]
    o = torch.cat([zeropower_via_newtonschulz(c, steps, coefficients, eps, dtype) * sc for c, sc in zip(chunks, scales)],
                  dim=1)
    return o.reshape(u.shape), 1.0


class Muon(torch.optim.Optimizer):
    """Muon with per-expert / per-head orthogonalisation (see module docstring). Param groups carry a
    ``layout`` ({"batch", "chunks"}); decoupled weight decay; Nesterov momentum."""

    def __init__(self, params, lr: float = 2e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_coefficients=NS_COEFFICIENTS, eps: float = 1e-7,
                 ns_dtype: str | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_dtype=ns_dtype, layout=None)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mom)  # EMA momentum, as torch.optim.Muon and Keller Jordan's reference
                u = g.lerp(buf, mom) if group["nesterov"] else buf
                layout = group["layout"] or {"batch": 1, "chunks": [p.shape[0]]}
                dtype = getattr(torch, group["ns_dtype"]) if group["ns_dtype"] else (
                    torch.bfloat16 if p.device.type == "cuda" else torch.float32)
                o, scale = _update_for(u, layout, group, dtype)
                p.mul_(1 - lr * wd)
                p.add_(o, alpha=-lr * scale)
        return loss


def _update_for(u, layout, group, dtype):
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(u, DTensor):
        o, scale = _orthogonalized_update(u.full_tensor(), layout, group["ns_steps"], group["ns_coefficients"],
                                          group["eps"], dtype)
        return distribute_tensor(o, u.device_mesh, u.placements, src_data_rank=None), scale
    return _orthogonalized_update(u, layout, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype)


class OptimizerList:
    """Several optimisers stepped as one (Muon + AdamW). ``param_groups`` lists all their groups."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = [o for o in optimizers if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def __iter__(self):
        return iter(self.optimizers)

    def __len__(self):
        return len(self.optimizers)


def _is_adamw_param(name: str, p: torch.Tensor) -> bool:
    return (p.dim() < 2 or name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight")
            or name.endswith("mlp.gate.weight"))


def build_optimizers(model: nn.Module, *, kind: str = "muon", lr: float = 2e-3, weight_decay: float = 0.1,
                     betas=(0.9, 0.95), momentum: float = 0.95, muon_split: bool = True, muon_impl: str = "auto",
                     distributed: bool = False, only=None) -> OptimizerList:
    """Optimisers over the trainable (requires_grad) parameters of a GLM5ForCausalLM; with ``only`` (a predicate
    on parameter names), over those it accepts.

    AdamW groups: ``decay`` (LM head, router) and ``no_decay`` (embeddings, norms, biases). Muon groups: one
    per layout. Every group records ``base_lr`` (the schedule scales it) and ``name``.
    """
    cfg = model.config
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (only is None or only(n))]
    adam_decay, adam_plain, muon_params = [], [], []
    for n, p in named:
        if kind == "adamw" or _is_adamw_param(n, p):
            (adam_plain if (p.dim() < 2 or n.endswith("embed_tokens.weight")) else adam_decay).append(p)
        else:
            muon_params.append((n, p))
    use_torch_muon = muon_impl == "torch"
    if use_torch_muon and not hasattr(torch.optim, "Muon"):
        raise RuntimeError("muon_impl='torch' but this torch has no torch.optim.Muon")
    if muon_impl == "torch" and distributed:
        raise RuntimeError("torch.optim.Muon cannot orthogonalise FSDP-sharded parameters; use muon_impl='glm5'")
    groups: dict[str, dict] = {}
    torch_plain = []
    for n, p in muon_params:
        layout = muon_layout(n, p, cfg, muon_split)
        if use_torch_muon and p.dim() == 2 and layout["batch"] == 1:
            torch_plain.append(p)
            continue
        key = f"muon_b{layout['batch']}_c{'-'.join(map(str, layout['chunks']))}"
        groups.setdefault(key, {"params": [], "layout": layout, "name": key, "base_lr": lr})["params"].append(p)
    opts: list[torch.optim.Optimizer] = []
    adam_groups = [g for g in (
        {"params": adam_decay, "weight_decay": weight_decay, "name": "adamw_decay", "base_lr": lr},
        {"params": adam_plain, "weight_decay": 0.0, "name": "adamw_no_decay", "base_lr": lr}) if g["params"]]
    if adam_groups:
        on_cuda = all(p.device.type == "cuda" for g in adam_groups for p in g["params"])
        opts.append(torch.optim.AdamW(adam_groups, lr=lr, betas=tuple(betas), eps=1e-8, weight_decay=weight_decay,
                                      fused=True if on_cuda else None))  # one kernel for all tensors on a GPU
    if groups:
        opts.append(Muon(list(groups.values()), lr=lr, weight_decay=weight_decay, momentum=momentum))
    if torch_plain:
        opts.append(torch.optim.Muon([{"params": torch_plain, "name": "torch_muon", "base_lr": lr}], lr=lr,
                                     weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"))
    if not opts:
        raise ValueError("no trainable parameters")
    return OptimizerList(opts)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1,
              decay_fraction: float = 0.2, progress: float | None = None) -> float:
    """Multiplier of the peak learning rate at (0-based) ``step``: linear warm-up over ``warmup`` steps, then
    cosine to ``min_ratio``, WSD (constant, then linear decay over the last ``decay_fraction`` to
    ``min_ratio``), or constant. After warm-up the position in the schedule is ``progress`` in [0, 1] when
    given (a time budget: the fraction of it used), else the step's position in ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup - 1)
    progress = min(1.0, max(0.0, progress))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        stable = 1.0 - decay_fraction
        if progress < stable:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * (progress - stable) / decay_fraction
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(optimizers: OptimizerList, factor: float) -> float:
    """Scale every group's ``base_lr`` by ``factor``; return the first group's lr (for logging)."""
    lr = None
    for g in optimizers.param_groups:
        g["lr"] = g["base_lr"] * factor
        lr = g["lr"] if lr is None else lr
    return lr
