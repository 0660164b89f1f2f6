"""Process-group set-up and the wrappers applied to a plain model from outside (torchtitan style):
FSDP2 (``fully_shard`` per decoder layer, then the root), activation checkpointing and ``torch.compile``.

Launch with ``torchrun --nproc_per_node N -m glm5.cli train ...`` (or ``glm5 train`` under torchrun). The
backend is NCCL when CUDA is available, gloo otherwise; the code path is the same. On GPU even a single
process runs through FSDP2 (a one-rank process group), so bf16 mixed precision (bf16 compute, fp32 master
weights and gradient reduction) is the same ``MixedPrecisionPolicy`` for one GPU and many. On CPU a single
process trains a plain fp32 model.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "apply_fsdp", "apply_activation_checkpointing", "apply_compile",
           "all_reduce", "barrier", "is_fsdp"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process (data is sharded across ranks)."""
        return self.world_size > 1

    @property
    def use_fsdp(self) -> bool:
        """Wrap the model with FSDP2: several processes, or any GPU run (bf16 mixed precision)."""
        return self.world_size > 1 or self.device.type == "cuda"


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    elif use_cuda:
        backend = "nccl"
        if not dist.is_initialized():  # a one-rank group, so one GPU runs the same FSDP2 path as many
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(rank, world, local_rank, local_world, dev, backend)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def apply_fsdp(model, info: DistInfo, mixed_precision: bool = False) -> None:
    """Shard every decoder layer (the MTP block too), then the root (embeddings, final norm, LM head).

    The MTP block is called through ``MTPLayer.step`` rather than ``forward``, so that method is registered
    with FSDP to get the same all-gather / reshard hooks; its ``shared_head.norm`` runs after ``step``
    returns, so it is a (tiny) unit of its own. The embeddings and LM head belong to the root, whose
    parameters FSDP keeps unsharded from its forward until backward, so MTP steps after the main forward
    can use them. ``mixed_precision``: bf16 compute, fp32 gradient
    reduction (GPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kw = {"mesh": mesh}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    n_main = model.config.num_hidden_layers
    for i, layer in enumerate(model.model.layers):
        if i >= n_main:
            fully_shard(layer.shared_head.norm, **kw)
        fully_shard(layer, **kw)
        if i >= n_main:
            register_fsdp_forward_method(layer, "step")
    fully_shard(model, **kw)


def apply_activation_checkpointing(model) -> None:
    """Recompute each main decoder layer in backward (non-reentrant ``torch.utils.checkpoint``). The state
    dict is unchanged: only the layer's ``forward`` is wrapped."""
    from torch.utils.checkpoint import checkpoint

    cfg = model.config
    if any(t == "shared" for t in cfg.layer_indexer_types):
        raise ValueError("activation checkpointing is not supported with 'shared' indexer layers: recomputation "
                         "in backward order would read another layer's top-k")
    for layer in model.model.layers[: cfg.num_hidden_layers]:
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def apply_compile(model) -> None:
    """``torch.compile`` the attention and MLP blocks of every main decoder layer in place (names and state dict
    unchanged). On CPU the routed experts stay eager (only the shared expert of a MoE block is compiled):
    ``torch._grouped_mm``'s CPU fake-tensor kernel only accepts bf16, so the fp32 experts cannot be traced. On
    CUDA the whole MoE block is compiled, routing included (its shapes are static: no host syncs)."""
    from glm5.model.moe import MoE

    on_cuda = next(model.parameters()).device.type == "cuda"
    for layer in model.model.layers[: model.config.num_hidden_layers]:
        layer.self_attn.compile(dynamic=False)
        if isinstance(layer.mlp, MoE) and not on_cuda:
            if layer.mlp.shared_experts is not None:
                layer.mlp.shared_experts.compile(dynamic=False)
        else:
            layer.mlp.compile(dynamic=False)
