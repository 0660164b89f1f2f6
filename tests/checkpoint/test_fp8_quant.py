"""FP8 block quantisation numerics: error bounds (random, heavy-tailed and trained weights), partial blocks,
dynamic activation quantisation, the block-scaled GEMM definition and FP8Linear/FP8Experts fallbacks."""

import math

import pytest
import torch
import torch.nn.functional as F

from glm5.checkpoint.fp8 import (BLOCK, FP8_DTYPE, FP8_MAX, dequantize_act, dequantize_block, fake_quant_act,
                                 fp8_block_matmul_reference, is_fp8_quantizable, quantize_act, quantize_block,
                                 scale_shape)
from glm5.model.fp8_linear import FP8Experts, FP8Linear, set_fp8_mode
from fp8_oracle import E4M3_MAX, e4m3_grid, e4m3_round  # tests/fp8_oracle.py (tests/ is on sys.path)

# e4m3: 3 mantissa bits -> round-to-nearest error ≤ 2^-4 relative for normals; subnormal spacing 2^-9
# (absolute, in units of the block scale) -> ≤ 2^-10·scale for the smallest values.
REL = 2.0 ** -4
SUB = 2.0 ** -10


def block_scale_of_each_element(s: torch.Tensor, shape) -> torch.Tensor:
    out_f, in_f = shape
    return s.repeat_interleave(BLOCK, 0)[:out_f].repeat_interleave(BLOCK, 1)[:, :in_f]


