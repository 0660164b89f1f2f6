"""The fused, chunked LM head + cross-entropy equals the unfused one in value and in both gradients."""

import pytest
import torch
import torch.nn.functional as F

from glm5.train.linear_ce import DEFAULT_CHUNK_ROWS, default_chunk_rows, linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, None])
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


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_soft_targets_give_the_kl_to_a_constant_teacher(chunk):
    """With ``target_hidden`` the loss is KL(softmax(t·Wᵀ) ‖ softmax(h·Wᵀ)) over rows with a label, and the
    gradients are those of that KL with the teacher detached (nothing flows into t, nor into W through t)."""
    g = torch.Generator().manual_seed(1)
    B, S, H, V = 2, 9, 8, 40
    h = torch.randn(B, S, H, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, S, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, S), generator=g)
    y[1, -3:] = -100
    valid = (y != -100).flatten()
    log_q = F.log_softmax(F.linear(h, W).flatten(0, 1), -1)[valid]
    log_p = F.log_softmax(F.linear(t, W.detach()).detach().flatten(0, 1), -1)[valid]
    ref = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    rh, rw = torch.autograd.grad(ref * 1.7, (h, W))
    out = linear_cross_entropy(h, W, y, chunk_rows=chunk, target_hidden=t)
    gh, gw = torch.autograd.grad(out * 1.7, (h, W))
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    assert gh[1, -3:].abs().max() == 0
    # A student equal to its teacher has zero loss (up to the fp32 logits).
    same = linear_cross_entropy(t.detach(), W.detach(), y, target_hidden=t)
    assert abs(float(same)) < 1e-4
    with pytest.raises(ValueError, match="target_hidden"):
        linear_cross_entropy(h, W, y, target_hidden=t[:, :3])


def test_default_chunk_is_cache_sized_on_cpu_and_large_on_a_gpu():
    # CPU: small blocks that stay in cache; GPU: ~256 MiB of fp32 logits per chunk (fewer, larger launches)
    assert default_chunk_rows(torch.device("cpu"), 32768) == DEFAULT_CHUNK_ROWS
    assert default_chunk_rows(torch.device("cuda"), 32768) == 2048
    assert default_chunk_rows(torch.device("cuda"), 154880) == 433
    assert default_chunk_rows(torch.device("cuda"), 10**7) == DEFAULT_CHUNK_ROWS  # never below the CPU size
