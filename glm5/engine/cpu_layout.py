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

The LM head is the one weight that gets a second copy. At 2 rows and more (a batch, MTP verification, the last
tokens of several prompts) MKL multiplies a wide head poorly: glm5-small's 32768 × 512 head takes 15 ms at 16 rows,
3× its arithmetic at this core's speed, against 3 ms for one row. oneDNN, given the weight pre-packed into its own
blocked format, takes 6.4 ms. So where timing shows that on this machine, ``PackedHead`` keeps a packed copy (the
head's size again in memory) for products of 2 rows and more; one row keeps the plain weight, which is fastest
for a single row. The copy is made again whenever the weight changes (its storage or version counter: the
engine's weight loading copies in place, see glm5/model/weights.py) and dropped by ``sleep(level=2)``.
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

__all__ = ["tune_linear_layouts", "packed_head", "PackedHead", "DECODE_ROWS", "decisions_path",
           "machine_fingerprint"]

log = logging.getLogger(__name__)

DECODE_ROWS = (1, 4)  # batch-1 decode, and a 4-token MTP verification / small batch
FLUSH_BYTES = 64 << 20  # larger than the last-level cache: each timing starts with the weight out of cache
MIN_GAIN = 1.05  # switch only for a clear win: timing noise must not flip layouts back and forth
PACK_ROWS = (4, 16)  # a small batch or an MTP verification, and a larger batch: the head's products at >= 2 rows
PACK_MIN_BYTES = 4 << 20  # below a few MB oneDNN's fixed cost per call (~50 µs here) exceeds what it saves
# (table, shape, threads) -> the table's first label won, for this process (mirrors the file). Tables:
# "layouts" (column-major faster at decode's rows) and "packed_head" (oneDNN's packed head faster at >= 2 rows).
_CHOICE: dict[tuple, bool] = {}
_LABELS = {"layouts": ("column", "row"), "packed_head": ("packed", "plain")}


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


def _onednn_packing() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _pack(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] fp32 -> oneDNN's blocked copy of it (an opaque ``torch._mkldnn`` tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACK_ROWS[-1])


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _packed_wins(shape: tuple[int, int], repeats: int) -> bool:
    """Is oneDNN's packed product faster than the better of MKL's two layouts, at PACK_ROWS?"""
    flush = torch.empty(FLUSH_BYTES // 4)
    w = torch.randn(shape)
    wc = w.t().contiguous().t()
    packed = _pack(w)
    plain = pk = 0.0
    for r in PACK_ROWS:
        x = torch.randn(r, shape[1])
        F.linear(x, w), F.linear(x, wc), _packed_linear(x, packed)
        plain += min(_best_time(lambda: F.linear(x, w), flush, repeats),
                     _best_time(lambda: F.linear(x, wc), flush, repeats))
        pk += _best_time(lambda: _packed_linear(x, packed), flush, repeats)
    return plain > MIN_GAIN * pk


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


def _decide(table: str, shapes: list[tuple[int, int]], threads: int, repeats: int) -> None:
    """Fill ``_CHOICE`` for ``shapes`` in ``table``: from the machine's file where it has them, else by timing
    (recorded)."""
    missing = [s for s in shapes if (table, s, threads) not in _CHOICE]
    path = decisions_path() if missing else None
    wins = _column_major_wins if table == "layouts" else _packed_wins  # looked up now: tests replace them
    yes, no = _LABELS[table]
    if path is not None:
        try:
            with _locked(path):
                data = _read(path)
                fp = machine_fingerprint()
                mine = data.get(fp)
                if not isinstance(mine, dict):
                    mine = data[fp] = {"cpu": _cpu_model(), "torch": torch.__version__}
                if not isinstance(mine.get(table), dict):
                    mine[table] = {}
                decided, timed = mine[table], False
                for s in missing:
                    key = _key(s, threads)
                    if decided.get(key) not in (yes, no):
                        decided[key] = yes if wins(s, repeats) else no
                        timed = True
                    _CHOICE[table, s, threads] = decided[key] == yes
                if timed:
                    _write(path, data)
        except OSError as e:  # a read-only home, say: decide for this process, as before the file existed
            log.warning("CPU layout decisions not persisted (%s): %s", path, e)
    for s in missing:  # no file (``off``), or it could not be used
        if (table, s, threads) not in _CHOICE:
            _CHOICE[table, s, threads] = wins(s, repeats)


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
    _decide("layouts", shapes, threads, repeats)
    layout = {shape: "column" if _CHOICE["layouts", shape, threads] else "row" for shape in shapes}
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


class PackedHead:
    """The LM head (an ``nn.Linear`` without bias): products of 2 rows and more through oneDNN's pre-packed copy of
    the weight, one row through the module itself (see the module docstring). Inference only."""

    def __init__(self, linear: torch.nn.Linear):
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < 2 * x.shape[-1]:  # one row: the plain weight is fastest (and the same bits as before)
            return self.linear(x)
        return self._packed(x)

    @torch.compiler.disable  # the packed weight is opaque to tracing: a compiled decode step breaks here
    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        key = (w.data_ptr(), w._version, tuple(w.shape), w.stride())
        cached = self.linear.__dict__.get("_packed_onednn")
        if cached is None or cached[0] != key:  # first use, or new weights (copied in place: the version moved)
            self.linear.__dict__.pop("_packed_onednn", None)  # free the stale copy before packing the new one
            cached = (key, _pack(w))
            self.linear.__dict__["_packed_onednn"] = cached
        return _packed_linear(x, cached[1])


def packed_head(model: torch.nn.Module, repeats: int = 3) -> PackedHead | None:
    """``PackedHead(model.lm_head)`` where timing shows oneDNN's packed product faster on this machine (decided once
    per machine, as the layouts are), else None. Only for a plain fp32 CPU head of at least PACK_MIN_BYTES, and not
    under tensor parallelism (its head gathers the ranks' shards in a forward hook), nor for a weight made under
    ``torch.inference_mode`` (it has no version counter to tell when it changes)."""
    head = getattr(model, "lm_head", None)
    tp = getattr(model, "tensor_parallel", None)
    if (type(head) is not torch.nn.Linear or head.bias is not None or head.weight.device.type != "cpu"
            or head.weight.dtype != torch.float32 or (tp is not None and tp.world > 1) or not _onednn_packing()
            or head.weight.numel() * 4 < PACK_MIN_BYTES or head.weight.is_inference()):
        return None
    shape = tuple(head.weight.shape)
    threads = torch.get_num_threads()
    _decide("packed_head", [shape], threads, repeats)
    if not _CHOICE["packed_head", shape, threads]:
        return None
    log.info("CPU LM head: %dx%d pre-packed for oneDNN at >= 2 rows", *shape)
    return PackedHead(head)
