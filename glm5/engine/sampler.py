"""The one sampler: temperature, top-k, top-p, per-request randomness, logprobs.

A sampled request's randomness is its own, so its tokens do not depend on what else is in the batch. A seeded
one (``SamplingParams.seed``) uses *position-keyed noise*: the random numbers of output position j are a hash
of (seed, j) alone, and the token is the exponential race ``argmax(probs / E)`` over them (``race_tokens``).
Its tokens are then a function of (prompt, params, seed) only, whether or not MTP drafts were verified, paused
or dropped (glm5/engine/spec_decode.py draws and verifies drafts with the same noise). An unseeded one draws
from its own ``torch.Generator`` stream (seeded from the engine's RNG), which keeps rejection sampling's maximal
draft acceptance. Greedy rows (temperature 0) take the argmax and draw nothing. The same ``probs`` processing is
used for normal sampling, for MTP drafts and for the target side of speculative verification.
"""

from __future__ import annotations

import torch

from glm5.engine.sampling_params import SamplingParams


LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


def processed_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Logits per row after temperature (not for greedy rows), top-k and top-p (masked to -inf): [M,V] -> fp32."""
    logits = logits.float()
    V = logits.shape[-1]
    dev = logits.device
    temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)
    x = logits / temp[:, None]
    top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    if any(top_k):
        k = torch.tensor([k if k else V for k in top_k], device=dev)
        kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    top_p = [p.top_p for p in params]
    if any(tp < 1.0 for tp in top_p):
        tp = torch.tensor(top_p, device=dev)
        sorted_x, order = x.sort(dim=-1, descending=True)
        sp = sorted_x.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p. The top token always stays, also
        # when top_p underflows to 0 in fp32 (e.g. 5e-324, a valid request value): then it is greedy.
        drop_sorted = (sp.cumsum(-1) - sp) >= tp[:, None]
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Sampling distribution per row after temperature, top-k and top-p: logits [M,V] -> probs [M,V] fp32.
    Greedy rows get a one-hot on the argmax."""
    probs = processed_logits(logits, params).softmax(-1)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


# ------------------------------------------------------------------ position-keyed noise (seeded requests)
# SplitMix64 (Steele et al. 2014): a 64-bit state advanced by GAMMA and finalised by MIX. Everything here is
# integer arithmetic on uint64 bits (Python ints for the per-row keys, int64 tensors with wrapping products for
# the [rows, V] streams), so the noise is the same on every device and every tensor-parallel rank.
_U64 = (1 << 64) - 1
_GAMMA, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
# rows of [R, V] noise made at once: bounds the int64 / float64 temporaries (4M elements = 32 MB each)
NOISE_CHUNK = 1 << 22


def _mix64(z: int) -> int:
    z &= _U64
    z = ((z ^ (z >> 30)) * _M1) & _U64
    z = ((z ^ (z >> 27)) * _M2) & _U64
    return z ^ (z >> 31)


def noise_key(seed: int, position: int) -> int:
    """The 64-bit key of output position ``position`` of a request seeded ``seed``:
    mix(mix(seed + GAMMA) XOR position). For one seed, distinct positions get distinct keys (XOR with the
    position and mix are bijections); across seeds the keys are unrelated 64-bit values. An additive mix
    (seed * C + position, or mix(seed + position)) would give completion i + 1 of an ``n > 1`` request (seed + 1)
    the noise of completion i shifted by one position; here (s, j) and (s + 1, j - 1) meet with chance 2^-64."""
    return _mix64(_mix64(seed + _GAMMA) ^ (position & _U64))


