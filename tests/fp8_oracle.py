"""The float8_e4m3fn value grid and round-to-nearest-even onto it, written from the format's bit fields: the
independent oracle the FP8 weight and KV-cache tests compare the quantisers with."""

import torch

E4M3_MAX = 448.0


def e4m3_grid() -> torch.Tensor:
    """The 127 non-negative finite float8_e4m3fn values, in code order (which is increasing order), from the bit
    fields: 4 exponent bits with bias 7 (exponent 0: subnormals), 3 mantissa bits; code 0x7F is NaN."""
    codes = torch.arange(0x7F, dtype=torch.float64)
    e, m = codes // 8, codes % 8
    return torch.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """v rounded once to the nearest e4m3 value, ties to the even code (even mantissa), saturating at ±448
    (float64)."""
    grid = e4m3_grid()
    a = v.double().abs().clamp(max=E4M3_MAX)
    hi = torch.searchsorted(grid, a).clamp(max=len(grid) - 1)  # first grid value >= a
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return torch.where(up, grid[hi], grid[lo]) * v.double().sign()
