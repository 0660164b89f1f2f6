"""CPU decode: keep each linear weight in the memory layout that this CPU's BLAS multiplies fastest at few rows.

``nn.Linear`` computes x·Wᵀ with W stored [out, in] row by row, which BLAS receives as a transposed B operand.
On the development box (AMD EPYC, MKL 2024.2, fp32, one thread) the weights of a decode step are streamed
from memory. There, the same product with W stored column by column (B not transposed) is up to 2.3× faster
at 1 row and 1.1–1.5× faster at 4 rows. From a few hundred rows up (prefill, training) the two layouts are
equal (benchmarks/engine.md §1). It is not a general rule: glm5-small's 32768 × 512 head is slower
column-major from 4 rows up, and other CPUs and BLAS builds differ. So each distinct weight shape is timed
both ways at decode's row counts, and switched only where that is clearly faster.

Only the strides change (``W.t().contiguous().t()``); the logical shape and every value stay. Modules,
weight sync (``copy_`` into the parameter), the checkpoint writer (it makes tensors contiguous) and autograd
therefore work unchanged. Decisions are cached per (shape, threads) for the process, so repeated engines
pay the timing once.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

__all__ = ["tune_linear_layouts", "DECODE_ROWS"]

log = logging.getLogger(__name__)

DECODE_ROWS = (1, 4)  # batch-1 decode, and a 4-token MTP verification / small batch
FLUSH_BYTES = 64 << 20  # larger than the last-level cache: each timing starts with the weight out of cache
MIN_GAIN = 1.05  # switch only for a clear win: timing noise must not flip layouts back and forth
_CHOICE: dict[tuple, bool] = {}  # (shape, threads) -> column-major is faster


def _best_time(fn, flush: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        flush.add_(1.0)  # evict the weight: decode reads every weight once per step, from memory
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _column_major_wins(shape: tuple[int, int], repeats: int) -> bool:
    flush = torch.empty(FLUSH_BYTES // 4)
    w = torch.randn(shape)
    wc = w.t().contiguous().t()  # same [out, in] tensor, stored column by column
    row = col = 0.0
    for r in DECODE_ROWS:
        x = torch.randn(r, shape[1])
        F.linear(x, w), F.linear(x, wc)  # first-call overheads out of the way
        row += _best_time(lambda: F.linear(x, w), flush, repeats)
        col += _best_time(lambda: F.linear(x, wc), flush, repeats)
    return row > MIN_GAIN * col


@torch.no_grad()
def tune_linear_layouts(model: torch.nn.Module, repeats: int = 3, agree=None) -> dict[tuple[int, int], str]:
    """Store the fp32 CPU ``nn.Linear`` weights of ``model`` column-major wherever that is faster at decode's
    row counts. Weights shared with an embedding (tied heads) keep their rows: lookups gather rows.
    ``agree``: {shape: layout} -> the layouts to use (tensor-parallel ranks take rank 0's, since a layout can change
    the last bit of a product and replicated modules must compute identically everywhere).
    Returns {weight shape: "column" | "row"}."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    threads = torch.get_num_threads()
    layout = {}
    for shape in sorted({tuple(m.weight.shape) for m in linears}):
        key = (shape, threads)
        if key not in _CHOICE:
            _CHOICE[key] = _column_major_wins(shape, repeats)
        layout[shape] = "column" if _CHOICE[key] else "row"
    if agree is not None:
        layout = agree(layout)
    switched = 0
    for m in linears:
        w = m.weight
        if layout[tuple(w.shape)] == "column" and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
            switched += 1
    log.info("CPU weight layout: %d of %d linear weights column-major (%s)", switched, len(linears),
             ", ".join(f"{a}x{b}" for (a, b), v in layout.items() if v == "column") or "none")
    return layout
