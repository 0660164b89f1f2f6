"""In-place weight loading into a built model: how new weights reach a running engine (RL weight pushes, a server's
weight update, a wake-up from ``sleep(level=2)``).

The tensors are copied into the model's own storage (``copy_`` into its state_dict views), never swapped for new
ones: an engine holds references to that storage (CUDA graphs, the CPU weight layouts of
glm5/engine/cpu_layout.py), and ``copy_`` bumps the version counters that cached FP8 dequantisations
(glm5/model/mla.py) and the sleep mode's reload check key on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from glm5.model.tensor_parallel import shard_dim, shard_weight

__all__ = ["load_weights"]


@torch.no_grad()
def load_weights(model: torch.nn.Module, named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 strict: bool = True, sharded: bool = False) -> int:
    """Copy tensors into ``model``'s parameters/buffers in place. Returns the number of tensors copied. ``named``
    holds whole tensors (a mapping, or (name, tensor) pairs as vLLM's ``load_weights`` takes); a tensor-parallel
    model (``apply_tensor_parallel``) takes its rank's slice of each, so every rank can read the same full weights.
    ``strict``: every tensor of the model must be given, and nothing else. ``sharded``: the tensors already are this
    rank's slices (read from the checkpoint by its own rank), copied as they are. Every name and shape is checked
    before the first copy, so a bad set of weights raises and leaves the model as it was."""
    items = list(named.items() if isinstance(named, Mapping) else named)
    own = model.state_dict()
    tp = None if sharded else getattr(model, "tensor_parallel", None)
    plan = []
    for name, t in items:
        if name not in own:
            if strict:
                raise KeyError(f"unexpected weight {name!r}")
            continue
        shape = _shard_shape(name, tuple(t.shape), tp)
        if tuple(own[name].shape) != shape:
            raise ValueError(f"{name}: shape {shape} != {tuple(own[name].shape)}")
        plan.append((name, t))
    if strict:
        missing = sorted(set(own) - {name for name, _ in items})
        if missing:
            raise KeyError(f"missing weights, e.g. {missing[:5]}")
    for name, t in plan:  # sliced one at a time: a rank never holds a second copy of its whole shard
        dst = own[name]
        dst.copy_(shard_weight(name, t, tp).to(device=dst.device, dtype=dst.dtype))
    return len(plan)


def _shard_shape(name: str, shape: tuple[int, ...], tp) -> tuple[int, ...]:
    """The shape of ``shard_weight(name, <a tensor of shape>, tp)``, without slicing anything."""
    dim = None if tp is None or tp.world == 1 else shard_dim(name, tp.expert_parallel)
    if dim is None:
        return shape
    return shape[:dim] + (shape[dim] // tp.world,) + shape[dim + 1:]
