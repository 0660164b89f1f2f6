"""The training objective, in one place: next-token cross-entropy + MTP + MoE balance + DSA indexer KL.

    L = CE(main) + λ_mtp · mean_d CE(MTP step d) + α · sequence-balance + w_idx · mean_layers KL(indexer)

* **MTP** (GLM-5: several steps sharing the single MTP layer). Step d (1-based) at position t combines the
  previous hidden state h^{d-1}_t (h^0 = the main model's final normed hidden state) with the embedding of
  token x_{t+d} and predicts x_{t+d+1}. Targets that fall outside the row, outside the document (position
  ids must advance by exactly d) or on masked labels are ignored.
  ``mtp_target="self"`` (self-distillation) replaces the label x_{t+d+1} by the main model's own next-token
  distribution at position t+d (the teacher, held constant), and the step's loss is KL(teacher ‖ MTP). What a
  speculative draft needs is to agree with the main model, which is not the same as predicting the corpus:
  a small model's greedy text loops, and an MTP head trained on real text disagrees with it exactly there.
* **MTP only** (``mtp_only``): the main model runs without gradient and only the MTP block learns, on the
  MTP loss alone. The main model's outputs cannot change, so a trained checkpoint gains better drafts at
  no risk to its quality (the post-hoc draft-head recipe of Medusa and EAGLE, applied to GLM-5's MTP layer).
* **DSA stages** (DeepSeek-V3.2's recipe, adopted by GLM-5):
  ``dense``: dense attention, the indexer idle; LM loss only.
  ``indexer-warmup``: dense attention, main model frozen; loss = KL(head-summed attention ‖ indexer) over
  all visible keys, for every indexer (the MTP layer's included).
  ``sparse``: attention restricted to the indexer's top-k; LM loss trains the model, the indexer keeps
  learning from the KL over the selected keys. Its inputs are detached, so the two losses do not mix.
* Normalisation: token losses are summed and divided by the *global* number of targets of the optimiser
  step (all micro-batches, all ranks), then multiplied by ``grad_scale`` (the data-parallel world size,
  because FSDP averages gradients over ranks). Per-batch means (balance, KL) are divided by the number of
  micro-batches. So accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from glm5.data.loader import IGNORE_INDEX, Batch
from glm5.model.cache import build_attention_mask
from glm5.train.balance import sequence_balance_loss
from glm5.train.linear_ce import linear_cross_entropy

__all__ = ["LossConfig", "stage_modes", "mtp_inputs", "count_targets", "compute_loss", "mtp_loss_sums",
           "mtp_agreement", "mtp_steps", "batch_mask"]


@dataclass
class LossConfig:
    stage: str = "dense"  # "dense" | "indexer-warmup" | "sparse"
    mtp_depth: int = 1
    mtp_weight: float = 0.3
    seq_balance_alpha: float = 0.0
    indexer_loss_weight: float = 1.0
    mtp_only: bool = False
    mtp_target: str = "data"  # "data" (the corpus's next token) | "self" (the main model's distribution)


def stage_modes(stage: str, indexer_loss_weight: float = 1.0) -> tuple[str, str | None]:
    """(dsa, indexer_loss) arguments of the model forward for a DSA training stage."""
    if stage == "dense":
        return "dense", None
    if stage == "indexer-warmup":
        return "dense", "dense"
    if stage == "sparse":
        return "sparse", ("sparse" if indexer_loss_weight > 0 else None)
    raise ValueError(f"unknown DSA stage {stage!r}")


def mtp_inputs(batch: Batch, d: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(next_ids, labels) for MTP step d: next_ids[t] = x_{t+d}, labels[t] = labels[t+d] (= x_{t+d+1}),
    ignored where t+d leaves the row or the document."""
    ids, labels, pos = batch.input_ids, batch.labels, batch.position_ids
    B, S = ids.shape
    nxt = torch.full_like(ids, pad_id)
    lab = torch.full_like(labels, IGNORE_INDEX)
    if d < S:
        nxt[:, : S - d] = ids[:, d:]
        same_doc = (pos[:, d:] - pos[:, : S - d]) == d
        lab[:, : S - d] = torch.where(same_doc, labels[:, d:], IGNORE_INDEX)
    return nxt, lab


def count_targets(batch: Batch, mtp_depth: int) -> torch.Tensor:
    """[1 + mtp_depth] numbers of targets: main, then each MTP step."""
    counts = [batch.n_tokens] + [int((mtp_inputs(batch, d)[1] != IGNORE_INDEX).sum()) for d in range(1, mtp_depth + 1)]
    return torch.tensor(counts, dtype=torch.float64)


def _ce_sum(model, head_input: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None,
            detach_head: bool = False) -> torch.Tensor:
    """Summed CE of the LM head applied to ``head_input`` [B,S,H], fused and chunked (no [B,S,V] logits); with
    ``teacher`` [B,S,H] the summed KL(head(teacher) ‖ head(head_input)) over the rows with a label."""
    w = model.lm_head.weight
    return linear_cross_entropy(head_input, w.detach() if detach_head else w, labels, ignore_index=IGNORE_INDEX,
                                target_hidden=teacher)


def batch_mask(batch: Batch) -> torch.Tensor:
    """The batch's attention mask: its document mask, or plain causal when it has none."""
    if batch.attention_mask is not None:
        return batch.attention_mask
    B, S = batch.input_ids.shape
    return build_attention_mask(B, S, 0, batch.input_ids.device)


def mtp_steps(model, depth: int) -> int:
    """MTP steps that run: ``depth``, or 0 for a model without an MTP layer."""
    return depth if getattr(model.model, "mtp", None) is not None else 0


def _shift_left(h: torch.Tensor, d: int) -> torch.Tensor:
    """h [B,S,H] → [B,S,H] with row t holding h[t+d]; the last d rows are zeros (their labels are ignored)."""
    out = torch.zeros_like(h)
    out[:, : max(h.shape[1] - d, 0)] = h[:, d:]
    return out


def compute_loss(model, batch: Batch, lc: LossConfig, norm: torch.Tensor, *, grad_scale: float = 1.0,
                 n_micro: int = 1, tracker=None, pad_id: int = 0) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch, scaled for backward (see module docstring), and float statistics:
    ``ce_sum``, ``mtp_sums`` (per step), ``indexer_kl`` (mean over indexers), ``balance`` (per-batch value).

    norm: the [1 + mtp_depth] global target counts of the whole optimiser step (``count_targets`` summed over
    micro-batches and ranks).
    """
    dsa, indexer_loss = stage_modes(lc.stage, lc.indexer_loss_weight)
    warmup = lc.stage == "indexer-warmup"
    cfg = model.config
    mask = batch_mask(batch)
    if tracker is not None:
        tracker.record_scores = lc.seq_balance_alpha > 0 and not warmup

    # MTP only: the frozen main model needs no graph and no indexer loss (its CE is still reported).
    with torch.no_grad() if lc.mtp_only else contextlib.nullcontext():
        out = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, dsa=dsa,
                    indexer_loss=None if lc.mtp_only else indexer_loss, compute_logits=False)
        ce_sum = _ce_sum(model, out.hidden_states, batch.labels)
    aux = list(out.aux_losses)
    mtp_sums = mtp_loss_sums(model, batch, out.hidden_states, mtp_steps(model, lc.mtp_depth), dsa,
                             target=lc.mtp_target, pad_id=pad_id, mask=mask, indexer_loss=indexer_loss, aux_losses=aux)
    kl = torch.stack(aux).mean() if aux else None

    balance = None
    if tracker is not None and tracker.record_scores:
        terms = [sequence_balance_loss(scores, shape, dict(model.moe_layers())[i].gate.e_score_correction_bias, cfg)
                 for i, scores, shape in tracker.take_scores()]
        balance = torch.stack(terms).mean() if terms else None
        tracker.record_scores = False

    if warmup:
        if kl is None:
            raise ValueError("indexer warm-up needs layers with an indexer")
        loss = kl / n_micro
    else:
        mtp = torch.stack([s / max(float(norm[d + 1]), 1.0) for d, s in enumerate(mtp_sums)]).mean() if mtp_sums else None
        if lc.mtp_only:
            if mtp is None:
                raise ValueError("MTP-only training needs a model with an MTP layer and mtp_depth >= 1")
            main = mtp
        else:
            main = ce_sum / max(float(norm[0]), 1.0)
            if mtp is not None and lc.mtp_weight > 0:
                main = main + lc.mtp_weight * mtp
        loss = main * grad_scale
        extra = 0.0
        if balance is not None:
            extra = extra + lc.seq_balance_alpha * balance
        if kl is not None and lc.stage == "sparse":
            extra = extra + lc.indexer_loss_weight * kl
        if not isinstance(extra, float):
            loss = loss + extra / n_micro
    stats = {
        "ce_sum": float(ce_sum.detach()),
        "mtp_sums": [float(s.detach()) for s in mtp_sums],
        "indexer_kl": float(kl.detach()) if kl is not None else None,
        "balance": float(balance.detach()) if balance is not None else None,
    }
    return loss, stats


def mtp_loss_sums(model, batch: Batch, hidden: torch.Tensor, depth: int, dsa: str, *, target: str = "data",
                  pad_id: int = 0, mask: torch.Tensor | None = None, indexer_loss: str | None = None,
                  aux_losses: list | None = None, detach_shared: bool = False) -> list[torch.Tensor]:
    """Summed loss of MTP steps 1..``depth`` over ``batch`` (see the module docstring), chained from the main
    model's final hidden states ``hidden`` [B,S,H]; ``target`` "data" or "self".

    ``detach_shared``: the MTP losses give no gradient to anything the main model owns: the hidden states, the
    shared embedding and the LM head are detached, so only the MTP block learns from them (RL trains the MTP
    layer beside the policy without changing the policy's gradient)."""
    mask = batch_mask(batch) if mask is None else mask
    sums = []
    h = hidden.detach() if detach_shared else hidden
    for d in range(1, depth + 1):
        nxt, lab = mtp_inputs(batch, d, pad_id)
        head_in, h = model.mtp_forward(h, nxt, batch.position_ids, mask, dsa=dsa, indexer_loss=indexer_loss,
                                       aux_losses=aux_losses, compute_logits=False, detach_embeddings=detach_shared)
        teacher = _shift_left(hidden.detach(), d) if target == "self" else None
        sums.append(_ce_sum(model, head_in, lab, teacher, detach_head=detach_shared))
    return sums


@torch.no_grad()
def mtp_agreement(model, batch: Batch, hidden: torch.Tensor, main_logits: torch.Tensor, depth: int, dsa: str,
                  pad_id: int = 0) -> tuple[list[int], list[int], int]:
    """How often MTP step d's top-1 equals the main model's top-1 for the same token (x_{t+d+1}), teacher-forced
    on ``batch``: returns (matches per step, chained matches per step, positions). A draft chain survives step d
    only if steps 1..d all matched, so 1 + Σ_d chained_d / positions estimates the acceptance length of greedy
    speculative decoding with ``depth`` drafts (an estimate: at inference the drafts follow the model's own
    tokens, here the corpus's)."""
    main_top = main_logits.argmax(-1)  # [B,S]
    S = main_top.shape[1]
    mask, h, alive = batch_mask(batch), hidden, None
    matches, chained, positions = [], [], 0
    for d in range(1, depth + 1):
        nxt, lab = mtp_inputs(batch, d, pad_id)
        logits, h = model.mtp_forward(h, nxt, batch.position_ids, mask, dsa=dsa)
        valid = lab != IGNORE_INDEX
        positions = positions or int(valid.sum())  # step 1's targets: the positions a draft chain starts at
        same = torch.zeros_like(valid)
        same[:, : max(S - d, 0)] = logits.argmax(-1)[:, : S - d] == main_top[:, d:]
        same &= valid
        alive = same if alive is None else alive & same  # ⊂ step 1's valid positions
        matches.append(int(same.sum()))
        chained.append(int(alive.sum()))
    return matches, chained, positions
