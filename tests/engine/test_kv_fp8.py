"""The FP8 KV cache (kv_cache_dtype="fp8"): byte layouts, quantisation error, and the engine reading what it wrote.

* The stored bytes are decoded here independently (e4m3 from its bit fields, the scales and bf16 rope from
  their offsets), so the layout is FlashMLA's 656-byte "fp8_ds_mla" row and the 132-byte indexer row.
* The engine with an FP8 cache equals, bit for bit, the engine with an fp32 cache into which every write
  stores the same quantise-then-dequantise round trip: the FP8 store, its gathers, the CPU decoding table and
  the indexer's Hadamard rotation change nothing but the rounding they are meant to.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5 import preset
from glm5.config import GLM5Config
from glm5.engine import LLM, SamplingParams
from glm5.engine.kv_cache import PagedCacheView, bytes_per_block
from glm5.engine.kv_quant import FP8, Fp8Rows, cache_bytes_per_token, quantize_tiles, resolve_kv_cache_dtype, row_bytes
from fp8_oracle import e4m3_round  # tests/fp8_oracle.py (tests/ is on sys.path)

from .conftest import make_model, prompts


def _e4m3(b: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes -> float64, from the bit fields (1 sign, 4 exponent with bias 7, 3 mantissa)."""
    b = b.astype(np.int64)
    sign = np.where(b >> 7, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 7
    return sign * np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))


def _bf16(b: np.ndarray) -> np.ndarray:
    """little-endian bfloat16 bytes [..., 2k] -> float64 [..., k] (the top half of a float32)."""
    u16 = b.reshape(*b.shape[:-1], -1, 2).astype(np.uint32)
    return ((u16[..., 0] | (u16[..., 1] << 8)) << 16).view(np.float32).astype(np.float64)


def test_glm5_rows_are_656_and_132_bytes_and_the_cache_shrinks_accordingly():
    cfg = GLM5Config()  # GLM-5's own widths: kv_lora 512, rope 64, indexer 128
    assert row_bytes(cfg.kv_lora_rank, cfg.qk_rope_head_dim) == 656
    assert row_bytes(cfg.index_head_dim) == 132
    assert cache_bytes_per_token(512, 64, 128, "fp8", torch.bfloat16) == (656, 132)
    assert cache_bytes_per_token(512, 64, 128, "auto", torch.bfloat16) == (1152, 256)
    L = cfg.num_hidden_layers
    fp8, bf16 = (bytes_per_block(cfg, 64, L, torch.bfloat16, d) for d in ("fp8", "auto"))
    assert fp8 == 64 * L * (656 + 132) and bf16 / fp8 == pytest.approx(1408 / 788)
    assert [resolve_kv_cache_dtype(n) for n in ("auto", "fp8", "fp8_e4m3", "fp8_ds_mla")] == \
        ["auto"] + ["fp8_ds_mla"] * 3
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_cache_dtype("int8")


@pytest.mark.parametrize("dim, rope", [(512, 64), (32, 8)])
def test_stored_bytes_decode_independently_to_the_rounded_values(dim, rope):
    g = torch.Generator().manual_seed(0)
    n = 37
    x = torch.randn(n, dim, generator=g) * torch.logspace(-3, 2, n)[:, None]  # rows of very different scales
    x[3] = 0.0  # an all-zero tile
    x[5, 7] = 900.0  # an outlier: its tile's scale follows it
    pe = torch.randn(n, rope, generator=g)
    store = Fp8Rows(64, dim, rope, torch.float32, "cpu")
    slots = torch.randperm(64, generator=g)[:n]
    store.write(slots, x, pe)
    raw = store.data[slots].numpy()
    t = dim // 128 if dim % 128 == 0 else 1
    assert raw.shape[1] == dim + 4 * t + 2 * rope
    scales = raw[:, dim:dim + 4 * t].copy().view(np.float32).astype(np.float64)  # [n,t]
    tile = dim // t
    amax = x.double().abs().view(n, t, tile).amax(-1).numpy()
    assert np.allclose(scales, np.maximum(amax / 448, 1e-30), rtol=1e-6)  # scale = amax / 448 per tile
    vals = (_e4m3(raw[:, :dim]).reshape(n, t, tile) * scales[..., None]).reshape(n, dim)
    rope_vals = _bf16(raw[:, dim + 4 * t:])
    assert np.array_equal(rope_vals, pe.to(torch.bfloat16).double().numpy())
    # e4m3 keeps 3 mantissa bits: error <= 2^-4 relative, or half the subnormal step (2^-10 · scale) near zero
    err = np.abs(vals - x.double().numpy())
    bound = np.maximum(np.abs(x.double().numpy()) * 2.0 ** -4, np.repeat(scales, tile, axis=1) * 2.0 ** -10)
    assert (err <= bound * (1 + 1e-6)).all()
    got = store.gather_rows(slots.view(1, n)).view(n, dim + rope).double().numpy()
    assert np.array_equal(got, np.concatenate([vals, rope_vals], axis=1).astype(np.float32).astype(np.float64))


