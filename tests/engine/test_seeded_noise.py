"""Position-keyed noise for seeded sampled requests: the race is an exact sample, the (seed, position) keys do not
collide, and a seeded request's tokens are a function of (prompt, params, seed) only: the same with speculation off,
on (1 or 3 drafts, both draft modes), paused for large batches, under preemption and whatever else is in the batch."""

from dataclasses import replace

import pytest
import torch

from glm5.engine import LLM, SamplingParams
from glm5.engine.sampler import _GAMMA, _mix64, exponential_noise, noise_key, race_tokens

from .conftest import prompts, ref_greedy

# ------------------------------------------------------------------------------------------ unit level


def test_noise_keys_differ_across_seeds_and_positions():
    """No two (seed, position) pairs of a grid share a key; in particular (s, j) and (s + 1, j - 1), which an additive
    mix would merge (completion i + 1 of an n > 1 request uses seed + 1). Large and negative seeds are taken mod 2^64."""
    keys = {(s, j): noise_key(s, j) for s in range(64) for j in range(64)}
    assert len(set(keys.values())) == len(keys)
    assert all(keys[s, j] != keys[s + 1, j - 1] for s in range(63) for j in range(1, 64))
    assert noise_key(-1, 5) == noise_key(2**64 - 1, 5) != noise_key(2**63, 5)
    assert len({noise_key(2**40 + s, 0) for s in range(1000)}) == 1000


def test_noise_matches_splitmix64_and_is_exponential():
    """The torch stream (wrapping int64 arithmetic) equals SplitMix64 computed with Python ints, element by element;
    the values are Exp(1) (mean and variance 1)."""
    keys = [noise_key(7, 3), noise_key(2**63 + 5, 0), 0]
    E = exponential_noise(keys, 1000, "cpu")
    for r, k in enumerate(keys):
        for v in (0, 1, 2, 517, 999):
            u = ((_mix64(k + (v + 1) * _GAMMA) >> 11) + 0.5) * 2.0 ** -53
            assert E[r, v].item() == -torch.log(torch.tensor(u, dtype=torch.float64)).item()
    big = exponential_noise([noise_key(1, j) for j in range(50)], 2000, "cpu")
    assert (big > 0).all() and torch.isfinite(big).all()
    assert abs(big.mean().item() - 1) < 0.01 and abs(big.var().item() - 1) < 0.03


def test_race_is_an_exact_sample():
    """argmax(p / E) over many seeds (one position), and over many positions (one seed): the empirical frequencies
    match p (chi-square with 4 degrees of freedom below 18.5, p-value 0.001; total variation below 0.01), and a
    zero-probability token never wins. Deterministic: the noise is a function of the seeds."""
    p = torch.tensor([0.40, 0.25, 0.0, 0.20, 0.10, 0.05])
    N = 40000
    for seeds, positions in (([*range(N)], [11] * N), ([123] * N, [*range(N)])):
        toks = torch.tensor(race_tokens(p.expand(N, -1), seeds, positions))
        freq = torch.bincount(toks, minlength=6).double()
        assert freq[2] == 0
        nz = p > 0
        expected = N * p.double()[nz]
        chi2 = (((freq[nz] - expected) ** 2) / expected).sum().item()
        assert chi2 < 18.5, chi2
        assert 0.5 * (freq / N - p.double()).abs().sum().item() < 0.01


def test_race_couples_drafts_with_the_target():
    """The same noise over a draft distribution q and the target p: the two winners agree with probability between
    the coupling bound (1 - TV) / (1 + TV) and the maximal coupling's 1 - TV, rejection sampling's acceptance."""
    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
    q = torch.tensor([0.30, 0.30, 0.10, 0.15, 0.10, 0.05])
    tv = 0.5 * (p - q).abs().sum().item()
    N = 20000
    a = torch.tensor(race_tokens(p.expand(N, -1), [*range(N)], [0] * N))
    b = torch.tensor(race_tokens(q.expand(N, -1), [*range(N)], [0] * N))
    agree = (a == b).double().mean().item()
    assert (1 - tv) / (1 + tv) - 0.01 < agree < 1 - tv + 0.01, (agree, tv)


