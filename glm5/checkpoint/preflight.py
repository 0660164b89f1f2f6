"""Check a checkpoint directory against the model its config describes, from the shard headers alone.

``load_pretrained`` calls :func:`check_checkpoint` on the meta-device model before allocating anything, so a
checkpoint that cannot load fails in a second with one line naming the file and the tensor, instead of after
(or while) gigabytes are allocated and copied, and never loads silently wrong. It refuses:

* a ``quantization_config`` other than GLM-5-FP8's (``quant_method: fp8``, 128×128 blocks);
* a tensor stored in two shards (which copy wins would be arbitrary);
* a tensor whose shape differs from the config's, or whose dtype is not floating point (an integer tensor
  would be cast to float without complaint);
* FP8 inconsistencies: a float8 weight without its ``weight_scale_inv``, a scale whose weight is not float8
  (the scale would be ignored or applied to unscaled values), a scale of the wrong block grid, and for
  ``fp8="keep"`` a float8 format other than e4m3 (it would be re-cast without its scale);
* with ``strict``, missing and unexpected tensors (all of them counted, the first few named).

The MTP block (layer ``num_hidden_layers``) is skipped, not refused, when the config has
``num_nextn_predict_layers: 0``: transformers and vLLM load GLM-5 without it the same way.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from glm5.checkpoint.fp8 import BLOCK, scale_shape
from glm5.checkpoint.safetensors_io import CheckpointError, TensorInfo, inventory
from glm5.config import GLM5Config

log = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def fp8_block_size(cfg: GLM5Config) -> int:
    """The FP8 block size from ``quantization_config`` (128 when absent); anything but GLM-5-FP8's is refused."""
    q = cfg.extra.get("quantization_config")
    if q is None:
        return BLOCK
    if not isinstance(q, dict):
        raise CheckpointError(f"config.json: quantization_config must be an object, got {q!r}")
    method = q.get("quant_method", "fp8")
    if method != "fp8":
        raise CheckpointError(f"config.json: quantization_config.quant_method {method!r} is not supported "
                              "(glm5 loads BF16/FP16/FP32 and GLM-5-FP8 block-scaled float8 checkpoints)")
    block = q.get("weight_block_size", [BLOCK, BLOCK])
    if list(block) != [BLOCK, BLOCK]:
        raise CheckpointError(f"config.json: quantization_config.weight_block_size {block!r} is not supported "
                              f"(GLM-5-FP8 uses [{BLOCK}, {BLOCK}])")
    return BLOCK


def _summary(what: str, keys: list[str]) -> str:
    return f"{what} {len(keys)} tensor(s): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"


def _check_scale(key: str, info: TensorInfo, inv: dict[str, TensorInfo], block: int) -> None:
    weight = key[: -len("_scale_inv")]
    w = inv.get(weight)
    where = f"{key} in {info.file.name}"
    if w is None:
        raise CheckpointError(f"{where}: a block scale without its weight {weight}")
    if w.dtype not in FP8_DTYPES:
        raise CheckpointError(f"{where}: {weight} is stored as {str(w.dtype).removeprefix('torch.')}, not float8, "
                              "so it is not clear whether the scale applies")
    if not info.dtype.is_floating_point or info.dtype in FP8_DTYPES:
        raise CheckpointError(f"{where}: dtype {str(info.dtype).removeprefix('torch.')}, expected float32")
    want = scale_shape(w.shape, block)
    if info.shape != want:
        raise CheckpointError(f"{where}: shape {info.shape}, expected {want} for the {w.shape} weight in "
                              f"{block}x{block} blocks")


def check_checkpoint(path: str | os.PathLike, cfg: GLM5Config, state_dict: dict[str, torch.Tensor],
                     fp8: str = "dequantize", strict: bool = True) -> set[str]:
    """Validate the checkpoint in ``path`` against ``state_dict`` (a meta-device model's, fused experts);
    returns the checkpoint keys the loader must skip (the MTP block when the config disables it)."""
    from glm5.checkpoint.hf import param_to_file_items  # hf imports this module

    path = Path(path)
    block = fp8_block_size(cfg)
    inv = inventory(path)
    expected = {key: tuple(view.shape) for name, t in state_dict.items()
                for key, view in param_to_file_items(name, t, cfg.moe_intermediate_size)}
    skip = set()
    if cfg.num_nextn_predict_layers == 0:
        skip = {k for k in inv if (m := _LAYER.match(k)) and int(m[1]) >= cfg.num_hidden_layers}
        if skip:
            log.info("%s: skipping the %d tensors of the MTP layer (num_nextn_predict_layers is 0)", path, len(skip))
    unexpected = []
    for key, info in inv.items():
        if key in skip:
            continue
        if key.endswith("_scale_inv"):
            _check_scale(key, info, inv, block)
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        where = f"{key} in {info.file.name}"
        if info.shape != expected[key]:
            raise CheckpointError(f"{where}: shape {info.shape}, the config expects {expected[key]}")
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{where}: dtype {str(info.dtype).removeprefix('torch.')}, expected a "
                                  "floating-point tensor")
        if info.dtype in FP8_DTYPES:
            if key + "_scale_inv" not in inv:
                raise CheckpointError(f"{where} is float8 but {key}_scale_inv is missing")
            if fp8 == "keep" and info.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"{where} is {str(info.dtype).removeprefix('torch.')}; fp8='keep' holds "
                                      "float8_e4m3fn weights only (load with fp8='dequantize')")
    missing = [k for k in expected if k not in inv]
    if strict and (missing or unexpected):
        parts = ([_summary("missing", missing)] if missing else []) + (
            [_summary("unexpected", unexpected)] if unexpected else [])
        raise CheckpointError(f"{path}: " + "; ".join(parts))
    return skip
