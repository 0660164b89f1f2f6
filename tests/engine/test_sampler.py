"""The sampler's distributions: temperature / top-k / top-p against direct definitions, edge values included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5.engine.sampler import processed_probs, unusable_rows
from glm5.engine.sampling_params import SamplingParams


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference: the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    p = logits.double().softmax(-1)
    order = p.argsort(descending=True)
    keep, mass = [], 0.0
    for j in order.tolist():
        keep.append(j)
        mass += float(p[j])
        if mass >= top_p:
            break
    out = torch.zeros_like(p)
    out[keep] = p[keep] / p[keep].sum()
    return out.float()


@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.5, 0.1])
def test_top_p_matches_the_nucleus_definition(top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=top_p)] * 4)
    for i in range(4):
        torch.testing.assert_close(probs[i], _nucleus(logits[i], top_p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-12])
def test_a_vanishing_top_p_keeps_the_top_token(top_p):
    # 5e-324 is a valid request value that becomes 0.0 in fp32; it must mean "most likely token", not "none"
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    probs = processed_probs(logits, [SamplingParams(temperature=0.7, top_p=top_p)])
    assert torch.isfinite(probs).all()
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_top_k_and_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs = processed_probs(logits, [SamplingParams(temperature=2.0, top_k=2)])
    expect = torch.zeros(4)
    expect[[1, 2]] = torch.tensor([1.5, 1.0]).softmax(-1)
    torch.testing.assert_close(probs[0], expect)


def test_logprobs_modes_report_the_raw_or_the_sampled_distribution():
    from glm5.engine.sampler import Sampler

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=g) * 2
    params = [SamplingParams(temperature=0.6, logprobs=2, seed=0), SamplingParams(temperature=1.3, top_k=5, logprobs=0),
              SamplingParams(temperature=0, logprobs=1)]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    raw_toks, raw_lps, _ = Sampler("raw_logprobs")(logits, params, gens, [[], [], []])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    toks, lps, _ = Sampler("processed_logprobs")(logits, params, gens, [[], [], []])
    assert toks == raw_toks  # the mode changes what is reported, not what is sampled
    raw = logits.log_softmax(-1)
    for i, t in enumerate(toks):
        assert raw_lps[i][t] == pytest.approx(float(raw[i, t]), abs=1e-5)
    # processed: the tempered (and top-k-truncated) distribution the token was drawn from
    assert lps[0][toks[0]] == pytest.approx(float((logits[0] / 0.6).log_softmax(-1)[toks[0]]), abs=1e-5)
    x = logits[1] / 1.3
    x = x.masked_fill(x < x.topk(5).values[-1], float("-inf"))
    assert lps[1][toks[1]] == pytest.approx(float(x.log_softmax(-1)[toks[1]]), abs=1e-5)
    assert lps[2] == raw_lps[2]  # greedy: no temperature to apply
    with pytest.raises(ValueError, match="logprobs_mode"):
        Sampler("processed_logits")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, -1.5, 2.0, 1e30, -1e30, float("nan"), float("inf"), float("-inf")]),
                         min_size=1, max_size=40), min_size=1, max_size=6).filter(lambda r: len({len(x) for x in r}) == 1))
def test_unusable_rows_are_those_with_nan_or_posinf_or_nothing_finite(rows):
    x = torch.tensor(rows)
    want = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | ~torch.isfinite(x).any(-1)
    assert torch.equal(unusable_rows(x), want)
    for n, fill in ((17, 0.0), (1000, 0.0), (1000, float("-inf"))):  # vectorised reductions: deep inside long rows
        wide = torch.full((x.shape[0], n), fill).index_copy_(1, torch.arange(x.shape[1]) * (n // x.shape[1]), x)
        want = torch.isnan(wide).any(-1) | torch.isposinf(wide).any(-1) | ~torch.isfinite(wide).any(-1)
        assert torch.equal(unusable_rows(wide), want)