def _signed(x: int) -> int:
    """uint64 bits as the int64 with the same bits (what a torch int64 tensor holds)."""
    return x - (1 << 64) if x >> 63 else x


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bits (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64_t(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _signed(_M1)  # int64 products wrap modulo 2^64, as the uint64 ones
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    return z ^ _shr(z, 31)


def exponential_noise(keys: list[int], V: int, device) -> torch.Tensor:
    """E [R, V] float64, i.i.d. Exp(1): E[r, v] = -log(u) with u the top 53 bits of the (v+1)-th SplitMix64 output
    from state ``keys[r]`` (u in (0, 1): never 0 or 1, so E is finite and positive)."""
    k = torch.tensor([_signed(x) for x in keys], dtype=torch.long, device=device)[:, None]
    steps = torch.arange(1, V + 1, dtype=torch.long, device=device) * _signed(_GAMMA)  # [V], wrapping
    u = (_shr(_mix64_t(k + steps), 11).double() + 0.5) * 2.0 ** -53
    return -torch.log(u)


def race_tokens(probs: torch.Tensor, seeds: list[int], positions: list[int]) -> list[int]:
    """The exponential race (Gumbel-max, as argmax(log p + Gumbel)): row r's token is argmax(probs[r] / E) with
    E the noise of (seeds[r], positions[r]). Token v "arrives" at E_v / p_v ~ Exp(p_v), and the first of
    independent exponential arrivals is v with probability p_v / sum(p): an exact sample of probs [R, V]
    (tokens with p = 0 never win). The same noise over another distribution q (an MTP draft) gives a token that
    equals this one with high probability when q is close to p."""
    R, V = probs.shape
    step = max(1, NOISE_CHUNK // V)
    out: list[int] = []
    for a in range(0, R, step):
        keys = [noise_key(s, j) for s, j in zip(seeds[a:a + step], positions[a:a + step])]
        out += (probs[a:a + step].double() / exponential_noise(keys, V, probs.device)).argmax(-1).tolist()
    return out


def sample_rows(probs: torch.Tensor, params: list[SamplingParams], rngs: list, positions: list[int]) -> list[int]:
    """One token per row of probs [M, V]: the argmax for greedy rows; for a row whose rng is an int (a seeded
    request's seed) the race over the noise of its output position ``positions[i]``; else a draw from the row's
    ``torch.Generator`` stream."""
    out: list[int | None] = [None] * len(params)
    raced = [i for i, (p, g) in enumerate(zip(params, rngs)) if not p.greedy and isinstance(g, int)]
    if raced:
        rows = torch.tensor(raced, dtype=torch.long, device=probs.device)
        for i, t in zip(raced, race_tokens(probs[rows], [rngs[i] for i in raced], [positions[i] for i in raced])):
            out[i] = t
    for i, p in enumerate(params):
        if p.greedy:
            out[i] = int(probs[i].argmax())
        elif out[i] is None:
            out[i] = int(torch.multinomial(probs[i], 1, generator=rngs[i]))
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], num_top: list[int | None]) -> list[dict[int, float] | None]:
    """Log-probabilities of ``logits``' distribution (raw, or processed by the caller): per row the chosen token and
    the ``num_top`` most likely ones."""
    if all(n is None for n in num_top):
        return [None] * len(tokens)
    lp = torch.log_softmax(logits.float(), dim=-1)
    kmax = max(n or 0 for n in num_top)
    top = lp.topk(kmax, dim=-1) if kmax else None
    out = []
    for i, (tok, n) in enumerate(zip(tokens, num_top)):
        if n is None:
            out.append(None)
            continue
        d = {tok: float(lp[i, tok])}
        if n:
            for v, j in zip(top.values[i, :n].tolist(), top.indices[i, :n].tolist()):
                d.setdefault(j, v)
        out.append(d)
    return out


def token_ranks(logits: torch.Tensor, tokens: list[int]) -> list[int]:
    """Vocabulary rank (1 = most likely) of ``tokens[i]`` in row i: one plus the ids with a larger logit."""
    idx = torch.tensor(tokens, dtype=torch.long, device=logits.device)[:, None]
    return ((logits > logits.gather(1, idx)).sum(-1) + 1).tolist()


def apply_logits_processors(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]],
                            errors: list[str | None]) -> torch.Tensor:
    """Row i's ``params[i].logits_processors`` applied in order to ``logits[i]`` given that sequence's output ids
    so far. Returns ``logits`` itself when no row has processors, else an fp32 copy. A processor that raises or
    returns the wrong shape fails its own row only: the reason goes to ``errors[i]``."""
    rows = [i for i, p in enumerate(params) if p.logits_processors]
    if not rows:
        return logits
    out = logits.float().clone()
    for i in rows:
        row = out[i]
        try:
            for proc in params[i].logits_processors:
                row = proc(outputs[i], row)
                if not isinstance(row, torch.Tensor) or row.shape != out[i].shape:
                    raise ValueError(f"a logits processor returned "
                                     f"{tuple(row.shape) if isinstance(row, torch.Tensor) else type(row).__name__}, "
                                     f"expected a tensor of shape {tuple(out[i].shape)}")
            out[i] = row
        except Exception as e:  # a user callback must not take the other requests down
            errors[i] = f"logits processor failed: {type(e).__name__}: {e}"
    return out