def test_cpu_decoding_table_equals_torch_conversion_for_every_finite_code():
    codes = torch.arange(256, dtype=torch.uint8)
    finite = ~codes.view(FP8).float().isnan()
    store = Fp8Rows(1, 4, 0, torch.float32, "cpu")
    assert torch.equal(store._table[finite.nonzero()[:, 0]], codes[finite].view(FP8).float())
    assert torch.equal(torch.tensor(_e4m3(codes[finite].numpy()), dtype=torch.float32), codes[finite].view(FP8).float())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=8, max_size=8), st.integers(-20, 20))
def test_quantisation_error_is_bounded_for_any_values(vals, exp):
    x = torch.tensor(vals, dtype=torch.float32)[None] * 2.0 ** exp
    q, s = quantize_tiles(x)
    back = q.float() * s[:, :, None].reshape(1, 1)
    assert q.float().abs().max() <= 448 and not q.float().isnan().any()
    err = (back.double() - x.double()).abs()
    assert (err <= torch.maximum(x.double().abs() * 2.0 ** -4, s.double() * 2.0 ** -10) * (1 + 1e-6)).all()


def _round_trip_writes(monkeypatch):
    """Make an fp32 ("auto") cache store exactly what the FP8 cache holds, dequantised: latents and indexer keys
    quantised and decoded by a throwaway FP8 store."""
    real_write = PagedCacheView.write

    def round_trip(values, rope=None):
        n = values.shape[0]
        store = Fp8Rows(n, values.shape[-1], 0 if rope is None else rope.shape[-1], torch.float32, "cpu")
        store.write(torch.arange(n), values, rope)
        return store.gather_rows(torch.arange(n))

    def write(self, layer, slot_mapping, c_kv, k_pe, k_idx):
        rows = round_trip(c_kv, k_pe)
        r = c_kv.shape[-1]
        real_write(self, layer, slot_mapping, rows[:, :r], rows[:, r:], None if k_idx is None else round_trip(k_idx))

    monkeypatch.setattr(PagedCacheView, "write", write)


@pytest.mark.parametrize("spec", [0, 2])
def test_engine_with_fp8_cache_equals_fp32_cache_of_round_tripped_rows(monkeypatch, spec):
    # prompts longer than the indexer's top-k (8): DSA's sparse selection runs over the FP8 indexer keys
    model = make_model(seed=5)
    assert model.config.index_head_dim == 16
    ps = [{"prompt_token_ids": p} for p in prompts([40, 70, 5, 23], seed=2)]
    sp = SamplingParams(temperature=0, max_tokens=10, logprobs=2)
    fp8 = LLM(model, kv_cache_dtype="fp8", num_speculative_tokens=spec).generate(ps, sp, use_tqdm=False)
    assert isinstance(LLM(model, kv_cache_dtype="fp8").engine.kv_cache.latent[0], Fp8Rows)
    with monkeypatch.context() as m:
        _round_trip_writes(m)
        ref = LLM(model, num_speculative_tokens=spec).generate(ps, sp, use_tqdm=False)
    for a, b in zip(fp8, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def test_fp8_cache_stays_close_to_the_model_and_holds_more_tokens():
    model = make_model(seed=6)
    p = prompts([120], seed=3)[0]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    budget = 1 << 20
    exact, fp8 = LLM(model, kv_cache_memory=budget), LLM(model, kv_cache_memory=budget, kv_cache_dtype="fp8")
    # nano (kv_lora 32, rope 8, indexer 16): (32 + 4 + 16) + (16 + 4) bytes per token and layer, not 4 · (32 + 8 + 16)
    nb_fp8, nb_exact = fp8.engine.block_manager.num_blocks, exact.engine.block_manager.num_blocks
    layers = model.config.num_hidden_layers
    assert nb_fp8 == budget // (16 * layers * 72) and nb_exact == budget // (16 * layers * 224)
    assert fp8.engine.kv_cache.nbytes() <= budget and nb_fp8 >= 3 * nb_exact
    a = exact.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0].prompt_logprobs
    b = fp8.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0].prompt_logprobs
    da = np.array([next(iter(x.values())) for x in a[1:]])
    db = np.array([next(iter(x.values())) for x in b[1:]])
    assert not np.array_equal(da, db)  # it is quantised
    assert np.abs(da - db).max() < 0.05 * np.abs(da).mean()


