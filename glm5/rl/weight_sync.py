"""Version-stamped weight flow trainer -> rollout engine.

Every push carries a monotonically increasing version (the trainer's optimiser-step count). The rollout side
records the version it holds and stamps it into every sample it generates (``Sample.weight_versions``), which
is what the staleness filter and the metrics read.

Transports (same ``push(model, version)`` / ``poll()`` shape):

* :class:`InProcessWeightSync`: trainer and engine in one process: copy the state dict into the engine's model.
* :class:`SharedMemoryWeightSync` (single box, several processes; the default): the trainer owns a shared-memory
  copy of the state dict (``Tensor.share_memory_()``), a shared version counter and a lock; the rollout process
  gets the same storage at spawn time and, between engine steps, copies a newer version into its engine.
  Nothing is serialised: one memcpy on each side.
* :class:`DistWeightSender` / :class:`DistWeightReceiver` (across processes or machines): a dedicated
  torch.distributed process group (gloo on CPU, NCCL on GPUs) built from its own TCPStore, so it coexists
  with a trainer's FSDP group. A push broadcasts a header [version, number of tensors, layout hash] and then
  the tensors flattened into dtype-homogeneous buckets of at most ``bucket_bytes`` (slime's bucketed
  broadcast); receivers unflatten into their engine's model. The layout hash (names, shapes, dtypes) makes a
  mismatched model fail loudly instead of loading garbage.

Every transport carries whole tensors; a tensor-parallel engine rank keeps its slice of each (:func:`load_weights`),
so one push serves every rank of a rollout worker with ``rollout_tp`` > 1 (``glm5.rl.rollout_tp``).

On the engine side, :func:`apply_to_engine` loads weights in place with ``LLMEngine.load_weights`` (which also
drops the prefix cache: its blocks hold latents computed by the old weights) and stamps the version.
``load_weights`` (``glm5.model.weights``) and ``shard_weight`` (``glm5.model.tensor_parallel``) live with the model
and are re-exported here for the transports and their tests.
"""

from __future__ import annotations

import datetime
import zlib
from collections.abc import Mapping

import torch

from glm5.model.tensor_parallel import shard_weight
from glm5.model.weights import load_weights

__all__ = ["clone_model", "named_weights", "shard_weight", "full_layout", "load_weights", "apply_to_engine", "layout_hash",
           "InProcessWeightSync", "SharedMemoryWeightSync", "DistWeightSender", "DistWeightReceiver", "free_port"]


@torch.no_grad()
def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy of a GLM5ForCausalLM (fresh modules + state dict; safe after training, unlike
    ``copy.deepcopy``, which trips over cached non-leaf tensors such as the MoE router statistics)."""
    new = type(model)(model.config)
    p = next(model.parameters())
    new.to(device=p.device, dtype=p.dtype)
    new.load_state_dict(model.state_dict())
    return new.train(model.training)


def named_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything the engine needs: parameters and buffers (router correction biases), detached."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def full_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> a tensor of the shape the trainer sends: the model's own tensors, or for a tensor-parallel shard
    meta tensors of the whole (unsplit) shapes, so a receiver sizes its buffers and layout hash like the sender."""
    from glm5.model.tensor_parallel import shard_dim

    own = named_weights(model)
    tp = getattr(model, "tensor_parallel", None)
    if tp is None or tp.world == 1:
        return own
    out = {}
    for k, v in own.items():
        shape = list(v.shape)
        dim = shard_dim(k, tp.expert_parallel)
        if dim is not None:
            shape[dim] *= tp.world
        out[k] = torch.empty(shape, dtype=v.dtype, device="meta")
    return out


def apply_to_engine(engine, named, version: int) -> None:
    """Load weights into an engine in place and stamp its version."""
    if hasattr(engine, "load_weights"):  # LLMEngine: the weights, then its prefix cache
        engine.load_weights(named)
    else:  # anything else holding a ``model`` (a bare receiver in tests)
        load_weights(engine.model, named)
    engine.weight_version = int(version)


def layout_hash(named: Mapping[str, torch.Tensor], wire_dtype: torch.dtype = torch.float32) -> int:
    """CRC of names, shapes and the wire dtype (both ends must agree on all three)."""
    h = zlib.crc32(str(wire_dtype).encode())
    for k in sorted(named):
        h = zlib.crc32(f"{k}:{tuple(named[k].shape)}".encode(), h)
    return h


# ---------------------------------------------------------------------------------------- in process
class InProcessWeightSync:
    """Trainer and engine share a process: ``push`` copies straight into the engine."""

    def __init__(self, engine):
        self.engine = engine
        self.version = getattr(engine, "weight_version", 0)

    def push(self, model: torch.nn.Module, version: int) -> None:
        apply_to_engine(self.engine, named_weights(model), version)
        self.version = version


