"""The RL train step on the project's optimisers (``glm5.train.optim``: Muon + AdamW, or AdamW).

One call of :meth:`RLTrainer.train_step` consumes one rollout batch (a list of groups):

1. advantages: per group from the scalar rewards (``compute_advantages``: GRPO z-score by default);
2. the batch is split into ``updates_per_batch`` mini-batches (one optimiser step each; slime's default is one
   step per rollout batch) and each mini-batch into micro-batches under a token budget, with the loss
   denominators (masked tokens / sequences) counted over the whole mini-batch so gradient accumulation equals
   the full-batch gradient;
3. log-probs of the response tokens under the policy (one forward per micro-batch, DSA sparse attention as in
   the engine, softmax(logits / T) with T the rollout temperature — what the rollout engine reports, its
   ``logprobs_mode`` being "processed_logprobs"):
   π_old is these log-probs detached when there is a
   single optimiser step (exact), a separate no-grad pass when there are several, or the rollout log-probs
   (``old_logp="rollout"``: slime's bypass mode);
4. ``policy_loss`` (glm5.rl.losses) with the configured switches, backward, gradient clipping, optimiser step;
5. the weight version increments (the manager then pushes the weights to the rollout engine).

GLM-5 practice kept here: the DSA indexer is frozen during RL (report §3.2), the MTP layer is not trained by
the RL objective (frozen), and the optimiser can be reset after every weight push (``reset_optimizer``,
report §4.1.1). Router correction biases are left as they are (no aux-loss-free updates during RL).

Online MTP training (``mtp_weight`` > 0, what slime and AReaL offer for speculative rollouts): as the policy
moves, a frozen MTP layer's drafts go stale and speculative decoding accepts fewer of them. The MTP layer then
learns beside the policy, from the same forward, by self-distillation: each of its ``mtp_depth`` steps is pulled
towards the policy's own next-token distribution on the batch's response tokens
(``glm5.train.losses.mtp_loss_sums`` with ``target="self"``). Hidden states, embedding and LM head are detached
for it, and the MTP layer's gradient is clipped on its own, so the policy's update is exactly the one it would
be without (a test checks this bit for bit). The weight push carries the new MTP weights to the rollout engine.

Metrics of every step include the train-vs-rollout log-prob gap (mean and max |log π_θ − log μ| over model
tokens, before the update), the importance ratio exp(log π_θ − log μ), clip fractions, entropy, KL, grad norm.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from glm5.rl.losses import LossConfig, compute_advantages, policy_loss, token_logprobs_and_entropy
from glm5.rl.sample import Sample

__all__ = ["TrainerConfig", "RLTrainer", "response_batch"]

_SHARES = ("loss", "pg_loss", "kl", "entropy")


@dataclass
class TrainerConfig:
    lr: float = 1e-5
    optimizer: str = "adamw"  # "adamw" | "muon" (glm5.train.optim.build_optimizers)
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    advantage: str = "grpo"
    loss: LossConfig = field(default_factory=LossConfig)
    micro_batch_tokens: int = 8192  # padded tokens per forward
    updates_per_batch: int = 1
    old_logp: str = "recompute"  # "recompute" | "rollout"
    freeze_indexer: bool = True
    freeze_mtp: bool = True
    freeze_router: bool = False  # keep MoE gate weights fixed (expert choice cannot drift between rollout and train)
    reset_optimizer: bool = False
    use_ref_model: bool | None = None  # None: when loss.kl_coef > 0
    temperature: float = 1.0  # log-probs of softmax(logits / T), T = the rollout temperature (slime does the same);
    # the rollout engine reports the same distribution (logprobs_mode "processed_logprobs")
    mtp_weight: float = 0.0  # > 0: train the MTP layer online by self-distillation (see the module docstring)
    mtp_depth: int = 1  # MTP steps trained (the one layer reused per step), e.g. the rollout's number of drafts
    mtp_lr: float | None = None  # the MTP layer's learning rate (None: the policy's ``lr``)

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if self.old_logp not in ("recompute", "rollout"):
            raise ValueError("old_logp must be 'recompute' or 'rollout'")
        if self.updates_per_batch < 1:
            raise ValueError("updates_per_batch must be >= 1")
        if self.mtp_weight < 0 or self.mtp_depth < 1 or (self.mtp_lr is not None and self.mtp_lr <= 0):
            raise ValueError(f"need mtp_weight >= 0, mtp_depth >= 1 and mtp_lr > 0, got {self.mtp_weight}, "
                             f"{self.mtp_depth}, {self.mtp_lr}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def response_batch(samples: list[Sample], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded model inputs and per-position response tensors, aligned with the logits of ``input_ids``:
    position p predicts token p+1, so response token j of a sample sits at position len(prompt) − 1 + j."""
    L = max(len(s.tokens) for s in samples)
    B = len(samples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L - 1)
    rollout = torch.zeros(B, L - 1)
    for i, s in enumerate(samples):
        toks = s.tokens
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        p, r = len(s.prompt_ids), len(s.response_ids)
        if r:
            mask[i, p - 1: p - 1 + r] = torch.tensor(s.loss_mask, dtype=torch.float32)
            rollout[i, p - 1: p - 1 + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    return {"input_ids": ids[:, :-1].to(device), "targets": ids[:, 1:].to(device), "mask": mask.to(device),
            "rollout_logp": rollout.to(device)}


def _micro_batches(samples: list[Sample], budget: int) -> list[list[Sample]]:
    order = sorted(samples, key=lambda s: len(s.tokens))
    out, cur, longest = [], [], 0
    for s in order:
        n = len(s.tokens)
        if cur and max(longest, n) * (len(cur) + 1) > budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(s)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


class RLTrainer:
    def __init__(self, model, cfg: TrainerConfig | None = None, ref_model=None, total_steps: int = 1000):
        from glm5.train.optim import OptimizerList, build_optimizers

        self.cfg = cfg = cfg or TrainerConfig()
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        n_main = model.config.num_hidden_layers
        is_mtp = lambda name: name.startswith(f"model.layers.{n_main}.")  # noqa: E731
        self.train_mtp = cfg.mtp_weight > 0
        if self.train_mtp and getattr(model.model, "mtp", None) is None:
            raise ValueError("mtp_weight > 0 needs a model with an MTP layer (num_nextn_predict_layers >= 1)")
        for name, p in model.named_parameters():
            if cfg.freeze_indexer and ".indexer." in name:
                p.requires_grad_(False)
            if is_mtp(name) and cfg.freeze_mtp and not self.train_mtp:
                p.requires_grad_(False)
            if cfg.freeze_router and name.endswith(".mlp.gate.weight"):
                p.requires_grad_(False)
        # the policy's parameters and the MTP layer's, clipped separately (see the module docstring)
        self.params = [p for n, p in model.named_parameters() if p.requires_grad and not is_mtp(n)]
        self.mtp_params = [p for n, p in model.named_parameters() if p.requires_grad and is_mtp(n)]

        def build():
            kw = dict(kind=cfg.optimizer, weight_decay=cfg.weight_decay, betas=cfg.betas)
            opts = build_optimizers(model, lr=cfg.lr, only=lambda n: not is_mtp(n), **kw)
            if self.mtp_params:  # its own learning rate: the schedule scales each group's base_lr
                mtp_lr = cfg.mtp_lr if cfg.mtp_lr is not None else cfg.lr
                opts = OptimizerList(opts.optimizers + build_optimizers(model, lr=mtp_lr, only=is_mtp, **kw).optimizers)
            return opts

        self._build_optim = build
        self.optim = self._build_optim()
        use_ref = cfg.use_ref_model if cfg.use_ref_model is not None else cfg.loss.kl_coef > 0
        if use_ref and ref_model is None:
            from glm5.rl.weight_sync import clone_model

            ref_model = clone_model(model)
        self.ref_model = ref_model.eval().requires_grad_(False) if (use_ref and ref_model is not None) else None
        self.version = 0
        self.total_steps = total_steps
        self.step_times: list[float] = []

    # ---------------------------------------------------------------------------------------- log-probs
    def _forward(self, model, batch, with_entropy: bool):
        """-> (token log-probs, entropy or None, final hidden states [B,S,H] for the MTP loss)."""
        out = model(batch["input_ids"], dsa="sparse")
        lp, ent = token_logprobs_and_entropy(out.logits, batch["targets"], self.cfg.temperature, with_entropy)
        return lp, ent, out.hidden_states

    def _mtp_loss_sums(self, batch, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Summed self-distillation loss of each MTP step over the response tokens of a micro-batch: step d at
        position t predicts token t+d+1, counted where that token is a trained response token."""
        from glm5.data.loader import IGNORE_INDEX, Batch
        from glm5.train.losses import mtp_loss_sums

        ids = batch["input_ids"]
        labels = torch.where(batch["mask"] > 0, batch["targets"], IGNORE_INDEX)
        pos = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        return mtp_loss_sums(self.model, Batch(ids, labels, pos, None), hidden, self.cfg.mtp_depth, "sparse",
                             target="self", pad_id=self.pad_id, detach_shared=True)

    @torch.no_grad()
    def logprobs(self, samples: list[Sample], model=None) -> list[torch.Tensor]:
        """Per-sample log-probs of the response tokens under ``model`` (default the policy), no grad."""
        model = model or self.model
        was = model.training
        model.eval()
        out = []
        try:
            for mb in _micro_batches(samples, self.cfg.micro_batch_tokens):
                b = response_batch(mb, self.pad_id, self.device)
                lp, _, _ = self._forward(model, b, False)
                for i, s in enumerate(mb):
                    p, r = len(s.prompt_ids), len(s.response_ids)
                    out.append((s, lp[i, p - 1: p - 1 + r].cpu()))
        finally:
            model.train(was)
        by_id = {id(s): t for s, t in out}
        return [by_id[id(s)] for s in samples]

    # ------------------------------------------------------------------------------------------ step
    def _set_lr(self) -> float:
        from glm5.train.optim import lr_factor, set_lr

        f = lr_factor(self.version, self.total_steps, self.cfg.warmup_steps, "constant")
        return set_lr(self.optim, f)

    def train_step(self, groups: list[list[Sample]]) -> dict:
        """One rollout batch -> ``updates_per_batch`` optimiser steps; returns metrics (see module docstring)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        samples = [s for g in groups for s in g]
        if not samples:
            raise ValueError("empty batch")
        adv = compute_advantages([float(s.reward or 0.0) for s in samples], [s.group_id for s in samples],
                                 cfg.advantage)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a
        lr = self._set_lr()
        self.model.train()
        n_mini = min(cfg.updates_per_batch, len(groups))
        minis = [[s for g in groups[k::n_mini] for s in g] for k in range(n_mini)]
        old = None
        if n_mini > 1 and cfg.old_logp == "recompute":
            old = {id(s): t for s, t in zip(samples, self.logprobs(samples))}
        agg: dict[str, float] = {}
        shares: dict[str, float] = {}
        weight_sum = 0.0
        gap_sum = gap_max = 0.0
        gap_n = 0
        grad_norms, mtp_norms = [], []
        for mini in minis:
            num_tokens = float(sum(sum(s.loss_mask) for s in mini))
            num_seqs = float(len(mini))
            self.optim.zero_grad(set_to_none=True)
            for mb in _micro_batches(mini, cfg.micro_batch_tokens):
                b = response_batch(mb, self.pad_id, self.device)
                logp, ent, hidden = self._forward(self.model, b, True)
                m = b["mask"]
                if cfg.old_logp == "rollout":
                    old_lp = b["rollout_logp"]
                elif old is not None:
                    old_lp = torch.zeros_like(logp)
                    for i, s in enumerate(mb):
                        p, r = len(s.prompt_ids), len(s.response_ids)
                        old_lp[i, p - 1: p - 1 + r] = old[id(s)].to(logp.device)
                else:
                    old_lp = logp.detach()
                ref_lp = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_lp, _, _ = self._forward(self.ref_model, b, False)
                a = torch.tensor([s.advantage for s in mb], device=logp.device)
                loss, met = policy_loss(logp, old_lp, a, m, rollout_logp=b["rollout_logp"], ref_logp=ref_lp,
                                        entropy=ent, cfg=cfg.loss, num_tokens=num_tokens, num_seqs=num_seqs)
                if self.train_mtp:
                    # per trained response token of the mini-batch, averaged over steps (as the pretraining MTP loss)
                    sums = self._mtp_loss_sums(b, hidden)
                    mtp = torch.stack(sums).mean() / max(num_tokens, 1.0)
                    loss = loss + cfg.mtp_weight * mtp
                    shares["mtp_kl"] = shares.get("mtp_kl", 0.0) + float(mtp.detach()) / n_mini
                loss.backward()
                w = float(m.sum())
                weight_sum += w
                for k, v in met.items():
                    if k in _SHARES:  # already this micro-batch's share of the mini-batch value: sum them
                        shares[k] = shares.get(k, 0.0) + v / n_mini
                    else:  # masked means over this micro-batch: token-weighted average
                        agg[k] = agg.get(k, 0.0) + v * w
                if mini is minis[0] or old is not None:  # the gap of the policy *before* this step's update:
                    # later mini-batches see updated weights, so take theirs from the pre-update pass when there
                    # is one (old), else count only the first mini-batch
                    with torch.no_grad():
                        before = old_lp if old is not None else logp.detach()
                        d = (before - b["rollout_logp"]).abs() * m
                        gap_sum += float(d.sum())
                        gap_max = max(gap_max, float(d.max()) if d.numel() else 0.0)
                        gap_n += int(m.sum())
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            gn = torch.nn.utils.clip_grad_norm_(self.params, clip)
            grad_norms.append(float(gn))
            ok = math.isfinite(float(gn))
            if self.mtp_params:
                mtp_gn = float(torch.nn.utils.clip_grad_norm_(self.mtp_params, clip))
                mtp_norms.append(mtp_gn)
                ok = ok and math.isfinite(mtp_gn)
            if ok:
                self.optim.step()
            self.optim.zero_grad(set_to_none=True)
        self.version += 1
        rewards = [float(s.reward or 0.0) for s in samples]
        metrics = {k: v / max(weight_sum, 1.0) for k, v in agg.items()}
        metrics.update(shares)
        metrics.update({
            "version": self.version, "lr": lr, "grad_norm": sum(grad_norms) / len(grad_norms),
            "train_samples": len(samples), "train_tokens": int(sum(s.num_model_tokens for s in samples)),
            "logprob_gap_mean": gap_sum / max(gap_n, 1), "logprob_gap_max": gap_max,
            "advantage_abs_mean": float(adv.abs().mean()), "reward_mean_batch": sum(rewards) / len(rewards),
            "train_time_s": time.perf_counter() - t0,
        })
        if mtp_norms:
            metrics["mtp_grad_norm"] = sum(mtp_norms) / len(mtp_norms)
        self.step_times.append(metrics["train_time_s"])
        return metrics

    def after_push(self) -> None:
        """Called after the weights were pushed to the rollout engine."""
        if self.cfg.reset_optimizer:
            self.optim = self._build_optim()

    def state_dict(self) -> dict:
        return {"version": self.version}
