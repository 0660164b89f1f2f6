"""The fused, chunked LM head + cross-entropy equals the unfused one in value and in both gradients."""

import pytest
import torch
import torch.nn.functional as F

from glm5.train.linear_ce import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_unfused_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    B, S, H, V = 3, 11, 16, 50
    h = torch.randn(B, S, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, S), generator=g)
    y[0, :4] = -100  # ignored targets (prompt / padding)
    y[2, -1] = -100
    ref = F.cross_entropy(F.linear(h, W).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    (rh, rw) = torch.autograd.grad(ref * 0.37, (h, W))
    out = linear_cross_entropy(h, W, y, chunk_rows=chunk)
    (gh, gw) = torch.autograd.grad(out * 0.37, (h, W))  # an incoming gradient ≠ 1 scales both
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)  # logits are accumulated in fp32
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    assert gh[0, :4].abs().max() == 0  # ignored rows get no gradient


def test_only_requested_gradients_and_bad_input():
    h = torch.randn(5, 4)
    W = torch.randn(9, 4, requires_grad=True)
    y = torch.tensor([1, 2, -100, 3, 8])
    out = linear_cross_entropy(h, W, y, chunk_rows=2)
    out.backward()
    ref = F.cross_entropy(h @ W.detach().t(), y, reduction="sum")
    torch.testing.assert_close(out, ref)
    assert W.grad is not None and h.grad is None
    with torch.no_grad():  # evaluation: a value, no gradient work
        torch.testing.assert_close(linear_cross_entropy(h, W, y), ref)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, W, y[:3])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, W, y, chunk_rows=0)
    assert float(linear_cross_entropy(h, W, torch.full((5,), -100)).detach()) == 0.0  # nothing to predict
