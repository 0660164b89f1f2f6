"""Advantage estimators and ONE policy-loss function with switches (slime/verl/GLM-5 formulas).

Notation (all per response token t of sequence i; tensors are [B, T] over response positions):

* ``logp``      log π_θ(y_t)         current policy, with grad (training engine)
* ``old_logp``  log π_old(y_t)       policy at the start of the step (recomputed by the trainer, or the
                                     rollout log-probs in "bypass" mode), detached
* ``rollout_logp`` log μ(y_t)        what the inference engine reported when it sampled y_t
* ``ref_logp``  log π_ref(y_t)       frozen reference, for the KL term
* ``m``         loss mask (1 = model token, 0 = prompt / tool output / padding)
* ``Â``         advantage, per sequence [B] (broadcast) or per token [B, T]

Advantages (:func:`compute_advantages`, per group g of G samples of one prompt):

* ``grpo``      Â_i = (r_i − mean_g r) / (std_g r + 1e-6), unbiased std (slime ``_post_process_rewards``)
* ``mean``      Â_i = r_i − mean_g r (Dr.GRPO / GLM-5 agentic RL: mean-centred only)
* ``rloo``      Â_i = r_i − mean_{j≠i} r_j (leave-one-out baseline)
* ``none``      Â_i = r_i

Policy term ℓ_t (``cfg.loss_type``), with ρ_t = exp(logp − old_logp):

* ``ppo``   ℓ = max(−ρ Â, −clip(ρ, 1−ε_low, 1+ε_high) Â)  (PPO clip with DAPO clip-higher 0.2 / 0.28);
            with ``dual_clip`` c > 1 and Â < 0: ℓ ← min(ℓ, −c Â)
* ``gspo``  same clip, but ρ is the sequence ratio s_i = exp( Σ_t m (logp − old_logp) / Σ_t m ), broadcast to
            the tokens of sequence i (gradient flows through s_i; GSPO uses tiny ε, e.g. 3e-4 / 4e-4)
* ``ddis``  GLM-5 direct double-sided importance sampling (report §4.1.2, Eqs. 3–5): the ratio is taken
            against the *rollout* log-probs, r = exp(logp − rollout_logp), no π_old and no PPO min/clip:
            ℓ = −r Â · 1[1−ε_low < r < 1+ε_high]. Its gradient is −Â ∇r = −r Â ∇log π_θ inside the band, 0
            outside (= f(r)·Â·∇log π_θ with f(x) = x if 1−ε_l < x < 1+ε_h, else 0: the band is open, Eq. 5)
* ``cispo`` ℓ = −sg(clip(ρ, 1−ε_low, 1+ε_high)) Â logp (clipped tokens keep their gradient)
* ``reinforce`` ℓ = −Â logp (on-policy REINFORCE, nanochat-style)

Train/inference mismatch corrections (multiply ℓ_t by a detached weight w_t):

* ``tis="tis"``     w = clamp(exp(old_logp − rollout_logp), tis_clip_low (default 0), tis_clip) (truncated IS)
* ``tis="icepop"``  w = ρ_mis if tis_clip_low (default 1/tis_clip) ≤ ρ_mis ≤ tis_clip else 0,
                    ρ_mis = exp(old_logp − rollout_logp) (GLM-5 reasoning RL, β = 2)
* ``is_mask=True``  GLM-5's double-sided IS mask: w = 1[1−is_eps_low < exp(logp − rollout_logp) < 1+is_eps_high]
                    (detached); tokens outside the band are masked. ``ddis`` always applies it with ε_low/ε_high.
                    A masked token leaves the numerator but stays in the denominator (as slime does for
                    rejection sampling), so masking never inflates the other tokens' weight.

Extra terms: KL to the reference, u = ref_logp − logp: ``k1`` = −u, ``k2`` = u²/2, ``k3`` = eᵘ − u − 1;
entropy bonus H_t (exact, over the vocabulary).

Aggregation R(x) (``cfg.agg``):

* ``token``  R(x) = Σ_i Σ_t m x / Σ_i Σ_t m  (DAPO token-level mean; denominator ``num_tokens`` if given,
             so micro-batches sum to the whole-batch loss)
* ``seq``    R(x) = (1/B) Σ_i (Σ_t m x / Σ_t m)  (per-sample mean, GRPO paper; ``num_seqs`` if given)

Total: loss = R(w ℓ) + β_KL R(KL) − c_H R(H).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["LossConfig", "compute_advantages", "kl_penalty", "policy_loss", "token_logprobs_and_entropy",
           "ADVANTAGE_ESTIMATORS", "LOSS_TYPES"]

ADVANTAGE_ESTIMATORS = ("grpo", "mean", "rloo", "none")
LOSS_TYPES = ("ppo", "gspo", "ddis", "cispo", "reinforce")


@dataclass
class LossConfig:
    loss_type: str = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    agg: str = "token"  # "token" | "seq"
    tis: str | None = None  # None | "tis" | "icepop"
    tis_clip: float = 2.0
    tis_clip_low: float | None = None
    is_mask: bool = False
    is_eps_low: float = 0.2
    is_eps_high: float = 0.28
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.agg not in ("token", "seq"):
            raise ValueError(f"agg must be 'token' or 'seq', got {self.agg!r}")
        if self.tis not in (None, "tis", "icepop"):
            raise ValueError(f"tis must be None, 'tis' or 'icepop', got {self.tis!r}")
        if self.kl_type not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_type must be k1, k2 or k3, got {self.kl_type!r}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError("dual_clip must be > 1")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError("need 0 <= eps_low < 1 and eps_high >= 0")

    @property
    def needs_rollout_logp(self) -> bool:
        return self.loss_type == "ddis" or self.is_mask or self.tis is not None

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ advantages
def compute_advantages(rewards, group_ids, estimator: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages [N] from scalar rewards [N], normalised within groups of equal ``group_ids``."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    r = torch.as_tensor(rewards, dtype=torch.float64)
    gid = torch.as_tensor(group_ids)
    out = torch.zeros_like(r)
    if estimator == "none":
        return r.float()
    for g in torch.unique(gid):
        idx = (gid == g).nonzero(as_tuple=True)[0]
        rg = r[idx]
        n = rg.numel()
        mean = rg.mean()
        if estimator == "grpo":
            std = rg.std(unbiased=True) if n > 1 else torch.zeros((), dtype=r.dtype)
            out[idx] = (rg - mean) / (std + eps)
        elif estimator == "mean":
            out[idx] = rg - mean
        else:  # rloo
            out[idx] = (rg - (rg.sum() - rg) / (n - 1)) if n > 1 else torch.zeros_like(rg)
    return out.float()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ; u = ref_logp − logp."""
    u = ref_logp - logp
    if kind == "k1":
        return -u
    if kind == "k2":
        return 0.5 * u * u
    if kind == "k3":
        return torch.exp(u) - u - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}")


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                               with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(target) and the exact entropy per position from logits [..., V] (half precision upcast to fp32),
    sampling temperature applied as the engine samples (logits / T)."""
    x = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    if temperature != 1.0:
        x = x / temperature
    logz = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    ent = None
    if with_entropy:
        p = torch.softmax(x, dim=-1)
        ent = logz - (p * x).sum(-1)
    return logp, ent


# ------------------------------------------------------------------------------------------ the loss
def _reduce(x: torch.Tensor, mask: torch.Tensor, agg: str, num_tokens=None, num_seqs=None) -> torch.Tensor:
    if agg == "token":
        denom = mask.sum() if num_tokens is None else torch.as_tensor(float(num_tokens))
        return (x * mask).sum() / denom.clamp(min=1.0)
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    b = per_seq.shape[0] if num_seqs is None else num_seqs
    return per_seq.sum() / max(float(b), 1.0)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor, *,
                rollout_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, cfg: LossConfig | None = None,
                num_tokens: float | None = None, num_seqs: float | None = None) -> tuple[torch.Tensor, dict]:
    """The policy loss (a scalar with grad through ``logp``/``entropy``) and detached metrics.

    Shapes: ``logp``, ``old_logp``, ``rollout_logp``, ``ref_logp``, ``entropy``, ``loss_mask``: [B, T];
    ``advantages``: [B] or [B, T]. ``num_tokens`` / ``num_seqs``: global denominators when the batch is split
    into micro-batches (sum the micro-batch losses to get the whole-batch loss). See the module docstring.
    """
    cfg = cfg or LossConfig()
    m = loss_mask.to(logp.dtype)
    old_logp = old_logp.detach()
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    if cfg.needs_rollout_logp and rollout_logp is None:
        raise ValueError(f"loss_type={cfg.loss_type!r} / tis={cfg.tis!r} / is_mask={cfg.is_mask} need rollout_logp")
    rollout_logp = rollout_logp.detach() if rollout_logp is not None else None
    metrics: dict[str, float] = {}

    log_ratio = logp - old_logp
    clip_lo, clip_hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    clipped = torch.zeros_like(m, dtype=torch.bool)
    if cfg.loss_type in ("ppo", "gspo"):
        if cfg.loss_type == "gspo":
            seq_log_ratio = (log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)
            ratio = torch.exp(seq_log_ratio)[:, None].expand_as(logp)
        else:
            ratio = torch.exp(log_ratio)
        pg1 = -adv * ratio
        pg2 = -adv * ratio.clamp(clip_lo, clip_hi)
        pg = torch.maximum(pg1, pg2)
        clipped = pg2 > pg1
        metrics["clipfrac_low"] = _masked_mean((clipped & (ratio < clip_lo)).to(m.dtype), m)
        metrics["clipfrac_high"] = _masked_mean((clipped & (ratio > clip_hi)).to(m.dtype), m)
        if cfg.dual_clip is not None:
            pg3 = -adv * cfg.dual_clip
            dual = (adv < 0) & (pg3 < pg)
            pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
            metrics["dual_clipfrac"] = _masked_mean(dual.to(m.dtype), m)
    elif cfg.loss_type == "cispo":
        ratio = torch.exp(log_ratio)
        w = ratio.detach().clamp(clip_lo, clip_hi)
        clipped = (ratio.detach() < clip_lo) | (ratio.detach() > clip_hi)
        pg = -w * adv * logp
    elif cfg.loss_type == "ddis":
        ratio = torch.exp(logp - rollout_logp)
        pg = -ratio * adv
    else:  # reinforce
        ratio = torch.exp(log_ratio)
        pg = -adv * logp
    metrics["clipfrac"] = _masked_mean(clipped.to(m.dtype), m)

    weight = torch.ones_like(m)
    if cfg.tis is not None:
        rho = torch.exp(old_logp - rollout_logp)
        if cfg.tis == "tis":
            lo = 0.0 if cfg.tis_clip_low is None else cfg.tis_clip_low
            w_tis = rho.clamp(lo, cfg.tis_clip)
        else:
            lo = 1.0 / cfg.tis_clip if cfg.tis_clip_low is None else cfg.tis_clip_low
            keep = (rho >= lo) & (rho <= cfg.tis_clip)
            w_tis = torch.where(keep, rho, torch.zeros_like(rho))
        weight = weight * w_tis
        metrics["tis_mean"] = _masked_mean(w_tis, m)
        metrics["tis_clipfrac"] = _masked_mean(((rho < lo) | (rho > cfg.tis_clip)).to(m.dtype), m)
    band_mask = torch.ones_like(m)
    if cfg.is_mask or cfg.loss_type == "ddis":
        lo, hi = (clip_lo, clip_hi) if cfg.loss_type == "ddis" else (1.0 - cfg.is_eps_low, 1.0 + cfg.is_eps_high)
        r_is = torch.exp(logp.detach() - rollout_logp)
        band_mask = ((r_is > lo) & (r_is < hi)).to(m.dtype)  # open band, as f(x) in GLM-5 Eq. 5
        weight = weight * band_mask
        metrics["is_masked_frac"] = _masked_mean(1.0 - band_mask, m)

    per_token = pg * weight.detach()
    pg_loss = _reduce(per_token, m, cfg.agg, num_tokens, num_seqs)
    loss = pg_loss
    metrics["pg_loss"] = float(pg_loss.detach())
    metrics["ratio_mean"] = _masked_mean(torch.exp(log_ratio.detach()), m)
    metrics["ppo_kl"] = _masked_mean(-log_ratio.detach(), m)  # mean(old − new): 0 at an on-policy first step
    if rollout_logp is not None:
        metrics["rollout_ratio_mean"] = _masked_mean(torch.exp(logp.detach() - rollout_logp), m)
        metrics["train_rollout_logprob_abs_diff"] = _masked_mean((logp.detach() - rollout_logp).abs(), m)
    if cfg.kl_coef and ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.detach(), cfg.kl_type)
        kl_loss = _reduce(kl, m, cfg.agg, num_tokens, num_seqs)
        loss = loss + cfg.kl_coef * kl_loss
        metrics["kl"] = float(kl_loss.detach())
    elif ref_logp is not None:
        metrics["kl"] = float(_reduce(kl_penalty(logp.detach(), ref_logp, cfg.kl_type), m, cfg.agg, num_tokens, num_seqs))
    if entropy is not None:
        ent = _reduce(entropy, m, cfg.agg, num_tokens, num_seqs)
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * ent
        metrics["entropy"] = float(ent.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics
