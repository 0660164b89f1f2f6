"""Fused LM head + cross-entropy, chunked over rows, so the [N, V] logits never exist whole.

``F.cross_entropy(h @ W.T, y)`` materialises the logits, their log-softmax and, in backward, a gradient of
the same size: for glm5-tiny's batch (2,048 tokens × 8,192 ids) that is 64 MiB each, written and read
several times per step, and on CPU every fresh 64 MiB buffer is also a round of page faults. Here each
chunk of rows computes its logits, its loss and, when a gradient is wanted, the gradients of the hidden
states and of the weight straight away (the softmax minus the one-hot target, times W or times h), as
Liger-Kernel's fused linear cross-entropy does; backward only scales the saved gradients by the incoming
one. The work is the same three matmuls as the unfused head; only the memory traffic shrinks, to one
[chunk, V] block at a time.

The result is the *sum* of the per-token losses over targets != ``ignore_index`` (the trainer normalises by
its global target count). Logits are accumulated in fp32 whatever the input dtype (bf16 under autocast).

**Soft targets (self-distillation).** Given ``target_hidden``, each row's target is the distribution the same
head gives that row of ``target_hidden`` (the teacher), and the loss is KL(teacher ‖ model) instead of the
cross-entropy with a label. The teacher is a constant (no gradient flows into it, nor into the weight through
it); ``labels`` then only say which rows count. The gradient with respect to the logits is softmax − p_teacher,
so the chunked scheme is unchanged: one more [chunk, V] matmul for the teacher's logits.
"""

from __future__ import annotations

import torch

# Rows per chunk on CPU: a [chunk, V] fp32 block stays a few MiB for vocabularies up to ~150K ids on CPU caches
# and keeps the matmuls large enough to run at full speed.
DEFAULT_CHUNK_ROWS = 256
# On a GPU the per-chunk launches dominate small chunks (an H100 profile of the ~1B benchmark model, V = 32K: 128
# chunks of 256 rows took 73 ms a step for ~7 TFLOP of matmuls); a [chunk, V] fp32 block of ~256 MiB there.
GPU_CHUNK_BYTES = 1 << 28


def default_chunk_rows(device: torch.device, vocab: int) -> int:
    if device.type == "cpu":
        return DEFAULT_CHUNK_ROWS
    return max(DEFAULT_CHUNK_ROWS, GPU_CHUNK_BYTES // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk: int, target_hidden):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        w = weight
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            h = hidden[a:b]
            y = labels[a:b]
            logits = (h @ w.t()).float()  # [c,V]
            valid = y != ignore_index
            safe_y = torch.where(valid, y, torch.zeros_like(y))
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            if target_hidden is None:
                target_logit = logits.gather(1, safe_y[:, None])[:, 0]
                total += ((lse - target_logit) * valid).sum()
                p_target = None
            else:
                log_p = torch.log_softmax((target_hidden[a:b] @ w.t()).float(), dim=-1)  # [c,V] teacher (forward
                p_target = log_p.exp()  # of an autograd.Function: no graph is recorded)
                # KL(p ‖ q) = Σ p·(log p − log q), log q = logits − lse
                row_kl = (p_target * (log_p - logits)).sum(-1) + lse
                total += (row_kl * valid).sum()
            if need_h or need_w:
                # d(sum of losses)/d logits = softmax - target (one-hot or teacher), zero on ignored rows
                g = logits.sub_(lse[:, None]).exp_()  # in place: the logits are not needed any more
                if p_target is None:
                    g[torch.arange(b - a, device=g.device), safe_y] -= 1.0
                else:
                    g -= p_target
                g *= valid[:, None]
                g = g.to(hidden.dtype)
                if need_h:
                    grad_h[a:b] = g @ w
                if need_w:
                    if g.dtype == grad_w.dtype:
                        grad_w.addmm_(g.t(), h)  # no [V, D] temporary per chunk
                    else:
                        grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, chunk_rows: int | None = None,
                         target_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over valid targets of ``cross_entropy(hidden @ weight.T, labels)``.

    hidden [..., H], weight [V, H], labels [...] (``ignore_index`` = no target). Equal to
    ``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")`` up to fp32 rounding, in
    value and in both gradients.

    With ``target_hidden`` [..., H] (same shape as ``hidden``): the sum over rows with a valid label of
    KL(softmax(target_hidden @ weight.T) ‖ softmax(hidden @ weight.T)), the teacher held constant.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden.device, weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be ≥ 1, got {chunk_rows}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {y.shape[0]} labels")
    t = None
    if target_hidden is not None:
        if target_hidden.shape != hidden.shape:
            raise ValueError(f"target_hidden {tuple(target_hidden.shape)} must match hidden {tuple(hidden.shape)}")
        t = target_hidden.detach().reshape(-1, hidden.shape[-1]).to(h.dtype)
    if weight.dtype != h.dtype:  # autocast: bf16 activations, fp32 master weight
        weight = weight.to(h.dtype)
    return _LinearCrossEntropy.apply(h, weight, y, ignore_index, chunk_rows, t)
