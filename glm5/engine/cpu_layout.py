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
therefore work unchanged.

A layout can change the last bit of a product (BLAS sums in another order), so two processes that chose
differently compute slightly different logits from the same weights: a run resumed after kill -9, or the rollout
processes of one RL run, would then disagree with each other in log-probs. Decisions are therefore kept per
machine, not per process: in ``$GLM5_CPU_LAYOUT_CACHE`` (default ``$GLM5_CACHE/cpu_layout.json``, i.e.
``~/.cache/glm5/cpu_layout.json``; ``off`` keeps them in the process only), keyed by a fingerprint of the CPU and
the torch/BLAS build, then by (shape, threads). The first process to meet a shape times it while holding the
file's lock, so a second one started at the same moment waits and reads the same answer. Delete the file to
re-time (after a BIOS or kernel change, say).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glm5.config import default_cache_dir

try:  # POSIX; elsewhere concurrent first timings may both write (the last one wins, each process stays consistent)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["tune_linear_layouts", "DECODE_ROWS", "decisions_path", "machine_fingerprint"]

log = logging.getLogger(__name__)

DECODE_ROWS = (1, 4)  # batch-1 decode, and a 4-token MTP verification / small batch
FLUSH_BYTES = 64 << 20  # larger than the last-level cache: each timing starts with the weight out of cache
MIN_GAIN = 1.05  # switch only for a clear win: timing noise must not flip layouts back and forth
_CHOICE: dict[tuple, bool] = {}  # (shape, threads) -> column-major is faster, for this process (mirrors the file)


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


def decisions_path() -> Path | None:
    """The file that holds this machine's decisions, or None when ``GLM5_CPU_LAYOUT_CACHE=off``."""
    env = os.environ.get("GLM5_CPU_LAYOUT_CACHE")
    if env is not None and env.strip().lower() in ("off", "0", "none", ""):
        return None
    return Path(env) if env else Path(default_cache_dir()) / "cpu_layout.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_fingerprint() -> str:
    """What the timings depend on: the CPU model, its core count, and torch's build (version, BLAS, flags)."""
    parts = [_cpu_model(), str(os.cpu_count()), torch.__version__, torch.__config__.show()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _key(shape: tuple[int, int], threads: int) -> str:
    return f"{shape[0]}x{shape[1]}@{threads}"


@contextlib.contextmanager
def _locked(path: Path):
    """Hold ``path``'s sidecar lock file (exclusive) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged file is re-timed and rewritten, never trusted
        log.warning("ignoring unreadable CPU layout decisions %s (%s); timing again", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _decide(shapes: list[tuple[int, int]], threads: int, repeats: int) -> None:
    """Fill ``_CHOICE`` for ``shapes``: from the machine's file where it has them, else by timing (recorded)."""
    missing = [s for s in shapes if (s, threads) not in _CHOICE]
    path = decisions_path() if missing else None
    if path is not None:
        try:
            with _locked(path):
                data = _read(path)
                fp = machine_fingerprint()
                mine = data.get(fp)
                if not isinstance(mine, dict) or not isinstance(mine.get("layouts"), dict):
                    mine = data[fp] = {"cpu": _cpu_model(), "torch": torch.__version__, "layouts": {}}
                layouts, timed = mine["layouts"], False
                for s in missing:
                    key = _key(s, threads)
                    if layouts.get(key) not in ("column", "row"):
                        layouts[key] = "column" if _column_major_wins(s, repeats) else "row"
                        timed = True
                    _CHOICE[s, threads] = layouts[key] == "column"
                if timed:
                    _write(path, data)
        except OSError as e:  # a read-only home, say: decide for this process, as before the file existed
            log.warning("CPU layout decisions not persisted (%s): %s", path, e)
    for s in missing:  # no file (``off``), or it could not be used
        if (s, threads) not in _CHOICE:
            _CHOICE[s, threads] = _column_major_wins(s, repeats)


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
    shapes = sorted({tuple(m.weight.shape) for m in linears})
    _decide(shapes, threads, repeats)
    layout = {shape: "column" if _CHOICE[shape, threads] else "row" for shape in shapes}
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
