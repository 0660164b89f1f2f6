"""The logits processors behind SamplingParams' ``logit_bias``, presence / frequency / repetition penalties,
``min_p``, ``allowed_token_ids`` and ``bad_words`` (vLLM's fields), and banning ids (the server's ``tool_choice: "none"`` bans
``<tool_call>``). Each has the engine's signature ``(output_token_ids, logits[V]) -> logits[V]``; the engine
builds them per request (:func:`request_processors`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from glm5.engine.sampling_params import LogitsProcessor

NEG_INF = float("-inf")


def request_processors(params) -> list[LogitsProcessor]:
    """The processors a SamplingParams' penalty / bias / min_p / allowed-ids fields ask for, in vLLM's order
    (penalties and bias on the logits, then the allowed set, then min_p on the tempered distribution)."""
    procs = []
    p = bias_processor(params.logit_bias, params.presence_penalty, params.frequency_penalty, params.repetition_penalty)
    if p is not None:
        procs.append(p)
    if params.allowed_token_ids is not None:
        procs.append(allow_only(params.allowed_token_ids))
    if params.min_p > 0:
        procs.append(min_p_processor(params.min_p, params.temperature))
    return procs


def bad_words_processor(sequences: Sequence[Sequence[int]]) -> LogitsProcessor:
    """vLLM's ``bad_words`` on token sequences: a sequence's last token is banned whenever the generated tokens end
    with the rest of it (one-token sequences always)."""
    always = sorted({int(s[-1]) for s in sequences if len(s) == 1})
    after = [(tuple(int(t) for t in s[:-1]), int(s[-1])) for s in sequences if len(s) > 1]

    def proc(output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        ban = always + [last for prefix, last in after
                        if len(output_ids) >= len(prefix) and tuple(output_ids[len(output_ids) - len(prefix):]) == prefix]
        if not ban:
            return logits
        logits = logits.clone()
        logits[..., [i for i in ban if i < logits.shape[-1]]] = NEG_INF
        return logits

    return proc


def bad_word_sequences(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Token sequences of each word as written (leading space removed) and with one leading space: a BPE vocabulary
    spells a word differently at the start of the text and after a space."""
    out: list[list[int]] = []
    for w in words:
        for text in (w.lstrip(), " " + w.lstrip()):
            ids = tokenizer.encode(text)
            if ids and ids not in out:
                out.append(ids)
    return out


def allow_only(token_ids: Sequence[int]) -> LogitsProcessor:
    keep = sorted({int(i) for i in token_ids})

    def proc(_output_ids, logits: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([i for i in keep if i < logits.shape[-1]], dtype=torch.long, device=logits.device)
        out = torch.full_like(logits, NEG_INF)
        out[..., idx] = logits[..., idx]
        return out

    return proc


def ban_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
    ids = [int(i) for i in token_ids]

    def proc(_output_ids, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., [i for i in ids if i < logits.shape[-1]]] = NEG_INF
        return logits

    return proc


def bias_processor(bias: Mapping[int, float] | None, presence: float = 0.0, frequency: float = 0.0,
                   repetition: float = 1.0) -> LogitsProcessor | None:
    """OpenAI ``logit_bias``, ``presence_penalty``, ``frequency_penalty`` and vLLM's ``repetition_penalty``
    (over the generated tokens)."""
    if not bias and presence == 0.0 and frequency == 0.0 and repetition == 1.0:
        return None
    bias = {int(k): float(v) for k, v in (bias or {}).items()}

    def proc(output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone().float()
        V = logits.shape[-1]
        for t, v in bias.items():
            if t < V:
                logits[..., t] += v
        if output_ids and (presence or frequency or repetition != 1.0):
            ids = torch.tensor([t for t in output_ids if t < V], dtype=torch.long, device=logits.device)
            counts = torch.bincount(ids, minlength=V).to(logits.dtype)
            seen = counts > 0
            if repetition != 1.0:
                logits = torch.where(seen & (logits > 0), logits / repetition, logits)
                logits = torch.where(seen & (logits <= 0), logits * repetition, logits)
            logits = logits - frequency * counts - presence * seen.to(logits.dtype)
        return logits

    return proc


def min_p_processor(min_p: float, temperature: float) -> LogitsProcessor:
    t = max(temperature, 1e-5)
    cut = math.log(min_p)

    def proc(_ids, logits):
        keep = (logits - logits.max()) / t >= cut
        return logits.masked_fill(~keep, float("-inf"))

    return proc