def test_fp8_cache_rejects_widths_it_cannot_lay_out():
    with pytest.raises(ValueError, match="divisible by 4"):
        Fp8Rows(4, 30, 8, torch.float32, "cpu")
    for name in ("glm5-nano", "glm5-tiny", "glm5-small"):  # every preset can use it
        cfg = preset(name)
        assert cfg.kv_lora_rank % 4 == 0 and cfg.index_head_dim % 4 == 0
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(make_model(), kv_cache_dtype="fp16")


@pytest.mark.parametrize("dim", [512, 32])
def test_stored_codes_are_the_once_rounded_e4m3_of_each_value_over_its_tile_scale(dim):
    """Each stored byte is round-to-nearest-even e4m3 of x / scale (the float32 quotient rounded once: no detour
    through bf16, which rounds twice), and an all-zero tile stores zero codes with a positive finite scale (a zero
    scale would store 0/0 = NaN codes; the CPU decoding table hides them, the GPU's float8 conversion does not)."""
    g = torch.Generator().manual_seed(1)
    n = 9
    x = torch.randn(n, dim, generator=g) * 4
    x[0, :8] = torch.tensor([448.0, 1.0625, 1.1875, 1.0625 + 2 ** -10, -1.0625 - 2 ** -10, 0.01, -300.0, 0.0])
    x[1] = 0.0  # all-zero tiles
    store = Fp8Rows(n, dim, 0, torch.float32, "cpu")
    store.write(torch.arange(n), x)
    raw = store.data.numpy()
    t = dim // 128 if dim % 128 == 0 else 1
    scales = raw[:, dim:dim + 4 * t].copy().view(np.float32)  # [n,t] float32, as stored
    assert (scales > 0).all() and np.isfinite(scales).all()
    quotient = x.numpy().reshape(n, t, dim // t) / scales[..., None]  # float32 / float32, as the writer divides
    want = e4m3_round(torch.from_numpy(quotient)).numpy().reshape(n, dim)
    assert np.array_equal(_e4m3(raw[:, :dim]), want)
    assert (raw[1, :dim] & 0x7F == 0).all()  # zero codes (either sign), not NaN (0x7F / 0xFF)
    # row 0's first tile has amax 448 -> scale 1, so its values are rounded as they are: 1.0625 is midway between 1
    # and 1.125 (tie -> even: 1), 1.0625 + 2^-10 just above it (-> 1.125; a bf16 detour gives 1), 0.01 subnormal
    assert scales[0, 0] == 1.0
    assert np.array_equal(_e4m3(raw[0, :8]), [448.0, 1.0, 1.25, 1.125, -1.125, 5 * 2.0 ** -9, -288.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_decode_path_and_bf16_rows_equal_the_cpu_table_decode(dtype):
    """The decode without the CPU lookup table (the path CUDA stores take) and decoding into a bf16 model's rows give
    the table's fp32 values (cast once to the row dtype): both apply the same per-tile scales."""
    g = torch.Generator().manual_seed(2)
    n, dim, rope = 11, 256, 16
    x = torch.randn(n, dim, generator=g) * torch.logspace(-2, 2, n)[:, None]
    pe = torch.randn(n, rope, generator=g)
    ref = Fp8Rows(n, dim, rope, torch.float32, "cpu")
    ref.write(torch.arange(n), x, pe)
    want = ref.gather_rows(torch.arange(n))
    store = Fp8Rows(n, dim, rope, dtype, "cpu")
    store.write(torch.arange(n), x, pe)
    assert torch.equal(store.gather_rows(torch.arange(n)), want.to(dtype))
    store._table = None  # what a CUDA store has: torch's own float8 -> float conversion
    assert torch.equal(store.gather_rows(torch.arange(n)), want.to(dtype))