# ------------------------------------------------------------------------------------------ engine level
N_TOK = 10
PS = prompts([9, 17, 5, 23], seed=40)
SEEDED = [SamplingParams(temperature=0.8, seed=5, max_tokens=N_TOK, ignore_eos=True),
          SamplingParams(temperature=1.0, top_p=0.9, seed=6, n=2, max_tokens=N_TOK, ignore_eos=True),
          SamplingParams(temperature=1.2, top_k=20, seed=2**40 + 7, max_tokens=N_TOK, ignore_eos=True),
          SamplingParams(temperature=0.9, top_p=0.8, top_k=50, min_p=0.01, seed=0, max_tokens=N_TOK, ignore_eos=True)]


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def plain_tokens(nano):
    return tokens(LLM(nano, block_size=4).generate(PS, SEEDED, use_tqdm=False))


@pytest.mark.parametrize("k,mode", [(1, "chain"), (3, "chain"), (3, "recursive")])
def test_seeded_tokens_do_not_depend_on_speculation(nano, plain_tokens, k, mode):
    llm = LLM(nano, block_size=4, num_speculative_tokens=k, mtp_draft_mode=mode)
    assert tokens(llm.generate(PS, SEEDED, use_tqdm=False)) == plain_tokens
    m = llm.spec_metrics()
    assert m["verify_steps"] > 0 and m["accepted_tokens"] > 0  # (coupled random-init drafts: ~15% accepted)


def test_seeded_tokens_with_drafting_paused_for_large_batches(nano, plain_tokens):
    """spec_disable_batch_size=1 now pauses seeded sampled requests too: while several run there are no drafts, and
    drafting resumes for the last one; the tokens are the plain ones."""
    llm = LLM(nano, block_size=4, num_speculative_tokens=3, spec_disable_batch_size=1)
    lens = [4, 6, 8, N_TOK]  # the batch shrinks to one sequence: drafting resumes
    sps = [replace(sp, max_tokens=n) for sp, n in zip(SEEDED, lens)]
    got = tokens(llm.generate(PS, sps, use_tqdm=False))
    assert got == [[t[:n] for t in ts] for ts, n in zip(plain_tokens, lens)]
    m = llm.spec_metrics()
    assert m["paused_steps"] > 0 and m["verify_steps"] > 0


def test_seeded_tokens_do_not_depend_on_batch_mates_or_preemption(nano, plain_tokens):
    """Seeded requests among greedy and unseeded sampled ones, with a cache small enough to preempt and a small step
    budget (chunked prefill), speculative and paused: the seeded tokens are the plain ones, greedy ones the
    no-cache reference."""
    mates = prompts([30, 26], seed=41)
    greedy = SamplingParams(temperature=0, max_tokens=N_TOK, ignore_eos=True)
    unseeded = SamplingParams(temperature=1.0, max_tokens=N_TOK, ignore_eos=True)
    for kw in (dict(num_speculative_tokens=2), dict(num_speculative_tokens=2, spec_disable_batch_size=3),
               dict(num_speculative_tokens=0)):
        llm = LLM(nano, block_size=4, num_blocks=26, max_model_len=48, max_num_batched_tokens=16,
                  enable_prefix_caching=False, **kw)
        outs = llm.generate([mates[0], *PS, mates[1]], [greedy, *SEEDED, unseeded], use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0, kw
        assert tokens(outs[1:-1]) == plain_tokens, kw
        assert outs[0].outputs[0].token_ids == ref_greedy(nano, mates[0], N_TOK)


def test_unseeded_requests_keep_rejection_sampling(nano, monkeypatch):
    """An unseeded sampled request draws from its own stream and is verified by rejection sampling against its draft
    distributions; a seeded one keeps no draft distributions and never reaches rejection sampling."""
    import glm5.engine.spec_decode as spec_decode

    calls = []
    orig = spec_decode.rejection_sample

    def counted(target, drafts, draft_probs, gen):
        calls.append((draft_probs is not None, isinstance(gen, torch.Generator)))
        return orig(target, drafts, draft_probs, gen)

    monkeypatch.setattr(spec_decode, "rejection_sample", counted)
    llm = LLM(nano, block_size=4, num_speculative_tokens=2)
    llm.generate(PS[:1], SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert calls == []
    llm.generate(PS[:1], SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert calls and all(c == (True, True) for c in calls)