def check_bounds(w: torch.Tensor):
    q, s = quantize_block(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert tuple(s.shape) == (math.ceil(w.shape[0] / BLOCK), math.ceil(w.shape[1] / BLOCK))
    d = dequantize_block(q, s)
    wf = w.float()
    err = (d - wf).abs()
    bound = REL * wf.abs() + SUB * block_scale_of_each_element(s, w.shape) + 1e-7 * wf.abs().max()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    # each block's largest element maps to ±448 exactly (the scale uses the full e4m3 range)
    qa = q.float().abs()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = qa[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            if blk.numel():
                assert blk.max().item() == FP8_MAX or wf[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].abs().max() == 0
    return (d - wf).norm().item() / wf.norm().item()


@pytest.mark.parametrize("shape", [(256, 512), (576, 300), (127, 129), (1, 1), (130, 7), (224, 32)])
def test_fp8_roundtrip_error_bound_random(shape):
    g = torch.Generator().manual_seed(sum(shape))
    rel = check_bounds(torch.randn(shape, generator=g) * 0.02)
    assert rel < 0.04  # ~2.6% rms for Gaussian weights


def test_fp8_roundtrip_heavy_tails_outliers_and_bf16_input():
    g = torch.Generator().manual_seed(1)
    t = torch.distributions.StudentT(torch.tensor(3.0)).sample((384, 256)) * 0.01
    t[5] *= 50.0  # an outlier row, as trained projections have
    t[:, 17] *= 30.0  # and an outlier column
    check_bounds(t)
    check_bounds(t.to(torch.bfloat16))
    # an all-zero block quantises to exact zeros with a finite scale
    z = torch.randn(256, 256, generator=g)
    z[:128, :128] = 0
    q, s = quantize_block(z)
    assert torch.isfinite(s).all() and (dequantize_block(q, s)[:128, :128] == 0).all()


def test_fp8_roundtrip_trained_weights():
    """Weights of a small byte-level LM actually trained (Adam, 100 steps) on English text."""
    torch.manual_seed(0)
    text = ("When in the course of human events it becomes necessary for one people to dissolve the political "
            "bands which have connected them with another, and to assume among the powers of the earth the "
            "separate and equal station to which the laws of nature entitle them. ").encode() * 8
    data = torch.tensor(list(text))
    ctx, hid = 8, 192
    net = torch.nn.Sequential(torch.nn.Embedding(256, 32), torch.nn.Flatten(), torch.nn.Linear(ctx * 32, hid),
                              torch.nn.GELU(), torch.nn.Linear(hid, 300), torch.nn.GELU(), torch.nn.Linear(300, 256))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    idx = torch.arange(len(data) - ctx - 1)
    X = torch.stack([data[i:i + ctx] for i in idx])
    Y = data[idx + ctx]
    first = None
    for step in range(100):
        b = torch.randint(0, len(X), (64,))
        loss = F.cross_entropy(net(X[b]), Y[b])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first  # it did learn something
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    for lin in linears:
        rel = check_bounds(lin.weight.detach())
        assert rel < 0.05
    # the quantised network predicts (nearly) the same distribution
    with torch.no_grad():
        ref = net(X[:512]).log_softmax(-1)
        for i, m in enumerate(net):
            if isinstance(m, torch.nn.Linear):
                net[i] = FP8Linear.from_linear(m)
        got = net(X[:512]).log_softmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert kl < 5e-3 and top1 > 0.97, (kl, top1)


def test_fp8_partial_blocks_follow_the_definition():
    """W[i,j] = fp8[i,j] · scale_inv[i//128, j//128], including the ragged last block row/column."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(576, 200, generator=g)  # 576 = 4.5 blocks (kv_a_proj_with_mqa), 200 = 1.56 blocks
    q, s = quantize_block(w)
    assert tuple(s.shape) == (5, 2) == scale_shape((576, 200))
    d = dequantize_block(q, s)
    for i in [0, 127, 128, 511, 512, 575]:
        for j in [0, 127, 128, 199]:
            assert d[i, j].item() == (q[i, j].float() * s[i // 128, j // 128]).item()
    # the partial edge block's scale comes from its real elements only
    assert s[4, 1].item() == pytest.approx(w[512:, 128:].abs().max().item() / FP8_MAX, rel=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        dequantize_block(q, s[:4])
    # stacked matrices (fused experts) are independent
    ws = torch.randn(3, 200, 130, generator=g)
    qs, ss = quantize_block(ws)
    assert tuple(ss.shape) == (3, 2, 2)
    for e in range(3):
        q1, s1 = quantize_block(ws[e])
        assert torch.equal(qs[e].view(torch.uint8), q1.view(torch.uint8)) and torch.equal(ss[e], s1)
    assert torch.equal(dequantize_block(qs, ss)[1], dequantize_block(qs[1], ss[1]))


def test_fp8_activation_quant_and_block_gemm_definition():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 300, generator=g) * 3
    q, s = quantize_act(x)
    assert q.dtype == FP8_DTYPE and s.shape == (5, 7, 3)
    d = dequantize_act(q, s)
    assert bool(((d - x).abs() <= REL * x.abs() + SUB * s.repeat_interleave(BLOCK, -1)[..., :300] + 1e-7).all())
    assert torch.equal(fake_quant_act(x), d)
    # block-scaled GEMM (fp32 accumulation over K blocks) == dequantise both, then matmul
    x2 = torch.randn(33, 384, generator=g)
    w = torch.randn(200, 384, generator=g) * 0.05
    xq, xs = quantize_act(x2)
    wq, ws = quantize_block(w)
    ref = fp8_block_matmul_reference(xq, xs, wq, ws)
    emu = F.linear(dequantize_act(xq, xs), dequantize_block(wq, ws))
    torch.testing.assert_close(ref, emu, rtol=1e-5, atol=1e-5)
    rel = ((ref - x2 @ w.t()).norm() / (x2 @ w.t()).norm()).item()
    assert rel < 0.06  # w8a8 error: weight (~2.6%) and activation (~2.6%) rounding combined


def test_fp8_linear_fallback_matches_linear_with_dequantised_weight():
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(300, 200, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(200, 300, generator=g) * 0.05)
    f = FP8Linear.from_linear(lin)
    assert f.weight.dtype == FP8_DTYPE and tuple(f.weight_scale_inv.shape) == (2, 3)
    x = torch.randn(2, 9, 300, generator=g)
    ref = F.linear(x, f.dequantized_weight(), lin.bias)
    torch.testing.assert_close(f(x), ref, rtol=0, atol=0)  # CPU "auto" = dequantise on the fly
    assert ((f(x) - lin(x)).norm() / lin(x).norm()).item() < 0.04
    set_fp8_mode(f, "emulate")
    torch.testing.assert_close(f(x), F.linear(fake_quant_act(x), f.dequantized_weight(), lin.bias))
    # bf16 activations: weights are dequantised to bf16, FP8 storage never changes dtype
    f.mode = "dequant"
    fb = f.to(torch.bfloat16)
    assert fb.weight.dtype == FP8_DTYPE and fb.weight_scale_inv.dtype == torch.float32 and fb.bias.dtype == torch.bfloat16
    yb = fb(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, rtol=3e-2, atol=3e-2)
    assert list(f.state_dict()) == ["weight", "weight_scale_inv", "bias"]
    f.mode = "scaled_mm"  # forcing the GPU kernel on CPU tensors must fail loudly, not fall back
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
        f(x.bfloat16())


def _random_fp8_experts(n: int, seed: int):
    """n experts (hidden 160, intermediate 72: partial 128-blocks on both axes) and their FP8 copy."""
    from glm5.model.moe import Experts

    torch.manual_seed(seed)
    ex = Experts(n, 160, 72)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.05)
        ex.down_proj.normal_(0, 0.05)
    return ex, FP8Experts.from_experts(ex)


def test_fp8_experts_match_dequantised_experts():
    from glm5.model.moe import Experts

    ex, fx = _random_fp8_experts(6, seed=5)
    assert tuple(fx.gate_up_proj_scale_inv.shape) == (6, 2, 2) and tuple(fx.down_proj_scale_inv.shape) == (6, 2, 1)
    # gate and up are quantised as the separate per-expert matrices the checkpoint stores
    q, s = quantize_block(ex.gate_up_proj.detach()[2, 72:])
    assert torch.equal(fx.gate_up_proj[2, 72:].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(fx.gate_up_proj_scale_inv[2, 1:], s)
    deq = Experts(6, 160, 72)
    gu, dn = fx.dequantized()
    with torch.no_grad():
        deq.gate_up_proj.copy_(gu)
        deq.down_proj.copy_(dn)
    x = torch.randn(11, 160)
    ids = torch.tensor([[0, 3]] * 5 + [[3, 5]] * 6)  # experts 1, 2, 4 get no tokens: never dequantised
    w = torch.rand(11, 2)
    for impl in ("grouped", "reference"):
        torch.testing.assert_close(fx(x, ids, w, impl=impl), deq(x, ids, w, impl=impl), rtol=1e-5, atol=1e-6)
    assert ((fx(x, ids, w) - ex(x, ids, w)).norm() / ex(x, ids, w).norm()).item() < 0.05
    fx.mode = "emulate"
    assert ((fx(x, ids, w) - ex(x, ids, w)).norm() / ex(x, ids, w).norm()).item() < 0.08


# ------------------------------------------------------------------------------------- independent oracle
# architecture.md §4: "Scale = blockwise amax / 448 (the e4m3 max), partial blocks padded";
# "W[i,j] = W_fp8[i,j] · scale_inv[i//128, j//128]". The oracle below is written from those sentences and from the
# e4m3 bit layout alone (no glm5 helper): 128 is the format's block edge and 448 its largest finite value.
FORMAT_BLOCK = 128


def oracle_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block with explicit slices (no padding): scale = amax / 448 in fp32, value = e4m3(w / scale)."""
    out_f, in_f = w.shape
    rb, cb = math.ceil(out_f / FORMAT_BLOCK), math.ceil(in_f / FORMAT_BLOCK)
    wf = w.float()
    vals, scale = torch.empty(out_f, in_f, dtype=torch.float64), torch.empty(rb, cb)
    for i in range(rb):
        for j in range(cb):
            rows = slice(i * FORMAT_BLOCK, (i + 1) * FORMAT_BLOCK)
            cols = slice(j * FORMAT_BLOCK, (j + 1) * FORMAT_BLOCK)
            scale[i, j] = wf[rows, cols].abs().max() / E4M3_MAX
            vals[rows, cols] = e4m3_round(wf[rows, cols] / scale[i, j])
    return vals, scale


def block_graded(shape, seed: int) -> torch.Tensor:
    """Gaussian weights whose magnitude differs by a factor 2^(i·cb + j) + 1/3 from block to block, so a scale read
    from the wrong block (transposed grid, off-by-one block edge, padding in the wrong place) is far off."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    rows = torch.arange(shape[-2])[:, None] // FORMAT_BLOCK
    cols = torch.arange(shape[-1])[None, :] // FORMAT_BLOCK
    return w * (2.0 ** (rows * math.ceil(shape[-1] / FORMAT_BLOCK) + cols) + 1 / 3)


@pytest.mark.parametrize("shape", [(384, 256), (300, 200), (129, 257), (576, 130)])
def test_fp8_quantisation_equals_the_format_definition_block_by_block(shape):
    """Every scale is its own block's amax / 448 and every value the once-rounded (nearest, ties to even, saturating)
    e4m3 of w / scale: checked exactly against an oracle built from explicit block slices, on non-square block grids
    with ragged edges."""
    w = block_graded(shape, seed=shape[0])
    q, s = quantize_block(w)
    ref_vals, ref_scale = oracle_quantize(w)
    assert torch.equal(s, ref_scale)
    assert torch.equal(q.double(), ref_vals)
    # stacked matrices (fused experts): the same definition for each
    ws = torch.stack([w, w.flip(0) * 3])
    qs, ss = quantize_block(ws)
    assert torch.equal(ss[1], oracle_quantize(ws[1])[1]) and torch.equal(qs[1].double(), oracle_quantize(ws[1])[0])


def test_fp8_block_with_amax_448_has_scale_one_and_rounds_to_nearest_even():
    """With amax = 448 the scale is exactly 1, so the stored values are the weights rounded to e4m3 themselves.
    1.0625 lies midway between 1 and 1.125 (tie -> even mantissa: 1), 1.1875 midway between 1.125 and 1.25 (-> 1.25);
    1.0625 + 2^-10 is just above the midpoint (-> 1.125) but an intermediate bfloat16 (7 mantissa bits) would first
    round it to 1.0625 and then to 1 (double rounding). 0.01 is below e4m3's normal range: subnormal 5 · 2^-9."""
    values = torch.tensor([448.0, 1.0625, 1.1875, 1.0625 + 2 ** -10, -1.0625 - 2 ** -10, 0.01, -300.0, 0.0])
    expected = torch.tensor([448.0, 1.0, 1.25, 1.125, -1.125, 5 * 2.0 ** -9, -288.0, 0.0], dtype=torch.float64)
    assert torch.equal(e4m3_round(values), expected)  # the oracle agrees with the hand-worked values
    assert torch.equal(e4m3_grid(), torch.arange(0x7F, dtype=torch.uint8).view(FP8_DTYPE).double())  # and torch's
    assert e4m3_grid()[-1] == E4M3_MAX == torch.finfo(FP8_DTYPE).max
    for rows, cols in [(1, 8), (130, 140)]:  # one partial block; a ragged 2×2 grid with this row in each block
        w = torch.zeros(rows, cols)
        for r0 in range(0, rows, FORMAT_BLOCK):
            for c0 in range(0, cols, FORMAT_BLOCK):
                w[r0, c0:c0 + 8] = values[: min(8, cols - c0)]
                w[r0, c0] = 448.0
        q, s = quantize_block(w)
        assert torch.equal(s, torch.ones(math.ceil(rows / FORMAT_BLOCK), math.ceil(cols / FORMAT_BLOCK)))
        assert torch.equal(q.double()[0, 1:8], expected[1:8])
        assert torch.equal(q.double(), e4m3_round(w))


@pytest.mark.parametrize("shape", [(256, 384), (300, 130), (2, 129, 260)])
def test_fp8_dequantisation_multiplies_each_value_by_its_own_blocks_scale_inv(shape):
    """W[i,j] = W_fp8[i,j] · scale_inv[i // 128, j // 128], on hand-made fp8 values and power-of-two scales that
    differ in every block (a divided, transposed or shifted scale grid gives other numbers)."""
    g = torch.Generator().manual_seed(len(shape))
    q = torch.randint(-448, 449, shape, generator=g).float().to(FP8_DTYPE)
    *lead, out_f, in_f = shape
    rb, cb = math.ceil(out_f / FORMAT_BLOCK), math.ceil(in_f / FORMAT_BLOCK)
    s = 2.0 ** (torch.arange(math.prod(lead) * rb * cb, dtype=torch.float32) - 4).view(*lead, rb, cb)
    rows = torch.arange(out_f)[:, None] // FORMAT_BLOCK
    cols = torch.arange(in_f)[None, :] // FORMAT_BLOCK
    want = q.double() * s[..., rows, cols].double()
    assert torch.equal(dequantize_block(q, s).double(), want)
    assert torch.equal(dequantize_block(q, s, dtype=torch.bfloat16), want.to(torch.bfloat16))  # one rounding


@pytest.mark.parametrize("K", [128, 300, 7])
def test_fp8_activation_quantisation_equals_the_per_token_group_definition(K):
    """Dynamic activation scales: per token and per 128-channel group, scale = group amax / 448, values rounded once
    to e4m3 (DeepSeek act_quant); a ragged last group uses its real channels only."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(3, K, generator=g) * (2.0 ** (torch.arange(K) // FORMAT_BLOCK * 3))
    q, s = quantize_act(x)
    assert s.shape == (3, math.ceil(K / FORMAT_BLOCK))
    for t in range(3):
        for grp in range(s.shape[1]):
            cols = slice(grp * FORMAT_BLOCK, (grp + 1) * FORMAT_BLOCK)
            scale = x[t, cols].abs().max() / E4M3_MAX
            assert s[t, grp] == scale
            assert torch.equal(q[t, cols].double(), e4m3_round(x[t, cols] / scale))


def test_fp8_experts_emulate_quantises_the_inputs_of_both_expert_matmuls():
    """mode="emulate" has the w8a8 GPU numerics: the tokens entering gate/up *and* the SwiGLU output entering down_proj
    are dynamically quantised (per token, per 128 channels); checked against a token-by-token loop."""
    ex, fx = _random_fp8_experts(4, seed=7)
    fx.mode = "emulate"
    gu, dn = fx.dequantized()
    x = torch.randn(6, 160)
    ids = torch.tensor([[0, 2], [1, 2], [3, 0], [2, 1], [0, 3], [1, 0]])
    w = torch.rand(6, 2)
    want = torch.zeros(6, 160)
    for n in range(6):
        for j in range(2):
            e = ids[n, j]
            gate, up = F.linear(fake_quant_act(x[n:n + 1]), gu[e]).chunk(2, dim=-1)
            want[n] += w[n, j] * F.linear(fake_quant_act(F.silu(gate) * up), dn[e])[0]
    for impl in ("grouped", "reference"):
        torch.testing.assert_close(fx(x, ids, w, impl=impl), want, rtol=1e-5, atol=1e-6)


OFFICIAL_KEYS = {  # architecture.md §3.1, one layer of each kind; True = FP8 in GLM-5-FP8
    "model.embed_tokens.weight": False, "model.norm.weight": False, "lm_head.weight": False,
    "model.layers.5.input_layernorm.weight": False, "model.layers.5.post_attention_layernorm.weight": False,
    "model.layers.5.self_attn.q_a_proj.weight": True, "model.layers.5.self_attn.q_a_layernorm.weight": False,
    "model.layers.5.self_attn.q_b_proj.weight": True, "model.layers.5.self_attn.kv_a_proj_with_mqa.weight": True,
    "model.layers.5.self_attn.kv_a_layernorm.weight": False, "model.layers.5.self_attn.kv_b_proj.weight": True,
    "model.layers.5.self_attn.o_proj.weight": True, "model.layers.5.self_attn.indexer.wq_b.weight": True,
    "model.layers.5.self_attn.indexer.wk.weight": True, "model.layers.5.self_attn.indexer.k_norm.weight": False,
    "model.layers.5.self_attn.indexer.k_norm.bias": False,
    "model.layers.5.self_attn.indexer.weights_proj.weight": False,
    "model.layers.1.mlp.gate_proj.weight": True, "model.layers.1.mlp.up_proj.weight": True,
    "model.layers.1.mlp.down_proj.weight": True, "model.layers.5.mlp.gate.weight": False,
    "model.layers.5.mlp.gate.e_score_correction_bias": False,
    "model.layers.5.mlp.experts.255.gate_proj.weight": True, "model.layers.5.mlp.experts.0.up_proj.weight": True,
    "model.layers.5.mlp.experts.7.down_proj.weight": True, "model.layers.5.mlp.shared_experts.gate_proj.weight": True,
    "model.layers.5.mlp.shared_experts.down_proj.weight": True,
    "model.layers.78.enorm.weight": False, "model.layers.78.hnorm.weight": False,
    "model.layers.78.eh_proj.weight": False, "model.layers.78.shared_head.norm.weight": False,
    "model.layers.78.self_attn.q_a_proj.weight": True, "model.layers.78.mlp.experts.3.down_proj.weight": True,
}


def test_fp8_quantizable_rule_matches_official_layout():
    for key, fp8 in OFFICIAL_KEYS.items():
        assert is_fp8_quantizable(key, (2, 2) if key.endswith("weight") else (2,)) == fp8, key
    # only 2-D Linear weights are FP8: a 1-D or a stacked 3-D tensor never is, whatever its name says
    for shape in [(128,), (4, 128, 128)]:
        assert not is_fp8_quantizable("model.layers.5.self_attn.q_a_proj.weight", shape)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_scaled_mm_matches_emulation_on_gpu():
    """On sm90 the block-scaled torch._scaled_mm path must equal the emulated w8a8 numerics (fp32 accumulation,
    bf16 output); elsewhere "auto" must silently fall back to dequantise-and-matmul."""
    from glm5.model.fp8_linear import scaled_mm_available

    g = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(1024, 768, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(768, 1024, generator=g) * 0.05)
    f = FP8Linear.from_linear(lin).cuda()
    for M in (1, 5, 64, 300):
        x = torch.randn(M, 1024, generator=g).cuda().bfloat16()
        f.mode = "emulate"
        ref = f(x.float())
        f.mode = "auto"
        got = f(x)
        assert got.dtype == torch.bfloat16
        rel = ((got.float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, (M, rel)
    if scaled_mm_available("cuda"):
        f.mode = "scaled_mm"
        f(torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16))