# A row whose processors masked every token: the request's own constraints contradict each other (e.g. a grammar
# that must end now and min_tokens that forbids ending), so servers report it as the request's error.
NO_TOKEN_ALLOWED = ("the request's constraints exclude every token (min_tokens, logit_bias, allowed_token_ids "
                    "and structured outputs together leave nothing to sample)")


def unusable_reason(raw: torch.Tensor, processed: torch.Tensor) -> str:
    """Why a row [V] that cannot be sampled is so, given the model's logits and the processed ones."""
    if bool(unusable_rows(raw[None])):
        return "the model produced non-finite logits"
    if bool(torch.isneginf(processed).all()):
        return NO_TOKEN_ALLOWED
    return "the logits processors returned no usable logits"


def unusable_rows(x: torch.Tensor) -> torch.Tensor:
    """[M, V] logits or probabilities -> [M] bool: rows with a NaN or +inf, or with no finite entry (nothing can
    be sampled from them). -inf entries are fine (masked tokens).
    One reduction: a row's maximum is NaN if it holds a NaN (max propagates it), +inf if it holds +inf, -inf if
    nothing in it is finite, and finite otherwise (six passes over [16, 32768] took 2 ms of a 50 ms decode step)."""
    return ~torch.isfinite(x.amax(-1))


class Sampler:
    """``logprobs_mode`` (vLLM's engine option): "raw_logprobs" reports the model's own distribution;
    "processed_logprobs" the one each token was sampled from (after logits processors, temperature, top-k and
    top-p), which is what RL's importance ratios against the rollout need when the temperature is not 1."""

    def __init__(self, logprobs_mode: str = "raw_logprobs"):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode

    def logprob_source(self, raw: torch.Tensor, processed: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The logits whose log-softmax is reported: ``raw``, or ``processed`` (processors applied) after
        temperature / top-k / top-p."""
        if self.logprobs_mode == "raw_logprobs" or all(p.logprobs is None for p in params):
            return raw
        return processed_logits(processed, params)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], rngs: list, outputs: list[list[int]]):
        """logits [M,V] -> (tokens list[int | None], logprobs list[dict | None], errors list[str | None]).

        ``rngs[i]``: row i's randomness (see ``sample_rows``: a seed, a ``torch.Generator``, None for greedy rows).
        ``outputs`` (each row's output ids so far) is what logits processors see, and its length the output
        position a seeded row's noise is keyed by; logprobs follow ``logprobs_mode``. A row that cannot be sampled
        (non-finite logits from the model, a failing logits processor, a distribution that is all zeros or NaN
        after temperature/top-k/top-p) gets token None and its reason in ``errors``, so that one bad request
        fails alone instead of stopping the engine."""
        M = logits.shape[0]
        errors: list[str | None] = [None] * M
        raw = logits
        logits = apply_logits_processors(logits, params, outputs, errors)
        for i in unusable_rows(logits).nonzero().flatten().tolist():
            errors[i] = errors[i] or unusable_reason(raw[i], logits[i])
        tokens: list[int | None] = [None] * M
        ok = [i for i in range(M) if errors[i] is None]
        if ok:
            sub = logits[ok] if len(ok) < M else logits
            sub_params = [params[i] for i in ok]
            if all(p.greedy for p in sub_params):
                for i, t in zip(ok, sub.argmax(-1).tolist()):
                    tokens[i] = t
            else:
                probs = processed_probs(sub, sub_params)
                bad = (unusable_rows(probs) | (probs.sum(-1) <= 0)).tolist()
                for j, i in enumerate(ok):
                    if bad[j]:
                        errors[i] = "the sampling distribution is not finite (check temperature/top_p/top_k)"
                good = [j for j in range(len(ok)) if not bad[j]]
                if good:
                    rows = torch.tensor(good, dtype=torch.long, device=probs.device)
                    picked = sample_rows(probs[rows], [sub_params[j] for j in good], [rngs[ok[j]] for j in good],
                                         [len(outputs[ok[j]]) for j in good])
                    for j, t in zip(good, picked):
                        tokens[ok[j]] = t
        src = self.logprob_source(raw, logits, params)
        lps = token_logprobs(src, [t if t is not None else 0 for t in tokens], [p.logprobs for p in params])
        return tokens, [lp if t is not None else None for t, lp in zip(tokens, lps)], errors
