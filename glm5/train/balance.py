"""MoE load balancing: aux-loss-free router-bias updates, the optional sequence-level balance loss, and
load statistics.

Aux-loss-free balancing (DeepSeek-V3, GLM-4.5/5): after every optimiser step each MoE layer's selection
bias moves by ``γ · sign(mean_load − load_i)``: under-loaded experts become more likely to be chosen,
over-loaded ones less. The bias only changes which experts are *selected*; gate weights use the unbiased
scores. Loads are summed over all micro-batches of the step (and all ranks) before the update.

``ExpertLoadTracker`` attaches forward hooks to every MoE block (the MTP block included; it runs once per
MTP step) and accumulates ``MoE.last_expert_load``. Set ``active = False`` around backward so that
activation-checkpoint recomputation is not counted twice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from glm5.model.moe import route_tokens

__all__ = ["ExpertLoadTracker", "update_router_biases", "load_stats", "sequence_balance_loss"]


class ExpertLoadTracker:
    def __init__(self, model):
        self.layers = model.moe_layers()  # [(layer index, MoE)]
        self.active = True
        self.record_scores = False
        self.loads: dict[int, torch.Tensor] = {}
        self.scores: list[tuple[int, torch.Tensor, tuple]] = []
        self._handles = [moe.register_forward_hook(self._hook(i)) for i, moe in self.layers]

    def _hook(self, idx: int):
        # bookkeeping on Python dicts, run eagerly: compiled, it would be retraced once per layer index (each
        # MoE block compiled by apply_compile carries its own hook) and hit dynamo's recompile limit
        @torch.compiler.disable
        def hook(module, inputs, output):
            if not self.active:
                return
            load = module.last_expert_load.to(torch.float32)
            self.loads[idx] = self.loads[idx] + load if idx in self.loads else load.clone()
            if self.record_scores:
                self.scores.append((idx, module.last_router_scores, tuple(inputs[0].shape[:-1])))
        return hook

    def take_scores(self) -> list:
        s, self.scores = self.scores, []
        return s

    def take_loads(self) -> dict[int, torch.Tensor]:
        loads, self.loads = self.loads, {}
        return loads

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def update_router_biases(model, loads: dict[int, torch.Tensor], rate: float, group=None) -> dict[int, torch.Tensor]:
    """Apply ``bias += rate · sign(mean(load) − load)`` to every MoE layer with a recorded load.
    Loads are all-reduced first when torch.distributed is initialised. Returns the global loads."""
    layers = [(i, moe) for i, moe in model.moe_layers() if i in loads]
    if not layers:
        return {}
    stacked = torch.stack([loads[i] for i, _ in layers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(stacked, group=group)
    out = {}
    for (i, moe), load in zip(layers, stacked):
        bias = moe.gate.e_score_correction_bias
        if rate:
            bias.add_(rate * torch.sign(load.mean() - load).to(bias.device, bias.dtype))
        out[i] = load
    return out


def load_stats(loads: dict[int, torch.Tensor]) -> dict:
    """Per-layer imbalance: ``max_vio`` = (max − mean) / mean (0 = perfectly balanced) and the coefficient of
    variation; plus their means over layers."""
    per_layer = {}
    for i, load in sorted(loads.items()):
        load = load.double()
        mean = load.mean().clamp_min(1e-9)
        per_layer[i] = {"max_vio": float((load.max() - mean) / mean), "cv": float(load.std(unbiased=False) / mean)}
    if not per_layer:
        return {}
    return {
        "max_vio": sum(v["max_vio"] for v in per_layer.values()) / len(per_layer),
        "cv": sum(v["cv"] for v in per_layer.values()) / len(per_layer),
        "layers": {str(i): round(v["max_vio"], 4) for i, v in per_layer.items()},
    }


def sequence_balance_loss(scores: torch.Tensor, shape: tuple, bias: torch.Tensor, cfg) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (without α): for each sequence,
    Σ_i f_i · P_i with f_i = E/(K·T) · #tokens routed to i and P_i = mean over tokens of the normalised
    score s_i / Σ_j s_j; averaged over sequences. scores [B·T, E] sigmoid scores (with grad)."""
    B, T = shape[0], (shape[1] if len(shape) > 1 else 1)
    E, K = scores.shape[-1], cfg.num_experts_per_tok
    with torch.no_grad():
        if cfg.n_group > 1:
            logits = torch.logit(scores.float().clamp(1e-6, 1 - 1e-6))
            _, ids = route_tokens(logits, bias.float(), K, cfg.n_group, cfg.topk_group)
        else:
            ids = (scores.float() + bias.float()).topk(K, dim=-1).indices
        counts = torch.zeros(B * T, E, device=scores.device).scatter_(1, ids, 1.0).view(B, T, E).sum(1)
        f = counts * (E / (K * T))
    p = (scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)).view(B, T, E).mean(1)
    return (f * p).sum(-1).mean()