# -------------------------------------------------------------------------------------- shared memory
class SharedMemoryWeightSync:
    """Shared-memory state dict + version counter. Create it in the trainer process from the policy model, hand
    it to the rollout process (picklable by torch.multiprocessing), ``push`` on one side, ``poll`` on the other."""

    def __init__(self, model: torch.nn.Module, version: int = 0, ctx=None):
        import torch.multiprocessing as mp

        ctx = ctx or mp.get_context("spawn")
        self.tensors = {k: v.detach().clone().share_memory_() for k, v in model.state_dict().items()}
        self._version = ctx.Value("q", int(version), lock=False)
        self._lock = ctx.Lock()
        self.local_version = int(version)  # rollout side: what its engine holds

    @property
    def version(self) -> int:
        return int(self._version.value)

    @torch.no_grad()
    def push(self, model: torch.nn.Module, version: int) -> None:
        with self._lock:
            for k, v in model.state_dict().items():
                self.tensors[k].copy_(v.detach())
            self._version.value = int(version)

    def poll(self, engine) -> int | None:
        """Rollout side: load a newer version into ``engine`` if there is one; returns it (else None)."""
        if self._version.value <= self.local_version:
            return None
        with self._lock:
            v = int(self._version.value)
            apply_to_engine(engine, self.tensors, v)
        self.local_version = v
        return v


# ------------------------------------------------------------------------------------ torch.distributed
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


def _broadcast(pg, t: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([t], opts).wait()


def _buckets(names: list[str], named: Mapping[str, torch.Tensor], bucket_bytes: int,
             wire_dtype: torch.dtype) -> list[list[str]]:
    """Consecutive names grouped into buckets of at most ``bucket_bytes`` on the wire (one tensor may exceed it)."""
    item = torch.empty((), dtype=wire_dtype).element_size()
    out, cur, size = [], [], 0
    for k in names:
        nb = named[k].numel() * item
        if cur and size + nb > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    if cur:
        out.append(cur)
    return out


class DistWeightSender:
    """Trainer side (rank 0 of a dedicated group). ``push`` must be matched by ``recv`` on every receiver."""

    def __init__(self, host: str, port: int, world_size: int, backend: str = "gloo", bucket_bytes: int = 512 << 20,
                 timeout_s: float = 300.0, device: str | torch.device = "cpu", wire_dtype: torch.dtype = torch.float32):
        self.pg = _make_group(host, port, 0, world_size, backend, timeout_s)
        self.bucket_bytes = bucket_bytes
        self.wire_dtype = wire_dtype
        self.device = torch.device(device)
        self.version = 0

    @torch.no_grad()
    def push(self, model: torch.nn.Module, version: int) -> None:
        named = named_weights(model)
        names = sorted(named)
        header = torch.tensor([int(version), len(names), layout_hash(named, self.wire_dtype)], dtype=torch.int64,
                              device=self.device)
        _broadcast(self.pg, header)
        for bucket in _buckets(names, named, self.bucket_bytes, self.wire_dtype):
            flat = torch.cat([named[k].reshape(-1).to(device=self.device, dtype=self.wire_dtype) for k in bucket])
            _broadcast(self.pg, flat)
        self.version = version


class DistWeightReceiver:
    """Rollout side (rank ≥ 1). ``recv(engine)`` blocks until the matching ``push`` and loads the weights."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 300.0, device: str | torch.device = "cpu", bucket_bytes: int = 512 << 20,
                 wire_dtype: torch.dtype = torch.float32):
        if rank < 1:
            raise ValueError("receivers have rank >= 1 (rank 0 is the trainer)")
        self.pg = _make_group(host, port, rank, world_size, backend, timeout_s)
        self.device = torch.device(device)
        self.bucket_bytes = bucket_bytes
        self.wire_dtype = wire_dtype
        self.local_version = 0

    @torch.no_grad()
    def recv(self, engine) -> int:
        own = full_layout(engine.model)  # a tensor-parallel rank receives whole tensors and keeps its slice
        names = sorted(own)
        header = torch.zeros(3, dtype=torch.int64, device=self.device)
        _broadcast(self.pg, header)
        version, n, h = (int(x) for x in header.tolist())
        mine = layout_hash(own, self.wire_dtype)
        if n != len(names) or h != mine:
            raise RuntimeError(f"weight layout mismatch: sender has {n} tensors (hash {h}), engine {len(names)} "
                               f"(hash {mine})")
        received: dict[str, torch.Tensor] = {}
        for bucket in _buckets(names, own, self.bucket_bytes, self.wire_dtype):
            numel = sum(own[k].numel() for k in bucket)
            flat = torch.empty(numel, dtype=self.wire_dtype, device=self.device)
            _broadcast(self.pg, flat)
            off = 0
            for k in bucket:
                m = own[k].numel()
                received[k] = flat[off:off + m].view(own[k].shape)
                off += m
        apply_to_engine(engine, received, version)
        self.local_version = version
        return version
